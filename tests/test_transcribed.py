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
    return values, source


def kept(spec: dict, row: str, task: str, key: str):
    """The value the project runs instead of the official one, if it keeps a deviation there."""
    for d in spec.get("deviations") or []:
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
        for key, official in values.items():
            assert key in ours, f"{path.name}: {key!r} is not a setting (choose from {sorted(ours)})"
            target = kept(spec, p.row, p.task, key)
            target = official if target is None else target
            if not same(ours[key], target):
                problems.append(f"{p.row} | {p.task} | {key}: ours {ours[key]!r}, source {official!r} ({source})")
    assert not problems, "\n".join(problems)
    assert seen, f"{path.name}: the preset has no runnable point"


def test_every_deviation_is_used_and_has_a_reason():
    for path in FILES:
        spec = load(path)
        for d in spec.get("deviations") or []:
            assert d.get("reason") and "key" in d and "ours" in d and "official" in d, (path.name, d)
