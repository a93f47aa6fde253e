"""The optimizers a run can use (`train.optimizer`), built from the train config: kept apart from the loop so
that validation and the benchmarks can name them without importing the loop (and its metrics)."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from peftbench.errors import choice_error

OPTIMIZERS = ("adamw", "adafactor")


def decay_groups(params: list[torch.nn.Parameter], model, t: DictConfig) -> list:
    """With train.decay_bias_and_norm=false, the Hugging Face Trainer's groups (which the papers' run_glue.py /
    run_language_modeling.py use): no weight decay on biases and LayerNorm weights
    (transformers Trainer.get_decay_parameter_names); else one group, every tensor decayed."""
    if t.get("decay_bias_and_norm", True) or not t.weight_decay or model is None:
        return params
    from transformers import Trainer

    decayed = set(Trainer.get_decay_parameter_names(None, model))
    names = {id(p): n for n, p in model.named_parameters()}
    return [
        {"params": [p for p in params if names.get(id(p)) in decayed]},
        {"params": [p for p in params if names.get(id(p)) not in decayed], "weight_decay": 0.0},
    ]


def schedule(opt: torch.optim.Optimizer, t: DictConfig, total_steps: int):
    """Linear warmup (train.warmup_steps, else train.warmup_ratio of the steps), then linear decay to 0
    (train.schedule=linear, HF Trainer's default) or a constant rate (constant: the prompt-tuning recipes)."""
    from transformers import get_constant_schedule_with_warmup, get_linear_schedule_with_warmup

    warmup = t.get("warmup_steps")
    warmup = int(warmup) if warmup is not None else int(t.warmup_ratio * total_steps)
    if t.get("schedule", "linear") == "constant":
        return get_constant_schedule_with_warmup(opt, warmup)
    return get_linear_schedule_with_warmup(opt, warmup, total_steps)


def default_optimizer(
    params: list[torch.nn.Parameter], model, t: DictConfig, method_cfg
) -> torch.optim.Optimizer:
    """AdamW (the GLUE papers), or Adafactor as T-Few runs it: a fixed lr, no relative step, no warmup
    init (t-few src/utils/get_optimizer.py; `adafactor_scale_parameter` is its `scale_parameter`)."""
    params = decay_groups(params, model, t)
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
