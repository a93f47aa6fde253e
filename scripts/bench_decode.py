"""Batched decoding vs one-at-a-time `generate`, same model, same inputs, same run.

    python scripts/bench_decode.py                      # 500 E2E dev inputs, tiny GPT-2, greedy
    python scripts/bench_decode.py --model gpt2 --random --n 100     # GPT-2 small dims, random weights, offline
    python scripts/bench_decode.py --model small-gpt2 --path results/bases/small-gpt2-e2e   # a trained model

Both paths decode the first N distinct E2E dev inputs with the same `task.decode` settings and the same
(random-init or pretrained) model: one `generate` call per input, then peftbench's batched path (prompts
left-padded for GPT-2, KV cache on, `--batch-size` inputs per call). Prints seconds, inputs/s, the speed-up
and how many outputs agree exactly (left padding can change the last float bits, rarely a token).
"""

from __future__ import annotations

import argparse
import os
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-gpt2")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--strategy", default="greedy", choices=("greedy", "beam", "sample"))
    ap.add_argument("--num-beams", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--random", action="store_true", help="random weights from the model YAML's dims (offline)"
    )
    ap.add_argument(
        "--path", default=None, help="a saved model folder (model.path), e.g. train.export_model's"
    )
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if a.threads:
        torch.set_num_threads(a.threads)
    from torch.utils.data import DataLoader

    from peftbench.config import compose
    from peftbench.formats.generation import GenerationFormat, decode_all, encode_eval
    from peftbench.models import family, load_model
    from peftbench.tasks import load_task

    cfg = compose(
        [
            "task=e2e",
            f"model={a.model}",
            f"task.decode.strategy={a.strategy}",
            f"task.decode.num_beams={a.num_beams}",
            f"task.decode.max_new_tokens={a.max_new_tokens}",
            *(["model.source=random", "model.tokenizer=gpt2_bpe"] if a.random else []),
            *([f"model.path={a.path}"] if a.path else []),
        ]
    )
    fam = family(cfg.model, True)
    kind = fam.kind
    rows = load_task(cfg.task, seed=0).validation[: a.n]
    model, tok = load_model(cfg.model, "generation", 1, lm=True)
    model.to(a.device).eval()
    batcher = GenerationFormat(cfg, None, tok, fam)
    feats = encode_eval(rows, cfg.task, tok, kind)

    def to_dev(batch):
        return {k: v.to(a.device) for k, v in batch.items()}

    torch.manual_seed(0)
    t0 = time.perf_counter()
    single = [batcher.generate(model, to_dev(batcher([f])))[0] for f in feats]
    t_single = time.perf_counter() - t0

    order = sorted(range(len(feats)), key=lambda i: -len(feats[i]["input_ids"]))  # less padding
    loader = DataLoader([feats[i] for i in order], a.batch_size, collate_fn=lambda b: to_dev(batcher(b)))
    torch.manual_seed(0)
    t0 = time.perf_counter()
    texts = decode_all(model, loader, batcher)
    t_batched = time.perf_counter() - t0
    batched = [None] * len(feats)
    for i, t in zip(order, texts):
        batched[i] = t

    same = sum(x == y for x, y in zip(single, batched))
    print(
        f"model {a.model}{' (random init)' if a.random else ''}{f' from {a.path}' if a.path else ''} ({kind}), {len(feats)} E2E dev inputs, {a.strategy}, max {a.max_new_tokens} new tokens"
    )
    print(f"one at a time: {t_single:8.2f} s  ({len(feats) / t_single:7.1f} inputs/s)")
    print(f"batched x{a.batch_size}: {t_batched:8.2f} s  ({len(feats) / t_batched:7.1f} inputs/s)")
    print(f"speed-up {t_single / t_batched:.1f}x; identical outputs {same}/{len(feats)}")


if __name__ == "__main__":
    main()
