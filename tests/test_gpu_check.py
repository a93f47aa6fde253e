"""scripts/gpu_check.sh on a CPU-only machine: its dry path (the environment row runs, every GPU check says it
needs a GPU, exit 0), and the arithmetic of its figures on known numbers (the GPU rows run on a GPU only)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))
import gpu_check  # noqa: E402


def test_dry_path_runs_the_environment_row_and_says_what_needs_a_gpu(tmp_path):
    done = subprocess.run(
        ["bash", str(SCRIPTS / "gpu_check.sh"), "--out", str(tmp_path), "--dry"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    checks = json.loads((tmp_path / "gpu_check.json").read_text())["checks"]
    assert list(checks) == [
        "environment",
        "train_minilm",
        "step_roberta-large",
        "step_gpt2-medium",
        "decode",
        "ddp",
    ]
    env = checks["environment"]
    assert env["status"] == "ok" and env["figures"]["torch"].startswith("2.13.0")
    assert {"deterministic_algorithms", "cudnn_benchmark", "CUBLAS_WORKSPACE_CONFIG"} <= set(env["figures"])
    for name, row in checks.items():
        if name != "environment":
            assert row["status"] == "skipped" and row["reason"] == "needs a CUDA device (none visible)", name
    assert "| train_minilm | skipped |" in done.stdout


def test_mfu_of_a_step_from_its_flops_and_the_peak():
    # GPT-2 medium (354.8M without head), LoRA r=4 on q, v (393,216), 16 x 256 tokens, 0.1 s on a 989 TFLOP/s peak
    flops = gpu_check.step_flops(354_823_168, 393_216, 16 * 256)
    assert flops == (4 * 354_823_168 + 2 * 393_216) * 4096
    assert gpu_check.mfu(flops, 0.1, 989e12) == pytest.approx(flops / 0.1 / 989e12)
    assert gpu_check.step_flops(1000, 1000, 10) == 6 * 1000 * 10  # full fine-tuning: 6 N per token
    assert gpu_check.mfu(flops, 0.1, None) is None


def test_step_summary_gives_ratios_and_mfu():
    rows = [
        {"method": "full", "total": 1000, "trainable": 1000, "s_per_step": 2.0, "peak_mib": 400.0},
        {"method": "lora", "total": 1000, "trainable": 10, "s_per_step": 1.0, "peak_mib": 100.0},
    ]
    out = gpu_check.summarise_steps({"rows": rows, "tokens_per_step": 100, "peak_flops": 1e6})
    assert out["lora_over_full_step"] == 0.5 and out["lora_over_full_memory"] == 0.25
    assert out["full_mfu"] == round(6 * 1000 * 100 / 2.0 / 1e6, 4) and out["lora_mfu"] == round(
        4020 * 100 / 1e6, 4
    )


def test_bench_efficiency_writes_the_json_the_check_reads(tmp_path):
    path = tmp_path / "bench.json"
    cmd = [sys.executable, str(SCRIPTS / "bench_efficiency.py"), "--model", "tiny-bert", "--methods", "full,lora",
           "--batch", "2", "--seq-len", "16", "--steps", "1", "--warmup", "1", "--threads", "1", "--json", str(path),
           "--no-bare"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    bench = json.loads(path.read_text())
    assert [r["method"] for r in bench["rows"]] == ["full", "lora"] and bench["tokens_per_step"] == 32
    assert bench["peak_flops"] is None and bench["peak_what"] == "no peak known for cpu"
    out = gpu_check.summarise_steps(bench)
    assert out["full_mfu"] is None and 0 < out["lora_over_full_step"]


@pytest.mark.slow
def test_cpu_rehearsal_runs_every_check(tmp_path):
    """--cpu: every GPU check on the CPU at toy sizes (MiniLM 2 steps, tiny models, 2 gloo processes): its
    commands, records and JSON work end to end (~3 min on 2 cores)."""
    done = subprocess.run(
        ["bash", str(SCRIPTS / "gpu_check.sh"), "--out", str(tmp_path), "--cpu", "--steps", "2"],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    checks = json.loads((tmp_path / "gpu_check.json").read_text())["checks"]
    assert all(row["status"] == "ok" for row in checks.values()), checks
    assert checks["train_minilm"]["figures"]["record_status"] == "finished"
    assert 0 < checks["step_roberta-large"]["figures"]["lora_over_full_step"]
    assert checks["ddp"]["figures"]["max_loss_difference"] < 1e-2
