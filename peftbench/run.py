"""The one recipe: load -> apply method -> train -> evaluate -> record.

Read it top to bottom: `execute` is what `peftbench train` runs for each point of a sweep. The loop is a
plain accelerate loop (no Trainer), so losses, evaluation, timing and memory are all visible here.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import random
import shutil
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator, DataLoaderConfiguration, PartialState
from accelerate.utils import broadcast_object_list
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from peftbench import checkpoint
from peftbench import metrics as M
from peftbench.checkpoint import Progress, Resume, set_rng_states
from peftbench.cost import add_training, static_cost
from peftbench.data import Batcher, LengthGroupedBatches, encode, feature_length
from peftbench.env import (
    determinism,
    device_info,
    git_sha,
    peak_flops,
    peak_memory_mib,
    reset_peak_memory,
    versions,
)
from peftbench.errors import UserError, choice_error, disk_full_is_user_error
from peftbench.faults import kill_point
from peftbench.generation import GenerationBatcher, decode_all, encode_eval, encode_train
from peftbench.lock import RunLock, describe, try_lock
from peftbench.methods import apply_method, finish, save_trainable, stored_count
from peftbench.models import count, family, load_model, span_head, transformer_blocks, uses_lm
from peftbench.parallel import (
    full_model_state,
    load_optimizer_state,
    load_state,
    optimizer_state,
    reshard,
    shard,
    sharded,
    trainable_state,
)
from peftbench.prompting import (
    SEQUENCE_METHODS,
    RankBatcher,
    anchored,
    base_model,
    content_free_prior,
    demonstration_text,
    demonstrations,
    encode_prompted,
    inner,
)
from peftbench.record import check_writable, read_record, run_id, write_atomic, write_record
from peftbench.span import SpanBatcher, best_answers, encode_spans, pad_tokens
from peftbench.tasks import TaskData, load_task
from peftbench.tasks.classification import shot_seed
from peftbench.validate import OPTIMIZERS, validate


def execute(cfg: DictConfig) -> dict[str, Any]:
    """Run one config to one record. A finished run is skipped (unless train.force); a run that another
    process holds (its lock) is skipped or waited for; an interrupted run resumes from its last checkpoint."""
    validate(cfg)
    out_dir = Path(cfg.paths.results) / cfg.name
    rid = run_id(cfg)
    path = out_dir / f"{rid}.json"
    state = PartialState(cpu=on_cpu(cfg.train))  # torchrun / accelerate launch: one process per device
    if state.num_processes > 1:
        return execute_data_parallel(cfg, state, rid, path)
    if not cfg.train.force and (done := finished(path)):
        return done
    check_writable(out_dir)
    lock_path = out_dir / f"{rid}.lock"
    lock = acquire_lock(lock_path, cfg.train)
    if lock is None:
        print(f"[peftbench] skip {rid}: running in {describe(lock_path)} (lock {lock_path})")
        return read_record(path) if path.exists() else {"run_id": rid, "status": "running"}
    try:
        if not cfg.train.force and (done := finished(path)):  # it finished while we waited for the lock
            return done
        with sigterm_as_interrupt():
            return run_locked(cfg, rid, path)
    finally:
        lock.release()


def on_cpu(t: DictConfig) -> bool:
    return t.device == "cpu" or (t.device == "auto" and not torch.cuda.is_available())


def execute_data_parallel(cfg: DictConfig, state: PartialState, rid: str, path: Path) -> dict[str, Any]:
    """Data parallel over the launched processes: the main process decides (finished, held by another
    process, or to run), takes the lock and writes the record; every process trains on its share of each
    batch and evaluates its share of the rows (gathered in order for the metrics)."""
    n = state.num_processes
    for key in ("batch_size", "eval_batch_size"):
        if int(cfg.train[key]) % n:
            raise UserError(
                f"train.{key}={cfg.train[key]} with {n} processes: each batch is split over the processes, "
                f"so it must be a multiple of {n}"
            )
    lock, plan = None, ["run"]
    if state.is_main_process:
        if not cfg.train.force and finished(path):
            plan = ["done"]
        else:
            check_writable(path.parent)
            lock_path = path.with_suffix(".lock")
            lock = acquire_lock(lock_path, cfg.train)
            if lock is None:
                print(f"[peftbench] skip {rid}: running in {describe(lock_path)} (lock {lock_path})")
                plan = ["busy"]
    broadcast_object_list(plan)
    try:
        if plan[0] != "run":
            return read_record(path) if path.exists() else {"run_id": rid, "status": "running"}
        with sigterm_as_interrupt():
            return run_locked(cfg, rid, path)
    finally:
        if lock is not None:
            lock.release()


def finished(path: Path) -> dict[str, Any] | None:
    try:
        old = read_record(path)
    except (OSError, ValueError):  # no record yet, or not one of ours: this run writes it
        return None
    if old.get("status") == "finished":
        print(f"[peftbench] skip {old['run_id']}: finished record {path}")
        return old
    return None


def acquire_lock(path: Path, t: DictConfig) -> RunLock | None:
    """The run's lock; while another live process holds it, wait up to train.lock_wait_s, then give up."""
    deadline = time.monotonic() + float(t.lock_wait_s or 0)
    while (lock := try_lock(path, float(t.lock_stale_s))) is None:
        if time.monotonic() >= deadline:
            return None
        time.sleep(min(2.0, max(0.1, deadline - time.monotonic())))
    return lock


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (a scheduler's preemption, `kill`) ends the run as interrupted, with the record written."""

    def handler(signum, frame):
        raise KeyboardInterrupt("SIGTERM")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (some launchers): leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_locked(cfg: DictConfig, rid: str, path: Path) -> dict[str, Any]:
    """Train, evaluate and record one run. With several processes only the main one writes (record,
    checkpoints, adapter, predictions); the others pass `path=None` down."""
    state = PartialState()
    artifacts = path.parent / rid
    if state.is_main_process:
        if cfg.train.force:
            checkpoint.clear(artifacts / "checkpoint")  # a forced rerun starts from scratch
        else:
            checkpoint.clean_temp(artifacts / "checkpoint")  # half-written by a killed process
    state.wait_for_everyone()  # nobody reads the checkpoint before it is cleared
    if not state.is_main_process:
        path = None
    record = new_record(cfg, rid)
    save_record(path, record)
    t_start = time.perf_counter()
    try:
        train_and_evaluate(cfg, record, artifacts, path)
        record["status"] = "finished"
    except KeyboardInterrupt as e:
        record.update(status="interrupted", error=f"KeyboardInterrupt {e}".strip())
        raise
    except torch.OutOfMemoryError:
        record.update(status="failed", error="out of memory")
        raise UserError(
            f"out of memory at train.batch_size={cfg.train.batch_size}; lower it and raise train.grad_accum "
            f"(now {cfg.train.grad_accum}) to keep the effective batch"
        ) from None
    except UserError as e:
        record.update(status="failed", error=str(e))
        raise
    except Exception as e:
        record.update(status="failed", error=f"{type(e).__name__}: {e}")
        raise
    finally:
        record["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        record["wall_s"] = round(time.perf_counter() - t_start, 2)
        try:
            save_record(path, record)
        except UserError:
            if record["status"] == "finished":
                raise
            # already failing: the first error is the one to report
    if path is not None:
        checkpoint.clear(artifacts / "checkpoint")  # the record is final; the checkpoint has done its job
        print(
            f"[peftbench] {rid}: best {record['main_metric']}={record['best']['metrics'][record['main_metric']]:.2f} -> {path}"
        )
    return record


def save_record(path: Path | None, record: dict[str, Any]) -> None:
    if path is None:  # not the main process
        return
    with disk_full_is_user_error(
        f"the record {path}", "the last checkpoint is kept and the rerun resumes from it"
    ):
        write_record(path, record)


def new_record(cfg: DictConfig, rid: str) -> dict[str, Any]:
    return {
        "run_id": rid,
        "experiment": cfg.name,
        "row": cfg.get("row"),
        "status": "running",
        "error": None,
        "method": cfg.method.name,
        "model": cfg.model.name,
        "task": cfg.task.name,
        "seed": int(cfg.seed),
        "main_metric": cfg.task.main_metric,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "versions": versions(),
        "git_sha": git_sha(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "checkpoint": {"every": cfg.train.checkpoint_every},
    }


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Setup:
    model: torch.nn.Module
    task: TaskData
    train_loader: DataLoader
    eval_loader: DataLoader
    batcher: Batcher
    generator: torch.Generator  # draws the train order; its state at an epoch's start fixes that epoch
    demos: list[dict]  # in-context demonstrations (prompt format, method=icl)
    test_loader: DataLoader | None = None  # unlabelled test rows to predict (train.predict_test)
    artifacts: Path | None = None  # the run's folder (generated outputs of each evaluation go there)
    n_evals: int = 0
    gather: Any = None  # the processes' shares of an evaluation batch, in order (accelerate)
    main: bool = True  # the process that writes (the only one without data parallelism)
    blocks: tuple[str, ...] = ()  # the model's transformer blocks (torch.compile and FSDP units)
    encode: Any = None  # rows -> evaluation features (the task's transfer sets go through it too)


def prepare(cfg: DictConfig, record: dict[str, Any], artifacts: Path | None = None) -> Setup:
    """Data and model, with the method applied; parameter counts go into the record."""
    seed_everything(cfg.seed)
    if cfg.train.num_threads:
        torch.set_num_threads(int(cfg.train.num_threads))
    task = load_task(cfg.task, seed=int(cfg.seed), max_train=cfg.train.max_train_samples)
    lm, span = uses_lm(cfg), span_head(cfg)
    fam = family(cfg.model, lm, span)
    kind = "span" if span else task.kind
    model, tokenizer = load_model(cfg.model, kind, max(1, len(task.label_names)), lm=lm)
    if cfg.train.gradient_checkpointing:  # keep only the blocks' inputs; recompute the rest in backward
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = apply_method(model, cfg.method, fam)
    if cfg.train.compile:
        compile_blocks(model, fam, cfg.train.compile)
    counts = count(model, fam.head)
    counts["trainable_percent"] = 100.0 * counts["trainable_without_head"] / counts["total_without_head"]
    record["params"] = counts
    validation = task.validation[: cfg.train.max_eval_samples or None]
    demos: list[dict] = []
    if span:  # extractive QA on an encoder: start / end logits over the context's windows (span.py)
        batcher = SpanBatcher(tokenizer)
        train = encode_spans(task.train, cfg.task, tokenizer)

        def enc(rows):
            return encode_spans(rows, cfg.task, tokenizer)
    elif task.kind == "generation":  # data-to-text: train on targets, evaluate by decoding (generation.py)
        batcher = GenerationBatcher(tokenizer, fam.kind, cfg.task)
        train = encode_train(task.train, cfg.task, tokenizer, fam.kind)
        if cfg.train.max_eval_samples:  # evenly spaced inputs: WebNLG's test lists seen before unseen
            step = max(1, len(task.validation) // int(cfg.train.max_eval_samples))
            validation = task.validation[::step][: int(cfg.train.max_eval_samples)]
        validation = sorted(validation, key=lambda r: -len(r["source"]))  # less padding; scored by idx

        def enc(rows):
            return encode_eval(rows, cfg.task, tokenizer, fam.kind)
    elif lm:
        if cfg.method.get("shots") is not None:  # in-context learning: k solved rows before every input
            demos = demonstrations(task.train, cfg.method, int(cfg.seed))
            task.train = []
            record["demonstrations"] = [d["idx"] for d in demos]
        share = bool(cfg.train.share_context) and cfg.method.name not in SEQUENCE_METHODS
        # a decoder under gradient checkpointing returns no key/value cache while training
        share = share and not (cfg.train.gradient_checkpointing and fam.kind == "decoder")
        batcher = RankBatcher(tokenizer, fam.kind, cfg.train, share_context=share)
        slots = anchored(cfg)  # P-tuning's [P] slots in the template
        train = encode_prompted(task.train, cfg.task, tokenizer, fam.kind, anchored=slots)

        def enc(rows):
            return encode_prompted(rows, cfg.task, tokenizer, fam.kind, demos, anchored=slots)
    else:
        batcher = Batcher(tokenizer, task.kind)
        train = encode(task.train, cfg.task, tokenizer)

        def enc(rows):
            return encode(rows, cfg.task, tokenizer)

    evals = enc(validation)
    test_loader = None
    if cfg.train.predict_test:
        if not task.test:
            raise UserError(f"train.predict_test=true but task {cfg.task.name} has no unlabelled test split")
        test = enc(task.test[: cfg.train.max_test_samples or None])
        test_loader = DataLoader(test, cfg.train.eval_batch_size, shuffle=False, collate_fn=batcher)
    generator = torch.Generator().manual_seed(int(cfg.seed))
    if cfg.train.group_by_length:
        sampler = LengthGroupedBatches([feature_length(f) for f in train], cfg.train.batch_size, generator)
        train_loader = DataLoader(train, batch_sampler=sampler, collate_fn=batcher)
    else:
        train_loader = DataLoader(
            train, cfg.train.batch_size, shuffle=True, generator=generator, collate_fn=batcher
        )
    eval_loader = DataLoader(evals, cfg.train.eval_batch_size, shuffle=False, collate_fn=batcher)
    record["data"] = {"sources": task.sources, "n_train": len(train), "n_eval": len(evals), **task.notes}
    stored = (
        stored_count(model, counts["trainable_without_head"])
        + counts["trainable"]
        - counts["trainable_without_head"]
    )
    demo_text = demonstration_text(cfg.task, demos) if cfg.method.get("shots") is not None else None
    seq2seq = lm and fam.kind == "encoder-decoder"
    tokens_of = batcher.tokens if isinstance(batcher, RankBatcher) else None
    record["cost"] = static_cost(model, counts["total"], stored, train, evals, seq2seq, demo_text, tokens_of)
    if cfg.task.get("n_shot") or cfg.task.get("shots_from"):  # which few-shot rows, reproducibly
        record["data"].update(
            shots_from=cfg.task.get("shots_from"),
            shot_seed=shot_seed(cfg.task, int(cfg.seed)),
            train_ids=[r["idx"] for r in task.train],
        )
    return Setup(
        model,
        task,
        train_loader,
        eval_loader,
        batcher,
        generator,
        demos,
        test_loader,
        artifacts,
        blocks=fam.blocks,
        encode=enc,
    )


def compile_blocks(model: torch.nn.Module, fam, backend: str) -> None:
    """torch.compile each transformer block in place ("regional compilation"): the blocks are where the
    FLOPs are, they compile once and are reused, and the code around them (heads, hooks that pick the scored
    positions, key/value caches) stays eager Python."""
    for block in transformer_blocks(base_model(model), fam.blocks):
        block.compile(backend=backend)


def train_and_evaluate(cfg: DictConfig, record: dict[str, Any], artifacts: Path, record_path: Path) -> None:
    t = cfg.train
    s = prepare(cfg, record, artifacts)
    acc = Accelerator(
        mixed_precision=t.mixed_precision,
        gradient_accumulation_steps=t.grad_accum,
        cpu=on_cpu(t),
        # data parallel: every batch of train.batch_size is split over the processes, so the global batch,
        # the steps and the schedule are those of one process
        dataloader_config=DataLoaderConfiguration(split_batches=True),
    )
    s.gather, s.main = acc.gather_for_metrics, acc.is_main_process
    record["device"] = device_info(acc.device)
    record["device"].update(processes=acc.num_processes, distributed=str(acc.distributed_type.value))
    record["determinism"] = determinism(acc.device)
    if t.fsdp:  # sharded over the processes (parallel.py); accelerate then prepares all but the model
        if acc.num_processes < 2:
            raise UserError(
                "train.fsdp=true shards the model over the processes of torchrun / accelerate "
                "launch; this run has 1 (launch it with --nproc_per_node N, N >= 2)"
            )
        shard(s.model, s.blocks, acc.device, t.mixed_precision)
        s.batcher.synced = True  # generate: every process steps until all are done (FSDP gathers per step)
    params = [p for p in s.model.parameters() if p.requires_grad]
    if not params or t.max_steps == 0:  # nothing trains (ICL), or a baseline of the model as loaded
        return evaluate_only(cfg, record, s, acc)
    opt = make_optimizer(params, t)
    n_batches = len(s.train_loader)
    steps_per_epoch = math.ceil(n_batches / t.grad_accum)
    total_steps = int(t.max_steps) if t.max_steps else steps_per_epoch * int(t.epochs)
    sched = get_linear_schedule_with_warmup(opt, int(t.warmup_ratio * total_steps), total_steps)
    if t.fsdp:
        model = s.model
        opt, train_loader, eval_loader, sched = acc.prepare(opt, s.train_loader, s.eval_loader, sched)
    else:
        model, opt, train_loader, eval_loader, sched = acc.prepare(
            s.model, opt, s.train_loader, s.eval_loader, sched
        )
    eval_every = steps_per_epoch if t.eval_every == "epoch" else int(t.eval_every)
    ckpt = Checkpointer(artifacts / "checkpoint", t.checkpoint_every, n_batches, acc, opt, sched, s.generator)
    ckpt.meta = {"run_id": record["run_id"], "n_batches": n_batches, "total_steps": total_steps}
    p, best_state, resume = Progress(), None, ckpt.load(acc.unwrap_model(model))
    if resume:
        p, best_state = resume.progress, resume.best
        record["checkpoint"]["resumed_from_step"] = p.step
        print(f"[peftbench] resume from step {p.step} (epoch {p.epoch}, batch {p.batch}): {resume.path}")

    reset_peak_memory(acc.device)
    bar = tqdm(
        total=total_steps, initial=p.step, desc=record["run_id"][:40], disable=not t.progress, leave=False
    )
    t_prev = time.perf_counter()  # train time counts data loading + step, not evaluation
    while p.step < total_steps:
        epoch_start = s.generator.get_state()  # the data order of this epoch follows from it
        batches = iter(train_loader)
        for _ in range(p.batch):  # resumed mid-epoch: replay the order, skip what was trained on
            next(batches)
        if resume:  # RNG states as they were at the checkpoint (after this epoch's order was drawn)
            set_rng_states(resume)
            resume = None
        model.train()
        for batch in batches:
            with acc.accumulate(model):
                loss = s.batcher.loss(model, batch)
                acc.backward(loss)
                if acc.sync_gradients:
                    acc.clip_grad_norm_(params, t.max_grad_norm)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
            p.batch += 1
            counts = torch.tensor(
                [int(batch["attention_mask"].sum()), len(batch["labels"])], device=acc.device
            )
            tokens, samples = acc.reduce(counts, "sum").tolist()  # all processes' shares of the batch
            p.tokens, p.samples = p.tokens + tokens, p.samples + samples
            if not acc.sync_gradients:
                continue
            p.step += 1
            p.losses.append(round(acc.reduce(loss.detach(), "mean").item(), 5))
            now = time.perf_counter()
            p.train_s += now - t_prev
            bar.update(1)
            if p.step % t.log_every == 0:
                bar.set_postfix(loss=f"{np.mean(p.losses[-t.log_every :]):.4f}")
            kill_point("step", p.step)
            if p.step % eval_every == 0 or p.step == total_steps:
                t1 = time.perf_counter()
                if track(p, evaluate(model, eval_loader, s, cfg), cfg, total_steps, steps_per_epoch):
                    best_state = trainable_state(acc.unwrap_model(model))
                p.eval_s += time.perf_counter() - t1
                model.train()
            if p.step >= total_steps:
                break
            if ckpt.due(p):
                ckpt.save(p, acc.unwrap_model(model), best_state, epoch_start)
                record.update(evals=p.evals, best=p.best)  # the record keeps the evaluations so far
                save_record(record_path, record)
                acc.wait_for_everyone()  # a rerun of any process resumes from the same checkpoint
            t_prev = time.perf_counter()
        else:
            p.epoch, p.batch = p.epoch + 1, 0
    bar.close()
    finish_record(cfg, record, acc, p, steps_per_epoch)
    record["checkpoint"].update(saved=ckpt.saved, bytes=ckpt.bytes)  # bytes: the last checkpoint's size
    model = acc.unwrap_model(model)
    load_state(model, best_state)
    if t.save_adapter:
        full = trainable_state(model) if sharded(model) else None  # every process takes part
        if s.main:
            record["adapter"] = save_adapter(model, artifacts / "adapter", full)
    if cfg.method.get("merge"):
        model = finish(model)
        record["final"] = evaluate(model, eval_loader, s, cfg)
        record["final"]["merged"] = True
    evaluate_transfer(model, s, cfg, acc, record)
    if s.test_loader is not None:  # with the weights the record reports (best, merged)
        record["test_predictions"] = predict_test(model, acc.prepare(s.test_loader), s)
    if t.export_model:
        full = full_model_state(model)  # every process takes part
        if s.main:
            record["export"] = export_model(model, Path(t.export_model), record, full)


def export_model(
    model: torch.nn.Module, folder: Path, record: dict[str, Any], state: dict[str, torch.Tensor] | None = None
) -> dict[str, Any]:
    """The trained model as a transformers checkpoint (LoRA / IA3 merged into the weights), loadable as
    `model.path=FOLDER`: e.g. a base that later PEFT runs adapt. export.json says which run made it."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp, state_dict=state)
        made_by = {k: record[k] for k in ("run_id", "method", "model", "task", "seed", "best")}
        (tmp / "export.json").write_text(json.dumps(made_by, indent=2) + "\n")

    write_folder(folder, fill, f"the exported model {folder}", "the record and adapter are kept")
    return {"path": str(folder), "bytes": checkpoint.size(folder)}


def write_folder(folder: Path, fill, what: str, kept: str):
    """Fill a temporary sibling of `folder`, then swap it in atomically (like a checkpoint); a full disk is
    one line naming `what` and what is `kept`. Returns what `fill(tmp)` returns."""
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    with disk_full_is_user_error(what, kept):
        try:
            out = fill(tmp)
            checkpoint.replace_dir(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def make_optimizer(params: list[torch.nn.Parameter], t: DictConfig) -> torch.optim.Optimizer:
    """AdamW (the GLUE papers), or Adafactor as T-Few runs it: a fixed lr, no relative step, no warmup
    init (t-few src/utils/get_optimizer.py; `adafactor_scale_parameter` is its `scale_parameter`)."""
    if t.optimizer == "adamw":
        return torch.optim.AdamW(
            params, lr=t.lr, weight_decay=t.weight_decay, betas=tuple(t.adam_betas), eps=t.adam_eps
        )
    if t.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(
            params,
            lr=t.lr,
            weight_decay=t.weight_decay,
            scale_parameter=bool(t.adafactor_scale_parameter),
            relative_step=False,
            warmup_init=False,
        )
    raise choice_error("train.optimizer", t.optimizer, OPTIMIZERS)  # validate() checks it first


def evaluate_only(cfg: DictConfig, record: dict[str, Any], s: Setup, acc: Accelerator) -> None:
    """Nothing trains (in-context learning, train.max_steps=0): one evaluation, with contextual calibration
    if asked."""
    model, eval_loader = acc.prepare(s.model, s.eval_loader)
    s.gather, s.main = acc.gather_for_metrics, acc.is_main_process
    reset_peak_memory(acc.device)
    t0 = time.perf_counter()
    if cfg.method.get("calibrate"):
        like = s.task.validation[0]
        prior = content_free_prior(model, s.batcher, cfg.task, cfg.method, s.demos, like, acc.device)
        s.batcher.prior = prior
        record["calibration"] = {"p_cf": [round(float(x), 5) for x in prior]}
    p = Progress()
    track(p, evaluate(model, eval_loader, s, cfg), cfg, 0, 1)
    p.eval_s = time.perf_counter() - t0
    finish_record(cfg, record, acc, p, 1)
    evaluate_transfer(model, s, cfg, acc, record)
    if s.test_loader is not None:
        record["test_predictions"] = predict_test(model, acc.prepare(s.test_loader), s)


def track(
    p: Progress, result: dict[str, Any], cfg: DictConfig, total_steps: int, steps_per_epoch: int
) -> bool:
    """Log an evaluation into the progress; True if it is the best so far (the caller keeps its weights)."""
    result.update(step=p.step, epoch=round(p.step / steps_per_epoch, 3))
    p.evals.append(result)
    print(
        f"[peftbench] step {p.step}/{total_steps} "
        + " ".join(f"{k}={v:.2f}" for k, v in result["metrics"].items())
    )
    main = cfg.task.main_metric
    value, best = result["metrics"][main], p.best["metrics"][main] if p.best else None
    if best is None or (value > best if M.higher_is_better(main) else value < best):
        p.best, p.best_step = result, p.step
        return True
    return False


def finish_record(
    cfg: DictConfig, record: dict[str, Any], acc: Accelerator, p: Progress, steps_per_epoch: int
) -> None:
    t = cfg.train
    losses, train_time = p.losses, p.train_s
    record["evals"], record["best"] = p.evals, p.best
    add_training(record["cost"], p.samples, record["params"]["trainable"])
    record["train"] = {
        "steps": p.step,
        "epochs": round(p.step / steps_per_epoch, 3),
        "samples": p.samples,
        "tokens": p.tokens,
        "train_s": round(train_time, 3),
        "eval_s": round(p.eval_s, 3),
        "s_per_step": round(train_time / max(p.step, 1), 5),
        "tokens_per_s": round(p.tokens / max(train_time, 1e-9), 1),
        "samples_per_s": round(p.samples / max(train_time, 1e-9), 2),
        "loss_first": losses[0] if losses else None,
        "loss_last": float(np.mean(losses[-max(1, min(len(losses), t.log_every)) :])) if losses else None,
        "loss_curve": losses[:: max(1, len(losses) // 200)],
    }
    # model FLOPs utilisation: the method's training FLOPs per second of training over the devices' peak
    flops = record["cost"]["training_flops_by_pass"]["total"]
    peak, peak_what = peak_flops(acc.device, t.mixed_precision)
    record["train"]["flops_per_s"] = round(flops / train_time, 1) if train_time > 0 else None
    record["train"]["mfu"] = (
        round(flops / train_time / (peak * acc.num_processes), 5) if peak and train_time > 0 else None
    )
    record["train"]["mfu_peak"] = peak_what
    record["memory"] = {
        "peak_mib": peak_memory_mib(acc.device),
        "kind": "cuda_max_allocated" if acc.device.type == "cuda" else "cpu_max_rss",
    }


def save_adapter(model: torch.nn.Module, folder: Path, state: dict | None = None) -> dict[str, Any]:
    """The trained parameters (peft format for peft methods), swapped in atomically like a checkpoint;
    `state`: them as full tensors (FSDP)."""
    fmt = write_folder(
        folder,
        lambda tmp: save_trainable(model, tmp, state),
        f"the adapter {folder}",
        "the last checkpoint is kept and the rerun resumes from it",
    )
    return {"path": str(folder), "format": fmt, "bytes": checkpoint.size(folder)}


class Checkpointer:
    """When to checkpoint (train.checkpoint_every: epoch | N optimizer steps | null) and what goes in."""

    def __init__(self, folder: Path, every, n_batches: int, acc: Accelerator, opt, sched, generator):
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
            self.bytes = checkpoint.save(self.folder, saved, trained, best_state, state, self.meta)
        self.saved += 1

    def load(self, model: torch.nn.Module) -> Resume | None:
        resume = checkpoint.load(self.folder, self.meta)
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


def gathered(s: Setup, data):
    """Every process's share of an evaluation batch, in the loader's order (as is without parallelism)."""
    return data if s.gather is None else s.gather(data)


@torch.no_grad()
def predict_test(model: torch.nn.Module, loader: DataLoader, s: Setup) -> dict[str, Any]:
    """The unlabelled test rows' predicted label names, as `ID,Label` CSV (RAFT's submission format)."""
    model.eval()
    preds = []
    for batch in loader:
        preds += s.batcher.predict(gathered(s, s.batcher.logits(model, batch))).tolist()
    reshard(model)
    if not s.main:
        return {}
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["ID", "Label"])
    writer.writerows((f["idx"], s.task.label_names[p]) for f, p in zip(loader.dataset, preds))
    path = s.artifacts / "test_predictions.csv"
    with disk_full_is_user_error(f"the test predictions {path}", "rerun to write them"):
        write_atomic(path, buf.getvalue())
    return {"path": str(path), "rows": len(preds), "of": len(s.task.test)}


def evaluate(
    model: torch.nn.Module, loader: DataLoader, s: Setup, cfg: DictConfig, rows=None, name=None
) -> dict[str, Any]:
    """One evaluation: of the validation rows, or (`rows`, `name`) of another set of the task's rows."""
    result = evaluate_once(model, loader, s, cfg, rows, name)
    reshard(model)
    return result


@torch.no_grad()
def evaluate_once(
    model: torch.nn.Module, loader: DataLoader, s: Setup, cfg: DictConfig, rows=None, name=None
) -> dict[str, Any]:
    if name is None:
        s.n_evals += 1
    if isinstance(s.batcher, GenerationBatcher):
        texts = decode_all(inner(model), loader, s.batcher, lambda t: gathered(s, t))
        return score_outputs({f["idx"]: t for f, t in zip(loader.dataset, texts)}, s, cfg, rows, name)
    if isinstance(s.batcher, SpanBatcher):
        return evaluate_spans(model, loader, s, cfg, rows, name)
    model.eval()
    preds, refs, total_loss, n = [], [], 0.0, 0
    for batch in loader:
        logits, labels = gathered(s, (s.batcher.logits(model, batch), batch["labels"]))
        total_loss += float(s.batcher.loss_from_logits(logits, labels)) * len(labels)
        n += len(labels)
        preds += s.batcher.predict(logits).tolist()
        refs += labels.tolist()
    groups = [ex.get("group") for ex in loader.dataset] if cfg.task.get("group") else None
    values = M.compute(list(cfg.task.metrics), preds, refs, groups)
    return {"metrics": {k: round(v, 4) for k, v in values.items()}, "loss": round(total_loss / max(n, 1), 5)}


def evaluate_spans(
    model: torch.nn.Module, loader: DataLoader, s: Setup, cfg: DictConfig, rows=None, name=None
) -> dict[str, Any]:
    """Start / end logits of every window, the best span per question (span.py), scored like generated
    answers; the loss is the windows' mean start / end cross-entropy."""
    model.eval()
    width = int(cfg.task.max_length)
    logits_all: list[torch.Tensor] = []
    total_loss, n = 0.0, 0
    for batch in loader:
        logits, labels = gathered(s, (pad_tokens(s.batcher.logits(model, batch), width), batch["labels"]))
        total_loss += float(s.batcher.loss_from_logits(logits, labels)) * len(labels)
        n += len(labels)
        logits_all += list(logits.cpu())
    rows = s.task.validation if rows is None else rows
    answers = best_answers(loader.dataset, logits_all, {r["idx"]: r["context"] for r in rows}, cfg.task)
    result = score_outputs({f["idx"]: answers.get(f["idx"], "") for f in loader.dataset}, s, cfg, rows, name)
    result["loss"] = round(total_loss / max(n, 1), 5)
    return result


def score_outputs(by_idx: dict[int, str], s: Setup, cfg: DictConfig, rows=None, name=None) -> dict[str, Any]:
    """Score the outputs (input idx -> text) as the task's official evaluation does, on all inputs and per
    category (WebNLG seen / unseen), and save them: one line per input, in the split's order."""
    from peftbench.nlg_metrics import score_by_category, shared_meteor

    rows = [r for r in (s.task.validation if rows is None else rows) if r["idx"] in by_idx]
    rows.sort(key=lambda r: r["idx"])
    hyps = [by_idx[r["idx"]] for r in rows]
    result: dict[str, Any] = {"metrics": {}, "unavailable": {}}
    for group, scores in score_by_category(cfg.task.scorer, hyps, rows, shared_meteor()).items():
        suffix = "" if group == "all" else f"_{group}"
        for metric, value in scores.values.items():
            if value is None:
                result["unavailable"][metric + suffix] = scores.unavailable.get(metric, "not computed")
            else:
                result["metrics"][metric + suffix] = round(float(value), 4)
    if s.artifacts is not None and s.main:
        path = s.artifacts / "predictions" / (f"{name}.txt" if name else f"eval_{s.n_evals}.txt")
        write_atomic(path, "".join(h + "\n" for h in hyps))
        result["predictions"] = str(path)
    return result


def evaluate_transfer(model: torch.nn.Module, s: Setup, cfg: DictConfig, acc: Accelerator, record) -> None:
    """The task's transfer sets (QA: MRQA out-of-domain), zero-shot with the weights the record reports;
    their metrics join the best evaluation's as `<metric>_<set>`."""
    if not s.task.transfer:
        return
    record["transfer"] = {}
    for name, rows in s.task.transfer.items():
        rows = rows[: cfg.train.max_eval_samples or None]
        features = s.encode(sorted(rows, key=lambda r: -len(r["source"])))  # less padding; scored by idx
        loader = acc.prepare(DataLoader(features, cfg.train.eval_batch_size, collate_fn=s.batcher))
        t0 = time.perf_counter()
        result = evaluate(model, loader, s, cfg, rows, f"transfer_{name}")
        result.update(n_eval=len(rows), eval_s=round(time.perf_counter() - t0, 3))
        record["transfer"][name] = result
        print(f"[peftbench] {name}: " + " ".join(f"{k}={v:.2f}" for k, v in result["metrics"].items()))
        if record.get("best"):
            record["best"]["metrics"].update({f"{k}_{name}": v for k, v in result["metrics"].items()})
