"""The Record: one JSON file per run, named by its run id, written atomically.

A run id is fixed by the parts of the config that change results, so rerunning a finished run is a no-op
and an interrupted sweep resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from peftbench.errors import UserError, disk_full_is_user_error

# train.* settings that do not change what a run computes (where it writes, how it reports progress).
NON_SEMANTIC_TRAIN_KEYS = {
    "force",
    "progress",
    "log_every",
    "save_adapter",
    "export_model",
    "eval_batch_size",
    "checkpoint_every",  # a resumed run ends bit-identical to an uninterrupted one
    "lock_wait_s",
    "lock_stale_s",
    "report_to",  # where the run's curves are also sent
    "share_context",  # the same scores computed with one context pass for all choices (tested equal)
    "gradient_checkpointing",  # the same activations, recomputed (tested equal)
    "compile",  # the same computation, fused: equal up to float rounding (tested)
    "fsdp",  # the same updates, sharded over the processes: equal up to float rounding (tested)
}


# Settings added after records existed, with the value that computes what those runs computed: left out of
# the run id at that value, so every earlier record keeps its id (and is still skipped)
ADDED_TRAIN_DEFAULTS = {"warmup_steps": None, "schedule": "linear", "decay_bias_and_norm": True}
ADDED_METHOD_DEFAULTS = {
    "activation": "relu",
    "init": "near_identity",
    "init_std": 0.01,
    "train_lm_head": False,
    "vocab_draw": "with_replacement",
}


def run_key(cfg: DictConfig) -> dict[str, Any]:
    c = OmegaConf.to_container(cfg, resolve=True)
    train = {
        k: v
        for k, v in c["train"].items()
        if k not in NON_SEMANTIC_TRAIN_KEYS
        and not (k in ADDED_TRAIN_DEFAULTS and ADDED_TRAIN_DEFAULTS[k] == v)
    }
    method = {
        k: v
        for k, v in c["method"].items()
        if k != "description" and not (k in ADDED_METHOD_DEFAULTS and ADDED_METHOD_DEFAULTS[k] == v)
    }
    model = {k: v for k, v in c["model"].items() if k != "description"}
    task = {k: v for k, v in c["task"].items() if k != "description"}
    return {"method": method, "model": model, "task": task, "train": train, "seed": c["seed"]}


def run_id(cfg: DictConfig) -> str:
    digest = hashlib.sha1(json.dumps(run_key(cfg), sort_keys=True).encode()).hexdigest()[:10]
    return f"{cfg.task.name}__{cfg.model.name}__{cfg.method.name}__s{cfg.seed}__{digest}"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _umask()


def write_atomic(path: Path, text: str | bytes) -> None:
    """Write to a temp file in the same folder, fsync, rename: a crash leaves the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "wb" if isinstance(text, bytes) else "w"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~UMASK)  # as open() would make it (mkstemp makes 0600: unreadable to a team)
        with os.fdopen(fd, mode) as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_record(path: Path, record: dict[str, Any]) -> None:
    write_atomic(path, json.dumps(record, indent=2, sort_keys=False, default=str) + "\n")


def read_record(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def load_records(folder: Path) -> list[dict[str, Any]]:
    """Every record in a results folder (one experiment), oldest first; temp files are ignored."""
    if not folder.is_dir():
        raise UserError(
            f"no results folder {str(folder)!r}: run `peftbench train` first or pass --results DIR"
        )
    by_id: dict[str, tuple[Path, dict[str, Any]]] = {}
    for path in sorted(folder.glob("*.json")):
        try:
            record = read_record(path)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not a valid record ({e}); delete it and rerun the run") from None
        rid = record.get("run_id", str(path))
        if rid in by_id:  # a copy (e.g. "x copy.json"): one run counts once, its final record if any
            kept, other = by_id[rid], (path, record)
            if _rank(other[1]) > _rank(kept[1]):
                kept, other = other, kept
            print(
                f"[peftbench] warning: {other[0]} is another record of run {rid}; counting {kept[0]}",
                file=sys.stderr,
            )
            by_id[rid] = kept
        else:
            by_id[rid] = (path, record)
    return [record for _, record in by_id.values()]


def _rank(record: dict[str, Any]) -> tuple[bool, str]:
    """Which of two records of one run counts: a finished one, then the later."""
    return record.get("status") == "finished", str(record.get("finished_at") or "")


def check_out_file(path: Path | str, flag: str) -> Path:
    """An output file the command will write, checked before any work: not a folder, and its folder can be
    made and written (a file in the way, no permission, a read-only file system: one line)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag}={str(path)!r} is a folder; give a file path, e.g. {path / 'table.md'}")
    try:
        probe_folder(path.parent)
    except OSError as e:
        raise UserError(f"{flag}={str(path)!r}: cannot write there ({e.strerror or e})") from None
    return path


def probe_folder(folder: Path) -> None:
    """Make the folder and a file in it (removed at once): OSError if it cannot be written."""
    folder.mkdir(parents=True, exist_ok=True)
    tempfile.NamedTemporaryFile(dir=folder, prefix=".probe.", delete=True).close()


def check_writable(folder: Path, what: str = "results folder", fix: str = "set paths.results=DIR") -> None:
    try:
        probe_folder(folder)
    except OSError as e:  # a file in the way, no permission, a read-only file system
        raise UserError(f"{what} {str(folder)!r} is not writable ({e.strerror or e}); {fix}") from None


def save_record(path: Path | None, record: dict[str, Any]) -> None:
    if path is None:  # not the main process
        return
    with disk_full_is_user_error(
        f"the record {path}", "the last checkpoint is kept and the rerun resumes from it"
    ):
        write_record(path, record)
