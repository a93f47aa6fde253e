"""In-context learning (Brown et al. 2020, "Language Models are Few-Shot Learners"): nothing trains; the
frozen model reads `method.shots` solved training rows before each input and ranks the answer choices with
its LM head. The demonstrations, their order (`method.order_seed`) and contextual calibration (Zhao et al.
2021, "Calibrate Before Use") are in peftbench.prompting; this module only freezes the model.
"""

from __future__ import annotations

from omegaconf import DictConfig
from torch import nn

from peftbench.methods import freeze, remember
from peftbench.models import Family


def apply(model: nn.Module, cfg: DictConfig, fam: Family) -> nn.Module:
    freeze(model)
    return remember(model, cfg)
