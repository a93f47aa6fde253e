"""Tasks: a YAML in configs/task/ names its loader (`_target_`); the loader returns TaskData.

Rows keep the hub's schema (the same field names whether they came from the official local files or from
`datasets`), so formatting for a classification head now, or for prompts and verbalizers later, is written
once per task.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.utils import get_method
from omegaconf import DictConfig


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
