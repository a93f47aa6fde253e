"""P-tuning (Liu et al. 2021, "GPT Understands, Too", Sec. 3): continuous prompt embeddings h_i = f(e_i)
produced by a prompt encoder f, a bidirectional LSTM with a 2-layer ReLU MLP on top (Eq. 3-4, the paper's
choice); also an MLP or the identity (EMB), as the paper's ablation and peft offer. The prompt is prepended
to the input (`placement: prepend`, peft's), or (`placement: template`, the paper's, with task.format=prompt)
its vectors fill the [P] slots of the task's anchored template, between real anchor tokens such as "?" and
"Answer:" (Sec. 3, "anchor tokens"; templates after THUDM/P-tuning's FewGLUE patterns). The
paper's SuperGLUE experiments fine-tune the backbone too (`tune_backbone: true`); `false` trains the prompt
encoder (and the task head) only. The mechanism (own hooks, not peft) is in peftbench.methods.prompt.
"""

from __future__ import annotations

from omegaconf import DictConfig
from torch import nn

from peftbench.errors import UserError
from peftbench.formats.prompt_text import SLOT
from peftbench.methods import Capabilities, remember, unfreeze
from peftbench.methods.prompt import apply_prompt
from peftbench.methods.prompt_tuning import INITS
from peftbench.models import Family
from peftbench.schema import SEED, Bool, ListOf, Map, OneOf, PositiveInt, Text

ENCODERS = ("lstm", "mlp", "emb")
PLACEMENTS = ("prepend", "template")
CAN = Capabilities(changes_input=True, tensors=("prompt_encoder.",))
FIELDS = {
    "length": PositiveInt(doc="prompt tokens"),
    "encoder": OneOf(*ENCODERS),
    "hidden": PositiveInt(null=True, doc="the prompt encoder's width (null: the paper's)"),
    "placement": OneOf(*PLACEMENTS),
    "tune_backbone": Bool(),
    "init": OneOf(*INITS),
    "label_words": ListOf(Text(), null=True),
    "tokenizer": Map(doc="the model config (interpolated: ${model})"),
    "seed": SEED,
}


def anchored(cfg: DictConfig) -> bool:
    """The paper's placement: the prompt vectors fill the [P] slots of task.prompt.anchored."""
    return cfg.method.get("placement") == "template"


def format_options(cfg: DictConfig, task, record: dict) -> dict:
    return {"anchored": anchored(cfg)}


def check(cfg: DictConfig, fam: Family, fmt: str) -> None:
    if fmt == "generation" and not (fam.kind == "encoder-decoder" and cfg.method.placement == "prepend"):
        raise UserError(
            "method=p_tuning cannot generate: its prompt is prepended in one forward call, which a GPT-2 / "
            "Llama decoder's step-by-step decoding does not repeat; use a T5 / BART model "
            "(method.placement=prepend), or method=prefix_tuning"
        )
    if not anchored(cfg):
        return
    if fmt != "prompt":
        raise UserError(
            "method.placement=template fills the [P] slots of task.prompt.anchored: add task.format=prompt"
        )
    template = (cfg.task.get("prompt") or {}).get("anchored")
    if not template:
        raise UserError(
            f"task {cfg.task.name} has no task.prompt.anchored template; use method.placement=prepend"
        )
    if template.count(SLOT) != cfg.method.length:
        raise UserError(
            f"method.length={cfg.method.length} but task.prompt.anchored has {template.count(SLOT)} [P] "
            f"slots; set method.length={template.count(SLOT)}"
        )


def input_positions(cfg: DictConfig) -> int:
    """Positions the prompt adds to the input: prepended, its length; in the template's [P] slots, none
    (they are tokens of the text, within task.max_length)."""
    return 0 if anchored(cfg) else int(cfg.method.length)


def apply(model: nn.Module, cfg: DictConfig, fam: Family) -> nn.Module:
    hidden = cfg.hidden or 0  # 0: the paper's
    placement = cfg.get("placement", "prepend")
    kind = "none" if cfg.encoder == "emb" else cfg.encoder
    model = apply_prompt(model, cfg, fam, kind, hidden, placement)
    if cfg.tune_backbone:
        unfreeze(model)
    return remember(model, cfg)
