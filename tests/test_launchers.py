"""Many jobs: Hydra launchers. `hydra/launcher=parallel` (joblib processes on one machine) and
`hydra/launcher=slurm` (submitit) are peftbench's configs over the plugins; the submitit plugin's local
executor stands in for SLURM here. Every run writes its own intact record into one results folder."""

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import require_data

SWEEP = ["model=tiny-bert", "method=lora", "task=rte", "train.max_steps=2", "train.max_eval_samples=8"]
SWEEP += ["train.max_train_samples=16", "train.batch_size=8", "train.progress=false", "train.num_threads=1"]


def sweep(tmp_path: Path, *args: str, jobs: str = "2") -> tuple[subprocess.CompletedProcess, list[dict]]:
    env = {
        **os.environ,
        "PEFTBENCH_RESULTS_DIR": str(tmp_path / "results"),
        "PEFTBENCH_LOG_DIR": str(tmp_path / "logs"),
        "PEFTBENCH_JOBS": jobs,
    }
    cmd = [sys.executable, "-m", "peftbench.cli", "train", "-m", *args, *SWEEP]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    records = [json.loads(p.read_text()) for p in sorted((tmp_path / "results" / "runs").glob("*.json"))]
    return done, records


def test_parallel_launcher_runs_a_4_point_sweep_in_2_processes(tmp_path):
    require_data()
    done, records = sweep(tmp_path, "hydra/launcher=parallel", "method.r=1,2,4,8")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Joblib.Parallel(n_jobs=2" in done.stdout + done.stderr  # $PEFTBENCH_JOBS
    assert sorted(r["config"]["method"]["r"] for r in records) == [1, 2, 4, 8]
    assert all(r["status"] == "finished" and r["best"]["metrics"] for r in records)
    assert len({r["run_id"] for r in records}) == 4


def test_submitit_local_launcher_runs_a_2_point_sweep(tmp_path):
    require_data()
    done, records = sweep(
        tmp_path, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", "method.r=1,2"
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(r["config"]["method"]["r"] for r in records) == [1, 2]
    assert all(r["status"] == "finished" for r in records)


def test_slurm_launcher_config_composes_with_its_defaults():
    from hydra import compose as hydra_compose

    from peftbench.config import compose

    compose([])  # peftbench's Hydra instance, on its config folder (it stays initialised)
    cfg = hydra_compose(
        "config", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu"], return_hydra_config=True
    )
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.partition, launcher.gpus_per_node, launcher.timeout_min) == ("gpu", 1, 720)


def test_a_preset_under_a_launcher_is_one_job_per_point(tmp_path):
    """`peftbench train -m experiment=NAME hydra/launcher=parallel`: the grid's points (here 2 rows of
    offline_minilm, on the tiny model) are checked, then run as one Hydra job each, in 2 processes; each writes
    its own record with its row."""
    require_data()
    env = {
        **os.environ,
        "PEFTBENCH_RESULTS_DIR": str(tmp_path / "results"),
        "PEFTBENCH_LOG_DIR": str(tmp_path / "logs"),
        "PEFTBENCH_JOBS": "2",
    }
    cmd = [sys.executable, "-m", "peftbench.cli", "train", "-m", "experiment=offline_minilm"]
    cmd += ["only=row=LoRA r=1|LoRA r=4,seed=1", "hydra/launcher=parallel", "model=tiny-bert"]
    cmd += [
        "train.max_steps=2",
        "train.max_eval_samples=8",
        "train.max_train_samples=16",
        "train.num_threads=1",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Joblib.Parallel(n_jobs=2" in done.stdout + done.stderr
    records = [json.loads(p.read_text()) for p in (tmp_path / "results" / "offline_minilm").glob("*.json")]
    assert sorted((r["row"], r["config"]["method"]["r"]) for r in records) == [
        ("LoRA r=1", 1),
        ("LoRA r=4", 4),
    ]
    assert all(r["status"] == "finished" for r in records)
    assert len(list((tmp_path / "logs" / "multiruns").glob("*/[01]"))) == 2  # two Hydra jobs
