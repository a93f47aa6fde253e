"""LoRA (Hu et al. 2021): W x + (alpha / r) * B A x on the chosen attention weights, Eq. (3); A is Gaussian /
Kaiming-initialised and B zero, so training starts from the pretrained function. The paper adapts W_q and
W_v by default (Sec. 7.1), which is our default for every family.

peft implements it faithfully for separate projections (BERT, RoBERTa, DeBERTa, T5, BART), and its adapters
save in peft's format. GPT-2 fuses q, k, v into one Conv1D `c_attn`; peft's LoRA on `c_attn` adapts the
whole fused matrix (q, k and v together), which is not the paper's q, v. For GPT-2 we add one low-rank pair
per chosen slice, as loralib's MergedLinear(enable_lora=[True, False, True]) in microsoft/LoRA does.

Variants that only change peft's LoraConfig are YAML files over this module: `method.peft` holds the extra
LoraConfig keywords (DoRA: use_dora; PiSSA: init_lora_weights). Our FusedLoRA slices are plain LoRA only, so
on GPT-2 such a variant needs `method.fused: whole`: peft adapts the whole fused c_attn, k included (a
written deviation in each variant's YAML); `fused: slices` (the default) raises for them. LoRA+ reuses this
module as it is and adds its optimizer (loraplus.py).
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import peft
import torch
from omegaconf import DictConfig, OmegaConf
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from torch import nn

from peftbench.errors import UserError
from peftbench.methods import Capabilities, freeze, remember, unfreeze_head
from peftbench.models import Family
from peftbench.schema import Bool, ListOf, Map, OneOf, Positive, PositiveInt, Rate, Text

# finish() merges peft's B A (DoRA, PiSSA too) and FusedLoRA's slices
CAN = Capabilities(exportable=True, tensors=("lora_",))

SLICES = ("q", "k", "v")
FUSED = ("slices", "whole")  # method.fused on GPT-2's c_attn: our q / v slices, or peft on the whole matrix
TARGETS = ListOf(
    Text(), doc="abstract weights (q, k, v, o, ffn_in, ffn_out); the family's are checked on apply"
)
# the keys of lora, dora and pissa (peftbench.schema checks them before anything runs)
FIELDS = {
    "r": PositiveInt(),
    "alpha": Positive(doc="scaling alpha / r"),
    "dropout": Rate(),
    "targets": TARGETS,
    "merge": Bool(),
    "init_from": Text(null=True),
    "peft": Map(doc="extra peft LoraConfig keywords"),
    "fused": OneOf(*FUSED),
}


def apply(model: nn.Module, cfg: DictConfig, fam: Family) -> nn.Module:
    r = cfg.r
    targets = list(cfg.targets)
    check_targets(targets, fam)
    mode = fused_mode(cfg)
    extra = peft_options(cfg, on_meta=next(model.parameters()).device.type == "meta")
    fused = [t for t in targets if t in SLICES and "qkv" in fam.proj]
    separate = [t for t in targets if t not in fused]
    if fused and mode == "whole":
        separate, fused = [*separate, "qkv"], []
    elif fused and extra:
        raise UserError(
            f"method={cfg.name} on {fam.name}: our q / v slices of the fused c_attn are plain LoRA, not "
            f"method.peft {sorted(extra)}; set method.fused=whole to adapt the whole c_attn (k too) with peft"
        )
    if fused:
        check_rank(model, r".*\." + fam.proj["qkv"], r, "method.r")
    if separate:
        pattern = r".*\.(" + "|".join(fam.proj[t] for t in separate) + r")$"
        check_rank(model, pattern, r, "method.r")
        model = get_peft_model(
            model,
            LoraConfig(
                r=r,
                lora_alpha=cfg.alpha,
                lora_dropout=cfg.dropout,
                target_modules=pattern,
                modules_to_save=list(fam.head),
                fan_in_fan_out=fam.transposed,  # GPT-2's Conv1D stores W transposed
                bias="none",
                **extra,
            ),
        )
    else:
        freeze(model)
        unfreeze_head(model, fam)
    if fused:
        add_fused_lora(model, fam, [SLICES.index(t) for t in fused], r, cfg.alpha, cfg.dropout)
    if cfg.get("init_from") and next(model.parameters()).device.type != "meta":
        warm_start(model, Path(cfg.init_from))
    return remember(model, cfg, init_from=None)  # a reload overwrites A, B: no warm start needed


def check_rank(model: nn.Module, pattern: str, r: int, key: str) -> None:
    """A rank above the smallest dimension of an adapted weight adds nothing a full-rank update would not
    (and PiSSA's SVD cannot take it): refuse it, naming the largest rank that fits."""
    dims = [
        min(m.weight.shape)
        for name, m in model.named_modules()
        if re.fullmatch(pattern, name) and getattr(m, "weight", None) is not None and m.weight.dim() == 2
    ]
    if dims and r > min(dims):
        raise UserError(f"{key}={r}: above the smallest adapted weight's dimension; use {key}<={min(dims)}")


def check_targets(targets: list[str], fam: Family) -> None:
    known = [*SLICES, *[k for k in fam.proj if k != "qkv"]]
    for t in targets:
        if t not in known:
            raise UserError(f"method.targets has {t!r}; choose from: {', '.join(dict.fromkeys(known))}")


# LoraConfig keywords apply() sets itself: a variant's `method.peft` must not set them again
OWN_KEYS = {"r", "lora_alpha", "lora_dropout", "target_modules", "modules_to_save", "fan_in_fan_out", "bias"}


def peft_options(cfg: DictConfig, on_meta: bool = False) -> dict:
    """A variant's extra LoraConfig keywords (`method.peft`; none for plain LoRA). On the meta device (parameter
    counts) a data-dependent init such as PiSSA's SVD cannot run and does not change the count: peft's
    default init stands in for it there."""
    extra = dict(OmegaConf.to_container(cfg.get("peft") or OmegaConf.create({}), resolve=True))
    clash = sorted(OWN_KEYS & set(extra))
    if clash:
        raise UserError(f"method.peft.{clash[0]}: set by the method's own keys (r, alpha, dropout, targets)")
    unknown = sorted(set(extra) - {f.name for f in dataclasses.fields(LoraConfig)})
    if unknown:
        raise UserError(f"method.peft.{unknown[0]} is not a peft LoraConfig field (peft {peft.__version__})")
    if on_meta and isinstance(extra.get("init_lora_weights"), str):
        extra["init_lora_weights"] = True
    return extra


def fused_mode(cfg: DictConfig) -> str:
    """How a fused q|k|v projection (GPT-2's c_attn) is adapted: `slices` (our FusedLoRA, plain LoRA only) or
    `whole` (peft on the whole matrix, so k is adapted as well)."""
    mode = cfg.get("fused") or "slices"
    if mode not in FUSED:
        raise UserError(f"method.fused={mode!r}; choose from: {', '.join(FUSED)}")
    return mode


def whole_targets(cfg: DictConfig, fam: Family, method: str) -> str:
    """The module regex for a variant that only peft implements: on a fused q|k|v family any of q, k, v maps
    to the whole fused matrix when method.fused=whole, and raises otherwise."""
    targets = list(cfg.targets)
    check_targets(targets, fam)
    if "qkv" in fam.proj and any(t in SLICES for t in targets):
        if fused_mode(cfg) != "whole":
            raise UserError(
                f"method={method} on {fam.name}: peft cannot adapt only the q / v slices of the fused c_attn; "
                f"set method.fused=whole to adapt the whole c_attn (k too)"
            )
        targets = [t for t in targets if t not in SLICES] + ["qkv"]
    return r".*\.(" + "|".join(fam.proj[t] for t in targets) + r")$"


def warm_start(model: nn.Module, folder: Path) -> None:
    """Start from another run's LoRA A and B (not its head: the label sets differ), as the paper's
    MRPC / RTE / STS-B runs start from the MNLI adapter."""
    file = folder / "adapter_model.safetensors"
    if not file.is_file():
        raise UserError(
            f"method.init_from={str(folder)!r} has no adapter_model.safetensors; run that task first"
        )
    lora = {k: v for k, v in load_file(str(file)).items() if "lora_" in k}
    if not hasattr(model, "peft_config") or not lora:
        raise UserError(f"method.init_from={str(folder)!r}: no LoRA weights to start from")
    # peft saves "...query.lora_A.weight"; the live parameter is "...query.lora_A.default.weight"
    named = {
        k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): v
        for k, v in lora.items()
    }
    unexpected = model.load_state_dict(named, strict=False).unexpected_keys
    if unexpected:
        raise UserError(f"method.init_from={str(folder)!r} does not fit this model ({unexpected[0]})")


