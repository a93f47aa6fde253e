"""The training loop, readable top to bottom: a plain accelerate loop (no Trainer), so losses, evaluation,
checkpoints, timing and memory are all visible here. `train_and_evaluate` is what one run does."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator, DataLoaderConfiguration
from omegaconf import DictConfig

from peftbench.checkpoint import Checkpointer, Progress, set_rng_states
from peftbench.cost import add_training
from peftbench.env import determinism, device_info, peak_flops, peak_memory_mib, reset_peak_memory
from peftbench.errors import UserError
from peftbench.evaluate import evaluate, evaluate_transfer, predict_test, track
from peftbench.export import export_model, save_adapter
from peftbench.faults import kill_point
from peftbench.log import bar as progress_bar
from peftbench.log import flat, lines_above_bars, log, tracker_names, trackers
from peftbench.methods import finish, hook
from peftbench.optim import default_optimizer, schedule
from peftbench.parallel import full_model_state, load_state, shard, sharded, trainable_state
from peftbench.record import save_record, write_atomic
from peftbench.setup import Setup, prepare


def on_cpu(t: DictConfig) -> bool:
    return t.device == "cpu" or (t.device == "auto" and not torch.cuda.is_available())


def train_and_evaluate(cfg: DictConfig, record: dict[str, Any], artifacts: Path, record_path: Path) -> None:
    s = prepare(cfg, record, artifacts)
    acc = accelerator(cfg, s, record)
    try:
        params = [p for p in s.model.parameters() if p.requires_grad]
        # nothing trains (ICL), or a baseline of the model as loaded
        if not params or cfg.train.max_steps == 0:
            return evaluate_only(cfg, record, s, acc)
        r = Training.start(cfg, s, acc, params, artifacts, record)
        try:
            train(r, record, record_path)
        except Diverged:  # the record keeps what came before: the finite losses, the evaluations
            r.p.losses.pop()  # non-finite: the error says it (JSON has no NaN)
            finish_record(cfg, record, acc, r.p, r.steps_per_epoch)
            raise
        finish_record(cfg, record, acc, r.p, r.steps_per_epoch)
        after_training_with_best(cfg, record, s, acc, r, artifacts)
    finally:
        acc.end_training()  # the trackers' files closed (TensorBoard flushes its events)


def after_training_with_best(cfg, record: dict, s: Setup, acc: Accelerator, r: Training, artifacts: Path):
    """The checkpoint's figures, the best weights back in the model, then what follows training."""
    record["checkpoint"].update(saved=r.ckpt.saved, bytes=r.ckpt.bytes)  # bytes: the last checkpoint's size
    model = acc.unwrap_model(r.model)
    load_state(model, r.best_state)
    after_training(cfg, record, s, acc, model, r.eval_loader, artifacts)


