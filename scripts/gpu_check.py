"""The GPU check: what a GPU machine must show, in one run of at most ~10 minutes, with no hub access.

    bash scripts/gpu_check.sh                       # every check; JSON in results/gpu_check/gpu_check.json
    bash scripts/gpu_check.sh --out DIR --steps 300

Checks (each a row of the table, with its figures and seconds):
  environment   torch / CUDA / driver / device, and the determinism settings a bit-reproducible GPU run needs
  train_minilm  `peftbench train` end to end on CUDA in bf16: the real MiniLM, LoRA, SST-2 (PEFTBENCH_DATA_DIR),
                --steps optimizer steps; dev accuracy, s/step, peak max_memory_allocated, MFU from the record
  step_<model>  LoRA and full fine-tuning step time, peak max_memory_allocated and MFU at RoBERTa-large and
                GPT-2-medium dims (random init, bf16; scripts/bench_efficiency.py), and their ratios
  decode        batched vs one-at-a-time decoding throughput (scripts/bench_decode.py, GPT-2 dims, random)
  ddp           2-process data parallelism equals 1 process (losses), when two GPUs are visible

On a machine without CUDA this is the dry path: the environment row runs, every other row says that it needs
a GPU, and the exit code is 0. `--cpu` rehearses every check on the CPU at toy sizes (tiny models, a few
steps; two gloo processes for DDP): it tests the plumbing, its figures mean nothing. A failed check is exit
code 1 (the table and the JSON are still written).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
STEP_MODELS = ("roberta-large", "gpt2-medium")
TOY_MODELS = {"roberta-large": "tiny-roberta", "gpt2-medium": "tiny-gpt2"}


def device_args(a: argparse.Namespace) -> list[str]:
    """The train overrides of the device: CUDA in bf16, or (--cpu) the CPU in fp32 with a small evaluation."""
    if a.cpu:
        return ["train.device=cpu", "train.max_eval_samples=32", "train.num_threads=1"]
    return ["train.device=cuda", "train.mixed_precision=bf16"]


def mfu(flops_per_step: float, s_per_step: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: the step's FLOPs per second over the device's peak."""
    if not peak or s_per_step <= 0:
        return None
    return flops_per_step / s_per_step / peak


def step_flops(total: int, trainable: int, tokens: int) -> float:
    """A training step's FLOPs (peftbench/cost.py, Kaplan et al. 2020): forward 2 N, backward 2 N for the
    activations' gradients and 2 N_trainable for the weights', per token: 6 N for full fine-tuning."""
    return (4.0 * total + 2.0 * trainable) * tokens


def run(cmd: list[str], env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=timeout, cwd=REPO)


def failed(done: subprocess.CompletedProcess) -> dict:
    """A check whose command failed: its row gives the command's last line of stderr."""
    return {"status": "failed", "reason": (done.stderr.strip().splitlines() or ["no output"])[-1]}


def check_environment(a: argparse.Namespace) -> dict:
    import torch

    figures = {
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cuda": torch.version.cuda,
        "devices": torch.cuda.device_count(),
        "CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
    }
    if torch.cuda.is_available():
        figures["device"] = torch.cuda.get_device_name(0)
        smi = run(["nvidia-smi", "--query-gpu=driver_version,memory.total", "--format=csv,noheader"])
        figures["driver"] = smi.stdout.strip() if smi.returncode == 0 else None
    return {"status": "ok", "figures": figures}


def check_train_minilm(a: argparse.Namespace) -> dict:
    out = Path(a.out) / "results"
    overrides = [
        "model=minilm", "method=lora", "task=sst2", *device_args(a),
        f"train.max_steps={a.steps}", "train.batch_size=32", f"train.eval_every={a.steps}",
        "train.progress=false", "train.force=true", "name=gpu_check",
    ]  # fmt: skip
    done = run(
        [sys.executable, "-m", "peftbench.cli", "train", *overrides], {"PEFTBENCH_RESULTS_DIR": str(out)}, 480
    )
    if done.returncode != 0:
        return failed(done)
    (path,) = sorted((out / "gpu_check").glob("*.json"))
    rec = json.loads(path.read_text())
    return {"status": "ok" if rec["status"] == "finished" else "failed", "figures": summarise_record(rec)}


def summarise_record(rec: dict) -> dict:
    """The figures of a `peftbench train` record that the check reports."""
    train = rec.get("train") or {}
    return {
        "record_status": rec["status"],
        "accuracy": (rec.get("best") or {}).get("metrics", {}).get("accuracy"),
        "steps": train.get("steps"),
        "s_per_step": train.get("s_per_step"),
        "tokens_per_s": train.get("tokens_per_s"),
        "mfu": train.get("mfu"),
        "peak_mib": (rec.get("memory") or {}).get("peak_mib"),
        "memory_kind": (rec.get("memory") or {}).get("kind"),
        "device": (rec.get("device") or {}).get("name") or (rec.get("device") or {}).get("type"),
    }


def check_step(model: str, a: argparse.Namespace) -> dict:
    path = Path(a.out) / f"step_{model}.json"
    cmd = [sys.executable, str(SCRIPTS / "bench_efficiency.py"), "--methods", "full,lora", "--json", str(path)]
    if a.cpu:  # toy sizes: 1 step of batch 2 x 16 tokens
        cmd += ["--model", TOY_MODELS[model], "--device", "cpu", "--batch", "2", "--seq-len", "16", "--steps", "1",
                "--warmup", "1", "--threads", "1"]  # fmt: skip
    else:
        cmd += ["--model", model, "--device", "cuda", "--bf16", "--batch", "16", "--seq-len", "256", "--steps", "10"]
    done = run(cmd, timeout=600)
    if done.returncode != 0:
        return failed(done)
    return {"status": "ok", "figures": summarise_steps(json.loads(path.read_text()))}


