"""Inference latency of each method relative to the base model, measured side by side in one run.

The LoRA paper (Hu et al. 2021, Sec. 3 "Adapter layers introduce inference latency", Table 1) times one
forward pass of GPT-2 medium: at batch 1 and sequence length 128, 19.8 ms fine-tuned / LoRA against
23.9 ms (+20.7 %) for Adapter^L and 25.8 ms (+30.3 %) for Adapter^H; the gap shrinks at larger batches and
longer sequences. Adapters add layers that run one after another; LoRA merged into W (W + B A, Sec. 4.1)
adds nothing to the inference path, and neither does IA3 merged into W_k, W_v, W_ff.

Every variant is built from one random base model (the model YAML's dims, no download), put in eval mode and
timed forward under torch.no_grad: warm-up rounds, then `--repeats` rounds, each timing every variant once in
a rotated order (round-robin), so a drift of the machine hits all variants alike. Reported per variant: the
median ms, and the ratio to the base = the median over rounds of (variant ms / base ms of the same round),
with a 95 % interval of that median (order statistics, no normality assumed).

    python scripts/bench_latency.py                                    # GPT-2 small dims, batch 1 and 16, seq 128
    python scripts/bench_latency.py --model gpt2-medium --device cuda --bf16
    python scripts/bench_latency.py --threads 1 --repeats 30 --batch-sizes 1 --seq-len 16,128
"""

from __future__ import annotations

import argparse
import copy
import math
import platform
import statistics
import time
from dataclasses import dataclass

import torch
import transformers

from peftbench.config import compose
from peftbench.methods import apply_method, finish
from peftbench.models import family, hf_config


@dataclass(frozen=True)
class Variant:
    label: str
    method: str | None  # None: the base model itself
    merge: bool = False  # peftbench.methods.finish: merge LoRA / IA3, drop prefix tuning's MLP
    overrides: tuple[str, ...] = ()


VARIANTS = (
    Variant("base", None),
    Variant("lora merged", "lora", merge=True),
    Variant("lora unmerged", "lora"),
    Variant("ia3 merged", "ia3", merge=True),
    Variant("adapter_houlsby m=64", "adapter_houlsby", overrides=("method.bottleneck=64",)),
    Variant("adapter_pfeiffer m=48", "adapter_pfeiffer", overrides=("method.bottleneck=48",)),
    Variant("prefix_tuning n=10", "prefix_tuning", merge=True),
    Variant("prompt_tuning n=20", "prompt_tuning", overrides=("method.init=random_uniform",)),
)


def build_base(model_name: str) -> torch.nn.Module:
    """The model YAML's architecture with random weights (seeded) and a 2-class head."""
    model_cfg = compose([f"model={model_name}"]).model
    config = hf_config(model_cfg, num_labels=2)
    if config.pad_token_id is None:  # GPT-2: pad with EOS, the head reads the last non-pad token
        config.pad_token_id = config.eos_token_id if config.eos_token_id is not None else 0
    torch.manual_seed(int(model_cfg.get("init_seed", 0)))
    return transformers.AutoModelForSequenceClassification.from_config(config).eval()


def build_variant(base: torch.nn.Module, variant: Variant, model_name: str) -> torch.nn.Module:
    """A copy of the base with the method applied as training would apply it, finished as after training."""
    model = copy.deepcopy(base)
    if variant.method is not None:
        cfg = compose([f"model={model_name}", f"method={variant.method}", *variant.overrides])
        model = apply_method(model, cfg.method, family(cfg.model))
        if variant.merge:
            model = finish(model)
    return model.eval()


