"""Methods: a YAML in configs/method/ names `apply(model, cfg, family) -> model` with `_target_`.

`apply` freezes what the method does not train and adds what it does; it may wrap the model (peft). It must
work on the meta device too, so `peftbench params` can count any paper model without its weights.

The module of `_target_` declares what the method can do (`CAN = Capabilities(...)`; the defaults below are
a method that trains some tensors of the model) and may define hooks the recipe calls when present:

    check(cfg, fam, fmt)                          -> None; a UserError if the method does not fit the format
    format_options(cfg, task, record)             -> dict of keyword arguments for the format's encoder
    before_evaluate_only(model, fmt, cfg, task, device, record)   when nothing trains (ICL's calibration)
    make_optimizer(params, model, train_cfg, method_cfg)  -> torch.optim.Optimizer (LoRA+'s groups)
    on_train_start(model, total_steps, method_cfg)      before the first step (AdaLoRA's schedule)
    adjust_loss(model, loss, method_cfg)          -> the loss to back-propagate (AdaLoRA's regulariser)
    after_step(model, step, method_cfg)           after each optimizer step, before zero_grad (AdaLoRA)
    input_positions(cfg)                          -> int; positions a soft prompt adds to the input (run config)

A method's own config keys, with their types and ranges, are its module's `FIELDS` (peftbench/schema.py).

Hooks receive the model as the method built it (unwrapped from accelerate / DDP). No list of method names
exists outside this folder: the generic code asks `capabilities(cfg)` and `hook()`.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from hydra.utils import get_method
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file

from peftbench.errors import UserError
from peftbench.models import Family


@dataclass(frozen=True)
class Capabilities:
    exportable: bool = False  # the trained model is a plain transformers model (weights, or merged into them)
    fsdp: bool = False  # the trained tensors are the model's own weights, so FSDP can shard them
    changes_input: bool = False  # prepends to the sequence: no context pass shared between answer choices
    trains: bool = True  # has parameters to train (in-context learning does not)
    in_params_table: bool = True  # a row of `peftbench params`' default table
    # what the names of the tensors it trains contain (one of these each; the task head aside); () = no rule
    tensors: tuple[str, ...] = ()


def method_module(method_cfg: DictConfig) -> ModuleType:
    """The module of the method's `_target_` (where its capabilities and hooks live)."""
    return importlib.import_module(str(method_cfg._target_).rsplit(".", 1)[0])


def capabilities(method_cfg: DictConfig) -> Capabilities:
    return getattr(method_module(method_cfg), "CAN", Capabilities())


def hook(method_cfg: DictConfig, name: str):
    """The method's hook `name`, or None if its module defines none."""
    return getattr(method_module(method_cfg), name, None)


def apply_method(model: torch.nn.Module, method_cfg: DictConfig, fam: Family) -> torch.nn.Module:
    return get_method(method_cfg._target_)(model, method_cfg, fam)


def freeze(model: torch.nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def unfreeze(module: torch.nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(True)


def unfreeze_head(model: torch.nn.Module, fam: Family) -> None:
    """The task head is new (random init), so every method trains it."""
    for name in fam.head:
        unfreeze(model.get_submodule(name))


def finish(model: torch.nn.Module) -> torch.nn.Module:
    """Prepare a trained model for inference: merge low-rank updates into the weights (peft's and our own
    modules that define `merge()`), so inference costs what the base model costs."""
    if hasattr(model, "merge_and_unload"):
        unwrap_trained_heads(model)
        model = model.merge_and_unload()
    for name, module in list(model.named_modules()):
        if name and callable(getattr(module, "merge", None)) and hasattr(module, "merged"):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module.merge())
    return model


def stored_count(model: torch.nn.Module, trainable_without_head: int) -> int:
    """Parameters kept after training, without the head: the trainable ones, except that modules with a
    training-only reparameterisation (prefix tuning's MLP) count what they keep (`stored_numel()`)."""
    for module in model.modules():
        if callable(getattr(module, "stored_numel", None)):
            during = sum(p.numel() for p in module.parameters() if p.requires_grad)
            trainable_without_head += module.stored_numel() - during
    return trainable_without_head


def unwrap_trained_heads(model: torch.nn.Module) -> None:
    """Replace peft's modules_to_save wrappers by their trained copies. peft's IA3 merge_and_unload would
    otherwise copy `.weight` onto a head that has none (RobertaClassificationHead, T5ClassificationHead)."""
    from peft.utils import ModulesToSaveWrapper

    wrappers = [(n, m) for n, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)]
    for name, wrapper in wrappers:
        parent, _, child = name.rpartition(".")
        trained = wrapper.modules_to_save[wrapper.active_adapters[0]]
        setattr(model.get_submodule(parent) if parent else model, child, trained)


