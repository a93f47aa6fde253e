"""VeRA (Kopiczko et al. 2024, Sec. 3): h = W x + Λ_b B Λ_d A x. One pair of frozen random matrices A, B
(kaiming-uniform from a fixed PRNG key) is shared by every adapted layer; each layer trains two vectors, d
(r entries) and b (d_out entries, zero at init). peft 0.21.2's VeraConfig implements it; A and B are buffers
(peft's BufferDict), so only the vectors count as trainable.

GPT-2 fuses q, k, v into one Conv1D `c_attn` and peft cannot adapt only its q and v slices: with
`method.fused: whole` (configs/method/vera.yaml) peft adapts the whole c_attn (k too, one d shared by q, k, v);
any other value raises.
"""

from __future__ import annotations

from omegaconf import DictConfig
from peft import VeraConfig, get_peft_model
from torch import nn

from peftbench.methods import Capabilities, remember
from peftbench.methods.lora import FUSED, TARGETS, whole_targets
from peftbench.models import Family
from peftbench.schema import SEED, Bool, Number, OneOf, PositiveInt, Rate

CAN = Capabilities(exportable=True, tensors=("vera_",))  # peft merges Λ_b B Λ_d A into the weights
FIELDS = {
    "r": PositiveInt(doc="the shared random matrices' rank: may exceed the model's width"),
    "d_initial": Number(),
    "dropout": Rate(),
    "targets": TARGETS,
    "projection_prng_key": SEED,
    "save_projection": Bool(),
    "fused": OneOf(*FUSED),
    "merge": Bool(),
}


def apply(model: nn.Module, cfg: DictConfig, fam: Family) -> nn.Module:
    r = cfg.r
    model = get_peft_model(
        model,
        VeraConfig(
            r=r,
            target_modules=whole_targets(cfg, fam, "vera"),
            projection_prng_key=int(cfg.projection_prng_key),
            save_projection=bool(cfg.save_projection),
            vera_dropout=cfg.dropout,
            d_initial=cfg.d_initial,
            fan_in_fan_out=fam.transposed,  # GPT-2's Conv1D stores W transposed
            bias="none",
            modules_to_save=list(fam.head),
        ),
    )
    return remember(model, cfg)
