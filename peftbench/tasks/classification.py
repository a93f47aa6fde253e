"""GLUE and SuperGLUE: the official local files (GLUE tsv, SuperGLUE jsonl) or the hub via `datasets`.

Local rows are mapped onto the hub's schema (`local.columns`, `local.flatten`), labels onto indices of
`task.labels`, so the rest of peftbench never sees where a row came from.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from peftbench.errors import UserError, choice_error
from peftbench.paths import data_dir
from peftbench.tasks import TaskData, text_file

SPLITS = ("train", "validation")


def load(cfg: DictConfig, seed: int, max_train: int | None = None) -> TaskData:
    rows, sources = {}, {}
    for split in SPLITS:
        if split == "train" and cfg.get("shots_from"):
            rows[split], sources[split] = published_shots(cfg, seed)
        elif split == "validation" and cfg.get("shots_dev"):  # FewGLUE's 32-example dev set
            rows[split], sources[split] = published_shots(cfg, seed, "dev_path")
        else:
            rows[split], sources[split] = _load_split(cfg, split)
    train = rows["train"] if cfg.get("shots_from") else select_train(rows["train"], cfg, seed, max_train)
    return TaskData(cfg.name, cfg.kind, list(cfg.labels or []), train, rows["validation"], sources)


def shot_seed(cfg: DictConfig, seed: int) -> int:
    return int(cfg.shot_seed) if cfg.get("shot_seed") is not None else int(seed)


def published_shots(cfg: DictConfig, seed: int, key: str = "path") -> tuple[list[dict], str]:
    """A published k-shot set, row for row: FewGLUE's 32 train examples (Schick & Schuetze 2021, used by
    P-tuning) and its 32-example dev set (`key="dev_path"`), or T-Few's k-shot file of the shot seed
    (r-three/t-few data/few_shot/<task>/<k>_shot/)."""
    source = cfg.shots_from
    files = cfg.get("shot_files") or {}
    if source not in files:
        raise choice_error(
            f"task.shots_from for task {cfg.name}", source, list(files) or ["(none for this task)"]
        )
    spec = files[source]
    if not spec.get(key):
        raise UserError(f"task.shots_dev=true but the {source} release of task {cfg.name} has no dev set")
    rel = spec[key].format(seed=shot_seed(cfg, seed))
    root = data_dir()
    path = root / rel if root is not None else None
    if path is None or not path.is_file():
        have = (
            sorted(p.name for p in path.parent.glob("*")) if path is not None and path.parent.is_dir() else []
        )
        raise UserError(
            f"task {cfg.name}: no published {source} split at {path or '$PEFTBENCH_DATA_DIR/' + rel}"
            + (f" (there: {', '.join(have)}; set task.shot_seed)" if have else "")
            + f"; get it from {spec.origin}, or drop task.shots_from to draw task.n_shot rows with a seed"
        )
    if spec.get("format", "official") == "official":  # the task's own release format (SuperGLUE jsonl)
        return _read_local(cfg, path), str(path)
    columns = dict(spec.get("columns") or {})
    rows, rule = [], label_rule(cfg)
    for line, row in _read_jsonl(cfg, path, flatten=False):  # hub schema, integer labels
        row = {columns.get(k, k): v for k, v in row.items()}
        rows.append(_normalise(rule, row, "hub", line))
    return rows, str(path)


def select_train(rows: list[dict], cfg: DictConfig, seed: int, max_train: int | None) -> list[dict]:
    """Seeded k-shot subset (`task.n_shot`, per class when `task.balanced`) or the first `max_train` of a
    seeded shuffle. The shot seed defaults to the run seed, as in the few-shot papers' split files."""
    if cfg.get("n_shot"):
        k = int(cfg.n_shot)
        rng = random.Random(shot_seed(cfg, seed))
        if cfg.get("balanced") and cfg.kind != "regression":
            by_label: dict[Any, list] = defaultdict(list)
            for r in rows:
                by_label[r["label"]].append(r)
            picked = []
            for label in sorted(by_label):
                pool = by_label[label]
                if k > len(pool):
                    raise UserError(
                        f"task.n_shot={k} per class but {cfg.name} has only {len(pool)} train rows of label {label}"
                    )
                picked += rng.sample(pool, k)
            rng.shuffle(picked)
            return picked
        if k > len(rows):
            raise UserError(
                f"task.n_shot={k} but {cfg.name} has only {len(rows)} train rows; use n_shot<={len(rows)}"
            )
        return rng.sample(rows, k)
    if max_train and max_train < len(rows):
        rng = random.Random(seed)
        order = list(range(len(rows)))
        rng.shuffle(order)
        return [rows[i] for i in sorted(order[:max_train])]
    return rows


