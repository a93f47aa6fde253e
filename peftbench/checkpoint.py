"""Checkpoints: a rerun of an interrupted run resumes from the last one and ends exactly where an uninterrupted
run ends (bit-identical on CPU).

A checkpoint holds only what training changes, so a PEFT run's checkpoint is small (full fine-tuning's holds
every weight, since every weight is trainable):
  trainable.safetensors  the trainable parameters (adapter, biases, head, ...)
  best.safetensors       the trainable parameters of the best evaluation, when that is not this step
  state.pt               optimizer, scheduler (and fp16 scaler) state, torch / CUDA RNG states, and the data
                         generator's state at the start of the current epoch
  progress.json          step, epoch, micro-batches of the epoch already consumed, counters, losses, evals, the
                         best evaluation, python / numpy RNG states
The data position is replayed, not stored as indices: reset the generator to the epoch's start, draw the
epoch's order again, skip the batches already consumed.

Atomic: everything is written into a temp folder next to `checkpoint/`, then swapped in with two renames;
the previous checkpoint is removed only after the new one is in place. A crash at any moment leaves a
complete `checkpoint/` or a complete `checkpoint.old/` (which `load` falls back to), never a half-written one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from peftbench.errors import UserError, disk_full_is_user_error
from peftbench.faults import kill_point
from peftbench.parallel import load_optimizer_state, load_state, optimizer_state, trainable_state


@dataclass
class Progress:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch (0-based)
    batch: int = 0  # micro-batches of the current epoch already consumed
    tokens: int = 0
    samples: int = 0
    train_s: float = 0.0
    eval_s: float = 0.0
    losses: list[float] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    best: dict | None = None
    best_step: int | None = None


@dataclass
class Resume:
    progress: Progress
    trainable: dict[str, torch.Tensor]
    best: dict[str, torch.Tensor] | None
    state: dict[str, Any]  # optimizer, scheduler, scaler, data, torch_rng, cuda_rng
    rng: dict[str, Any]  # python, numpy
    path: Path


def rng_states() -> tuple[dict[str, Any], dict[str, Any]]:
    """(JSON-able python / numpy states, tensor states of torch / CUDA)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    portable = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), pos, has_gauss, cached],
    }
    tensors = {"torch_rng": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda_rng"] = torch.cuda.get_rng_state_all()
    return portable, tensors


def set_rng_states(r: Resume) -> None:
    version, internal, gauss = r.rng["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = r.rng["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(r.state["torch_rng"])
    if "cuda_rng" in r.state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(r.state["cuda_rng"])


def save(
    folder: Path,
    progress: Progress,
    trainable: dict[str, torch.Tensor],
    best: dict[str, torch.Tensor] | None,
    state: dict[str, Any],
    meta: dict[str, Any],
) -> int:
    """Write a checkpoint atomically; return its size in bytes."""
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file(_cpu(trainable), str(tmp / "trainable.safetensors"))
        kill_point("checkpoint", progress.step)  # tests: die with some files written, before the rename
        if best is not None and progress.best_step != progress.step:
            save_file(_cpu(best), str(tmp / "best.safetensors"))
        portable, tensors = rng_states()
        with open(tmp / "state.pt", "wb") as f:
            torch.save({**state, **tensors}, f)
        (tmp / "progress.json").write_text(
            json.dumps({**meta, "rng": portable, "progress": asdict(progress)})
        )
        for p in tmp.iterdir():
            _fsync(p)
        replace_dir(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return size(folder)


def load(folder: Path, meta: dict[str, Any]) -> Resume | None:
    """The last complete checkpoint, or None. `meta` must match what was saved (same run, same data)."""
    path = next((p for p in (folder, _old(folder)) if (p / "progress.json").is_file()), None)
    if path is None:
        return None
    fix = f"delete {folder} (or rerun with train.force=true) to start over"
    try:
        saved = json.loads((path / "progress.json").read_text())
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
        trainable = load_file(str(path / "trainable.safetensors"))
        best_file = path / "best.safetensors"
        best = load_file(str(best_file)) if best_file.is_file() else None
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(f"checkpoint {path} is unreadable ({type(e).__name__}); {fix}") from None
    for key, value in meta.items():
        if saved.get(key) != value:
            raise UserError(
                f"checkpoint {path} has {key}={saved.get(key)!r} but this run has {value!r}; {fix}"
            )
    progress = Progress(**saved["progress"])
    if best is None and progress.best_step == progress.step:
        best = trainable
    return Resume(progress, trainable, best, state, saved["rng"], path)


def replace_dir(tmp: Path, final: Path) -> None:
    """Swap a complete folder in for `final`; the old one is moved aside first and removed last."""
    old = _old(final)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)  # a leftover: `final` is complete, so `old` is not needed
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def clear(folder: Path) -> None:
    """Remove a checkpoint, its fallback and any temp folders left by killed writers."""
    for p in [folder, _old(folder), *folder.parent.glob(f".{folder.name}.tmp-*")]:
        shutil.rmtree(p, ignore_errors=True)


def clean_temp(folder: Path) -> None:
    for p in folder.parent.glob(f".{folder.name}.tmp-*"):
        shutil.rmtree(p, ignore_errors=True)


def size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _old(folder: Path) -> Path:
    return folder.with_name(folder.name + ".old")


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Checkpointer:
    """When to checkpoint (train.checkpoint_every: epoch | N optimizer steps | null) and what goes in."""

    def __init__(self, folder: Path, every, n_batches: int, acc, opt, sched, generator):
        self.folder, self.every, self.n_batches = folder, every, n_batches
        self.acc, self.opt, self.sched, self.generator = acc, opt, sched, generator
        self.meta: dict[str, Any] = {}
        self.saved, self.bytes = 0, None

    def due(self, p: Progress) -> bool:
        if self.every is None:
            return False
        if self.every == "epoch":
            return p.batch == self.n_batches
        return p.step % int(self.every) == 0

    def save(self, p: Progress, model: torch.nn.Module, best_state, epoch_start: torch.Tensor) -> None:
        at_end = p.batch == self.n_batches  # store "next epoch, batch 0": nothing to replay on resume
        saved = replace(p, epoch=p.epoch + 1, batch=0) if at_end else p
        state = {
            "optimizer": optimizer_state(model, self.opt),  # every process takes part (FSDP gathers)
            "scheduler": self.sched.state_dict(),
            "data": self.generator.get_state() if at_end else epoch_start,
        }
        if self.acc.scaler is not None:
            state["scaler"] = self.acc.scaler.state_dict()
        trained = trainable_state(model)
        if not self.acc.is_main_process:
            return
        keeps = "the previous checkpoint is kept and the rerun resumes from it"
        with disk_full_is_user_error(f"the checkpoint of step {p.step} to {self.folder}", keeps):
            self.bytes = save(self.folder, saved, trained, best_state, state, self.meta)
        self.saved += 1

    def load(self, model: torch.nn.Module) -> Resume | None:
        resume = load(self.folder, self.meta)
        if resume is None:
            return None
        load_trainable(model, resume.trainable, resume.path)
        load_optimizer_state(model, self.opt, resume.state["optimizer"])
        self.sched.load_state_dict(resume.state["scheduler"])
        if self.acc.scaler is not None and "scaler" in resume.state:
            self.acc.scaler.load_state_dict(resume.state["scaler"])
        self.generator.set_state(resume.state["data"])
        return resume


def load_trainable(model: torch.nn.Module, state: dict[str, torch.Tensor], where: Path) -> None:
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    if names != set(state):
        raise UserError(
            f"checkpoint {where} holds other trainable parameters than this run's model; delete it (or rerun "
            "with train.force=true) to start over"
        )
    load_state(model, state)
