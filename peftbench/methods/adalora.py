"""AdaLoRA (Zhang et al. 2023): ΔW = P Λ Q in SVD form on every chosen weight, trained with an orthogonality
regulariser on P and Q, while a rank allocator prunes the least important singular values from init_r to an
average of target_r per matrix on a cubic schedule (warm-up tinit, then budgeting, then tfinal steps at the
final ranks). peft 0.21.2 implements the layers (AdaLoraConfig / SVDLinear) and the allocator (RankAllocator);
peft only adds the regulariser to `outputs.loss` (labels passed to the model) and leaves the schedule to the
caller, so this module supplies the training loop's hooks:

    on_train_start  the run's step count -> peft's total_step, tinit, tfinal (apply() runs before it is known)
    adjust_loss     + orth_reg_weight x mean ||P^T P - I||_F, ||Q Q^T - I||_F, as AdaLoraModel.forward adds it
    after_step      update_and_allocate(step): importance scores, budget, masks (after optimizer.step())

GPT-2 fuses q, k, v into one Conv1D `c_attn`: with `method.fused: whole` peft adapts it as one matrix (one SVD
triplet set for q, k, v and one matrix in the budget); any other value raises.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from peft import AdaLoraConfig, get_peft_model
from torch import nn

from peftbench.errors import UserError
from peftbench.methods import Capabilities, remember
from peftbench.methods.lora import FUSED, TARGETS, check_rank, whole_targets
from peftbench.models import Family
from peftbench.schema import Bool, Number, OneOf, Positive, PositiveInt, Rate

# peft merges P Λ Q (pruned triplets are zero) into the weights
CAN = Capabilities(exportable=True, tensors=("lora_",))
EMA = Number(0, 1, open_low=True, open_high=True, doc="an EMA coefficient")
FIELDS = {
    "init_r": PositiveInt(),
    "target_r": PositiveInt(),
    "alpha": Positive(doc="scaling alpha / init_r"),
    "dropout": Rate(),
    "targets": TARGETS,
    "orth_reg_weight": Number(0),
    "tinit_frac": Number(0, 1, open_high=True),
    "tfinal_frac": Number(0, 1, open_high=True),
    "delta_t": PositiveInt(),
    "beta1": EMA,
    "beta2": EMA,
    "fused": OneOf(*FUSED),
    "merge": Bool(),
}


def apply(model: nn.Module, cfg: DictConfig, fam: Family) -> nn.Module:
    init_r = cfg.init_r
    target_r = cfg.target_r
    if target_r > init_r:
        raise UserError(f"method.target_r={target_r} > method.init_r={init_r}: the budget only shrinks")
    if cfg.tinit_frac + cfg.tfinal_frac >= 1:
        raise UserError(
            f"method.tinit_frac={cfg.tinit_frac!r}, method.tfinal_frac={cfg.tfinal_frac!r}: each >= 0 and "
            f"their sum < 1 (the budget needs steps between them)"
        )
    pattern = whole_targets(cfg, fam, "adalora")
    check_rank(model, pattern, init_r, "method.init_r")
    model = get_peft_model(
        model,
        AdaLoraConfig(
            init_r=init_r,
            target_r=target_r,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=pattern,
            modules_to_save=list(fam.head),
            fan_in_fan_out=fam.transposed,  # GPT-2's Conv1D stores W transposed
            bias="none",
            orth_reg_weight=cfg.orth_reg_weight,
            deltaT=cfg.delta_t,
            beta1=cfg.beta1,
            beta2=cfg.beta2,
            # placeholders: on_train_start sets the run's schedule (peft requires total_step > tinit + tfinal)
            total_step=1,
            tinit=0,
            tfinal=0,
        ),
    )
    # ranknum (the current rank, a constant) is frozen by peft, but its meta-device copy comes back trainable
    for name, p in model.named_parameters():
        if ".ranknum." in name:
            p.requires_grad_(False)
    return remember(model, cfg)


def tuner(model: nn.Module):
    """peft's AdaLoraModel inside the PeftModel (hooks get the model unwrapped from accelerate)."""
    return model.base_model


def schedule(total_steps: int, cfg: DictConfig) -> tuple[int, int]:
    """(tinit, tfinal) in steps for a run of total_steps."""
    tinit, tfinal = round(cfg.tinit_frac * total_steps), round(cfg.tfinal_frac * total_steps)
    if tinit >= total_steps - tfinal:
        raise UserError(
            f"method=adalora with {total_steps} steps: tinit_frac={cfg.tinit_frac} ({tinit} steps) and "
            f"tfinal_frac={cfg.tfinal_frac} ({tfinal}) leave no budgeting steps; train longer or lower them"
        )
    return tinit, tfinal


def on_train_start(model: nn.Module, total_steps: int, method_cfg: DictConfig) -> None:
    t = tuner(model)
    config = t.peft_config[t.trainable_adapter_name]
    config.tinit, config.tfinal = schedule(int(total_steps), method_cfg)
    t.rankallocator.set_total_step(int(total_steps))  # the allocator reads the same config object
    config.total_step = int(total_steps)


def orthogonal_regulariser(model: nn.Module) -> torch.Tensor | None:
    """Mean over P and Q of ||P^T P - I||_F, ||Q Q^T - I||_F (peft's AdaLoraModel.forward); None if none."""
    t = tuner(model)
    name = t.trainable_adapter_name
    terms = []
    for n, p in t.model.named_parameters():
        if ("lora_A" in n or "lora_B" in n) and name in n:
            cov = p @ p.T if "lora_A" in n else p.T @ p
            eye = torch.eye(*cov.shape, dtype=cov.dtype, device=cov.device)
            terms.append(torch.norm(cov - eye, p="fro"))
    return torch.stack(terms).mean() if terms else None


def adjust_loss(model: nn.Module, loss: torch.Tensor, method_cfg: DictConfig) -> torch.Tensor:
    t = tuner(model)
    weight = t.peft_config[t.trainable_adapter_name].orth_reg_weight
    reg = orthogonal_regulariser(model) if weight > 0 else None
    return loss if reg is None else loss + weight * reg.to(loss.dtype)


def after_step(model: nn.Module, step: int, method_cfg: DictConfig) -> None:
    """After optimizer.step(), before zero_grad (the allocator reads the gradients); `step` counts the optimizer
    steps taken, this one included. A run resumed from a checkpoint after the final allocation has lost peft's
    rank pattern (it lives in the peft config, not in the checkpoint): it is the singular values left non-zero.
    The allocator's importance averages restart from zero on resume."""
    t = tuner(model)
    config = t.peft_config[t.trainable_adapter_name]
    if step > config.total_step - config.tfinal and config.rank_pattern is None:
        suffix = f"lora_E.{t.trainable_adapter_name}"
        config.rank_pattern = {
            n: (p != 0).view(-1).tolist() for n, p in t.model.named_parameters() if n.endswith(suffix)
        }
    t.update_and_allocate(int(step))


def ranks(model: nn.Module) -> dict[str, int]:
    """The current rank of every adapted matrix (by its Λ's name): init_r until the allocator first masks,
    then the singular values its rank pattern keeps (Λ starts at zero, so its non-zeros do not tell)."""
    t = tuner(model)
    config = t.peft_config[t.trainable_adapter_name]
    suffix = f"lora_E.{t.trainable_adapter_name}"
    names = [n for n, _ in t.model.named_parameters() if n.endswith(suffix)]
    pattern = config.rank_pattern or {}
    return {n: int(sum(pattern[n])) if n in pattern else config.init_r for n in names}
