"""Many processes, one run: data parallelism over 2 CPU processes (torchrun, gloo) gives the run of 1 process
with the same global batch. Each batch of train.batch_size is split over the processes and the gradients are
averaged (DDP), so with dropout off the losses, the evaluations and the metric are those of one process;
only the main process writes, so there is one record."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
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


TINY = [
    "model=tiny-bert",
    "method=full",
    "task=rte",
    "train.lr=1e-3",
    "train.batch_size=8",
    "train.max_steps=6",
]
TINY += [
    "train.eval_every=3",
    "train.max_train_samples=48",
    "train.max_eval_samples=32",
    "train.progress=false",
]
TINY += ["train.num_threads=1", "train.checkpoint_every=3", "+model.dims.hidden_dropout_prob=0"]
TINY += ["+model.dims.attention_probs_dropout_prob=0"]


def test_fsdp_shards_full_fine_tuning_and_gathers_what_it_writes(tmp_path):
    """FSDP (train.fsdp=true) over 2 CPU processes: every block and the root sharded, each process holding half
    of the parameters and AdamW's state; the losses, evaluations, the saved weights and the export equal the
    1-process run's (the saved tensors are gathered, whole)."""
    require_data()
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    env = {**os.environ, "PEFTBENCH_RESULTS_DIR": str(tmp_path / "results"), "OMP_NUM_THREADS": "1"}
    env["PEFTBENCH_LOG_DIR"] = str(tmp_path / "logs")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    records = {}
    for name, launcher, extra in [
        ("fsdp", torchrun, ["train.fsdp=true", f"train.export_model={tmp_path / 'export'}"]),
        ("one", [sys.executable], []),
    ]:
        cmd = [*launcher, "-m", "peftbench.cli", "train", *TINY, f"name={name}", *extra]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        records[name] = record(sorted((tmp_path / "results" / name).iterdir()))
    fsdp, one = records["fsdp"], records["one"]
    assert fsdp["device"]["processes"] == 2 and fsdp["config"]["train"]["fsdp"] is True
    assert fsdp["train"]["loss_curve"] == pytest.approx(one["train"]["loss_curve"], abs=1e-4)
    assert [e["loss"] for e in fsdp["evals"]] == pytest.approx([e["loss"] for e in one["evals"]], abs=1e-4)
    assert fsdp["checkpoint"]["saved"] == 1  # the gathered optimizer state went into it
    saved = {k: load_file(Path(r["adapter"]["path"]) / "trainable.safetensors") for k, r in records.items()}
    assert saved["fsdp"].keys() == saved["one"].keys() and len(saved["one"]) > 30
    for name, tensor in saved["one"].items():
        assert saved["fsdp"][name].shape == tensor.shape  # whole, not a shard
        assert torch.allclose(saved["fsdp"][name], tensor, atol=1e-5), name
    exported = AutoModelForSequenceClassification.from_pretrained(tmp_path / "export")
    weights = dict(exported.named_parameters())
    assert all(torch.allclose(weights[n], t, atol=1e-5) for n, t in saved["one"].items())
