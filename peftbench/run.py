"""Execute one run: skip it when finished, take its lock, write its record through its life (running ->
finished / failed / interrupted) and hand the work to the loop (loop.py). `execute` is what `peftbench
train` runs for each point of a sweep or preset."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list
from omegaconf import DictConfig, OmegaConf

from peftbench import checkpoint
from peftbench.env import git_sha, versions
from peftbench.errors import UserError
from peftbench.lock import RunLock, describe, try_lock
from peftbench.log import BARS, library_bars, log, log_file
from peftbench.loop import Diverged, on_cpu, train_and_evaluate
from peftbench.record import check_writable, read_record, run_id, save_record
from peftbench.tasks import data_identity
from peftbench.validate import check_processes, validate


def execute(cfg: DictConfig) -> dict[str, Any]:
    """Run one config to one record. A finished run is skipped (unless train.force); a run that another
    process holds (its lock) is skipped or waited for; an interrupted run resumes from its last checkpoint."""
    validate(cfg)
    BARS["on"] = bool(cfg.train.progress)
    library_bars()
    out_dir = Path(cfg.paths.results) / cfg.name
    rid = run_id(cfg)
    path = out_dir / f"{rid}.json"
    state = PartialState(cpu=on_cpu(cfg.train))  # torchrun / accelerate launch: one process per device
    if state.num_processes > 1:
        return execute_data_parallel(cfg, state, rid, path)
    if not cfg.train.force and (done := finished(path, cfg)):
        return done
    check_writable(out_dir)
    lock_path = out_dir / f"{rid}.lock"
    lock = acquire_lock(lock_path, cfg.train)
    if lock is None:
        log.info(f"skip {rid}: running in {describe(lock_path)} (lock {lock_path})")
        return read_record(path) if path.exists() else {"run_id": rid, "status": "running"}
    try:
        if not cfg.train.force and (done := finished(path, cfg)):  # it finished while we waited for the lock
            return done
        with sigterm_as_interrupt():
            return run_locked(cfg, rid, path)
    finally:
        lock.release()


def execute_data_parallel(cfg: DictConfig, state: PartialState, rid: str, path: Path) -> dict[str, Any]:
    """Data parallel over the launched processes: the main process decides (finished, held by another
    process, or to run), takes the lock and writes the record; every process trains on its share of each
    batch and evaluates its share of the rows (gathered in order for the metrics)."""
    check_processes(cfg.train, state.num_processes)  # validate() checked WORLD_SIZE; this is what launched
    lock, plan = None, ["run"]
    if state.is_main_process:
        if not cfg.train.force and finished(path, cfg):
            plan = ["done"]
        else:
            check_writable(path.parent)
            lock_path = path.with_suffix(".lock")
            lock = acquire_lock(lock_path, cfg.train)
            if lock is None:
                log.info(f"skip {rid}: running in {describe(lock_path)} (lock {lock_path})")
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


FINAL = ("finished", "diverged")  # a rerun of the same config gives the same: skipped unless train.force


def final_record(path: Path) -> dict[str, Any] | None:
    """The run's final record (finished or diverged), if it has one."""
    try:
        old = read_record(path)
    except (OSError, ValueError):  # no record yet, or not one of ours: this run writes it
        return None
    return old if old.get("status") in FINAL else None


def finished(path: Path, cfg: DictConfig) -> dict[str, Any] | None:
    """The final record to skip to: one of the same data. A final record whose data changed since (another
    copy or cut of the files: their content hash differs) is run again, beside it (where_to_work)."""
    if (old := final_record(path)) is None:
        return None
    now, then = data_identity(cfg.task), old.get("data_identity")
    if then is not None and then != now:  # records written before data identities were kept: no check
        changed = sorted(k for k in {*now, *then} if now.get(k) != then.get(k))
        log.info(
            f"rerun {old['run_id']}: its data changed since its {old['status']} record ({changed[0]}: "
            f"{then.get(changed[0])} -> {now.get(changed[0])}); the old record stays until this run finishes"
        )
        return None
    log.info(f"skip {old['run_id']}: {old['status']} record {path}")
    return old


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
    final_path, final_artifacts = path, path.parent / rid
    path, artifacts = where_to_work(cfg, path, final_artifacts, state)
    record = new_record(cfg, rid)
    save_record(path, record)
    log.info(f"run {rid}: record {path}" + (f", log {record['log']}" if record.get("log") else ""))
    t_start = time.perf_counter()
    try:
        train_and_evaluate(cfg, record, artifacts, path)
        record["status"] = "finished"
    except Diverged as e:
        record.update(status="diverged", error=str(e))
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
            if record["status"] in FINAL:  # a result that no record would keep
                raise
            # already failing: the first error is the one to report
    if path is None:
        return record
    checkpoint.clear(artifacts / "checkpoint")  # the record is final; the checkpoint has done its job
    if path != final_path:
        record = replace_final(record, path, artifacts, final_path, final_artifacts)
    if record["status"] == "diverged":
        log.info(f"{rid}: diverged: {record['error']}; lower train.lr or keep train.max_grad_norm on")
    else:
        best = record["best"]["metrics"][record["main_metric"]]
        log.info(f"{rid}: best {record['main_metric']}={best:.2f} -> {final_path}")
    return record


def where_to_work(
    cfg: DictConfig, path: Path, artifacts: Path, state: PartialState
) -> tuple[Path | None, Path]:
    """(record path or None off the main process, run folder). A forced rerun of a run with a final record
    works beside it (<id>.json.rerun, <id>.rerun/) and replaces it only when it finishes: killed or failed,
    it leaves the final record and its files as they were. The checkpoint is cleared (forced) or its
    half-written temp removed before any process reads it."""
    beside = [bool(state.is_main_process and final_record(path))]  # forced, or its data changed
    broadcast_object_list(beside)
    if beside[0]:
        path, artifacts = path.with_name(path.name + ".rerun"), artifacts.with_name(artifacts.name + ".rerun")
    if state.is_main_process:
        if cfg.train.force:
            checkpoint.clear(artifacts / "checkpoint")  # a forced rerun starts from scratch
        else:
            checkpoint.clean_temp(artifacts / "checkpoint")  # half-written by a killed process
    state.wait_for_everyone()  # nobody reads the checkpoint before it is cleared
    return (path if state.is_main_process else None), artifacts


def replace_final(record: dict, path: Path, artifacts: Path, final_path: Path, final_artifacts: Path) -> dict:
    """A forced rerun's final record and files take the place of the old ones (paths in the record too)."""
    text = json.dumps(record).replace(
        json.dumps(str(artifacts))[1:-1], json.dumps(str(final_artifacts))[1:-1]
    )
    record = json.loads(text)
    save_record(path, record)
    old = final_artifacts.with_name(f"{final_artifacts.name}.old-{os.getpid()}")
    if final_artifacts.exists():
        final_artifacts.rename(old)
    if artifacts.exists():
        artifacts.rename(final_artifacts)
    os.replace(path, final_path)
    shutil.rmtree(old, ignore_errors=True)
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
        "data_identity": data_identity(cfg.task),
        "versions": versions(),
        "git_sha": git_sha(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "log": log_file(),  # the job's log file (Hydra's output folder), which names this record in turn
        "checkpoint": {"every": cfg.train.checkpoint_every},
    }