def save_trainable(model: torch.nn.Module, folder: Path, state: dict | None = None) -> str:
    """Adapters of peft methods in peft's format (PeftModel.from_pretrained loads them); every other trained
    tensor as safetensors (trainable.safetensors, parameter name -> tensor). When a model mixes both (GPT-2's
    fused q|k|v modules next to peft's), the safetensors file holds every trained tensor, so load_trainable
    alone rebuilds the model. `state`: the trained tensors, if not the model's own (FSDP gathers them)."""
    folder.mkdir(parents=True, exist_ok=True)
    formats = []
    saved_by_peft: set[str] = set()
    if hasattr(model, "peft_config"):
        model.save_pretrained(folder)
        formats.append("peft")
        saved_by_peft = peft_tensors(model)
    if state is None:
        state = {n: p for n, p in model.named_parameters() if p.requires_grad}
    trained = {n: t.detach().contiguous().cpu() for n, t in state.items()}
    tensors = {n: t for n, t in trained.items() if n not in saved_by_peft}
    if tensors and saved_by_peft:
        tensors = trained
    if tensors:
        save_file(tensors, str(folder / "trainable.safetensors"))
        formats.append("safetensors")
    method = getattr(model, METHOD_ATTR, None)
    if method is not None:
        (folder / "method.json").write_text(json.dumps(method, indent=2) + "\n")
    return "+".join(formats)


def peft_tensors(model: torch.nn.Module) -> set[str]:
    """Names of the parameters peft's own save_pretrained writes: those of peft's tuner layers (not their
    frozen base layers) and of its modules_to_save copies; our own modules (GPT-2's fused q|k|v LoRA / IA3)
    are not among them."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    names: set[str] = set()
    for prefix, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            names |= {
                f"{prefix}.{n}" for n, _ in module.named_parameters() if not n.startswith("base_layer.")
            }
    return names | {n for n, _ in model.named_parameters() if "modules_to_save" in n}


METHOD_ATTR = "peftbench_method"


def remember(model: torch.nn.Module, cfg: DictConfig, **resolved) -> torch.nn.Module:
    """Keep the method config (with values solved at apply time, e.g. an adapter's m) on the model, so
    save_trainable writes it as method.json and load_trainable can rebuild the same modules."""
    method = OmegaConf.to_container(cfg, resolve=True)
    method.update(resolved)
    setattr(model, METHOD_ATTR, method)
    return model


def load_trainable(base: torch.nn.Module, folder: Path, fam: Family) -> torch.nn.Module:
    """Our own methods' checkpoints: method.json + trainable.safetensors -> the method on a fresh base model
    (random inits are overwritten by the saved tensors, so the logits equal the saved model's)."""
    folder = Path(folder)
    cfg = OmegaConf.create(json.loads((folder / "method.json").read_text()))
    model = apply_method(base, cfg, fam)
    tensors = load_file(str(folder / "trainable.safetensors"))
    names = dict(model.named_parameters())
    missing = sorted(set(tensors) - set(names))
    absent = sorted(n for n, p in names.items() if p.requires_grad and n not in tensors)
    if missing or absent:
        raise UserError(
            f"{folder} does not match method {cfg.name}: saved but not in the model {missing[:3]}, "
            f"trainable but not saved {absent[:3]}"
        )
    with torch.no_grad():
        for n, t in tensors.items():
            names[n].copy_(t)
    return model