class FusedLoRA(nn.Module):
    """A frozen fused q|k|v projection (GPT-2 Conv1D) plus one LoRA pair per chosen slice."""

    def __init__(self, base: nn.Module, slices: list[int], r: int, alpha: float, dropout: float):
        super().__init__()
        self.base = base
        d_in, d_out3 = base.weight.shape  # Conv1D weight is (in, out)
        self.d = d_out3 // 3
        self.slices = slices
        self.r, self.alpha = r, alpha
        self.scaling = alpha / r
        self.dropout = nn.Dropout(dropout)
        dev, dtype = base.weight.device, base.weight.dtype
        self.lora_A = nn.ParameterList(
            [nn.Parameter(torch.empty(r, d_in, device=dev, dtype=dtype)) for _ in slices]
        )
        self.lora_B = nn.ParameterList(
            [nn.Parameter(torch.zeros(self.d, r, device=dev, dtype=dtype)) for _ in slices]
        )
        for a in self.lora_A:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as peft / loralib
        self.merged = False

    def delta(self) -> torch.Tensor:
        """The (in, 3d) update of the fused weight, zero on the slices without LoRA."""
        w = torch.zeros_like(self.base.weight)
        for s, a, b in zip(self.slices, self.lora_A, self.lora_B):
            w[:, s * self.d : (s + 1) * self.d] = (b @ a).T * self.scaling
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.merged:
            return out
        h = self.dropout(x)
        parts = [torch.zeros_like(out[..., : self.d])] * 3
        for s, a, b in zip(self.slices, self.lora_A, self.lora_B):
            parts[s] = (h @ a.T @ b.T) * self.scaling
        return out + torch.cat(parts, dim=-1)

    @torch.no_grad()
    def merge(self) -> nn.Module:
        self.base.weight += self.delta()
        self.merged = True
        return self.base

    @torch.no_grad()
    def peft_tensors(self) -> dict[str, torch.Tensor]:
        """This module as peft's LoRA on the whole fused matrix (what export.save_adapter writes, so
        PeftModel.from_pretrained gives our logits): rank len(slices) * r, A the slices' A stacked, B each
        slice's B in its own rows and columns and zero elsewhere (k's rows when q, v are adapted), so B A x
        is our update on each slice and 0 on the others."""
        r = self.r
        b = self.lora_B[0].new_zeros(3 * self.d, len(self.slices) * r)
        for i, (s, b_s) in enumerate(zip(self.slices, self.lora_B)):
            b[s * self.d : (s + 1) * self.d, i * r : (i + 1) * r] = b_s
        return {"lora_A.weight": torch.cat(list(self.lora_A)), "lora_B.weight": b}

    @staticmethod
    def peft_config(config: LoraConfig | None, modules: list[FusedLoRA], target: str) -> LoraConfig | None:
        """peft's LoraConfig for `modules` (names matching the regex `target`) next to peft's own LoRA
        layers (`config`, None when there are none): rank and alpha len(slices) times ours on them, so
        alpha / r, peft's scaling, is ours. None if the modules differ in r, alpha or slices."""
        kinds = {(m.r, m.alpha, tuple(m.slices), m.dropout.p) for m in modules}
        if len(kinds) != 1:
            return None
        r, alpha, slices, dropout = kinds.pop()
        if config is None:
            config = LoraConfig(
                r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target, fan_in_fan_out=True
            )
        elif isinstance(config.target_modules, str):  # apply() gives peft a regex
            config.target_modules = f"(?:{config.target_modules})|(?:{target})"
        else:
            return None
        config.rank_pattern = {**config.rank_pattern, target: len(slices) * r}
        config.alpha_pattern = {**config.alpha_pattern, target: len(slices) * alpha}
        return config


def add_fused_lora(model: nn.Module, fam: Family, slices: list[int], r: int, alpha: float, dropout: float):
    pattern = re.compile(r".*\." + fam.proj["qkv"] + r"$")
    names = [n for n, _ in model.named_modules() if pattern.match(n)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, FusedLoRA(getattr(parent, child), slices, r, alpha, dropout))
