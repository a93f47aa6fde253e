"""Prompt tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning", Sec. 2):
the frozen model reads [P; X_e], P a trainable n x d matrix prepended to the embedded input; only P (and the
task head) trains: n x d_model parameters. Inits (Sec. 3.2): random uniform, sampled vocabulary, class label.
The mechanism (own hooks, not peft) is in peftbench.methods.prompt.
"""

from __future__ import annotations

from omegaconf import DictConfig
from torch import nn

from peftbench.errors import UserError
from peftbench.methods import Capabilities, remember
from peftbench.methods.prompt import apply_prompt
from peftbench.models import Family
from peftbench.schema import SEED, ListOf, Map, OneOf, PositiveInt, Text

INITS = ("random_uniform", "sampled_vocab", "class_label")
CAN = Capabilities(changes_input=True, tensors=("prompt_encoder.",))
FIELDS = {
    "length": PositiveInt(doc="prompt tokens n"),
    "init": OneOf(*INITS),
    "label_words": ListOf(Text(), null=True, doc="words whose embeddings init the first slots (class_label)"),
    "tokenizer": Map(doc="the model config (interpolated: ${model})"),
    "seed": SEED,
    "vocab_draw": OneOf("without_replacement", "with_replacement", doc="sampled-vocabulary ids"),
}


def check(cfg: DictConfig, fam: Family, fmt: str) -> None:
    """Soft prompts generate with T5 / BART (the encoder reads the prompt once), not with GPT-2."""
    if fmt == "generation" and fam.kind != "encoder-decoder":
        raise UserError(
            "method=prompt_tuning cannot generate: its prompt is prepended in one forward call, which a "
            "GPT-2 / Llama decoder's step-by-step decoding does not repeat; use a T5 / BART model, or "
            "method=prefix_tuning"
        )


def input_positions(cfg: DictConfig) -> int:
    """Positions the prompt takes in the input sequence (validate: max_length + these fit the model)."""
    return int(cfg.method.length)


def apply(model: nn.Module, cfg: DictConfig, fam: Family) -> nn.Module:
    model = apply_prompt(model, cfg, fam, "none")
    return remember(model, cfg, init="random_uniform")  # a reload overwrites P: skip the label-word lookup
