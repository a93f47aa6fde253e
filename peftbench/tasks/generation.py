"""Data-to-text tasks: E2E (official csv), WebNLG 2017 (official XML), DART v1.1.1 (official JSON / XML), from
PEFTBENCH_DATA_DIR or the hub via `datasets`.

Every split is first read as entries `{"source": linearised input, "references": [...], "category": ...}`,
one per distinct input in the official file order. Evaluation splits keep that shape (`target` = the first
reference); training rows are one per (input, reference) pair, as Prefix-Tuning and LoRA train.
Linearisations follow LoRA's `examples/NLG/src/format_converting_{e2e,webnlg,dart}.py` (the Prefix-Tuning
data files): E2E `name : X | Type : Y | ...`; WebNLG / DART triples `s : p : o | s : p : o` (DART's
predicates lowercased; WebNLG keeps the XML's underscores and only `comment="good"` lexicalisations).
"""

from __future__ import annotations

import csv
import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig

from peftbench.errors import UserError, choice_error
from peftbench.paths import data_dir
from peftbench.tasks import TaskData, text_file
from peftbench.tasks.classification import hub_rows, hub_source, select_train

SPLITS = ("train", "validation", "test")
# Prefix-Tuning's names for the E2E attributes (its src files; LoRA's data/e2e/*.txt)
E2E_KEYS = {"eatType": "Type", "priceRange": "price", "familyFriendly": "family friendly"}
# WebNLG 2017: the test set's categories also present in train ("seen"); the other five are unseen
WEBNLG_SEEN = {
    "Airport", "Astronaut", "Building", "City", "ComicsCharacter",
    "Food", "Monument", "SportsTeam", "University", "WrittenWork",
}  # fmt: skip


def load(cfg: DictConfig, seed: int, max_train: int | None = None) -> TaskData:
    """Train rows (one per reference) and validation entries (one per input, all its references)."""
    train, train_src = load_split(cfg, cfg.get("train_split") or "train")  # DART offline: validation
    validation, val_src = load_split(cfg, cfg.get("eval_split") or "validation")  # test: the papers' tables
    # text_only: a plain language model of the references (no source), domain pre-training of a base
    blank = {"source": ""} if cfg.get("text_only") else {}
    pairs = [{**e, "target": ref, **blank} for e in train for ref in e["references"]]
    for i, row in enumerate(pairs):
        row["idx"] = i
    rows = select_train(pairs, cfg, seed, max_train)
    return TaskData(cfg.name, "generation", [], rows, validation, {"train": train_src, "validation": val_src})


def load_split(cfg: DictConfig, split: str) -> tuple[list[dict], str]:
    """One entry per distinct input of `split` (train | validation | test) and where it came from."""
    if split not in SPLITS:
        raise choice_error("split", split, SPLITS)
    name = cfg.local.files.get(split)
    root = data_dir()
    if root is not None and name is not None:
        path = root / cfg.local.dir / name
        if path.exists():
            entries = READERS[cfg.local.format](path, split)
            return _finish(entries), str(path)
        missing = f"no local file {path}"
    else:
        missing = "PEFTBENCH_DATA_DIR is not set" if root is None else f"no local copy of the {split} split"
    return _finish(_read_hub(cfg, split, missing)), hub_source(cfg.hub.path, cfg.hub.get("name"))


def _finish(entries: list[dict]) -> list[dict]:
    """Number the entries; an input without references (WebNLG has 5 in train, 1 in dev with no "good"
    lexicalisation) can be neither trained on nor scored, so it is left out, as in Prefix-Tuning's data."""
    entries = [e for e in entries if e["references"]]
    for i, e in enumerate(entries):
        e["idx"] = i
        e["target"] = e["references"][0]
        e.setdefault("category", None)
    return entries


def _read_hub(cfg: DictConfig, split: str, missing: str) -> list[dict]:
    hub = cfg.hub
    hub_split = hub.get("splits", {}).get(split, split)
    rows, reason = hub_rows(hub, hub_split)
    if rows is not None:
        return HUB_READERS[cfg.local.format](rows)
    download = f"; {cfg.local.download}" if cfg.local.get("download") else ""
    raise UserError(
        f"task {cfg.name}: {missing}; the alternative is the hub dataset {hub.path} ({hub_split}), which "
        f"could not be loaded ({reason}){download}"
    )


# --- E2E ------------------------------------------------------------------------------------------------


def e2e_source(mr: str) -> str:
    """`name[The Vaults], eatType[pub]` -> `name : The Vaults | Type : pub`."""
    pairs = re.findall(r"\s*([^\[,]+?)\s*\[([^\]]*)\]", mr)
    return " | ".join(f"{E2E_KEYS.get(k, k)} : {v}" for k, v in pairs)


