"""What a method costs, in the units of T-Few's Table 1 (Liu et al. 2022, Sec. 4.2): inference FLOPs per
example, training FLOPs, and the bytes that must be stored per task.

FLOPs follow Kaplan et al. (2020), as T-Few does: a forward pass of an N-parameter model costs 2 N FLOPs per
token it reads, and training costs 3 forward passes (forward + backward). The tokens are the ones this run
really feeds the model: in rank classification the context once and every answer choice after it when the
batcher shares the context (`RankBatcher.tokens`; T-Few counts T0's encoder input once), else every choice's
own sequence; the demonstrations in front of every input for in-context learning; the decoder's target for
T5 / BART.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import torch

FORMULA = "inference = 2 N tokens per example; training = 3 x inference x examples trained (Kaplan et al. 2020, T-Few Sec. 4.2)"


def example_tokens(feature: dict, seq2seq: bool) -> int:
    """Tokens one example costs: the input of every choice (and its decoder target for seq2seq); for
    generation the prompt (training: with the target), not the tokens decoded."""
    n = 0
    for c in feature.get("choices") or [feature]:
        n += len(c["input_ids"])
        if seq2seq and isinstance(c.get("labels"), list):
            n += len(c["labels"])
    return n


def mean_tokens(features: list[dict], tokens_of: Callable[[dict], int]) -> float:
    return statistics.fmean(tokens_of(f) for f in features) if features else 0.0


def stored_bytes(model: torch.nn.Module, stored_params: int) -> int:
    """Bytes of what a task keeps: its stored parameters at the trainable parameters' precision."""
    sizes = {p.element_size() for p in model.parameters() if p.requires_grad}
    return stored_params * (max(sizes) if sizes else 4)


def static_cost(
    model: torch.nn.Module,
    n_params: int,
    stored_params: int,
    train: list[dict],
    evals: list[dict],
    seq2seq: bool,
    demonstrations: str | None,
    tokens_of: Callable[[dict], int] | None = None,
) -> dict[str, Any]:
    """The run's costs that do not depend on how long it trains; `add_training` adds the rest.
    `tokens_of`: the tokens a feature costs (default `example_tokens`)."""
    tokens_of = tokens_of or (lambda f: example_tokens(f, seq2seq))
    per_example = mean_tokens(evals, tokens_of)
    if demonstrations is not None:  # in-context learning stores its prompt, not weights
        disk, what = len(demonstrations.encode("utf-8")), "demonstrations (UTF-8 text)"
    elif stored_params:
        disk, what = stored_bytes(model, stored_params), "trained parameters (incl. a new head)"
    else:
        disk, what = 0, "nothing (zero-shot)"
    return {
        "params": n_params,
        "inference_tokens_per_example": round(per_example, 2),
        "inference_flops_per_example": 2.0 * n_params * per_example,
        "train_tokens_per_example": round(mean_tokens(train, tokens_of), 2),
        "training_flops": 0.0,
        "disk_bytes": disk,
        "disk_what": what,
        "formula": FORMULA,
    }


def add_training(cost: dict[str, Any], examples_trained: int, trainable: int) -> None:
    """Training FLOPs two ways: T-Few's 3 forward passes per example (its Table 1 counts every method so), and
    per pass for this method: forward 2 N, backward 2 N for the activations' gradients plus 2 N_trainable for
    the weights' (Kaplan et al. 2020): 6 N for full fine-tuning, about 4 N when the base is frozen."""
    tokens = cost["train_tokens_per_example"] * examples_trained
    n = cost["params"]
    cost["examples_trained"] = examples_trained
    cost["training_flops"] = 3 * 2.0 * n * tokens
    forward, backward = 2.0 * n * tokens, (2.0 * n + 2.0 * trainable) * tokens
    cost["training_flops_by_pass"] = {
        "forward": forward,
        "backward": backward,
        "total": forward + backward,
        "trainable": trainable,
        "formula": "forward 2 N tokens; backward (2 N + 2 N_trainable) tokens",
    }
