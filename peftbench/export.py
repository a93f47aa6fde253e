"""What a run writes besides its record: the trained parameters (adapter folder, peft format where peft made
them) and the trained model exported as a transformers checkpoint; both swapped in atomically."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from peftbench import checkpoint
from peftbench.errors import disk_full_is_user_error
from peftbench.methods import save_trainable


def save_adapter(model: torch.nn.Module, folder: Path, state: dict | None = None) -> dict[str, Any]:
    """The trained parameters (peft format for peft methods), swapped in atomically like a checkpoint;
    `state`: them as full tensors (FSDP)."""
    fmt = write_folder(
        folder,
        lambda tmp: save_trainable(model, tmp, state),
        f"the adapter {folder}",
        "the last checkpoint is kept and the rerun resumes from it",
    )
    return {"path": str(folder), "format": fmt, "bytes": checkpoint.size(folder)}


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