def accelerator(cfg: DictConfig, s: Setup, record: dict[str, Any]) -> Accelerator:
    t = cfg.train
    log_with, tracker_kwargs = trackers(cfg, record["run_id"])
    acc = Accelerator(
        log_with=log_with or None,
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
    if log_with:  # train.report_to: the run's config as hyperparameters, then losses and evaluations by step
        acc.init_trackers(f"peftbench-{cfg.name}", config=flat(record["config"]), init_kwargs=tracker_kwargs)
        record["trackers"] = tracker_names(t.report_to)
    if t.fsdp:  # sharded over the processes (parallel.py); accelerate then prepares all but the model
        if acc.num_processes < 2:
            raise UserError(
                "train.fsdp=true shards the model over the processes of torchrun / accelerate "
                "launch; this run has 1 (launch it with --nproc_per_node N, N >= 2)"
            )
        shard(s.model, s.blocks, acc.device, t.mixed_precision)
        s.fmt.synced = True  # generate: every process steps until all are done (FSDP gathers per step)
    return acc


@dataclass
class Training:
    """What the loop works on: the prepared model, optimizer, schedule and loaders, and where it stands."""

    cfg: DictConfig
    s: Setup
    acc: Accelerator
    model: torch.nn.Module
    opt: Any
    sched: Any
    train_loader: Any
    eval_loader: Any
    params: list[torch.nn.Parameter]
    ckpt: Checkpointer
    total_steps: int
    steps_per_epoch: int
    eval_every: int
    p: Progress
    best_state: dict | None = None
    resume: Any = None
    adjust_loss: Any = None  # the method's hooks, looked up once
    after_step: Any = None

    @classmethod
    def start(cls, cfg, s: Setup, acc: Accelerator, params, artifacts: Path, record: dict) -> Training:
        """Optimizer, schedule and loaders through accelerate; resumed from the run's checkpoint if any."""
        t = cfg.train
        opt = (hook(cfg.method, "make_optimizer") or default_optimizer)(params, s.model, t, cfg.method)
        n_batches = len(s.train_loader)
        steps_per_epoch = math.ceil(n_batches / t.grad_accum)
        total_steps = int(t.max_steps) if t.max_steps else steps_per_epoch * int(t.epochs)
        sched = schedule(opt, t, total_steps)
        if t.fsdp:
            model = s.model
            opt, train_loader, eval_loader, sched = acc.prepare(opt, s.train_loader, s.eval_loader, sched)
        else:
            model, opt, train_loader, eval_loader, sched = acc.prepare(
                s.model, opt, s.train_loader, s.eval_loader, sched
            )
        eval_every = steps_per_epoch if t.eval_every == "epoch" else int(t.eval_every)
        ckpt = Checkpointer(
            artifacts / "checkpoint", t.checkpoint_every, n_batches, acc, opt, sched, s.generator
        )
        ckpt.meta = {
            "run_id": record["run_id"],
            "n_batches": n_batches,
            "total_steps": total_steps,
            "data_identity": record.get("data_identity"),  # a checkpoint of other data does not resume
        }
        r = cls(cfg, s, acc, model, opt, sched, train_loader, eval_loader, params, ckpt, total_steps,
                steps_per_epoch, eval_every, Progress())  # fmt: skip
        r.adjust_loss, r.after_step = hook(cfg.method, "adjust_loss"), hook(cfg.method, "after_step")
        r.resume = ckpt.load(acc.unwrap_model(model))
        if r.resume:
            r.p, r.best_state = r.resume.progress, r.resume.best
            record["checkpoint"]["resumed_from_step"] = r.p.step
            log.info(f"resume from step {r.p.step} (epoch {r.p.epoch}, batch {r.p.batch}): {r.resume.path}")
        if on_start := hook(cfg.method, "on_train_start"):
            on_start(acc.unwrap_model(model), total_steps, cfg.method)
        return r


def train(r: Training, record: dict[str, Any], record_path: Path | None) -> None:
    """Epochs of batches until total_steps optimizer steps; evaluations every eval_every steps and at the
    end; checkpoints when due. A resumed run replays the data order of its epoch and skips what it did."""
    reset_peak_memory(r.acc.device)
    with lines_above_bars():
        bar = progress_bar(total=r.total_steps, initial=r.p.step, desc=record["run_id"][:40], unit="step")
        train_steps(r, record, record_path, bar)
        bar.close()


def train_steps(r: Training, record: dict[str, Any], record_path: Path | None, bar) -> None:
    t, p = r.cfg.train, r.p
    t_prev = time.perf_counter()  # train time counts data loading + step, not evaluation
    while p.step < r.total_steps:
        epoch_start = r.s.generator.get_state()  # the data order of this epoch follows from it
        batches = iter(r.train_loader)
        for _ in range(p.batch):  # resumed mid-epoch: replay the order, skip what was trained on
            next(batches)
        if r.resume:  # RNG states as they were at the checkpoint (after this epoch's order was drawn)
            set_rng_states(r.resume)
            r.resume = None
        r.model.train()
        for batch in batches:
            if not step(r, batch):
                continue
            p.train_s += time.perf_counter() - t_prev
            bar.update(1)
            lr = r.sched.get_last_lr()[0]
            r.acc.log({"train/loss": p.losses[-1], "train/lr": lr}, step=p.step)
            if p.step % t.log_every == 0 or p.step == r.total_steps:
                loss = float(np.mean(p.losses[-t.log_every :]))
                bar.set_postfix(loss=f"{loss:.4f}")
                log.info(
                    f"step {p.step}/{r.total_steps} epoch {p.step / r.steps_per_epoch:.2f} loss {loss:.4f} "
                    f"lr {lr:.3g} {p.train_s / p.step:.3f} s/step"
                )
            kill_point("step", p.step)
            if p.step % r.eval_every == 0 or p.step == r.total_steps:
                evaluate_now(r)
            if p.step >= r.total_steps:
                break
            if r.ckpt.due(p):
                checkpoint_now(r, record, record_path, epoch_start)
            t_prev = time.perf_counter()
        else:
            p.epoch, p.batch = p.epoch + 1, 0


def step(r: Training, batch: dict[str, torch.Tensor]) -> bool:
    """One micro-batch: forward, backward and (when gradients sync) the optimizer step with the method's
    hooks. True when an optimizer step was taken."""
    acc, p, method = r.acc, r.p, r.cfg.method
    with acc.accumulate(r.model):
        loss = r.s.fmt.loss(r.model, batch)
        if r.adjust_loss:
            loss = r.adjust_loss(acc.unwrap_model(r.model), loss, method)
        acc.backward(loss)
        if acc.sync_gradients and r.cfg.train.max_grad_norm is not None:  # null: no clipping
            acc.clip_grad_norm_(r.params, r.cfg.train.max_grad_norm)
        r.opt.step()
        r.sched.step()
        if r.after_step and acc.sync_gradients:
            r.after_step(acc.unwrap_model(r.model), p.step + 1, method)
        r.opt.zero_grad(set_to_none=True)
    p.batch += 1
    counts = torch.tensor([int(batch["attention_mask"].sum()), len(batch["labels"])], device=acc.device)
    tokens, samples = acc.reduce(counts, "sum").tolist()  # all processes' shares of the batch
    p.tokens, p.samples = p.tokens + tokens, p.samples + samples
    if not acc.sync_gradients:
        return False
    p.step += 1
    p.losses.append(round(acc.reduce(loss.detach(), "mean").item(), 5))  # the same on every process
    if not math.isfinite(p.losses[-1]):
        raise Diverged(f"the train loss is {p.losses[-1]} at step {p.step} (train.lr={r.cfg.train.lr})")
    return True


class Diverged(Exception):
    """A NaN or infinite train loss: the run stops and its record says `diverged`."""


def evaluate_now(r: Training) -> None:
    t1 = time.perf_counter()
    result = evaluate(r.model, r.eval_loader, r.s)
    if track(r.p, result, r.cfg, r.total_steps, r.steps_per_epoch):
        r.best_state = trainable_state(r.acc.unwrap_model(r.model))
    log_eval(r.acc, result, r.p.step)
    r.p.eval_s += time.perf_counter() - t1
    r.model.train()


def log_eval(acc: Accelerator, result: dict[str, Any], step: int) -> None:
    """An evaluation's metrics (and loss) to the trackers, at its optimizer step."""
    values = {f"eval/{k}": v for k, v in result["metrics"].items()}
    if result.get("loss") is not None:
        values["eval/loss"] = result["loss"]
    acc.log(values, step=step)


def checkpoint_now(r: Training, record: dict, record_path: Path | None, epoch_start: torch.Tensor) -> None:
    r.ckpt.save(r.p, r.acc.unwrap_model(r.model), r.best_state, epoch_start)
    record.update(evals=r.p.evals, best=r.p.best)  # the record keeps the evaluations so far
    save_record(record_path, record)
    r.acc.wait_for_everyone()  # a rerun of any process resumes from the same checkpoint


def after_training(
    cfg, record: dict, s: Setup, acc: Accelerator, model, eval_loader, artifacts: Path
) -> None:
    """With the best weights: save the adapter, merge (and evaluate merged), transfer sets, test
    predictions, export."""
    t = cfg.train
    if t.save_adapter:
        full = trainable_state(model) if sharded(model) else None  # every process takes part
        if s.main:
            record["adapter"] = save_adapter(model, artifacts / "adapter", full)
    if cfg.method.get("merge"):
        model = finish(model)
        record["final"] = evaluate(model, eval_loader, s)
        record["final"]["merged"] = True
    transfer_and_test(model, s, acc, record)
    if t.export_model:
        full = full_model_state(model)  # every process takes part
        if s.main:
            record["export"] = export_model(model, Path(t.export_model), record, full)


def evaluate_only(cfg: DictConfig, record: dict[str, Any], s: Setup, acc: Accelerator) -> None:
    """Nothing trains (in-context learning, train.max_steps=0): one evaluation, after the method's
    `before_evaluate_only` hook (ICL's contextual calibration)."""
    model, eval_loader = acc.prepare(s.model, s.eval_loader)
    reset_peak_memory(acc.device)
    t0 = time.perf_counter()
    if before := hook(cfg.method, "before_evaluate_only"):
        before(model, s.fmt, cfg, s.task, acc.device, record)
    p = Progress()
    result = evaluate(model, eval_loader, s)
    track(p, result, cfg, 0, 1)
    log_eval(acc, result, 0)
    p.eval_s = time.perf_counter() - t0
    finish_record(cfg, record, acc, p, 1)
    transfer_and_test(model, s, acc, record)


def transfer_and_test(model, s: Setup, acc: Accelerator, record: dict[str, Any]) -> None:
    """With the weights the record reports (best, merged): the task's transfer sets and its unlabelled test
    rows (train.predict_test)."""
    evaluate_transfer(model, s, acc, record)
    if s.test_loader is not None:
        record["test_predictions"] = predict_test(model, acc.prepare(s.test_loader), s)
    keep_predictions(record, s)


def keep_predictions(record: dict[str, Any], s: Setup) -> None:
    """The per-example predictions of the evaluation the record reports (merged, else best) as
    <run>/predictions.jsonl, beside the record."""
    reported = record.get("final") or record.get("best") or {}
    source = reported.get("predictions")
    if not (s.main and s.artifacts is not None and source and str(source).endswith(".jsonl")):
        return
    path = s.artifacts / "predictions.jsonl"
    write_atomic(path, Path(source).read_bytes())
    record["predictions"] = str(path)


def finish_record(cfg: DictConfig, record: dict, acc: Accelerator, p: Progress, steps_per_epoch: int) -> None:
    """The training summary: steps, samples, tokens, times, throughput, losses, FLOPs, MFU and peak memory."""
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
