"""Tasks: a YAML in configs/task/ names its loader (`_target_`); the loader returns TaskData.

Rows keep the hub's schema (the same field names whether they came from the official local files or from
`datasets`), so formatting for a classification head now, or for prompts and verbalizers later, is written
once per task.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.utils import get_method
from omegaconf import DictConfig

from peftbench.errors import UserError
from peftbench.paths import data_dir


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


def data_identity(task_cfg: DictConfig) -> dict[str, Any]:
    """What data a run of this task reads: the content hash, count and size of every file of its local folder
    (and of its published few-shot files), or its hub dataset. Recorded with the run; a finished run whose
    data changed since is run again (run.py), so a run on a cut-down copy is never taken for the full one."""
    root, local = data_dir(), task_cfg.get("local") or {}
    folders = [local.get("dir")] if local.get("dir") else []
    if (
        folders
        and task_cfg.get("subset")
        and root is not None
        and (root / folders[0] / task_cfg.subset).is_dir()
    ):
        folders = [f"{folders[0]}/{task_cfg.subset}"]  # RAFT: <dir>/<subset>/
    shots = (task_cfg.get("shot_files") or {}).get(task_cfg.get("shots_from") or "", {})
    if shots.get("path"):
        prefix = shots["path"].split("{")[0]  # the folder of every seed's file
        folders.append(prefix.rstrip("/") if prefix.endswith("/") else str(Path(prefix).parent))
    out: dict[str, Any] = {}
    for folder in folders:
        if root is not None and (root / folder).is_dir():
            out[folder] = folder_digest(root / folder)
    if not out:
        hub = task_cfg.get("hub") or {}
        out["hub"] = "/".join(str(v) for v in (hub.get("path"), hub.get("name")) if v)
    return out


def folder_digest(folder: Path) -> str:
    """`<files> files, <bytes> bytes, sha256 <16 hex>` over the files' relative paths and contents."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    total, digest = 0, hashlib.sha256()
    for f in files:
        st = f.stat()
        total += st.st_size
        digest.update(f"{f.relative_to(folder)}\0{file_digest(f, st.st_size, st.st_mtime_ns)}\0".encode())
    return f"{len(files)} files, {total} bytes, sha256 {digest.hexdigest()[:16]}"


@functools.lru_cache(maxsize=4096)
def file_digest(path: Path, size: int, mtime_ns: int) -> str:
    """A file's sha256, once per process per (size, mtime): a sweep hashes each file once."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
