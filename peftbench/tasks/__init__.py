"""Tasks: a YAML in configs/task/ names its loader (`_target_`); the loader returns TaskData.

Rows keep the hub's schema (the same field names whether they came from the official local files or from
`datasets`), so formatting for a classification head now, or for prompts and verbalizers later, is written
once per task.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.utils import get_method
from omegaconf import DictConfig

from peftbench.errors import UserError


@dataclass
class TaskData:
    name: str
    kind: str  # classification | regression | multiple_choice | generation
    label_names: list[str]
    train: list[dict[str, Any]]
    validation: list[dict[str, Any]]
    sources: dict[str, str] = field(default_factory=dict)  # split -> file path or hub id it came from
    test: list[dict[str, Any]] = field(
        default_factory=list
    )  # unlabelled rows to predict (RAFT's leaderboard set)
    notes: dict[str, Any] = field(
        default_factory=dict
    )  # what a reader of the record must know (e.g. eval on train rows)
    transfer: dict[str, list[dict[str, Any]]] = field(
        default_factory=dict
    )  # other evaluation sets, scored zero-shot after training (QA domain transfer)


def load_task(task_cfg: DictConfig, seed: int, max_train: int | None = None) -> TaskData:
    return get_method(task_cfg._target_)(task_cfg, seed=seed, max_train=max_train)


@contextmanager
def text_file(path: Path) -> Iterator[None]:
    """Reading a data file: a byte that is not UTF-8 is one line naming the file, not a decoder traceback."""
    try:
        yield
    except UnicodeDecodeError as e:
        bad = e.object[e.start : e.start + 1].hex()
        raise UserError(
            f"{path}: not UTF-8 text (byte 0x{bad} at offset {e.start} of a chunk); re-save it as UTF-8"
        ) from None


def check_rows(task: TaskData, needs_train: bool) -> None:
    """An empty split would train forever (no batch ever comes) or score nothing: say which file it is."""
    splits = (["train"] if needs_train else []) + ["validation"]
    for split in splits:
        if not getattr(task, split):
            where = task.sources.get(split) or task.sources.get("train") or "its source"
            raise UserError(
                f"task {task.name}: the {split} split has no rows ({where}: empty, or a header only?)"
            )