def _group(pairs: list[tuple[str, str]], linearise: Callable[[str], str]) -> list[dict]:
    """(input, reference) pairs -> one entry per distinct input, in order of first appearance."""
    by_input: dict[str, dict] = {}
    for mr, ref in pairs:
        entry = by_input.setdefault(mr, {"source": linearise(mr), "references": []})
        entry["references"].append(ref)
    return list(by_input.values())


def read_e2e(path: Path, split: str) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f, text_file(path):
        reader = csv.DictReader(f)
        if reader.fieldnames is not None and not {"mr", "ref"} <= set(reader.fieldnames):
            raise UserError(f"{path}:1: expected the columns mr,ref (found: {','.join(reader.fieldnames)})")
        pairs = []
        for row in reader:  # an unclosed quote swallows the next rows: their MRs land inside this field
            merged = "\n" in (row.get("mr") or "") or "name[" in (row.get("ref") or "")
            if None in row or None in row.values() or merged:
                raise UserError(
                    f"{path}:{reader.line_num}: malformed row (an unclosed quote, or not the 2 fields mr,ref)"
                )
            pairs.append((row["mr"], row["ref"]))
    return _group(pairs, e2e_source)


def hub_e2e(rows: list[dict]) -> list[dict]:
    return _group([(r["meaning_representation"], r["human_reference"]) for r in rows], e2e_source)


# --- WebNLG / DART ----------------------------------------------------------------------------------------


def triples_source(triples: list[list[str]], lower_predicate: bool = False) -> str:
    return " | ".join(f"{s} : {p.lower() if lower_predicate else p} : {o}" for s, p, o in triples)


def _xml_entries(path: Path, lower_predicate: bool, lex_filter: Callable[[ET.Element], bool]) -> list[dict]:
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise UserError(f"{path}: malformed XML ({e})") from None
    out = []
    for entry in root.iter("entry"):
        triples = [[x.strip() for x in t.text.split(" | ")] for t in entry.iter("mtriple")]
        out.append(
            {
                "source": triples_source(triples, lower_predicate),
                "references": [(lex.text or "").strip() for lex in entry.iter("lex") if lex_filter(lex)],
                "category": entry.get("category"),
            }
        )
    return out


def read_webnlg(path: Path, split: str) -> list[dict]:
    """A folder of XML files (train/dev: one per size and category, read in sorted order) or one XML file
    (test); test entries get category seen / unseen."""
    files = sorted(path.rglob("*.xml")) if path.is_dir() else [path]
    if not files:
        raise UserError(f"{path}: no WebNLG XML files")
    out = [e for f in files for e in _xml_entries(f, False, lambda lex: lex.get("comment", "good") == "good")]
    for e in out:
        e["category"] = "seen" if e["category"] in WEBNLG_SEEN else "unseen"
    return out


def hub_webnlg(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        lex = r["lex"]
        refs = [t for t, c in zip(lex["text"], lex["comment"]) if c == "good"]
        triples = [[x.strip() for x in t.split(" | ")] for t in r["modified_triple_sets"]["mtriple_set"][0]]
        seen = "seen" if r["category"] in WEBNLG_SEEN else "unseen"
        out.append({"source": triples_source(triples), "references": refs, "category": seen})
    return out


def read_dart(path: Path, split: str) -> list[dict]:
    if path.suffix == ".xml":
        return _xml_entries(path, True, lambda lex: True)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
    return hub_dart(data)


def hub_dart(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        notes = r["annotations"]
        texts = notes["text"] if isinstance(notes, dict) else [a["text"] for a in notes]
        out.append({"source": triples_source(r["tripleset"], True), "references": list(texts)})
    return out


# --- XSum -------------------------------------------------------------------------------------------------


def read_source_target(path: Path, split: str) -> list[dict]:
    """`<split>.source` / `<split>.target`: one document / summary per line, as the BART and Prefix-Tuning
    summarisation code reads XSum (its newlines inside documents escaped); `path` is the .source file."""
    target = path.with_suffix(".target")
    if not target.exists():
        raise UserError(f"{path} has no {target.name} beside it: summaries go there, one per line")
    sources = path.read_text(encoding="utf-8").splitlines()
    targets = target.read_text(encoding="utf-8").splitlines()
    if len(sources) != len(targets):
        raise UserError(f"{path}: {len(sources)} documents but {target.name} has {len(targets)} summaries")
    return [{"source": " ".join(d.split()), "references": [t.strip()]} for d, t in zip(sources, targets)]


def hub_xsum(rows: list[dict]) -> list[dict]:
    return [{"source": " ".join(r["document"].split()), "references": [r["summary"].strip()]} for r in rows]


READERS = {
    "e2e_csv": read_e2e,
    "webnlg_xml": read_webnlg,
    "dart": read_dart,
    "source_target": read_source_target,
}
HUB_READERS = {"e2e_csv": hub_e2e, "webnlg_xml": hub_webnlg, "dart": hub_dart, "source_target": hub_xsum}
