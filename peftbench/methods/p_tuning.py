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

from peftbench.errors import choice_error
from peftbench.methods import positive_int, remember, unfreeze
from peftbench.methods.prompt import apply_prompt
from peftbench.models import Family

ENCODERS = ("lstm", "mlp", "emb")
PLACEMENTS = ("prepend", "template")


def apply(model: nn.Module, cfg: DictConfig, fam: Family) -> nn.Module:
    if cfg.encoder not in ENCODERS:
        raise choice_error("method.encoder", cfg.encoder, ENCODERS)
    hidden = positive_int(cfg.hidden, "method.hidden") if cfg.hidden is not None else 0  # 0: the paper's
    if not isinstance(cfg.tune_backbone, bool):
        raise choice_error("method.tune_backbone", cfg.tune_backbone, ["true", "false"])
    placement = cfg.get("placement", "prepend")
    if placement not in PLACEMENTS:
        raise choice_error("method.placement", placement, PLACEMENTS)
    kind = "none" if cfg.encoder == "emb" else cfg.encoder
    model = apply_prompt(model, cfg, fam, kind, hidden, placement)
    if cfg.tune_backbone:
        unfreeze(model)
    return remember(model, cfg)