def _load_split(cfg: DictConfig, split: str) -> tuple[list[dict], str]:
    root = data_dir()
    local = cfg.get("local")
    path = None
    if root is not None:
        if not root.is_dir():
            raise UserError(
                f"PEFTBENCH_DATA_DIR={root} does not exist; point it at a folder laid out like the official "
                "releases (glue/RTE/train.tsv, superglue/CB/val.jsonl, ...) or unset it to use the hub"
            )
        if local is not None and local.files.get(split):
            path = root / local.dir / local.files[split]
            if path.is_file():
                return _read_local(cfg, path), str(path)
    return _read_hub(cfg, split, missing_local=path), hub_source(cfg.hub.path, cfg.hub.get("name"))


def _read_hub(cfg: DictConfig, split: str, missing_local: Path | None) -> list[dict]:
    hub = cfg.get("hub")
    where = (
        f"no local file {missing_local}"
        if missing_local
        else "PEFTBENCH_DATA_DIR is not set"
        if data_dir() is None
        else f"no local copy of the {split} split"
    )
    if hub is None:
        raise UserError(f"task {cfg.name}: {where} and the task has no hub source")
    hub_split = hub.get("splits", {}).get(split, split)
    rows, reason = hub_rows(hub, hub_split)
    if rows is not None:
        rule = label_rule(cfg)
        return [_normalise(rule, r, "hub", i) for i, r in enumerate(rows)]
    local_dir = f"$PEFTBENCH_DATA_DIR/{cfg.local.dir}/" if cfg.get("local") else "$PEFTBENCH_DATA_DIR"
    raise UserError(
        f"task {cfg.name}: {where}, and the hub dataset {hub.path}/{hub.get('name')} ({hub_split}) could not be "
        f"loaded ({reason}); put the official files in {local_dir} or go online"
    )


# "path/name" -> the revision of the copy `datasets` loaded (its commit on the hub), for the run's record
HUB_REVISIONS: dict[str, str] = {}


def hub_source(path: str, name: str | None = None) -> str:
    """How a record names hub data: `hub:<path>/<name>@<revision>`."""
    key = "/".join(str(v) for v in (path, name) if v)
    rev = HUB_REVISIONS.get(key)
    return f"hub:{key}" + (f"@{rev}" if rev else "")


def hub_revision(ds) -> str | None:
    """The revision a loaded dataset came from: `datasets` caches a hub dataset under
    <cache>/<owner>___<name>/<config>/<version>/<commit hash>/, so the folder of its cache files names the
    commit (a local folder's: the hash of its files); None for an in-memory dataset."""
    files = ds.cache_files
    if isinstance(files, dict):  # a DatasetDict: split -> files
        files = [f for split in files.values() for f in split]
    return Path(files[0]["filename"]).parent.name if files else None


def hub_load(path: str, name: str | None = None, split: str | None = None):
    """`datasets.load_dataset(path, name, split=split)` (offline: from the local Hugging Face cache, as a
    dataset downloaded on a login node), or None and why it could not be loaded."""
    from peftbench.env import offline_unless_reachable

    offline_unless_reachable()
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
    try:
        import datasets

        ds = datasets.load_dataset(path, name, split=split)
    except Exception as e:  # any failure to reach or read the hub is a user-facing data problem
        why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:160]
        return None, f"HF_HUB_OFFLINE=1 and not in the local cache ({why})" if offline else why
    if rev := hub_revision(ds):
        HUB_REVISIONS["/".join(str(v) for v in (path, name) if v)] = rev
    return ds, ""


def hub_rows(hub: DictConfig, split: str) -> tuple[list[dict] | None, str]:
    """The rows of a hub split via `datasets`, or None and why they could not be loaded."""
    ds, reason = hub_load(hub.path, hub.get("name"), split)
    return ([dict(r) for r in ds] if ds is not None else None), reason


def _read_local(cfg: DictConfig, path: Path) -> list[dict]:
    fmt = cfg.local.format
    if fmt == "tsv":
        raw = _read_tsv(cfg, path)
    elif fmt == "jsonl":
        raw = _read_jsonl(cfg, path)
    else:
        raise UserError(f"task {cfg.name}: unknown local.format {fmt!r}; choose from: jsonl, tsv")
    rule = label_rule(cfg)
    return [_normalise(rule, row, f"{path}:{line}", line) for line, row in raw]


