"""Many processes, one run: data parallelism over 2 CPU processes (torchrun, gloo) gives the run of 1 process
with the same global batch. Each batch of train.batch_size is split over the processes and the gradients are
averaged (DDP), so with dropout off the losses, the evaluations and the metric are those of one process;
only the main process writes, so there is one record."""

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import require_data

RUN = ["model=minilm", "method=full", "task=sst2", "train.lr=2e-4", "train.batch_size=16"]
RUN += [
    "train.max_steps=16",
    "train.eval_every=8",
    "train.max_train_samples=256",
    "train.max_eval_samples=96",
]
RUN += ["train.progress=false", "train.num_threads=1", "train.checkpoint_every=8"]
RUN += [
    "+model.config_overrides.hidden_dropout_prob=0",
    "+model.config_overrides.attention_probs_dropout_prob=0",
]


def train(tmp_path: Path, name: str, launcher: list[str]) -> tuple[subprocess.CompletedProcess, list[Path]]:
    env = {**os.environ, "PEFTBENCH_RESULTS_DIR": str(tmp_path / "results"), "OMP_NUM_THREADS": "1"}
    env["PEFTBENCH_LOG_DIR"] = str(tmp_path / "logs")
    cmd = [*launcher, "-m", "peftbench.cli", "train", *RUN, f"name={name}"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    return done, sorted((tmp_path / "results" / name).iterdir())


def record(files: list[Path]) -> dict:
    (path,) = [f for f in files if f.suffix == ".json"]  # one record, written once
    return json.loads(path.read_text())


def test_two_process_data_parallel_run_equals_one_process_run(tmp_path):
    require_data()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done, files = train(tmp_path, "ddp", torchrun)
    assert done.returncode == 0, done.stderr[-3000:]
    one_done, one_files = train(tmp_path, "one", [sys.executable])
    assert one_done.returncode == 0, one_done.stderr[-3000:]

    assert [f.name for f in files if f.suffix == ".lock"] == []
    ddp, one = record(files), record(one_files)
    assert ddp["status"] == one["status"] == "finished" and ddp["run_id"] == one["run_id"]
    assert (ddp["device"]["processes"], ddp["device"]["distributed"]) == (2, "MULTI_CPU")
    assert one["device"]["processes"] == 1
    # the same global batches: every row of every step, once
    assert ddp["train"]["samples"] == one["train"]["samples"] == 16 * 16
    assert ddp["train"]["tokens"] == one["train"]["tokens"]
    curve_ddp, curve_one = ddp["train"]["loss_curve"], one["train"]["loss_curve"]
    assert len(curve_ddp) == len(curve_one) == 16
    assert max(abs(a - b) for a, b in zip(curve_ddp, curve_one)) < 1e-3
    # evaluation: each process scores half the rows; gathered, they are all 96 rows, in order
    assert len(ddp["evals"]) == len(one["evals"]) == 2
    assert all(abs(a["loss"] - b["loss"]) < 1e-3 for a, b in zip(ddp["evals"], one["evals"]))
    assert abs(ddp["best"]["metrics"]["accuracy"] - one["best"]["metrics"]["accuracy"]) <= 1.1  # 1 row of 96
    assert ddp["evals"][-1]["loss"] < ddp["evals"][0]["loss"] < 0.70  # it learned something
    assert (
        ddp["checkpoint"]["saved"] == 1
        and not (tmp_path / "results" / "ddp" / ddp["run_id"] / "checkpoint").exists()
    )
