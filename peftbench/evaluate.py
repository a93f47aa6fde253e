"""Evaluation and prediction through the run's format: one evaluation, the best so far, the task's transfer
sets, and RAFT's test predictions."""

from __future__ import annotations

import csv
import io
import time
from typing import Any

import torch
from accelerate import Accelerator
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from peftbench import metrics as M
from peftbench.checkpoint import Progress
from peftbench.errors import disk_full_is_user_error
from peftbench.log import log
from peftbench.parallel import reshard
from peftbench.record import write_atomic
from peftbench.setup import Setup


def evaluate(model: torch.nn.Module, loader: DataLoader, s: Setup, rows=None, name=None) -> dict[str, Any]:
    """One evaluation: of the validation rows, or (`rows`, `name`) of another set of the task's rows."""
    if name is None:
        s.n_evals += 1
    with torch.no_grad():
        result = s.fmt.evaluate(model, loader, s, rows, name)
    reshard(model)
    return result


def track(
    p: Progress, result: dict[str, Any], cfg: DictConfig, total_steps: int, steps_per_epoch: int
) -> bool:
    """Log an evaluation into the progress; True if it is the best so far (the caller keeps its weights)."""
    result.update(step=p.step, epoch=round(p.step / steps_per_epoch, 3))
    p.evals.append(result)
    log.info(f"step {p.step}/{total_steps} " + " ".join(f"{k}={v:.2f}" for k, v in result["metrics"].items()))
    main = cfg.task.main_metric
    value, best = result["metrics"][main], p.best["metrics"][main] if p.best else None
    if best is None or (value > best if M.higher_is_better(main) else value < best):
        p.best, p.best_step = result, p.step
        return True
    return False


def evaluate_transfer(model: torch.nn.Module, s: Setup, acc: Accelerator, record: dict[str, Any]) -> None:
    """The task's transfer sets (QA: MRQA out-of-domain), zero-shot with the weights the record reports;
    their metrics join the best evaluation's as `<metric>_<set>`."""
    if not s.task.transfer:
        return
    record["transfer"] = {}
    for name, rows in s.task.transfer.items():
        rows = rows[: s.cfg.train.max_eval_samples or None]
        features = s.fmt.encode(sorted(rows, key=lambda r: -len(r["source"])))  # less padding; scored by idx
        loader = acc.prepare(s.loader(features))
        t0 = time.perf_counter()
        result = evaluate(model, loader, s, rows, f"transfer_{name}")
        result.update(n_eval=len(rows), eval_s=round(time.perf_counter() - t0, 3))
        record["transfer"][name] = result
        log.info(f"{name}: " + " ".join(f"{k}={v:.2f}" for k, v in result["metrics"].items()))
        if record.get("best"):
            record["best"]["metrics"].update({f"{k}_{name}": v for k, v in result["metrics"].items()})


@torch.no_grad()
def predict_test(model: torch.nn.Module, loader: DataLoader, s: Setup) -> dict[str, Any]:
    """The unlabelled test rows' predicted label names, as `ID,Label` CSV (RAFT's submission format)."""
    preds = s.fmt.predict_labels(model, loader, s)
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
