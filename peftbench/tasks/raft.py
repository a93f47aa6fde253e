"""RAFT (Alex et al. 2021): 11 real-world few-shot classification tasks, 50 labelled rows each, test labels
private. The official files (<subset>/task.json, train.csv, test_unlabeled.csv) or the hub (`ought/raft`).

Rows keep the release's column names ("Sentence", "Paper title", ...), labels become indices of the task's
label names (the hub's integer labels are 1 + that index, 0 = Unlabeled), ids are the release's ID column.
Evaluation is cross-validation on the 50 labelled rows, as T-Few does it: fold k holds out rows 10k..10k+9.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from omegaconf import DictConfig

from peftbench.errors import UserError
from peftbench.paths import data_dir
from peftbench.tasks import TaskData
from peftbench.tasks.classification import hub_load, hub_source


def load(cfg: DictConfig, seed: int, max_train: int | None = None) -> TaskData:
    labelled, test, labels, sources = _read(cfg)
    if labels != list(cfg.labels):
        raise UserError(
            f"task {cfg.name}: the data's label names {labels} differ from configs/task/{cfg.name}.yaml's "
            f"{list(cfg.labels)}; the data is not the RAFT release this config was written for"
        )
    train, validation, notes = split_folds(cfg, labelled)
    return TaskData(cfg.name, "classification", labels, train, validation, sources, test=test, notes=notes)


def split_folds(cfg: DictConfig, rows: list[dict]) -> tuple[list[dict], list[dict], dict]:
    n_folds, fold = int(cfg.n_folds), cfg.fold
    if fold is None:  # the leaderboard run: every labelled row trains; nothing is held out
        return rows, rows, {"eval_on_train_rows": True}
    size = len(rows) // n_folds
    if isinstance(fold, bool) or not isinstance(fold, int) or not 0 <= fold < n_folds:
        raise UserError(
            f"task.fold={fold!r}: choose 0..{n_folds - 1} (task.n_folds={n_folds}) or null (train on all)"
        )
    held = rows[fold * size : (fold + 1) * size]
    return rows[: fold * size] + rows[(fold + 1) * size :], held, {"fold": fold, "n_folds": n_folds}


def _read(cfg: DictConfig) -> tuple[list[dict], list[dict], list[str], dict[str, str]]:
    root = data_dir()
    folder = root / cfg.local.dir / cfg.subset if root is not None else None
    if folder is not None and (folder / "task.json").is_file():
        return _read_local(cfg, folder)
    return _read_hub(cfg, folder)


def _read_local(cfg: DictConfig, folder: Path) -> tuple[list[dict], list[dict], list[str], dict[str, str]]:
    try:
        spec = json.loads((folder / "task.json").read_text())
        labels = list(spec["label_columns"]["Label"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{folder / 'task.json'}: not a RAFT task.json ({type(e).__name__}: {e})") from None
    files = {"train": folder / "train.csv", "test": folder / "test_unlabeled.csv"}
    for split, path in files.items():
        if not path.is_file():
            raise UserError(
                f"task {cfg.name}: no local {split} file {path}; put the RAFT release there or go online"
            )
    train = [_row(cfg, r, labels, f"{files['train']}:{i + 2}") for i, r in enumerate(_csv(files["train"]))]
    test = [_row(cfg, r, labels, None) for r in _csv(files["test"])]
    return train, test, labels, {k: str(v) for k, v in files.items()}


def _csv(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def _row(cfg: DictConfig, raw: dict, labels: list[str], where: str | None) -> dict:
    row = {k: v for k, v in raw.items() if k not in ("Label", "ID")}
    try:
        row["idx"] = int(raw["ID"])
    except (KeyError, TypeError, ValueError):
        raise UserError(
            f"{where or cfg.name}: row without an integer ID column ({raw.get('ID')!r})"
        ) from None
    if where is None:  # unlabelled test row
        row["label"] = -1
        return row
    if raw.get("Label") not in labels:
        raise UserError(
            f"{where}: unknown label {raw.get('Label')!r} for task {cfg.name}; expected one of {labels}"
        )
    row["label"] = labels.index(raw["Label"])
    return row


def _read_hub(
    cfg: DictConfig, missing: Path | None
) -> tuple[list[dict], list[dict], list[str], dict[str, str]]:
    where = f"no local {missing / 'task.json'}" if missing else "PEFTBENCH_DATA_DIR is not set"
    ds, reason = hub_load(cfg.hub.path, cfg.subset)
    if ds is not None:
        labels = ds["train"].features["Label"].names[1:]  # 0 is "Unlabeled"

        def rows(split: str) -> list[dict]:
            out = []
            for r in ds[split]:
                row = {k: v for k, v in r.items() if k not in ("Label", "ID")}
                row.update(idx=int(r["ID"]), label=int(r["Label"]) - 1)
                out.append(row)
            return out

        hub = hub_source(cfg.hub.path, cfg.subset)
        return rows("train"), rows("test"), labels, {"train": hub, "test": hub}
    raise UserError(
        f"task {cfg.name}: {where}, and the hub dataset {cfg.hub.path}/{cfg.subset} could not be loaded "
        f"({reason}); put the RAFT release in $PEFTBENCH_DATA_DIR/{cfg.local.dir}/{cfg.subset}/ or go online"
    )
