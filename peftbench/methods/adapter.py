"""Bottleneck adapters: Houlsby et al. 2019 ("Parameter-Efficient Transfer Learning for NLP", Sec. 2.1,
Fig. 2) and Pfeiffer et al. 2021 ("AdapterFusion", Sec. 3, the single-adapter placement).

An adapter maps a sublayer's output h (size d) to

    h + W_up f(W_down h + b_down) + b_up,     W_down: d -> m,  W_up: m -> d,  f = ReLU (Houlsby Fig. 2 / Pfeiffer),

with m << d. W_up is zero at init so the adapter starts as the identity (Houlsby: "near-identity
initialisation"). It sits on the sublayer's output, after its projection (and dropout) and before the
residual + LayerNorm. Houlsby: one adapter after the attention sublayer and one after the FFN in every layer,
and the LayerNorms train too ("we also train the layer normalization parameters"); Pfeiffer: after the FFN
only, LayerNorms frozen. Encoder-decoder models get adapters in every encoder and decoder block (after
self-attention and FFN, as the adapter-transformers library places them; none on cross-attention).

The bottleneck m is given directly (`method.bottleneck`) or solved from a budget (`method.budget`, a
fraction of the model's parameters without the head, as Prefix-Tuning Table 1's ADAPTER(0.1%) / (3%)): with
n adapters, n (2 d m + m + d) (+ the LayerNorms when they train) = budget x N.

Saved as `trainable.safetensors` (every trained tensor, parameter name -> tensor, the task head included)
plus `method.json` (the method config with the solved m); `load_adapters(base, folder, family)` re-applies
them to a fresh base model (peftbench.methods.load_trainable, shared by all our own methods).
"""

from __future__ import annotations

import re

import torch
from omegaconf import DictConfig
from torch import nn

from peftbench.errors import UserError
from peftbench.methods import Capabilities, freeze, remember, unfreeze_head
from peftbench.models import Family
from peftbench.schema import Bool, Number, OneOf, Positive, PositiveInt

# Per family: module-path regexes whose OUTPUT is a sublayer's output before residual (+ LayerNorm).
# Dropout modules where the model has them (the adapter then sees exactly what the residual would add).
SITES: dict[str, dict[str, str]] = {
    "bert": {"attn": r"attention\.output\.dropout", "ffn": r"layer\.\d+\.output\.dropout"},
    "gpt2": {"attn": r"attn\.resid_dropout", "ffn": r"mlp\.dropout"},
    "t5": {
        "attn": r"block\.\d+\.layer\.0\.dropout",
        "ffn": r"encoder\.block\.\d+\.layer\.1\.dropout|decoder\.block\.\d+\.layer\.2\.dropout",
    },
    # BART's dropout is functional: the adapter follows the output projection (dropout comes after it).
    "bart": {"attn": r"self_attn\.out_proj", "ffn": r"fc2"},
    # Llama has no dropout on either sublayer's output: the adapter follows o_proj and the FFN's down_proj.
    "llama": {"attn": r"self_attn\.o_proj", "ffn": r"mlp\.down_proj"},
}
SITES["roberta"] = SITES["deberta-v2"] = SITES["bert"]
PLACEMENTS = {"houlsby": ("attn", "ffn"), "pfeiffer": ("ffn",)}
NORM_TYPES = ("LayerNorm", "T5LayerNorm", "LlamaRMSNorm")
# the adapters, and (Houlsby) the LayerNorms by each family's names for them (Llama's final RMSNorm: model.norm)
CAN = Capabilities(tensors=(".adapter.", "LayerNorm", "layer_norm", "layernorm", "ln_", ".norm."))
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "swish": nn.SiLU}
# near_identity: W_down ~ N(0, init_std), W_up = 0 (the adapter is exactly the identity at init; ours);
# truncated_normal: both weights ~ N(0, init_std) cut at 2 std (google-research/adapter-bert@1a31fc6e:modeling.py
# L321-360, init_scale 1e-3); normal: both ~ N(0, init_std) (adapter-hub/adapters@88f18eb:
# src/adapters/methods/modeling.py init_bert_weights, std 0.02). Biases are 0 in all three.
INITS = ("near_identity", "truncated_normal", "normal")


