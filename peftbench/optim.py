"""The optimizers a run can use (`train.optimizer`), built from the train config: kept apart from the loop so
that validation and the benchmarks can name them without importing the loop (and its metrics)."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from peftbench.errors import choice_error

OPTIMIZERS = ("adamw", "adafactor")


def default_optimizer(
    params: list[torch.nn.Parameter], model, t: DictConfig, method_cfg
) -> torch.optim.Optimizer:
    """AdamW (the GLUE papers), or Adafactor as T-Few runs it: a fixed lr, no relative step, no warmup
    init (t-few src/utils/get_optimizer.py; `adafactor_scale_parameter` is its `scale_parameter`)."""
    if t.optimizer == "adamw":
        return torch.optim.AdamW(
            params, lr=t.lr, weight_decay=t.weight_decay, betas=tuple(t.adam_betas), eps=t.adam_eps
        )
    if t.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(
            params,
            lr=t.lr,
            weight_decay=t.weight_decay,
            scale_parameter=bool(t.adafactor_scale_parameter),
            relative_step=False,
            warmup_init=False,
        )
    raise choice_error("train.optimizer", t.optimizer, OPTIMIZERS)  # validate() checks it first
