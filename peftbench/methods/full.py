"""Full fine-tuning: every weight trains (the FT rows of LoRA Table 2 and Prefix-Tuning Table 1)."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from peftbench.methods import unfreeze
from peftbench.models import Family


def apply(model: torch.nn.Module, cfg: DictConfig, fam: Family) -> torch.nn.Module:
    unfreeze(model)
    return model