FIELDS = {
    "placement": OneOf(*PLACEMENTS),
    "bottleneck": PositiveInt(null=True, doc="m"),
    "budget": Number(
        0, 1, open_low=True, open_high=True, null=True, doc="a fraction of the model's parameters"
    ),
    "train_layer_norm": Bool(),
    "activation": OneOf(*ACTIVATIONS),
    "init": OneOf(*INITS),
    "init_std": Positive(doc="std of the adapter weights' init"),
}


class Adapter(nn.Module):
    def __init__(
        self, d: int, m: int, device=None, dtype=None, activation="relu", init="near_identity", std=1e-2
    ):
        super().__init__()
        self.down = nn.Linear(d, m, device=device, dtype=dtype)
        self.up = nn.Linear(m, d, device=device, dtype=dtype)
        self.act = ACTIVATIONS[activation]()
        if self.up.weight.device.type != "meta":
            for layer in (self.down, self.up):
                if init == "truncated_normal":
                    nn.init.trunc_normal_(layer.weight, std=std, a=-2 * std, b=2 * std)
                else:
                    nn.init.normal_(layer.weight, std=std)
                nn.init.zeros_(layer.bias)
            if init == "near_identity":
                nn.init.zeros_(self.up.weight)  # identity at init

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(self.act(self.down(h)))


class WithAdapter(nn.Module):
    """A sublayer module followed by an adapter on its output."""

    def __init__(self, inner: nn.Module, adapter: Adapter):
        super().__init__()
        self.inner, self.adapter = inner, adapter

    def forward(self, *args, **kwargs):
        return self.adapter(self.inner(*args, **kwargs))


def apply(model: nn.Module, cfg: DictConfig, fam: Family) -> nn.Module:
    family_name = fam.name
    if family_name not in SITES:
        raise UserError(f"method {cfg.name} does not apply to {type(model).__name__}: no adapter sites known")
    sites = sites_of(model, SITES[family_name], PLACEMENTS[cfg.placement])
    d = model.config.get_text_config().hidden_size
    freeze(model)
    norms = [m for m in model.modules() if type(m).__name__ in NORM_TYPES] if cfg.train_layer_norm else []
    head = set(fam.head)
    norms = [m for n, m in model.named_modules() if m in norms and head.isdisjoint(n.split("."))]
    n_norm = sum(p.numel() for m in norms for p in m.parameters())
    m = bottleneck(cfg, model, fam, len(sites), d, n_norm)
    p = next(model.parameters())
    # a method.json saved before these keys existed: the behaviour of then (peftbench.record.ADDED_METHOD_DEFAULTS)
    style = (cfg.get("activation", "relu"), cfg.get("init", "near_identity"), cfg.get("init_std", 1e-2))
    for path in sites:
        parent, _, child = path.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, child, WithAdapter(getattr(owner, child), Adapter(d, m, p.device, p.dtype, *style)))
    for norm in norms:
        norm.requires_grad_(True)
    unfreeze_head(model, fam)
    return remember(model, cfg, bottleneck=m, budget=None)


def sites_of(model: nn.Module, sites: dict[str, str], placement: tuple[str, ...]) -> list[str]:
    # a site's path, at the root (T5's LM model: encoder.block...) or below a wrapper (transformer.encoder...)
    pattern = re.compile(r"(?:.*\.)?(" + "|".join(f"(?:{sites[k]})" for k in placement) + r")$")
    return [n for n, _ in model.named_modules() if pattern.match(n)]


def bottleneck(cfg: DictConfig, model: nn.Module, fam: Family, n: int, d: int, n_norm: int) -> int:
    if (cfg.bottleneck is None) == (cfg.budget is None):
        raise UserError(
            "set exactly one of method.bottleneck (size m) or method.budget (fraction, e.g. 0.001)"
        )
    if cfg.bottleneck is not None:
        return cfg.bottleneck
    head = set(fam.head)
    total = sum(p.numel() for k, p in model.named_parameters() if head.isdisjoint(k.split(".")))
    m = round((cfg.budget * total - n_norm - n * d) / (n * (2 * d + 1)))
    if m < 1:
        raise UserError(f"method.budget={cfg.budget} is below one bottleneck unit on this model; raise it")
    return m


def load_adapters(base: nn.Module, folder, fam: Family) -> nn.Module:
    """A fresh base model with the saved adapters (and trained norms, head) applied: identical logits."""
    from peftbench.methods import load_trainable

    return load_trainable(base, folder, fam)