def make_inputs(config, batch: int, seq_len: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Random token ids without special tokens; encoder-decoder heads read the (one) EOS, so it ends each row."""
    g = torch.Generator().manual_seed(0)
    vocab = config.get_text_config().vocab_size
    special = sorted(
        {config.pad_token_id, config.eos_token_id, getattr(config, "bos_token_id", None)} - {None}
    )
    ids = torch.randint(0, vocab, (batch, seq_len), generator=g)
    ids[torch.isin(ids, torch.tensor(special))] = next(i for i in range(vocab) if i not in special)
    if config.is_encoder_decoder:
        ids[:, -1] = config.eos_token_id
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}


def timed_forward(model: torch.nn.Module, inputs: dict[str, torch.Tensor], device: torch.device) -> float:
    """Milliseconds of one forward pass (CUDA: synchronised before and after)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        model(**inputs)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def round_robin(models: dict[str, torch.nn.Module], inputs, device, warmup: int, repeats: int):
    """ms per variant per round; round r starts at variant r mod n, so no variant always runs first."""
    names = list(models)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            ms = timed_forward(models[name], inputs, device)
            if r >= warmup:
                times[name].append(ms)
    return times


def median_interval(xs: list[float], z: float = 1.96) -> tuple[float, float, float]:
    """Median and its distribution-free ~95 % interval: the order statistics at ranks (n -/+ z sqrt(n)) / 2."""
    s, n = sorted(xs), len(xs)
    lo = max(math.floor((n - z * math.sqrt(n)) / 2), 1)
    hi = min(math.ceil((n + z * math.sqrt(n)) / 2), n)
    return statistics.median(s), s[lo - 1], s[hi - 1]


def summarize(times: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    base = times["base"]
    out = {}
    for name, ms in times.items():
        ratio, lo, hi = median_interval([m / b for m, b in zip(ms, base)])
        out[name] = {"ms": statistics.median(ms), "ratio": ratio, "lo": lo, "hi": hi}
    return out


def added(model: torch.nn.Module, base: torch.nn.Module) -> tuple[int, int]:
    """Parameters and modules the method adds to the model that runs inference."""
    params = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in base.parameters())
    return params, len(list(model.modules())) - len(list(base.modules()))


def table(results: dict[tuple[int, int], dict], extra: dict[str, tuple[int, int]]) -> str:
    points = list(results)
    head = ["variant", "added params", "added modules"]
    for b, s in points:
        head += [f"b={b} L={s} ms", f"b={b} L={s} × base [95 % CI]"]
    rows = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for name, (n_params, n_modules) in extra.items():
        cells = [name, f"{n_params:,}", str(n_modules)]
        for p in points:
            r = results[p][name]
            cells += [f"{r['ms']:.2f}", f"{r['ratio']:.3f} [{r['lo']:.3f}, {r['hi']:.3f}]"]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gpt2", help="a configs/model YAML name (built from its dims, random)")
    p.add_argument("--batch-sizes", type=ints, default=[1, 16], help="comma-separated, e.g. 1,16")
    p.add_argument("--seq-len", type=ints, default=[128], help="comma-separated, e.g. 16,128")
    p.add_argument("--repeats", type=int, default=100, help="timed rounds (every variant once per round)")
    p.add_argument("--warmup", type=int, default=5, help="untimed rounds first")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true", help="weights and activations in bfloat16")
    p.add_argument("--variants", default=None, help="comma-separated labels' methods to keep (default: all)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    keep = set(args.variants.split(",")) if args.variants else None
    variants = [v for v in VARIANTS if keep is None or v.method is None or v.method in keep]
    base = build_base(args.model)
    models = {v.label: build_variant(base, v, args.model) for v in variants}
    extra = {name: added(m, base) for name, m in models.items()}
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    for m in models.values():
        m.to(device=device, dtype=dtype)
    results = {}
    for b in args.batch_sizes:
        for s in args.seq_len:
            inputs = make_inputs(base.config, b, s, device)
            times = round_robin(models, inputs, device, args.warmup, args.repeats)
            results[(b, s)] = summarize(times)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    print(
        f"model={args.model} (random init) device={device.type} ({where}) dtype={str(dtype).split('.')[-1]} "
        f"threads={torch.get_num_threads()} repeats={args.repeats} warmup={args.warmup} torch={torch.__version__}"
    )
    print(table(results, extra))


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or "cpu"
    return name


if __name__ == "__main__":
    main()
