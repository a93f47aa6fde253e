"""What a run writes besides its record: the trained parameters (adapter folder, peft format where peft made
them) and the trained model exported as a transformers checkpoint; both swapped in atomically."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from peftbench import checkpoint
from peftbench.errors import disk_full_is_user_error
from peftbench.methods import peft_tensors, save_trainable

# what peft's save_pretrained writes
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors", "README.md")
PREFIX = "base_model.model."  # a peft model's path to the base model's modules, in names and saved keys


def save_adapter(model: torch.nn.Module, folder: Path, state: dict | None = None) -> dict[str, Any]:
    """The trained parameters, swapped in atomically like a checkpoint; `state`: them as full tensors (FSDP).
    Always peftbench's own format where it has trained tensors peft does not (method.json and
    trainable.safetensors, for methods.load_trainable); peft's format (PeftModel.from_pretrained) where it
    gives the same logits: peft's methods, and our fused q|k|v modules (GPT-2's FusedLoRA / FusedIA3)
    written as their exact peft equivalent on the whole c_attn (`write_peft_equivalent`). A model peft
    would load only in part (silently, to other logits) gets no adapter_config.json, but a README.md
    saying how to load it."""

    def fill(tmp: Path) -> str:
        fmt = save_trainable(model, tmp, state)
        if state is None and write_peft_equivalent(model, tmp):
            return "peft+safetensors"
        if fmt == "peft+safetensors":  # peft's files would load without the tensors only we saved
            for name in PEFT_FILES:
                (tmp / name).unlink(missing_ok=True)
            (tmp / "README.md").write_text(OWN_FORMAT_NOTE)
            return "safetensors"
        return fmt

    fmt = write_folder(
        folder, fill, f"the adapter {folder}", "the last checkpoint is kept and the rerun resumes from it"
    )
    return {"path": str(folder), "format": fmt, "bytes": checkpoint.size(folder)}


OWN_FORMAT_NOTE = """# peftbench adapter (not peft's format)

Some trained tensors here have no peft equivalent, so this folder has no `adapter_config.json`:
`PeftModel.from_pretrained` cannot load it. `method.json` is the method's config, `trainable.safetensors`
every trained tensor by parameter name. Load it with peftbench (the base model as the run built it):

```python
import json
from omegaconf import OmegaConf
from peftbench.methods import load_trainable
from peftbench.models import family, load_model

record = json.load(open("RUN_ID.json"))  # the run's record, beside its folder RUN_ID/ (this is RUN_ID/adapter)
model_cfg = OmegaConf.create(record["config"]["model"])
base, _ = load_model(model_cfg, "classification", len(record["config"]["task"]["labels"]))
model = load_trainable(base, "RUN_ID/adapter", family(model_cfg))
```
"""


def write_peft_equivalent(model: torch.nn.Module, folder: Path) -> bool:
    """Our own modules that have an exact peft equivalent (they define `peft_tensors()` and `peft_config()`:
    GPT-2's FusedLoRA / FusedIA3) written, with peft's own layers and heads, as one peft adapter
    (adapter_config.json, adapter_model.safetensors) that PeftModel.from_pretrained loads to our logits.
    False (nothing written) when the model has none, or trains what the equivalent would leave out."""
    from peft.utils import get_peft_model_state_dict

    own = {n.removeprefix(PREFIX): m for n, m in model.named_modules() if hasattr(m, "peft_tensors")}
    kinds = {type(m) for m in own.values()}
    if len(kinds) != 1:
        return False
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    rest = {n for n in trained if not any(n.removeprefix(PREFIX).startswith(o + ".") for o in own)}
    if hasattr(model, "peft_config"):
        if rest - peft_tensors(model) or list(model.peft_config) != ["default"]:
            return False
        config = copy.deepcopy(model.peft_config["default"])
        tensors = get_peft_model_state_dict(model)
    else:  # only our modules: the task head (what else trains) becomes peft's modules_to_save
        heads = sorted({n.rpartition(".")[0] for n in rest})
        if "" in heads:
            return False
        config = None
        tensors = {
            f"{PREFIX}{h}.{k}": t for h in heads for k, t in model.get_submodule(h).state_dict().items()
        }
    config = kinds.pop().peft_config(config, list(own.values()), module_regex(model, own))
    if config is None:
        return False
    if not hasattr(model, "peft_config"):
        config.modules_to_save = heads or None
        config.base_model_name_or_path = model.__dict__.get("name_or_path")
    config.inference_mode = True
    tensors = {k: v for k, v in tensors.items() if not any(k.startswith(f"{PREFIX}{o}.") for o in own)}
    for name, module in own.items():
        tensors.update({f"{PREFIX}{name}.{k}": v for k, v in module.peft_tensors().items()})
    config.save_pretrained(str(folder))
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return True


def module_regex(model: torch.nn.Module, names: dict[str, Any]) -> str:
    """A regex that peft's fullmatch finds on exactly these modules of the base model: their last names
    (`.*\\.(c_attn)`) when no other module ends so, else the names themselves."""
    short = r".*\.(" + "|".join(sorted({re.escape(n.rpartition(".")[2]) for n in names})) + ")"
    every = {n.removeprefix(PREFIX) for n, _ in model.named_modules()}
    if {n for n in every if re.fullmatch(short, n)} == set(names):
        return short
    return "|".join(re.escape(n) for n in sorted(names))


def export_model(
    model: torch.nn.Module, folder: Path, record: dict[str, Any], state: dict[str, torch.Tensor] | None = None
) -> dict[str, Any]:
    """The trained model as a transformers checkpoint (LoRA / IA3 merged into the weights), loadable as
    `model.path=FOLDER`: e.g. a base that later PEFT runs adapt. export.json says which run made it."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp, state_dict=state)
        made_by = {k: record[k] for k in ("run_id", "method", "model", "task", "seed", "best")}
        (tmp / "export.json").write_text(json.dumps(made_by, indent=2) + "\n")

    write_folder(folder, fill, f"the exported model {folder}", "the record and adapter are kept")
    return {"path": str(folder), "bytes": checkpoint.size(folder)}


def write_folder(folder: Path, fill, what: str, kept: str):
    """Fill a temporary sibling of `folder`, then swap it in atomically (like a checkpoint); a full disk is
    one line naming `what` and what is `kept`. Returns what `fill(tmp)` returns."""
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    with disk_full_is_user_error(what, kept):
        try:
            out = fill(tmp)
            checkpoint.replace_dir(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out
