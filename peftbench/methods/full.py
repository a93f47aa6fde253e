"""Full fine-tuning: every weight trains (the FT rows of LoRA Table 2 and Prefix-Tuning Table 1)."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from peftbench.methods import Capabilities, unfreeze
from peftbench.models import Family

CAN = Capabilities(exportable=True, fsdp=True)  # its trained tensors are the model's own weights


def apply(model: torch.nn.Module, cfg: DictConfig, fam: Family) -> torch.nn.Module:
    unfreeze(model)
    return model
