"""FSDP (train.fsdp=true): full fine-tuning of a model too large for one device's memory, sharded over the
processes of `torchrun` / `accelerate launch` with torch's own FSDP2 (`fully_shard`): every transformer block is
one unit (gathered for its forward and backward, then freed), the rest of the model the root unit. Parameters,
gradients and AdamW's state are then 1/N per process. What leaves the training loop (the best weights, a
checkpoint, the saved weights, an export) is gathered into full tensors first, so records, checkpoints and
adapters are the same files as without FSDP.

Without FSDP these helpers fall back to the plain module's own state dicts, so the loop has one code path."""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from peftbench.models import base_model, transformer_blocks


def shard(model: torch.nn.Module, blocks: tuple[str, ...], device: torch.device, mixed_precision: str):
    """Shard the model in place: each block of `blocks` (ModuleList paths), then the root. bf16 computes in
    bf16 and reduces gradients in fp32 (FSDP2's MixedPrecisionPolicy), the fp32 master weights stay sharded."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    dtype = torch.bfloat16 if mixed_precision == "bf16" else None
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype else None)
    model.to(device)
    for block in transformer_blocks(base_model(model), blocks):
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def sharded(model: torch.nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


def reshard(model: torch.nn.Module) -> None:
    """Free the gathered parameters a forward without backward leaves behind (FSDP2 keeps the root unit's
    after its forward), so the model again holds its sharded parameters, the ones the optimizer steps."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trained tensors by name, full (gathered from the shards, on CPU: every process calls it)."""
    return {
        n: p.full_tensor().cpu() if isinstance(p, DTensor) else p.detach().clone()
        for n, p in model.named_parameters()
        if p.requires_grad
    }


def load_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load full tensors by name (a part of the model's parameters), into the shards under FSDP."""
    if sharded(model):
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))
    else:
        model.load_state_dict(state, strict=False)


def optimizer_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state as a checkpoint stores it: full under FSDP (on the main process)."""
    if not sharded(model):
        return opt.state_dict()
    opt = getattr(opt, "optimizer", opt)  # under accelerate's wrapper
    return get_optimizer_state_dict(
        model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )


def load_optimizer_state(model: torch.nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    if sharded(model):
        opt = getattr(opt, "optimizer", opt)
        set_optimizer_state_dict(model, opt, state, options=StateDictOptions(full_state_dict=True))
    else:
        opt.load_state_dict(state)


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The whole model's full state dict for an export (the main process gets it), None without FSDP."""
    if not sharded(model):
        return None
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
