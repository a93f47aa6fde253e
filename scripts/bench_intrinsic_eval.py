"""Evaluation time of `method=intrinsic` with and without reusing the written weights, same model, same run.

    python scripts/bench_intrinsic_eval.py                     # MiniLM, MRPC dev, Fastfood d = 20,000
    python scripts/bench_intrinsic_eval.py --d 2000 --threads 2

The write hook computes θ₀ + P θ_d (a Fastfood transform over every weight) before a forward; in evaluation
(no gradients, θ_d unchanged) it writes once and reuses the weights for every later batch. The second pass
forces the old behaviour, one write per forward, by touching θ_d before each forward. Prints the seconds of
one write, both evaluations, their ratio and whether the metrics agree.
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="minilm")
    p.add_argument("--task", default="mrpc")
    p.add_argument("--d", type=int, default=20000)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from peftbench.config import compose
    from peftbench.evaluate import evaluate
    from peftbench.setup import prepare

    cfg = compose([f"model={a.model}", "method=intrinsic", f"method.d={a.d}", f"task={a.task}",
                   f"train.num_threads={a.threads}"])  # fmt: skip
    s = prepare(cfg, {})
    model, sub = s.model, s.model.intrinsic
    t = time.perf_counter()
    with torch.no_grad():
        sub.deltas()
    write = time.perf_counter() - t
    t = time.perf_counter()
    reused = evaluate(model, s.eval_loader, s)
    once = time.perf_counter() - t

    def touch(module, args):
        with torch.no_grad():
            sub.theta.add_(0.0)  # an in-place write: the hook recomputes

    handle = model.register_forward_pre_hook(touch, prepend=True)
    t = time.perf_counter()
    every = evaluate(model, s.eval_loader, s)
    each = time.perf_counter() - t
    handle.remove()
    print(f"{a.model} {a.task} d={a.d} ({sub.kind}), {len(s.eval_loader)} batches: one write {write:.2f} s")
    print(f"evaluation, write once: {once:.1f} s; write per forward: {each:.1f} s; ratio {each / once:.2f}x")
    print(f"same metrics: {reused['metrics'] == every['metrics']} ({reused['metrics']})")


if __name__ == "__main__":
    main()
