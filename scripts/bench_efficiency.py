"""Training efficiency of every method on one model, measured side by side in one run of this script.

Each method trains the same random-init model (a model YAML's dims, no download; random weights time like
trained ones) on the same fixed batches of random tokens with a 2-class head, in its own subprocess so that
peak memory is the method's own (CPU: peak RSS of the process; CUDA: peak allocated). Each method runs twice:
stepped as peftbench's loop steps (accelerate-prepared model and optimizer, the method's optimizer and hooks)
and by a bare hand-written torch loop on the same model and batches. Per method: trainable parameters, steady
step time (forward + backward + optimizer step; `--warmup` steps dropped), step time and peak memory relative
to full fine-tuning and to the bare loop, tokens/s (`--no-bare`: peftbench's loop only). Inference latency relative to the base model
(LoRA and IA3 merged and unmerged, adapters, prefix, prompt) is `scripts/bench_latency.py`'s job; with
`--latency` this script runs it on the same model and batch and prints its table after this one.

    python scripts/bench_efficiency.py                                   # RoBERTa-base dims, CPU
    python scripts/bench_efficiency.py --threads 2 --steps 6 --warmup 2 --methods full,lora,bitfit
    python scripts/bench_efficiency.py --model roberta-large --device cuda --bf16 --batch 32
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch


def trained_methods() -> list[str]:
    """Every method that trains (its module's capabilities), full fine-tuning first: the reference row."""
    from peftbench.config import load_option
    from peftbench.methods import capabilities
    from peftbench.paths import group_options

    names = [m for m in group_options("method") if capabilities(load_option("method", m)).trains]
    return sorted(names, key=lambda m: m != "full")


# offline: prompt tuning's default init reads the label words with the model's tokenizer (a download)
OVERRIDES = {"prompt_tuning": ["method.init=random_uniform"]}


def worker(a: argparse.Namespace) -> dict:
    """One method, one loop: build, apply, train --warmup + --steps steps on fixed batches, report. `--loop
    peftbench` steps as peftbench's loop does (accelerate-prepared model and optimizer, the method's optimizer
    and loss / step hooks, accelerate's clipping); `--loop bare` is a hand-written torch loop (AdamW, backward,
    clip, step) on the same model with the same method applied."""
    sys.path.insert(0, os.path.dirname(__file__))
    from bench_latency import build_base, make_inputs

    from peftbench.config import compose
    from peftbench.methods import apply_method
    from peftbench.models import count, family

    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    cfg = compose([f"model={a.model}", f"method={a.method}", *OVERRIDES.get(a.method, [])])
    model = build_base(a.model)
    if a.method != "full":
        model = apply_method(model, cfg.method, family(cfg.model))
    model.to(device).train()
    counts = count(model, family(cfg.model).head)
    params = [p for p in model.parameters() if p.requires_grad]
    inputs = make_inputs(model.config, a.batch, a.seq_len, device)
    labels = torch.zeros(a.batch, dtype=torch.long, device=device)
    step = (peftbench_step if a.loop == "peftbench" else bare_step)(model, params, cfg, a)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(a.warmup + a.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step(inputs, labels)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    steady = sorted(times[a.warmup :])
    s_per_step = steady[len(steady) // 2]  # median: robust to a disturbed step
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "method": a.method,
        "loop": a.loop,
        "trainable": counts["trainable_without_head"],  # the papers' count: without the task head
        "total": counts["total_without_head"],
        "s_per_step": s_per_step,
        "tokens_per_s": a.batch * a.seq_len / s_per_step,
        "peak_mib": peak,
    }


def bare_step(model, params, cfg, a: argparse.Namespace):
    opt = torch.optim.AdamW(params, lr=cfg.train.lr)

    def step(inputs, labels):
        with torch.autocast(a.device, dtype=torch.bfloat16, enabled=a.bf16):
            loss = model(**inputs, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def peftbench_step(model, params, cfg, a: argparse.Namespace):
    from accelerate import Accelerator

    from peftbench.methods import hook
    from peftbench.optim import default_optimizer

    acc = Accelerator(cpu=a.device == "cpu", mixed_precision="bf16" if a.bf16 else "no")
    opt = (hook(cfg.method, "make_optimizer") or default_optimizer)(params, model, cfg.train, cfg.method)
    prepared, opt = acc.prepare(model, opt)
    if on_start := hook(cfg.method, "on_train_start"):
        on_start(model, a.warmup + a.steps, cfg.method)
    adjust, after = hook(cfg.method, "adjust_loss"), hook(cfg.method, "after_step")
    n = [0]

    def step(inputs, labels):
        loss = prepared(**inputs, labels=labels).loss
        if adjust:
            loss = adjust(model, loss, cfg.method)
        acc.backward(loss)
        acc.clip_grad_norm_(params, cfg.train.max_grad_norm)
        opt.step()
        n[0] += 1
        if after:
            after(model, n[0], cfg.method)
        opt.zero_grad(set_to_none=True)

    return step


def spawn(method: str, a: argparse.Namespace, loop: str = "peftbench") -> dict:
    cmd = [sys.executable, __file__, "--worker", "--method", method, "--model", a.model, "--loop", loop]
    cmd += ["--batch", str(a.batch), "--seq-len", str(a.seq_len), "--steps", str(a.steps)]
    cmd += ["--warmup", str(a.warmup), "--device", a.device, *(["--bf16"] if a.bf16 else [])]
    cmd += ["--threads", str(a.threads)] if a.threads else []
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"worker {method} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows: list[dict], memory: str) -> str:
    """One line per method (peftbench's loop), with its ratios to full fine-tuning and to the bare loop."""
    full = next(r for r in rows if r["method"] == "full")
    lines = [
        f"| method | trainable (no head) | % of base | s/step | × full FT step | × bare step | {memory} MiB | "
        "× full FT memory | × bare memory | tokens/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        bare = r.get("bare")
        step_ratio = f"{r['s_per_step'] / bare['s_per_step']:.2f}" if bare else "–"
        memory_ratio = f"{r['peak_mib'] / bare['peak_mib']:.3f}" if bare else "–"
        lines.append(
            f"| {r['method']} | {r['trainable']:,} | {100 * r['trainable'] / r['total']:.3f} | "
            f"{r['s_per_step']:.3f} | {r['s_per_step'] / full['s_per_step']:.2f} | {step_ratio} | "
            f"{r['peak_mib']:.0f} | {r['peak_mib'] / full['peak_mib']:.2f} | {memory_ratio} | "
            f"{r['tokens_per_s']:.0f} |"
        )
    return "\n".join(lines)


def write_json(a: argparse.Namespace, rows: list[dict]) -> None:
    """The rows with the settings, the tokens of a step and the device's peak FLOP/s (for MFU)."""
    from peftbench.env import peak_flops

    device = torch.device(a.device)
    peak, peak_what = peak_flops(device, "bf16" if a.bf16 else "no")
    out = {
        "model": a.model, "batch": a.batch, "seq_len": a.seq_len, "steps": a.steps, "device": a.device,
        "bf16": a.bf16, "tokens_per_step": a.batch * a.seq_len, "peak_flops": peak, "peak_what": peak_what,
        "torch": torch.__version__, "rows": rows,
    }  # fmt: skip
    with open(a.json, "w") as f:
        json.dump(out, f, indent=2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="roberta-base")
    p.add_argument("--methods", default=None, help="comma-separated (default: every method that trains)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    p.add_argument("--latency", action="store_true", help="also run scripts/bench_latency.py on this model")
    p.add_argument("--json", default=None, help="also write the rows and settings to this JSON file")
    p.add_argument("--worker", action="store_true")
    p.add_argument("--method", default="full")
    p.add_argument("--loop", default="peftbench", choices=("peftbench", "bare"))
    p.add_argument("--no-bare", action="store_true", help="skip the bare-loop run of each method")
    a = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if a.worker:
        print(json.dumps(worker(a)))
        return
    methods = a.methods.split(",") if a.methods else trained_methods()
    if "full" not in methods:
        methods.insert(0, "full")
    start = time.perf_counter()
    rows = []
    for m in methods:  # the two loops of a method one after the other: the same machine state for both
        rows.append(spawn(m, a))
        rows[-1]["bare"] = None if a.no_bare else spawn(m, a, "bare")
    memory = "peak allocated" if a.device == "cuda" else "peak RSS"
    print(
        f"model={a.model} (random init) batch={a.batch} seq_len={a.seq_len} steps={a.steps} (+{a.warmup} "
        f"warm-up, median step) device={a.device}{' bf16' if a.bf16 else ''} threads={a.threads or 'default'} "
        f"torch {torch.__version__}; {time.perf_counter() - start:.0f} s"
    )
    print(table(rows, memory))
    if a.json:
        write_json(a, rows)
    if a.latency:
        cmd = [
            sys.executable,
            os.path.join(os.path.dirname(__file__), "bench_latency.py"),
            "--model",
            a.model,
        ]
        cmd += ["--batch-sizes", str(a.batch), "--seq-len", str(a.seq_len), "--device", a.device]
        cmd += (["--threads", str(a.threads)] if a.threads else []) + (["--bf16"] if a.bf16 else [])
        subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