def _read_tsv(cfg: DictConfig, path: Path) -> list[tuple[int, dict]]:
    columns = OmegaConf.to_container(cfg.local.columns)
    with open(path, encoding="utf-8-sig", newline="") as f, text_file(path):
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        has_header = cfg.local.get("header", True)
        header = next(reader, None) if has_header else None
        if has_header and header is None:
            raise UserError(f"{path}: empty file (not even its header row)")
        index = {}
        for field, col in columns.items():
            if isinstance(col, int):
                index[field] = col
            elif header is not None and col in header:
                index[field] = header.index(col)
            else:
                raise UserError(f"{path}:1: header has no column {col!r} (found: {', '.join(header or [])})")
        need = max(index.values()) + 1
        out = []
        for line, fields in enumerate(reader, start=2 if header else 1):
            if not fields:
                continue
            if len(fields) < need:
                raise UserError(
                    f"{path}:{line}: malformed row: {len(fields)} tab-separated fields, expected at least {need}"
                )
            out.append((line, {field: fields[i] for field, i in index.items()}))
    return out


def _read_jsonl(cfg: DictConfig | None, path: Path, flatten: bool = True) -> list[tuple[int, dict]]:
    """(line number, row) of a JSON-lines file, gzipped if it ends in .gz; `flatten`: as the task's rows."""
    out = []
    with (gzip.open if path.suffix == ".gz" else open)(path, "rt", encoding="utf-8") as f, text_file(path):
        for line, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{line}: malformed JSON row ({e.msg})") from None
            if not flatten:
                out.append((line, row))
                continue
            if cfg.local.get("flatten") == "multirc":
                out += [(line, r) for r in _flatten_multirc(row)]
                continue
            for key in cfg.local.get("flatten_keys") or []:
                row.update(row.pop(key, {}))
            out.append((line, row))
    return out


def _flatten_multirc(row: dict) -> list[dict]:
    """One passage with questions with answers -> one row per answer option, as on the hub."""
    text = row["passage"]["text"]
    return [
        {
            "paragraph": text,
            "question": q["question"],
            "answer": a["text"],
            "idx": {"paragraph": row["idx"], "question": q["idx"], "answer": a["idx"]},
            "label": a.get("label", -1),
        }
        for q in row["passage"]["questions"]
        for a in q["answers"]
    ]


@dataclass(frozen=True)
class LabelRule:
    """What `_normalise` needs of the task config, read once per file rather than once per row."""

    name: str
    kind: str
    labels: tuple[str, ...]


def label_rule(cfg: DictConfig) -> LabelRule:
    return LabelRule(cfg.name, cfg.kind, tuple(str(x) for x in (cfg.labels or [])))


def _normalise(rule: LabelRule, row: dict, where: str, position: int) -> dict:
    """Map the label to an index of task.labels (or a float for regression); give every row an id."""
    raw = row.get("label")
    if rule.kind == "regression":
        try:
            row["label"] = float(raw)
        except (TypeError, ValueError):
            raise UserError(f"{where}: label {raw!r} of task {rule.name} is not a number") from None
    elif where != "hub" or isinstance(raw, str):
        value = str(raw).lower() if isinstance(raw, bool) else str(raw)
        if value not in rule.labels:
            raise UserError(
                f"{where}: unknown label {value!r} for task {rule.name}; expected one of {list(rule.labels)}"
            )
        row["label"] = rule.labels.index(value)
    row.setdefault("idx", position)
    return row


# --- formatting for models with a classification head ------------------------------------------------


def format_pairs(cfg: DictConfig, row: dict) -> list[tuple[str, str | None]]:
    """The (text_a, text_b) inputs of one row: one pair, or one per answer choice (multiple choice)."""
    inputs = list(cfg.inputs)
    if cfg.kind == "multiple_choice":
        out = []
        for choice_field in cfg.choices:
            fields = fields_of(cfg, row)
            fields["choice"] = row[choice_field]
            texts = [t.format(**fields) for t in inputs]
            out.append((texts[0], texts[1] if len(texts) > 1 else None))
        return out
    texts = [t.format(**row) for t in inputs]
    return [(texts[0], texts[1] if len(texts) > 1 else None)]


def fields_of(cfg: DictConfig, row: dict) -> dict:
    """The row's fields plus those its `derive_from` value derives (COPA: cause -> connective "because")."""
    return {**row, **dict((cfg.get("derived") or {}).get(row.get(cfg.get("derive_from", "")), {}))}


def group_of(cfg: DictConfig, row: dict) -> str | None:
    return cfg.group.format(**row) if cfg.get("group") else None