def summarise_steps(bench: dict) -> dict:
    """LoRA vs full fine-tuning from bench_efficiency.py's JSON: step time, peak memory, MFU and the ratios."""
    rows = {r["method"]: r for r in bench["rows"]}
    full, lora = rows["full"], rows["lora"]
    out = {}
    for name, r in (("full", full), ("lora", lora)):
        out[f"{name}_s_per_step"] = round(r["s_per_step"], 4)
        out[f"{name}_peak_mib"] = round(r["peak_mib"])
        m = mfu(
            step_flops(r["total"], r["trainable"], bench["tokens_per_step"]),
            r["s_per_step"],
            bench["peak_flops"],
        )
        out[f"{name}_mfu"] = None if m is None else round(m, 4)
    out["lora_over_full_step"] = round(lora["s_per_step"] / full["s_per_step"], 3)
    out["lora_over_full_memory"] = round(lora["peak_mib"] / full["peak_mib"], 3)
    return out


def check_decode(a: argparse.Namespace) -> dict:
    cmd = [sys.executable, str(SCRIPTS / "bench_decode.py"), "--random"]
    if a.cpu:
        cmd += [
            "--model",
            "tiny-gpt2",
            "--n",
            "4",
            "--batch-size",
            "2",
            "--max-new-tokens",
            "4",
            "--device",
            "cpu",
        ]
    else:
        cmd += ["--model", "gpt2", "--n", "100", "--device", "cuda"]
    done = run(cmd, timeout=300)
    if done.returncode != 0:
        return failed(done)
    return {"status": "ok", "figures": {"output": done.stdout.strip().splitlines()[-3:]}}


def check_ddp(a: argparse.Namespace) -> dict:
    out = Path(a.out) / "ddp"
    steps = min(a.steps, 20)
    common = [
        "-m",
        "peftbench.cli",
        "train",
        "model=minilm",
        "method=lora",
        "task=sst2",
        "train.batch_size=32",
    ]
    common += [o for o in device_args(a) if "mixed_precision" not in o]  # fp32: the losses must agree
    common += [
        f"train.max_steps={steps}",
        f"train.eval_every={steps}",
        "train.progress=false",
        "train.force=true",
    ]
    common += ["+model.config_overrides.hidden_dropout_prob=0"]
    common += ["+model.config_overrides.attention_probs_dropout_prob=0"]
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    curves = {}
    for name, launcher in (("two", torchrun), ("one", [])):
        env = {"PEFTBENCH_RESULTS_DIR": str(out)}
        done = run([sys.executable, *launcher, *common, f"name={name}"], env, 300)
        if done.returncode != 0:
            return failed(done)
        (path,) = sorted((out / name).glob("*.json"))
        curves[name] = json.loads(path.read_text())["train"]["loss_curve"]
    diff = max(abs(x - y) for x, y in zip(curves["two"], curves["one"]))
    return {"status": "ok" if diff < 1e-2 else "failed", "figures": {"max_loss_difference": diff}}


def checks(a: argparse.Namespace) -> list[tuple[str, object, str | None]]:
    """(name, function, why it cannot run here or None)."""
    import torch

    gpu = None if (torch.cuda.is_available() and not a.dry) or a.cpu else "needs a CUDA device (none visible)"
    two = gpu or (None if torch.cuda.device_count() >= 2 or a.cpu else "needs two CUDA devices")
    rows = [("environment", check_environment, None), ("train_minilm", check_train_minilm, gpu)]
    rows += [(f"step_{m}", lambda a, m=m: check_step(m, a), gpu) for m in STEP_MODELS]
    return rows + [("decode", check_decode, gpu), ("ddp", check_ddp, two)]


def table(results: dict) -> str:
    lines = ["| check | status | s | figures |", "|---|---|---:|---|"]
    for name, r in results.items():
        shown = r.get("reason") or ", ".join(f"{k}={v}" for k, v in (r.get("figures") or {}).items())
        lines.append(f"| {name} | {r['status']} | {r.get('seconds', 0):.1f} | {shown} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(REPO / "results" / "gpu_check"))
    p.add_argument("--steps", type=int, default=300, help="optimizer steps of the MiniLM run")
    p.add_argument("--dry", action="store_true", help="skip the GPU checks even if a GPU is visible")
    p.add_argument("--cpu", action="store_true", help="rehearse every check on the CPU at toy sizes")
    a = p.parse_args(argv)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    results, start = {}, time.perf_counter()
    for name, fn, why_not in checks(a):
        t0 = time.perf_counter()
        if why_not:
            results[name] = {"status": "skipped", "reason": why_not}
        else:
            try:
                results[name] = fn(a)
            except Exception as e:  # one check's failure is its row, not the end of the check
                results[name] = {"status": "failed", "reason": f"{type(e).__name__}: {e}"}
        results[name]["seconds"] = round(time.perf_counter() - t0, 1)
    print(table(results))
    total = round(time.perf_counter() - start, 1)
    (Path(a.out) / "gpu_check.json").write_text(
        json.dumps({"seconds": total, "checks": results}, indent=2) + "\n"
    )
    print(f"{total} s; JSON: {Path(a.out) / 'gpu_check.json'}")
    return 1 if any(r["status"] == "failed" for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
