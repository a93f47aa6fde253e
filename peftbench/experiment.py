"""Experiment presets: one YAML under configs/experiment/ per paper table or figure.

A preset declares rows (model x method x settings, with the paper's numbers), tasks, seeds, the reporting
protocol and plots. `expand` turns it into runs (lists of overrides for `peftbench train`) and `run_grid`
runs them; report/presets.py turns the records back into the paper's layout. Records are matched to cells by
the `row` label each run carries, so tables never parse folder or file names.
"""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

from peftbench.errors import UserError, choice_error
from peftbench.paths import config_dir, group_options

FILTER_KEYS = ("row", "task", "seed", "model", "method")


@dataclass(frozen=True)
class Point:
    row: str
    model: str
    method: str
    task: str
    seed: int
    overrides: tuple[str, ...]


def load_preset(name: str) -> DictConfig:
    if name not in group_options("experiment"):
        raise choice_error("experiment", name, group_options("experiment"))
    return OmegaConf.load(config_dir() / "experiment" / f"{name}.yaml")


def is_preset(name: str) -> bool:
    return name in group_options("experiment")


def runnable_rows(preset: DictConfig) -> list[DictConfig]:
    return [r for r in preset.rows if r.get("runnable", True)]


def row_tasks(preset: DictConfig, row: DictConfig) -> list[str]:
    return list(row.get("tasks") or preset.tasks)


def expand(preset: DictConfig, extra: list[str] = (), only: str | None = None) -> list[Point]:
    """Every run of the preset's grid: rows x their tasks x seeds, each a full list of overrides."""
    keep = parse_only(only)
    points = []
    for row in runnable_rows(preset):
        for task in row_tasks(preset, row):
            for seed in row.get("seeds") or preset.protocol.seeds:
                overrides = [
                    f"model={row.model}",
                    f"method={row.method}",
                    f"task={task}",
                    f"seed={seed}",
                    f"name={preset.name}",
                    f"row={_quote(row.label)}",
                    *(preset.get("common") or []),
                    *((preset.get("task_overrides") or {}).get(task) or []),
                    *(row.get("overrides") or []),
                    *((row.get("task_overrides") or {}).get(task) or []),
                    *extra,
                ]
                point = Point(row.label, row.model, row.method, task, int(seed), tuple(overrides))
                if all(str(getattr(point, k)) in v for k, v in keep.items()):
                    points.append(point)
    return points


def _quote(text: str) -> str:
    """A Hydra override value with spaces and symbols, quoted."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def parse_only(only: str | None) -> dict[str, set[str]]:
    """`task=rte|mrpc,method=lora` -> {"task": {"rte", "mrpc"}, "method": {"lora"}}"""
    if not only:
        return {}
    out: dict[str, set[str]] = {}
    for part in only.split(","):
        key, sep, values = part.partition("=")
        if not sep or key.strip() not in FILTER_KEYS:
            raise UserError(
                f"only={only!r}: use key=value[|value] joined by commas, keys: {', '.join(FILTER_KEYS)}"
            )
        out[key.strip()] = {v.strip() for v in values.split("|")}
    return out


# --- running a preset's grid -------------------------------------------------------------------------------


def run_grid(name: str, args: list[str]) -> int:
    """The whole grid of a preset (or the `only=` slice), every point checked first, finished runs skipped.
    A run that fails is recorded as failed and the grid goes on; the exit code says whether any failed."""
    import sys

    from peftbench.config import compose
    from peftbench.run import execute
    from peftbench.validate import validate

    only = next((a.split("=", 1)[1] for a in args if a.lstrip("+").startswith("only=")), None)
    extra = [a for a in args if not a.lstrip("+").startswith("only=") and a not in ("-m", "--multirun")]
    points = expand(load_preset(name), extra, only)
    if not points:
        raise UserError(f"experiment {name}: only={only!r} selects no run")
    configs = warm_started(load_preset(name), points, [compose(list(p.overrides)) for p in points], extra)
    points, configs = unique_runs(points, configs)
    for cfg in configs:
        validate(cfg)
    failed = []
    for i, (point, cfg) in enumerate(zip(points, configs), start=1):
        print(f"[peftbench] {name} {i}/{len(points)}: {point.row} | {point.task} | seed {point.seed}")
        try:
            execute(cfg)
        except UserError as e:
            print(f"peftbench: error: {e}", file=sys.stderr)
            failed.append(point)
    if failed:
        print(f"peftbench: {len(failed)} of {len(points)} runs failed (see their records)", file=sys.stderr)
        return 1
    return 0


def unique_runs(points: list[Point], configs: list[DictConfig]) -> tuple[list[Point], list[DictConfig]]:
    """One run per run id: `experiment=tfew task=rte` sets every point's task to rte, and the points that
    differed only in their task are then the same run."""
    from peftbench.record import run_id

    seen, keep = set(), []
    for point, cfg in zip(points, configs):
        rid = run_id(cfg)
        if rid not in seen:
            seen.add(rid)
            keep.append((point, cfg))
    return [p for p, _ in keep], [c for _, c in keep]


def warm_started(
    preset, points: list[Point], configs: list[DictConfig], extra: list[str]
) -> list[DictConfig]:
    """Rows with `warm_start: {from: mnli, tasks: [...]}` start those tasks' LoRA from the same row and seed's
    `from` run: its adapter folder (results/<name>/<run id>/adapter) becomes method.init_from."""
    from pathlib import Path

    from peftbench.config import compose
    from peftbench.record import run_id

    rows = {r.label: r for r in preset.rows}
    grid = {
        (p.row, p.task, p.seed): p for p in expand(preset, extra)
    }  # the sources, even if `only` skips them
    out = []
    for p, cfg in zip(points, configs):
        ws = rows[p.row].get("warm_start")
        if ws and p.task in ws.tasks:
            source = compose(list(grid[(p.row, ws["from"], p.seed)].overrides))
            folder = Path(source.paths.results) / source.name / run_id(source) / "adapter"
            cfg = compose([*p.overrides, f"method.init_from={folder}"])
        out.append(cfg)
    return out
