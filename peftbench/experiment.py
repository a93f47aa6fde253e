"""Experiment presets: one YAML under configs/experiment/ per paper table or figure.

A preset declares rows (model x method x settings, with the paper's numbers), tasks, seeds, the reporting
protocol and plots. `expand` turns it into runs (lists of overrides for `peftbench train`) and `run_grid`
runs them; report/presets.py turns the records back into the paper's layout. Records are matched to cells by
the `row` label each run carries, so tables never parse folder or file names.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from peftbench.errors import UserError, choice_error
from peftbench.log import bar, log
from peftbench.log import setup as setup_log
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


def grid(name: str, args: list[str]) -> tuple[list[Point], list[DictConfig]]:
    """The preset's points (the `only=` slice; `args`' other overrides apply to every point), one per run id,
    each with its composed config, in a fixed order (a launcher's job i runs point i)."""
    from peftbench.config import compose

    only = next((a.split("=", 1)[1] for a in args if a.lstrip("+").startswith("only=")), None)
    extra = [
        a
        for a in args
        if not a.lstrip("+").startswith("only=") and a not in ("-m", "--multirun", "--dry-run")
    ]
    points = expand(load_preset(name), extra, only)
    if not points:
        raise UserError(f"experiment {name}: only={only!r} selects no run")
    configs = warm_started(load_preset(name), points, [compose(list(p.overrides)) for p in points], extra)
    return unique_runs(points, configs)


GRID_FILE = "PEFTBENCH_GRID_FILE"  # a launched grid's composed points, for its jobs to read theirs from


def launch_grid(name: str, args: list[str], hydra_args: list[str]) -> int:
    """`peftbench train -m experiment=NAME [hydra/launcher=...]`: every point checked, then one Hydra job per
    point (`+grid.point=i`), so a launcher runs them in parallel processes or as SLURM jobs. The composed
    points go to one JSON file under paths.logs that every job reads (no job composes the grid again)."""
    import json
    import time

    from peftbench.cli import run_hydra
    from peftbench.record import write_atomic
    from peftbench.validate import validate

    points, configs = grid(name, args)
    for cfg in configs:
        validate(cfg)
    path = (
        Path(configs[0].paths.logs) / "grids" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.json"
    )
    write_atomic(path, json.dumps([OmegaConf.to_container(c, resolve=True) for c in configs]))
    os.environ[GRID_FILE] = str(path.resolve())  # the jobs inherit it (joblib's processes, SLURM's --export)
    indices = ",".join(str(i) for i in range(len(points)))
    return run_hydra(["-m", f"+grid.preset={name}", f"+grid.point={indices}", *hydra_args])


def grid_point(name: str, i: int) -> DictConfig:
    """Inside a launched job: the config of point i of the grid its launcher wrote."""
    import json

    where = os.environ.get(GRID_FILE)
    if not where or not Path(where).is_file():
        raise UserError(f"grid.point={i}: no grid file of experiment {name} (${GRID_FILE}={where!r})")
    configs = json.loads(Path(where).read_text())
    if not 0 <= i < len(configs):
        raise UserError(f"grid.point={i}: experiment {name}'s grid has {len(configs)} points")
    return OmegaConf.create(configs[i])


def run_grid(name: str, args: list[str]) -> int:
    """The whole grid of a preset (or the `only=` slice), every point checked first, finished runs skipped.
    A run that fails is recorded as failed and the grid goes on; the exit code says whether any failed."""
    import sys

    from peftbench.run import execute
    from peftbench.validate import validate

    points, configs = grid(name, args)
    dry = "--dry-run" in args
    for cfg in configs:
        validate(cfg, here=not dry)  # a dry run prints a GPU preset's settings on any machine
    if dry:
        from peftbench.report import render

        print(render(settings_table(points, configs), "md"))
        return 0
    log_path = (
        Path(configs[0].paths.logs) / "experiments" / name / f"{time.strftime('%Y-%m-%d_%H-%M-%S')}.log"
    )
    setup_log(log_path)  # the grid's log file, as Hydra keeps a job's
    log.info(f"experiment {name}: {len(points)} runs; log {log_path}")
    failed = []
    for i, (point, cfg) in enumerate(bar(list(zip(points, configs)), desc=name, unit="run"), start=1):
        log.info(f"{name} {i}/{len(points)}: {point.row} | {point.task} | seed {point.seed}")
        try:
            execute(cfg)
        except UserError as e:
            print(f"peftbench: error: {e}", file=sys.stderr)
            failed.append(point)
    if failed:
        print(f"peftbench: {len(failed)} of {len(points)} runs failed (see their records)", file=sys.stderr)
        return 1
    return 0


def settings(cfg: DictConfig) -> dict[str, Any]:
    """What a reader checks against a paper's scripts, resolved for one run (the `--dry-run` table and the
    transcription test, tests/transcribed/): the global batch is batch_size x grad_accum per optimizer step
    (a source's per-device batch x its processes x its accumulation)."""
    t, m, task = cfg.train, cfg.method, cfg.task
    out: dict[str, Any] = {
        "model": cfg.model.name,
        "method": m.name,
        "lr": t.lr,
        "global_batch": int(t.batch_size) * int(t.grad_accum),
        "epochs": None if t.max_steps else t.epochs,
        "max_steps": t.max_steps,
        "max_length": task.max_length,
        "warmup": f"{t.warmup_steps} steps" if t.get("warmup_steps") is not None else f"{t.warmup_ratio:g}",
        "schedule": t.get("schedule", "linear"),
        "optimizer": t.optimizer,
        "weight_decay": t.weight_decay,
        "decay_bias_and_norm": t.get("decay_bias_and_norm", True),
        "adam_eps": t.adam_eps if t.optimizer == "adamw" else None,
        "max_grad_norm": t.max_grad_norm,
        "mixed_precision": t.mixed_precision,
        "group_by_length": t.group_by_length,
        "loss": f"lm {t.loss.lm:g}, ul {t.loss.ul:g}, ln {t.loss.ln:g}"
        if task.get("format") == "prompt"
        else None,
        "rank_length_norm": t.rank_length_norm if task.get("format") == "prompt" else None,
        "adafactor_scale_parameter": t.adafactor_scale_parameter if t.optimizer == "adafactor" else None,
    }
    for key in (
        "r",
        "alpha",
        "dropout",
        "length",
        "mid_dim",
        "k",
        "bottleneck",
        "activation",
        "init",
        "init_std",
        "vocab_draw",
    ):
        if key in m:
            out[f"method.{key}"] = m[key]
    if m.get("targets") is not None:  # the weights a LoRA-style method adapts (abstract names: q, k, v, o, ffn_in, ...)
        out["method.targets"] = ",".join(str(t) for t in m.targets)
    if task.kind == "generation":
        d = task.decode
        out.update(
            label_smoothing=task.get("label_smoothing"),
            eval_split=task.get("eval_split"),
            decode=f"{d.strategy} {d.num_beams}, lp {d.length_penalty}, no-repeat {d.no_repeat_ngram_size}, "
            f"max {d.max_new_tokens}",
        )
    return out


def settings_table(points: list[Point], configs: list[DictConfig]) -> list[dict[str, Any]]:
    """One line per row x task (seeds collapsed: they share every setting but the seed)."""
    lines: dict[tuple[str, str], dict[str, Any]] = {}
    for p, cfg in zip(points, configs):
        key = (p.row, p.task)
        if key in lines:
            lines[key]["seeds"] += f",{p.seed}"
            continue
        lines[key] = {"row": p.row, "task": p.task, "seeds": str(p.seed), **settings(cfg)}
    return list(lines.values())


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
