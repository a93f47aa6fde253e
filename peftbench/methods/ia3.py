"""IA3 (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning", Sec. 3.3): learned vectors rescale the keys, the values and the FFN's intermediate activation,

    softmax(Q (l_k ⊙ K)^T / sqrt(d_k)) (l_v ⊙ V)   and   (l_ff ⊙ γ(W_1 x)) W_2,

all initialised to ones (training starts from the pretrained function). l_ff scales the INPUT of the FFN's
output projection (size d_ff): T5 `wo`, BERT / RoBERTa / DeBERTa `output.dense` (not
`attention.output.dense`), GPT-2 `mlp.c_proj`, BART `fc2`, Llama `mlp.down_proj` (with k_proj, v_proj: peft
0.21.2's default IA3 targets for Llama; under grouped-query attention l_k, l_v have num_key_value_heads x
head_dim entries). Every attention has its own l_k, l_v, so a decoder block with cross-attention has two of
each: L (d_k + d_v + d_ff) per encoder, L (2 d_k + 2 d_v + d_ff) per decoder.

peft's IA3 is this method for separate k / v projections. GPT-2 fuses q, k, v into one Conv1D `c_attn`: peft
on `c_attn` would learn a 3d vector (rescaling q too); `FusedIA3` rescales only the k and v slices.
"""

from __future__ import annotations

import re

import torch
from omegaconf import DictConfig
from peft import IA3Config, get_peft_model
from torch import nn

from peftbench.methods import Capabilities, freeze, remember, unfreeze_head
from peftbench.models import Family
from peftbench.schema import Bool

CAN = Capabilities(exportable=True, tensors=("ia3_",))  # peft merges the vectors into the weights
FIELDS = {"merge": Bool()}


def apply(model: nn.Module, cfg: DictConfig, fam: Family) -> nn.Module:
    ff = fam.proj["ffn_out"]
    if "qkv" in fam.proj:  # GPT-2
        add_fused_ia3(model, fam)
        targets = [ff]
    else:
        targets = [fam.proj["k"], fam.proj["v"], ff]
    model = get_peft_model(
        model,
        IA3Config(
            target_modules=r".*\.(" + "|".join(targets) + r")$",
            feedforward_modules=r".*\.(" + ff + r")$",
            modules_to_save=list(fam.head),
            fan_in_fan_out=fam.transposed,  # GPT-2's Conv1D stores W transposed
        ),
    )
    if "qkv" in fam.proj:  # get_peft_model froze the fused vectors with the base
        for m in model.modules():
            if isinstance(m, FusedIA3):
                m.ia3_k.requires_grad_(True)
                m.ia3_v.requires_grad_(True)
    return remember(model, cfg)


class FusedIA3(nn.Module):
    """A frozen fused q|k|v Conv1D (GPT-2) whose k and v outputs are rescaled by l_k, l_v (ones at init)."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.d = base.weight.shape[1] // 3  # Conv1D weight is (in, 3d)
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.ia3_k = nn.Parameter(torch.ones(self.d, **kw))
        self.ia3_v = nn.Parameter(torch.ones(self.d, **kw))
        self.merged = False

    def scale(self) -> torch.Tensor:
        return torch.cat([torch.ones_like(self.ia3_k), self.ia3_k, self.ia3_v])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        return out if self.merged else out * self.scale()

    @torch.no_grad()
    def merge(self) -> nn.Module:
        s = self.scale()
        self.base.weight.mul_(s)  # (in, 3d) * (3d,): scales output columns
        if self.base.bias is not None:
            self.base.bias.mul_(s)
        self.merged = True
        return self.base

    @torch.no_grad()
    def peft_tensors(self) -> dict[str, torch.Tensor]:
        """This module as peft's IA3 on the whole fused matrix (what export.save_adapter writes, so
        PeftModel.from_pretrained gives our logits): one 3d output vector, ones on q's slice, l_k, l_v."""
        return {"ia3_l": self.scale().reshape(-1, 1)}  # peft's shape for a non-feedforward layer: (out, 1)

    @staticmethod
    def peft_config(config: IA3Config | None, modules: list[FusedIA3], target: str) -> IA3Config | None:
        """peft's IA3Config for `modules` (names matching the regex `target`, not feedforward) next to peft's
        own IA3 layers (`config`, None when there are none)."""
        if config is None:
            return IA3Config(target_modules=target, feedforward_modules=[], fan_in_fan_out=True)
        if not isinstance(config.target_modules, str):  # apply() gives peft a regex
            return None
        config.target_modules = f"(?:{config.target_modules})|(?:{target})"
        return config


def add_fused_ia3(model: nn.Module, fam: Family) -> None:
    freeze(model)
    pattern = re.compile(r".*\." + fam.proj["qkv"] + r"$")
    for name in [n for n, _ in model.named_modules() if pattern.match(n)]:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, FusedIA3(getattr(parent, child)))
    unfreeze_head(model, fam)
