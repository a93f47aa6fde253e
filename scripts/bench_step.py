"""Step time and peak memory, measured side by side in one run of this script:

1. LoRA vs full fine-tuning through `peftbench train` (same model, task, batches, steps);
2. `peftbench train` with LoRA vs a bare peft + torch loop doing the same steps on the same batches.

Each measurement runs in its own subprocess, so the peak memory of one (CPU: peak RSS; CUDA: peak
allocated) is not the peak of another. The bare loop replays the batches peftbench draws (same seed, same
sampler), and both count data loading + forward + backward + optimizer step, not evaluation.

    python scripts/bench_step.py                  # MiniLM on SST-2, 60 steps, 3 alternating repeats
    python scripts/bench_step.py --steps 100 --model minilm --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

COMMON = [
    "task=sst2",
    "train.batch_size=32",
    "train.max_eval_samples=8",
    "train.save_adapter=false",
    "train.progress=false",
    "train.group_by_length=false",
    "train.force=true",
    "train.warmup_ratio=0.0",
]


def worker_peftbench(args) -> dict:
    from peftbench.config import compose
    from peftbench.run import execute

    cfg = compose([f"model={args.model}", f"method={args.method}", f"train.max_steps={args.steps}", *COMMON])
    rec = execute(cfg)
    tr = rec["train"]
    return {
        "s_per_step": tr["train_s"] / tr["steps"],
        "tokens": tr["tokens"],
        "peak_mib": rec["memory"]["peak_mib"],
        "trainable": rec["params"]["trainable_without_head"],
        "device": rec["device"]["type"],
    }


def worker_bare(args) -> dict:
    """The same LoRA steps written directly against transformers + peft + torch."""
    import resource

    import torch
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import DataLoader
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        get_linear_schedule_with_warmup,
    )

    from peftbench.config import compose
    from peftbench.models import model_source
    from peftbench.tasks import load_task

    cfg = compose([f"model={args.model}", "method=lora", f"train.max_steps={args.steps}", *COMMON])
    torch.manual_seed(cfg.seed)
    task = load_task(cfg.task, seed=cfg.seed, max_train=None)
    source = model_source(cfg.model)
    tok = AutoTokenizer.from_pretrained(source)
    model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=2)
    model = get_peft_model(
        model,
        LoraConfig(
            r=8,
            lora_alpha=16,
            lora_dropout=0.1,
            target_modules=["query", "value"],
            modules_to_save=["classifier"],
        ),
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).train()
    enc = tok([r["sentence"] for r in task.train], truncation=True, max_length=cfg.task.max_length)
    feats = [
        {"input_ids": i, "attention_mask": m, "token_type_ids": t, "labels": r["label"]}
        for i, m, t, r in zip(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"], task.train)
    ]
    loader = DataLoader(
        feats,
        batch_size=32,
        shuffle=True,
        generator=torch.Generator().manual_seed(cfg.seed),
        collate_fn=lambda b: tok.pad(b, return_tensors="pt"),
    )
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, eps=cfg.train.adam_eps
    )
    sched = get_linear_schedule_with_warmup(opt, 0, args.steps)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    tokens, t_prev, elapsed = 0, time.perf_counter(), 0.0
    for step, batch in enumerate(loader):
        if step == args.steps:
            break
        batch = {k: v.to(device) for k, v in batch.items()}
        loss = torch.nn.functional.cross_entropy(
            model(**{k: v for k, v in batch.items() if k != "labels"}).logits, batch["labels"]
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        tokens += int(batch["attention_mask"].sum())
        now = time.perf_counter()
        elapsed += now - t_prev
        t_prev = now
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    return {
        "s_per_step": elapsed / args.steps,
        "tokens": tokens,
        "peak_mib": round(peak, 1),
        "device": device.type,
    }


def spawn(kind: str, method: str, args, steps: int) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        kind,
        "--method",
        method,
        "--model",
        args.model,
        "--steps",
        str(steps),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PEFTBENCH_RESULTS_DIR": tmp, "PEFTBENCH_LOG_DIR": tmp}
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.exit(f"worker {kind}/{method} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="minilm")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--repeats", type=int, default=3, help="alternating repeats")
    p.add_argument("--warmup", type=int, default=10, help="steps whose time is subtracted (one-time costs)")
    p.add_argument("--worker", choices=("peftbench", "bare"))
    p.add_argument("--method", default="lora")
    args = p.parse_args()
    if args.worker:
        result = worker_peftbench(args) if args.worker == "peftbench" else worker_bare(args)
        print(json.dumps(result))
        return
    # Each point runs twice, for --warmup and for --warmup + --steps steps: the difference of the two train
    # times over --steps is the steady per-step time, free of one-time costs (first allocations, first batch).
    kinds = {
        "peftbench lora": ("peftbench", "lora"),
        "bare peft lora": ("bare", "lora"),
        "peftbench full": ("peftbench", "full"),
    }
    runs: dict[str, list[dict]] = {k: [] for k in kinds}
    for _ in range(args.repeats):  # alternate, so drifts of the machine hit all three alike
        for name, (kind, method) in kinds.items():
            short = spawn(kind, method, args, args.warmup)
            long = spawn(kind, method, args, args.warmup + args.steps)
            steady = (
                long["s_per_step"] * (args.warmup + args.steps) - short["s_per_step"] * args.warmup
            ) / args.steps
            runs[name].append({**long, "s_per_step": steady})
    # step time: the fastest repeat (the one least disturbed by anything else on the machine); memory: median
    med = {
        k: {
            "s_per_step": min(r["s_per_step"] for r in v),
            **{m: statistics.median(r[m] for r in v) for m in ("peak_mib", "tokens")},
        }
        for k, v in runs.items()
    }
    lora, bare, full = med["peftbench lora"], med["bare peft lora"], med["peftbench full"]
    device = runs["peftbench lora"][0]["device"]
    memory = "peak allocated" if device == "cuda" else "peak RSS of the process"
    print(
        f"model={args.model} task=sst2 batch=32 steps={args.steps} (+{args.warmup} warm-up) device={device} repeats={args.repeats} "
        f"(s/step: fastest repeat; memory: median, {memory})"
    )
    print(f"{'run':<16} {'s/step':>8} {'peak MiB':>9} {'tokens':>8}")
    for k, v in med.items():
        print(f"{k:<16} {v['s_per_step']:>8.4f} {v['peak_mib']:>9.0f} {v['tokens']:>8.0f}")
    assert lora["tokens"] == bare["tokens"], "the bare loop did not see the same batches"
    print(f"LoRA / full FT step time:        {lora['s_per_step'] / full['s_per_step']:.3f}x")
    print(f"LoRA / full FT peak memory:      {lora['peak_mib'] / full['peak_mib']:.3f}x")
    print(f"peftbench / bare peft step time: {lora['s_per_step'] / bare['s_per_step']:.3f}x  (goal <= 1.05)")


if __name__ == "__main__":
    main()
