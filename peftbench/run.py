"""The one recipe: load -> apply method -> train -> evaluate -> record.

Read it top to bottom: `execute` is what `peftbench train` runs for each point of a sweep. The loop is a
plain accelerate loop (no Trainer), so losses, evaluation, timing and memory are all visible here.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from peftbench import metrics as M
from peftbench.data import Batcher, LengthGroupedBatches, encode, feature_length
from peftbench.env import device_info, git_sha, peak_memory_mib, reset_peak_memory, versions
from peftbench.errors import UserError
from peftbench.methods import apply_method, finish, save_trainable
from peftbench.models import count, family, load_model
from peftbench.record import check_writable, read_record, run_id, write_record
from peftbench.tasks import TaskData, load_task
from peftbench.validate import validate


def execute(cfg: DictConfig) -> dict[str, Any]:
    """Run one config to one record; skip it if a finished record exists (unless train.force)."""
    validate(cfg)
    out_dir = Path(cfg.paths.results) / cfg.name
    rid = run_id(cfg)
    path = out_dir / f"{rid}.json"
    if path.exists() and not cfg.train.force:
        old = read_record(path)
        if old.get("status") == "finished":
            print(f"[peftbench] skip {rid}: finished record {path}")
            return old
    check_writable(out_dir)
    record = new_record(cfg, rid)
    write_record(path, record)
    t_start = time.perf_counter()
    try:
        train_and_evaluate(cfg, record, out_dir / rid)
        record["status"] = "finished"
    except KeyboardInterrupt:
        record.update(status="interrupted", error="KeyboardInterrupt")
        raise
    except torch.OutOfMemoryError:
        record.update(status="failed", error="out of memory")
        raise UserError(
            f"out of memory at train.batch_size={cfg.train.batch_size}; lower it and raise train.grad_accum "
            "to keep the effective batch"
        ) from None
    except Exception as e:
        record.update(status="failed", error=f"{type(e).__name__}: {e}")
        raise
    finally:
        record["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        record["wall_s"] = round(time.perf_counter() - t_start, 2)
        write_record(path, record)
    print(
        f"[peftbench] {rid}: best {record['main_metric']}={record['best']['metrics'][record['main_metric']]:.2f} -> {path}"
    )
    return record


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


def prepare(cfg: DictConfig, record: dict[str, Any]) -> Setup:
    """Data and model, with the method applied; parameter counts go into the record."""
    seed_everything(cfg.seed)
    if cfg.train.num_threads:
        torch.set_num_threads(int(cfg.train.num_threads))
    task = load_task(cfg.task, seed=int(cfg.seed), max_train=cfg.train.max_train_samples)
    fam = family(cfg.model)
    model, tokenizer = load_model(cfg.model, task.kind, max(1, len(task.label_names)))
    model = apply_method(model, cfg.method, fam)
    counts = count(model, fam.head)
    counts["trainable_percent"] = 100.0 * counts["trainable_without_head"] / counts["total_without_head"]
    record["params"] = counts
    validation = task.validation[: cfg.train.max_eval_samples or None]
    batcher = Batcher(tokenizer, task.kind)
    train = encode(task.train, cfg.task, tokenizer)
    evals = encode(validation, cfg.task, tokenizer)
    generator = torch.Generator().manual_seed(int(cfg.seed))
    if cfg.train.group_by_length:
        sampler = LengthGroupedBatches([feature_length(f) for f in train], cfg.train.batch_size, generator)
        train_loader = DataLoader(train, batch_sampler=sampler, collate_fn=batcher)
    else:
        train_loader = DataLoader(
            train, cfg.train.batch_size, shuffle=True, generator=generator, collate_fn=batcher
        )
    eval_loader = DataLoader(evals, cfg.train.eval_batch_size, shuffle=False, collate_fn=batcher)
    record["data"] = {"sources": task.sources, "n_train": len(train), "n_eval": len(evals)}
    if cfg.task.get("n_shot"):
        record["data"]["train_ids"] = [r["idx"] for r in task.train]
    return Setup(model, task, train_loader, eval_loader, batcher)


def train_and_evaluate(cfg: DictConfig, record: dict[str, Any], artifacts: Path) -> None:
    t = cfg.train
    s = prepare(cfg, record)
    cpu = t.device == "cpu" or (t.device == "auto" and not torch.cuda.is_available())
    acc = Accelerator(mixed_precision=t.mixed_precision, gradient_accumulation_steps=t.grad_accum, cpu=cpu)
    record["device"] = device_info(acc.device)
    params = [p for p in s.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        params, lr=t.lr, weight_decay=t.weight_decay, betas=tuple(t.adam_betas), eps=t.adam_eps
    )
    steps_per_epoch = math.ceil(len(s.train_loader) / t.grad_accum)
    total_steps = int(t.max_steps) if t.max_steps else steps_per_epoch * int(t.epochs)
    sched = get_linear_schedule_with_warmup(opt, int(t.warmup_ratio * total_steps), total_steps)
    model, opt, train_loader, eval_loader, sched = acc.prepare(
        s.model, opt, s.train_loader, s.eval_loader, sched
    )
    eval_every = steps_per_epoch if t.eval_every == "epoch" else int(t.eval_every)
    main = cfg.task.main_metric
    better = M.higher_is_better(main)

    reset_peak_memory(acc.device)
    evals, losses, best, best_value, best_state = [], [], None, None, None
    step = tokens = samples = 0
    train_time = eval_time = 0.0
    bar = tqdm(total=total_steps, desc=record["run_id"][:40], disable=not t.progress, leave=False)
    epoch = 0
    t_prev = time.perf_counter()  # train time counts data loading + step, not evaluation
    while step < total_steps:
        model.train()
        for batch in train_loader:
            with acc.accumulate(model):
                loss = s.batcher.loss(model, batch)
                acc.backward(loss)
                if acc.sync_gradients:
                    acc.clip_grad_norm_(params, t.max_grad_norm)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
            tokens += int(batch["attention_mask"].sum())
            samples += len(batch["labels"])
            if not acc.sync_gradients:
                continue
            step += 1
            losses.append(round(loss.item(), 5))
            now = time.perf_counter()
            train_time += now - t_prev
            t_prev = now
            bar.update(1)
            if step % t.log_every == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-t.log_every :]):.4f}")
            if step % eval_every == 0 or step == total_steps:
                t1 = time.perf_counter()
                result = evaluate(model, eval_loader, s, cfg)
                eval_time += time.perf_counter() - t1
                result.update(step=step, epoch=round(step / steps_per_epoch, 3))
                evals.append(result)
                print(
                    f"[peftbench] step {step}/{total_steps} "
                    + " ".join(f"{k}={v:.2f}" for k, v in result["metrics"].items())
                )
                value = result["metrics"][main]
                if best is None or (value > best_value if better else value < best_value):
                    best, best_value = result, value
                    best_state = trainable_state(acc.unwrap_model(model))
                model.train()
                t_prev = time.perf_counter()
            if step >= total_steps:
                break
        epoch += 1
    bar.close()

    model = acc.unwrap_model(model)
    model.load_state_dict(best_state, strict=False)
    record["evals"], record["best"] = evals, best
    record["train"] = {
        "steps": step,
        "epochs": round(step / steps_per_epoch, 3),
        "samples": samples,
        "tokens": tokens,
        "train_s": round(train_time, 3),
        "eval_s": round(eval_time, 3),
        "s_per_step": round(train_time / max(step, 1), 5),
        "tokens_per_s": round(tokens / max(train_time, 1e-9), 1),
        "samples_per_s": round(samples / max(train_time, 1e-9), 2),
        "loss_first": losses[0] if losses else None,
        "loss_last": float(np.mean(losses[-max(1, min(len(losses), t.log_every)) :])) if losses else None,
        "loss_curve": losses[:: max(1, len(losses) // 200)],
    }
    record["memory"] = {
        "peak_mib": peak_memory_mib(acc.device),
        "kind": "cuda_max_allocated" if acc.device.type == "cuda" else "cpu_max_rss",
    }
    if t.save_adapter:
        folder = artifacts / "adapter"
        fmt = save_trainable(model, folder)
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        record["adapter"] = {"path": str(folder), "format": fmt, "bytes": size}
    if cfg.method.get("merge"):
        model = finish(model)
        record["final"] = evaluate(model, eval_loader, s, cfg)
        record["final"]["merged"] = True


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader, s: Setup, cfg: DictConfig) -> dict[str, Any]:
    model.eval()
    preds, refs, total_loss, n = [], [], 0.0, 0
    for batch in loader:
        logits = s.batcher.logits(model, batch)
        total_loss += float(s.batcher.loss_from_logits(logits, batch["labels"])) * len(batch["labels"])
        n += len(batch["labels"])
        preds += s.batcher.predict(logits).tolist()
        refs += batch["labels"].tolist()
    groups = [ex.get("group") for ex in loader.dataset] if cfg.task.get("group") else None
    values = M.compute(list(cfg.task.metrics), preds, refs, groups)
    return {"metrics": {k: round(v, 4) for k, v in values.items()}, "loss": round(total_loss / max(n, 1), 5)}
