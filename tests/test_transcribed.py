"""Every runnable point of a paper preset runs the settings of the paper's own code. `tests/transcribed/<preset>.yaml`
holds the values transcribed from the official scripts (each with its repository@commit:path:lines), and the
deviations the project keeps on purpose (each with its reason); this test composes every point of the preset and
compares `experiment.settings()` (what `peftbench train experiment=NAME --dry-run` prints) with them."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from peftbench import experiment
from peftbench.config import compose

FOLDER = Path(__file__).parent / "transcribed"
FILES = sorted(FOLDER.glob("*.yaml"))


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
    return a == b


def expected(spec: dict, row: str, task: str) -> tuple[dict, str] | None:
    """The official values of one row x task (its `*` entry holds for every task of the row), with their
    source; None if the row is not transcribed."""
    entry = spec["points"].get(row)
    if entry is None:
        return None
    values = {**(entry.get("*") or {}), **(entry.get(task) or {})}
    source = values.pop("source", "")
    also = spec.get("also") or {}  # more values of a row (or of every row: "*"), under the row's source
    for part in (also.get("*") or {}, also.get(row) or {}):
        values.update({**(part.get("*") or {}), **(part.get(task) or {})})
    return values, source


def kept(spec: dict, row: str, task: str, key: str):
    """The value the project runs instead of the official one, if it keeps a deviation there."""
    for d in spec.get("deviations") or []:
        if row in (d.get("except") or []):  # a row of a `*` deviation that runs the official value
            continue
        if d["key"] == key and d.get("row", "*") in ("*", row) and d.get("task", "*") in ("*", task):
            assert d.get("reason"), f"deviation {d} has no reason"
            return d["ours"]
    return None


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_every_runnable_point_runs_the_official_settings(path):
    spec = load(path)
    preset = experiment.load_preset(spec["preset"])
    points = experiment.expand(preset)
    seen: set[tuple[str, str]] = set()
    problems = []
    for p in points:
        if (p.row, p.task) in seen:  # seeds share every setting
            continue
        seen.add((p.row, p.task))
        want = expected(spec, p.row, p.task)
        if want is None:
            problems.append(f"row {p.row!r} ({p.task}) is runnable but not transcribed")
            continue
        values, source = want
        assert source, f"{path.name}: row {p.row!r} task {p.task} has no source"
        ours = experiment.settings(compose(list(p.overrides)))
        # no official script batches by length (HF Trainer's group_by_length is off unless asked for)
        if kept(spec, p.row, p.task, "group_by_length") is None and ours["group_by_length"] is not False:
            problems.append(
                f"{p.row} | {p.task} | group_by_length: ours {ours['group_by_length']!r}, source False"
            )
        for key, official in values.items():
            assert key in ours, f"{path.name}: {key!r} is not a setting (choose from {sorted(ours)})"
            target = kept(spec, p.row, p.task, key)
            target = official if target is None else target
            # the official value, or the deviation kept there (a row that runs the official value under a `*`
            # deviation is named in its `except` list)
            if not same(ours[key], target):
                problems.append(
                    f"{p.row} | {p.task} | {key}: ours {ours[key]!r}, source {official!r} ({source})"
                )
    assert not problems, "\n".join(problems)
    assert seen, f"{path.name}: the preset has no runnable point"


def test_every_deviation_is_used_and_has_a_reason():
    for path in FILES:
        spec = load(path)
        rows = {p.row for p in experiment.expand(experiment.load_preset(spec["preset"]))}
        for d in spec.get("deviations") or []:
            assert d.get("reason") and "key" in d and "ours" in d and "official" in d, (path.name, d)
            # `except` names rows of a `*` deviation that run the official value: real rows, only under a `*`
            assert not d.get("except") or d.get("row", "*") == "*", (path.name, d)
            assert set(d.get("except") or []) <= rows, (path.name, d, sorted(rows))


def test_the_readmes_deviations_table_is_made_from_these_files():
    import subprocess
    import sys

    script = Path(__file__).resolve().parent.parent / "scripts" / "deviations.py"
    r = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dry_run_prints_the_official_settings_without_loading_weights(capsys, monkeypatch):
    """`peftbench train experiment=lora_glue --dry-run`: RoBERTa-large RTE LoRA as roberta_large_rte.sh and
    DeBERTa-XXL MNLI LoRA as deberta_v2_xxlarge_mnli.sh (microsoft/LoRA@c4593f0), nothing loaded or run."""
    import peftbench.setup  # noqa: F401  imported before the patch: importing it under the patch would bind
    from peftbench.cli import main  # the failing stand-in as its `load_model` for every later test here

    for where in ("peftbench.models.load_model", "peftbench.setup.load_model"):
        monkeypatch.setattr(where, lambda *a, **k: pytest.fail("a dry run loaded a model"))
    monkeypatch.setattr("peftbench.run.execute", lambda *a, **k: pytest.fail("a dry run ran"))
    for only, label in (("task=rte", "LoRA (large)"), ("task=mnli", "LoRA (XXL)")):
        assert main(["train", "experiment=lora_glue", "--dry-run", f"only={only}"]) == 0
        lines = capsys.readouterr().out.splitlines()
        header = [c.strip() for c in lines[0].strip("|").split("|")]
        row = next(
            dict(zip(header, (c.strip() for c in ln.strip("|").split("|"))))
            for ln in lines
            if f"| {label} " in ln
        )
        if label == "LoRA (large)":
            want = {
                "lr": "0.0004",
                "global_batch": "64",
                "epochs": "20",
                "max_length": "512",
                "method.r": "8",
            }
            want.update({"method.alpha": "16", "method.dropout": "0.0", "model": "roberta-large"})
        else:
            want = {
                "lr": "0.0001",
                "global_batch": "64",
                "epochs": "5",
                "max_length": "256",
                "weight_decay": "0.0",
            }
            want.update(
                {"warmup": "1000 steps", "method.r": "16", "method.alpha": "32", "mixed_precision": "fp16"}
            )
        assert {k: row[k] for k in want} == want, row


def test_a_row_named_in_except_runs_the_official_value():
    spec = {
        "deviations": [
            {"row": "*", "task": "*", "key": "decode", "official": "beam 10", "ours": "greedy", "reason": "cpu",
             "except": ["beam row"]},
        ]
    }
    assert kept(spec, "other row", "e2e", "decode") == "greedy"
    assert kept(spec, "beam row", "e2e", "decode") is None
