"""LoRA+ (Hayou et al. 2024): LoRA (peftbench/methods/lora.py, unchanged: peft on separate projections, our
FusedLoRA slices on GPT-2's c_attn) trained with two learning rates: every B matrix at lr_ratio x train.lr,
everything else (the A matrices and the task head) at train.lr.

peft's `create_loraplus_optimizer` (0.21.2) is not used: like the reference nikhil-ghosh-berkeley/loraplus it
puts every 1-D trainable tensor (here the classification head's biases) in B's group at lr_ratio x lr, and it
sets weight decay by its own `loraplus_weight_decay` (0 unless given; always 0 for biases and LayerNorms)
instead of train.weight_decay. Our groups keep the default optimizer's settings (AdamW betas, eps, weight decay on every
tensor), so the LoRA+ row differs from the LoRA row by the ratio on B alone.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch import nn

from peftbench.errors import UserError
from peftbench.methods import Capabilities, lora
from peftbench.models import Family
from peftbench.schema import Positive

CAN = Capabilities(exportable=True, tensors=("lora_",))  # the adapter is LoRA's: merged into the weights
FIELDS = {**lora.FIELDS, "lr_ratio": Positive(doc="lr of B / lr of A")}


def apply(model: nn.Module, cfg: DictConfig, fam: Family) -> nn.Module:
    return lora.apply(model, cfg, fam)


def is_b(name: str) -> bool:
    """LoRA's B (up-projection): peft's `...lora_B.default.weight`, FusedLoRA's `...lora_B.0`."""
    return "lora_B" in name.split(".")


def param_groups(params: list[nn.Parameter], model: nn.Module, lr: float, ratio: float) -> list[dict]:
    b_ids = {id(p) for n, p in model.named_parameters() if is_b(n)}
    b = [p for p in params if id(p) in b_ids]
    if not b:
        raise UserError("method=loraplus: the model has no trainable LoRA B matrices to give lr_ratio x lr")
    rest = [p for p in params if id(p) not in b_ids]
    return [{"params": rest, "lr": lr, "name": "A+head"}, {"params": b, "lr": lr * ratio, "name": "B"}]


def make_optimizer(
    params: list[nn.Parameter], model: nn.Module, t: DictConfig, method_cfg: DictConfig
) -> torch.optim.Optimizer:
    if t.optimizer != "adamw":
        raise UserError(
            f"train.optimizer={t.optimizer!r} with method=loraplus: Adafactor scales each step by the tensor's "
            f"RMS (B starts at zero), so lr_ratio would not set B's rate; choose from: adamw"
        )
    from peftbench.optim import default_optimizer

    groups = param_groups(params, model, t.lr, float(method_cfg.lr_ratio))
    return default_optimizer(groups, model, t, method_cfg)  # AdamW with train's betas, eps, weight decay
