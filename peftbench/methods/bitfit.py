"""BitFit (Ben Zaken et al. 2022): train only the bias terms of the pretrained model (and the task head).

Every `bias` parameter outside the head trains: attention q/k/v/o, the FFN, and the LayerNorms, as in the
paper's Eq. 1-2 setting "all bias terms". RoBERTa-base: 102,144 = 0.1M, LoRA Table 2's BitFit row.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from peftbench.errors import UserError
from peftbench.methods import Capabilities, freeze, unfreeze_head
from peftbench.models import Family

# its trained tensors are the model's own weights
CAN = Capabilities(exportable=True, fsdp=True, tensors=("bias",))


def apply(model: torch.nn.Module, cfg: DictConfig, fam: Family) -> torch.nn.Module:
    freeze(model)
    head = set(fam.head)
    biases = [
        p
        for name, p in model.named_parameters()
        if name.endswith("bias") and head.isdisjoint(name.split("."))
    ]
    if not biases:
        raise UserError(
            f"method bitfit does not apply to this model: it has no bias terms ({type(model).__name__}); "
            "choose lora, full or ft_top2"
        )
    for p in biases:
        p.requires_grad_(True)
    unfreeze_head(model, fam)
    return model
