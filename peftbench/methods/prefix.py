"""Prefix tuning for classification models (Li & Liang 2021, "Prefix-Tuning", Sec. 4.1-4.3).

Every attention layer i attends over [P_k^i; K] and [P_v^i; V]: trainable key / value prefixes of length n
in front of the real keys and values (Eq. 4: h_i = P_theta[i, :] for i in P_idx); the frozen model is
unchanged otherwise. Training is reparameterised (Sec. 4.3): P_theta = MLP_theta(P'_theta), P' an n x d
matrix and the MLP d -> mid_dim (512) -> tanh -> layers x 2 x d, as in the paper's code and peft's
PrefixEncoder; after training only P_theta is kept (`merge` drops the MLP): n x layers x 2 x d parameters
(GPT-2 Medium, n=10: 10 x 24 x 2 x 1024 = 491,520). `mlp: false` trains P_theta directly; `init_text`
(with mlp: false) initialises it with the keys / values of real words' activations (Sec. 7.2, Fig. 5).

Why our own: peft's prefix tuning passes the prefixes as past_key_values, which transformers 5.x sequence-
classification models refuse ("Model does not support past key values"). Here the prefixes enter through
transformers' attention interface: we register an attention function (sdpa underneath) that concatenates
the layer's prefixes to key and value, extends the mask (and T5's position bias) with attended columns,
and set the model to use it. That reaches every attention that goes through the interface: BERT, RoBERTa,
GPT-2, Llama, and every self- and cross-attention of T5 and BART (Li & Liang prefix encoder, decoder and
cross-attention of BART too). DeBERTa's disentangled attention does not go through it: refused.

Llama's grouped-query attention hands the interface num_key_value_heads heads of keys and values (each shared
by num_attention_heads / num_key_value_heads query heads, sdpa repeats them): the prefixes have that layout,
n x layers x 2 x (num_key_value_heads x head_dim) stored parameters (SmolLM2-135M, n=10: 10 x 30 x 2 x 192).
Its keys get their rotary positions before the interface; the prefixes are keys as they enter attention.
"""

from __future__ import annotations

import re

import torch
from omegaconf import DictConfig
from torch import nn
from transformers import AttentionInterface, PretrainedConfig
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from peftbench.errors import UserError
from peftbench.methods import Capabilities, freeze, remember, unfreeze_head
from peftbench.models import Family
from peftbench.schema import Bool, Map, PositiveInt, Text

# key / value prefixes: one sequence per answer choice
CAN = Capabilities(changes_input=True, tensors=("prefix_encoder.",))
FIELDS = {
    "length": PositiveInt(doc="prefix length n"),
    "mlp": Bool(),
    "mid_dim": PositiveInt(doc="the reparameterisation MLP's hidden size"),
    "init_text": Text(null=True),
    "tokenizer": Map(doc="the model config (interpolated: ${model})"),
    "merge": Bool(),
}

IMPL = "peftbench_prefix"
ATTENTION = {
    "bert": r"attention\.self",
    "roberta": r"attention\.self",
    "gpt2": r"attn",
    "t5": r"SelfAttention|EncDecAttention",
    "bart": r"self_attn|encoder_attn",
    "llama": r"self_attn",
}
SLOT = "_peftbench_prefix"  # (encoder, index) on each attention module; not a submodule (no double params)


def prefix_attention(module, query, key, value, attention_mask, position_bias=None, **kwargs):
    slot = module.__dict__.get(SLOT)
    if slot is not None:
        encoder, i = slot
        pk, pv = encoder.layer(i, key.shape[0], key.dtype)  # (B, H, n, dh) each
        n, q_len, k_len = pk.shape[2], query.shape[2], key.shape[2]
        key, value = torch.cat([pk, key], dim=2), torch.cat([pv, value], dim=2)
        if attention_mask is None:
            attention_mask = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device)
            if kwargs.get("is_causal", getattr(module, "is_causal", False)) and q_len > 1:
                attention_mask = attention_mask.tril(k_len - q_len)
            attention_mask = attention_mask[None, None]
        cols = (*attention_mask.shape[:-1], n)
        if attention_mask.dtype == torch.bool:
            attention_mask = torch.cat([attention_mask.new_ones(cols), attention_mask], dim=-1)
        else:  # additive float mask
            attention_mask = torch.cat([attention_mask.new_zeros(cols), attention_mask], dim=-1)
        if position_bias is not None:
            bias = position_bias.new_zeros((*position_bias.shape[:-1], n))
            position_bias = torch.cat([bias, position_bias], dim=-1)
        kwargs["is_causal"] = False
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, position_bias=position_bias, **kwargs
    )


AttentionInterface.register(IMPL, prefix_attention)
AttentionMaskInterface.register(IMPL, sdpa_mask)


def heads(module: nn.Module) -> tuple[int, int]:
    """(key / value heads, head size) of an attention module: the prefix has the keys' and values' layout."""
    if hasattr(module, "num_key_value_groups"):  # Llama: grouped-query attention, fewer k / v heads than q
        return int(module.config.num_key_value_heads), int(module.head_dim)
    for h, dh in (
        ("num_attention_heads", "attention_head_size"),
        ("num_heads", "head_dim"),
        ("n_heads", "key_value_proj_dim"),
    ):
        if hasattr(module, h) and hasattr(module, dh):
            return int(getattr(module, h)), int(getattr(module, dh))
    raise UserError(f"cannot read the head layout of {type(module).__name__}")


