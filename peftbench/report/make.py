"""The `table` and `plot` verbs' work: a results folder's table (a preset's layout, or one row per method
and settings), the check that committed tables equal their records, and a preset's plots."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from peftbench.errors import UserError


def results_root() -> Path:
    return Path(os.environ.get("PEFTBENCH_RESULTS_DIR", "results"))


def make_table(
    root: Path,
    name: str,
    fmt: str = "md",
    stat: str | None = None,
    paper: bool = True,
    with_efficiency: bool = False,
) -> str:
    from peftbench import experiment
    from peftbench.record import load_records
    from peftbench.report import presets, records_table, render

    if experiment.is_preset(name):  # the layout is the preset's: cells without runs say "missing"
        preset = experiment.load_preset(name)
        records = in_preset(preset, load_records(root / name) if (root / name).is_dir() else [])
        text = render(presets.table(preset, records, stat, paper, with_efficiency), fmt)
        notes = presets.threshold_dimension(preset, records, stat or preset.protocol.stat)
        return text + "".join(f"\n\n{line}" if fmt == "md" else f"\n# {line}" for line in notes)
    records = load_records(root / name)
    if not records:
        raise UserError(f"no records in {root / name}; run `peftbench train name={name} ...` first")
    return render(records_table(records, stat or "mean", with_efficiency), fmt)


def in_preset(preset, records: list[dict]) -> list[dict]:
    """The records of the preset's grid (row, task, seed, method, model); any other record in its folder (a
    seed or method run by hand under a row's label) is left out of its table, with a warning naming it."""
    from peftbench.experiment import expand

    grid = {(p.row, p.task, p.seed, p.method, p.model) for p in expand(preset)}
    kept: dict[tuple, dict] = {}
    for r in records:
        key = (r.get("row"), r.get("task"), r.get("seed"), r.get("method"), r.get("model"))
        if key not in grid:
            print(
                f"[peftbench] warning: {r.get('run_id')} (row {r.get('row')!r}, method {r.get('method')}, seed "
                f"{r.get('seed')}) is not a run of preset {preset.name}; left out of its table",
                file=sys.stderr,
            )
            continue
        if key in kept:  # one seed run twice (another run id: e.g. another thread count): one record per seed
            newer, older = sorted((kept[key], r), key=_recency, reverse=True)
            print(
                f"[peftbench] warning: {older.get('run_id')} and {newer.get('run_id')} are the same point (row "
                f"{key[0]!r}, {key[1]}, seed {key[2]}); the table takes {newer.get('run_id')}, the later finished",
                file=sys.stderr,
            )
            kept[key] = newer
        else:
            kept[key] = r
    return list(kept.values())


def _recency(record: dict) -> tuple:
    """Finished before anything else, then the later finish (or start)."""
    finished = record.get("status") == "finished"
    return (finished, str(record.get("finished_at") or record.get("started_at") or ""))


def check_tables(root: Path) -> int:
    """Every committed table results/<name>.md must equal what its records give now."""
    tables = sorted(root.glob("*.md"))
    if not tables:
        print(f"no committed tables (*.md) in {root}: nothing to check")
        return 0
    stale = [t.name for t in tables if t.read_text() != make_table(root, t.stem) + "\n"]
    for t in tables:
        print(f"{'STALE' if t.name in stale else 'ok'}: {t}")
    if stale:
        raise UserError(
            f"{', '.join(stale)} differ from their records; regenerate with "
            f"`peftbench table NAME --out {root}/NAME.md`"
        )
    return 0


def plot_experiment(root: Path, name: str, stat: str | None) -> list[Path]:
    """Every plot a preset declares, drawn from its records; the PNG files written."""
    from peftbench import experiment
    from peftbench.record import check_writable, load_records
    from peftbench.report import center, presets
    from peftbench.report.plot import draw

    preset = experiment.load_preset(name)
    if not preset.get("plots"):
        raise UserError(f"experiment {name} declares no plots")
    records = load_records(root / name)
    # the PNGs go beside the records: refused before any drawing
    check_writable(root / name, "results folder", "copy it somewhere writable and pass --results DIR")
    stat = stat or preset.protocol.stat
    written = []
    for spec in preset.plots:
        series = presets.plot_series(preset, spec, records, stat)
        if not series:
            raise UserError(f"plot {spec.file}: no finished runs of rows {list(spec.rows)} on {spec.task}")
        lines = {}  # horizontal reference lines: a row's value (full fine-tuning) and a fraction of it
        if spec.get("reference"):
            ref, _ = presets.cell_values(records, spec.reference, spec.task, spec.metric)
            if ref:
                value = center(ref, stat)
                lines[spec.reference] = value
                if spec.get("fraction"):
                    lines[f"{spec.fraction:.0%} of {spec.reference}"] = spec.fraction * value
        draw(series, spec, root / name / spec.file, lines)
        written.append(root / name / spec.file)
    return written
