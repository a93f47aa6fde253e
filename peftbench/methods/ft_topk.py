"""FT-top-k: fine-tune only the top k transformer blocks (and the norms above them and the task head).

Li & Liang 2021, Table 1, row FT-TOP2: "fine-tune only the top 2 layers". For encoder-decoder models the
top k blocks of the encoder and of the decoder train.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from peftbench.errors import UserError
from peftbench.methods import Capabilities, freeze, unfreeze, unfreeze_head
from peftbench.models import Family
from peftbench.schema import Bool, PositiveInt

CAN = Capabilities(exportable=True, fsdp=True)  # its trained tensors are the model's own weights
FIELDS = {
    "k": PositiveInt(doc="blocks from the top"),
    "train_lm_head": Bool(doc="the LM head too (tied to the input embeddings on GPT-2)"),
}


def apply(model: torch.nn.Module, cfg: DictConfig, fam: Family) -> torch.nn.Module:
    k = cfg.k
    freeze(model)
    for path in fam.blocks:
        blocks = model.get_submodule(path)
        if k > len(blocks):
            raise UserError(f"method.k={k} but {path} has only {len(blocks)} blocks; use k<={len(blocks)}")
        for block in list(blocks)[-k:]:
            unfreeze(block)
    for path in fam.final_norms:
        unfreeze(model.get_submodule(path))
    head = model.get_output_embeddings() if cfg.get("train_lm_head", False) else None
    if head is not None:  # the LM head (prompt / generation formats); GPT-2's is tied to transformer.wte
        head.requires_grad_(True)
    unfreeze_head(model, fam)
    return model