class PrefixEncoder(nn.Module):
    """P_theta for `layers` attentions: (layers, 2, n, H * dh), directly or as MLP(P')."""

    def __init__(self, layers: int, n: int, heads_: int, dh: int, d: int, mid: int | None, device, dtype):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.layers, self.n, self.h, self.dh = layers, n, heads_, dh
        width = layers * 2 * heads_ * dh
        if mid:
            self.embedding = nn.Parameter(torch.empty(n, d, **kw))
            self.mlp = nn.Sequential(nn.Linear(d, mid, **kw), nn.Tanh(), nn.Linear(mid, width, **kw))
            if self.embedding.device.type != "meta":
                nn.init.normal_(self.embedding)
        else:
            self.prefix = nn.Parameter(torch.empty(n, width, **kw))
            if self.prefix.device.type != "meta":
                nn.init.normal_(self.prefix, std=0.02)
        self.current: torch.Tensor | None = None
        self.merged = False

    def stored_numel(self) -> int:
        """What is kept after training (the MLP dropped): n x layers x 2 x d."""
        return self.n * self.layers * 2 * self.h * self.dh

    def compute(self) -> None:
        p = self.mlp(self.embedding) if hasattr(self, "mlp") else self.prefix
        self.current = p.view(self.n, self.layers, 2, self.h, self.dh).permute(1, 2, 3, 0, 4)

    def layer(self, i: int, batch: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self.current is None:
            self.compute()
        k, v = self.current[i].to(dtype)
        return k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)

    @torch.no_grad()
    def merge(self) -> PrefixEncoder:
        """Drop the reparameterisation in place: keep P_theta = MLP(P') only (the stored parameters)."""
        if hasattr(self, "mlp"):
            p = self.mlp(self.embedding)
            del self.mlp, self.embedding
            self.prefix = nn.Parameter(p, requires_grad=False)
            self.current = None
        self.merged = True
        return self


def apply(model: nn.Module, cfg: DictConfig, fam: Family) -> nn.Module:
    n = cfg.length
    mid = cfg.mid_dim if cfg.mlp else None
    family_name = fam.name
    if family_name not in ATTENTION:
        raise UserError(
            f"method prefix_tuning does not apply to {type(model).__name__}: its attention does not go through "
            "transformers' attention interface (DeBERTa's disentangled attention)"
        )
    if cfg.init_text and cfg.mlp:
        raise UserError("method.init_text needs method.mlp=false (it sets P_theta itself, not P')")
    pattern = re.compile(r".*\.(" + ATTENTION[family_name] + r")$")
    attns = [m for name, m in model.named_modules() if pattern.match(name)]
    h, dh = heads(attns[0])
    d = model.base_model.get_input_embeddings().weight.shape[1]
    p = next(model.parameters())
    freeze(model)
    encoder = PrefixEncoder(len(attns), n, h, dh, d, mid, p.device, p.dtype)
    attach(model, encoder, attns)
    if cfg.init_text and p.device.type != "meta":
        init_from_words(model, encoder, attns, cfg)
    unfreeze_head(model, fam)
    return remember(model, cfg, init_text=None)  # a reload overwrites P_theta: no need to redo the words


def attach(model: nn.Module, encoder: PrefixEncoder, attns: list[nn.Module]) -> None:
    model.prefix_encoder = encoder
    for i, m in enumerate(attns):
        m.__dict__[SLOT] = (encoder, i)
    for m in model.modules():  # T5 / BART stacks hold their own copies of the config
        if isinstance(getattr(m, "config", None), PretrainedConfig):
            m.config._attn_implementation = IMPL
    model.register_forward_pre_hook(lambda *_: model.prefix_encoder.compute())  # once per forward


@torch.no_grad()
def init_from_words(
    model: nn.Module, encoder: PrefixEncoder, attns: list[nn.Module], cfg: DictConfig
) -> None:
    """Run the frozen model on the words; each layer's keys / values of the first n tokens become P_theta."""
    from omegaconf import OmegaConf

    from peftbench.models import load_tokenizer

    tok = load_tokenizer(OmegaConf.create(OmegaConf.to_container(cfg.tokenizer, resolve=True)))
    ids = tok(cfg.init_text, add_special_tokens=False, return_tensors="pt")["input_ids"][:, : encoder.n]
    if ids.shape[1] < encoder.n:
        raise UserError(
            f"method.init_text has {ids.shape[1]} tokens; give at least method.length={encoder.n}"
        )
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for m in attns:
        m.__dict__[SLOT] = None  # no prefix while reading the words' activations
    original = AttentionInterface._global_mapping[IMPL]

    def capture(module, query, key, value, *args, **kwargs):
        captured[next(i for i, m in enumerate(attns) if m is module)] = (key[0], value[0])
        return original(module, query, key, value, *args, **kwargs)

    AttentionInterface._global_mapping[IMPL] = capture
    try:
        was = model.training
        model.eval()
        kwargs = {"decoder_input_ids": ids} if model.config.is_encoder_decoder else {}
        model.base_model(input_ids=ids, **kwargs)
        model.train(was)
    finally:
        AttentionInterface._global_mapping[IMPL] = original
        for i, m in enumerate(attns):
            m.__dict__[SLOT] = (encoder, i)
    stacked = torch.stack([torch.stack(captured[i]) for i in range(len(attns))])  # (layers, 2, H, n, dh)
    encoder.prefix.copy_(stacked.permute(3, 0, 1, 2, 4).reshape(encoder.n, -1))
