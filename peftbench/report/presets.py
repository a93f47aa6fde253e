"""A preset's records in the paper's layout: its table (ours beside the paper's, with the difference), cost
and transfer tables, the series of its plots and the threshold lines (intrinsic dimension's d90)."""

from __future__ import annotations

import statistics
from typing import Any

from omegaconf import DictConfig, OmegaConf

from peftbench.experiment import row_tasks
from peftbench.report import METRIC_SHORT, center, efficiency, format_bytes, format_params


def models_of(records: list[dict], row: DictConfig) -> str:
    """The row's model, or the models its runs really used (`experiment=tfew model=tiny-t5`)."""
    used = sorted({r["model"] for r in records if r.get("row") == row.label and r.get("model")})
    return ", ".join(used) if used else row.model


def table_columns(columns: dict, reported) -> list[tuple[str, str, float | None]]:
    """(task, metric, the paper's number) per column: a task shows one metric or a list of them, and the
    paper's entry for it is one number or a list in the same order."""
    out = []
    for task, metrics in columns.items():
        ref = reported.get(task)
        if isinstance(metrics, list):
            refs = list(ref) if ref is not None else [None] * len(metrics)
            out += [(task, m, r) for m, r in zip(metrics, refs)]
        else:
            out.append((task, metrics, ref))
    return out


def _num(value: float, scale: float | None = None, sign: bool = False) -> str:
    """1 decimal on the 0-100 scales, 2 below 10 (NIST 8.62, TER 0.46, CIDEr 2.47), as the papers print."""
    digits = 1 if abs(scale if scale is not None else value) >= 10 else 2
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def cell_values(records: list[dict], row: str, task: str, metric: str) -> tuple[list[float], set[str]]:
    mine = [r for r in records if r.get("row") == row and r["task"] == task]
    done = [
        r["best"]["metrics"][metric]
        for r in mine
        if r["status"] == "finished" and r["best"]["metrics"].get(metric) is not None
    ]
    return done, {r["status"] for r in mine if r["status"] != "finished"}


def table(
    preset: DictConfig,
    records: list[dict],
    stat: str | None = None,
    paper: bool = True,
    with_efficiency: bool = False,
) -> list[dict]:
    """The paper's layout: its rows and columns in its order, ours = protocol statistic ± std (n seeds),
    the paper's number and the difference beside it; runs that do not exist are 'missing', never 0."""
    stat = stat or preset.protocol.stat
    if preset.get("layout") == "cost":
        return cost_table(preset, records, stat, paper)
    if preset.get("layout") == "transfer":
        return transfer_table(preset, records, stat, paper)
    columns = OmegaConf.to_container(preset.columns)  # task -> metric shown
    out = []
    for row in preset.rows:
        reported = row.get("paper") or {}
        line = {"model": models_of(records, row), "method": row.label}
        line["# trainable params"] = params_cell(records, row, reported, paper)
        per_task: dict[str, list[float]] = {}
        for task, metric, ref in table_columns(columns, reported):
            header = f"{preset.get('column_names', {}).get(task, task)} {METRIC_SHORT.get(metric, metric)}"
            in_grid = task in row_tasks(preset, row)
            line[header] = (
                cell(records, row, task, metric, ref, stat, paper, per_task, preset.get("paper_model"))
                if in_grid
                else ""
            )
        if preset.get("avg", False):
            line["Avg"] = average(preset, row, columns, per_task, reported, paper)
        if with_efficiency:
            line |= efficiency([r for r in records if r.get("row") == row.label])
        out.append(line)
    return out


def params_cell(records: list[dict], row: DictConfig, reported: dict, paper: bool) -> str:
    """Our trainable parameters (without the head), with the paper's count beside them."""
    ours = next(
        (
            r["params"]["trainable_without_head"]
            for r in records
            if r.get("row") == row.label and r.get("params")
        ),
        None,
    )
    params = format_params(ours) if ours else "—"
    return f"{params} ({reported.get('params')})" if paper and reported.get("params") else params


def cell(
    records,
    row: DictConfig,
    task: str,
    metric: str,
    ref,
    stat: str,
    paper: bool,
    per_task: dict,
    paper_model: str | None = None,
) -> str:
    """ours = statistic ± std (n seeds), [paper value, Δ]; 'missing' where no run exists, never 0. A preset
    whose `paper_model` is not its own model (offline stand-ins) shows the paper's number under that model's
    name and no difference: the two are not the same experiment."""
    runnable = row.get("runnable", True)
    values, other = cell_values(records, row.label, task, metric) if runnable else ([], set())
    if values:
        ours = center(values, stat)
        per_task.setdefault(task, []).append(ours)
        spread = f" ± {_num(statistics.stdev(values), ours)}" if len(values) > 1 else ""
        text = f"{_num(ours)}{spread} (n={len(values)})"
    elif not runnable:
        text = f"n/a: {row.get('note', 'not runnable')}"
    else:
        text = ", ".join(sorted(other)) if other else "missing"
    if paper and ref is not None and paper_model:
        text += f" [paper, {paper_model}: {ref}]"
    elif paper and ref is not None:
        text += f" [paper {ref}" + (f", Δ {_num(ours - ref, ref, sign=True)}]" if values else "]")
    return text


def average(
    preset: DictConfig, row: DictConfig, columns: dict, per_task: dict, reported: dict, paper: bool
) -> str:
    """The mean over tasks of each task's mean metric (SuperGLUE's average), when every cell has runs."""
    n_metrics = {t: len(m) if isinstance(m, list) else 1 for t, m in columns.items()}
    complete = all(len(per_task.get(t, [])) == n for t, n in n_metrics.items())
    avg = (
        f"{statistics.fmean(statistics.fmean(v) for v in per_task.values()):.1f}"
        if complete
        else "missing"
        if len(row_tasks(preset, row)) == len(columns)
        else ""
    )
    if paper and reported.get("avg") is not None:
        avg += f" [paper {reported['avg']}]"
    return avg


def cost_table(preset: DictConfig, records: list[dict], stat: str, paper: bool = True) -> list[dict]:
    """T-Few's Table 1 layout for one task: method, inference FLOPs per example, training FLOPs, disk space
    per task, accuracy; costs are each run's measured `cost` (peftbench/cost.py), averaged over seeds."""
    ((task, metric),) = OmegaConf.to_container(preset.columns).items()
    header = f"{preset.get('column_names', {}).get(task, task)} {METRIC_SHORT.get(metric, metric)}"
    costs = {
        "inference FLOPs / example": ("inference_flops_per_example", lambda v: f"{v:.2e}"),
        "training FLOPs": ("training_flops", lambda v: f"{v:.2e}" if v else "0"),
        "disk space / task": ("disk_bytes", format_bytes),
    }
    out = []
    for row in preset.rows:
        done = [
            r
            for r in records
            if r.get("row") == row.label and r["task"] == task and r["status"] == "finished"
        ]
        reported = (row.get("paper") or {}) if paper else {}
        line = {"method": row.label, "model": models_of(records, row)}
        for name, (key, fmt) in costs.items():
            line[name] = fmt(statistics.fmean(r["cost"][key] for r in done)) if done else "missing"
            if reported.get(key) is not None:
                line[name] += f" [paper {reported[key]}]"
        values = [r["best"]["metrics"][metric] for r in done]
        spread = f" ± {statistics.stdev(values):.1f}" if len(values) > 1 else ""
        line[header] = f"{center(values, stat):.1f}{spread} (n={len(values)})" if values else "missing"
        if reported.get("accuracy") is not None:
            line[header] += f" [paper {reported['accuracy']}]"
        out.append(line)
    return out


def transfer_table(preset: DictConfig, records: list[dict], stat: str, paper: bool = True) -> list[dict]:
    """Lester et al.'s Table 2 layout: one line per evaluation set (the trained task's dev set, then the
    transfer sets), the two compared rows' metric (± std over seeds) and their difference Δ = other - base,
    each with the paper's number beside it."""
    ((task, metrics),) = OmegaConf.to_container(preset.columns).items()
    rows = {r.label: r for r in preset.rows}
    base, other = rows[preset.compare.base], rows[preset.compare.other]
    out = []
    for metric in metrics:
        dataset, domain = preset.datasets[metric]
        line = {"dataset": dataset, "domain": domain}
        means = {}
        for row in (base, other):
            values, states = cell_values(records, row.label, task, metric)
            if values:
                means[row.label] = center(values, stat)
                spread = f" ± {_num(statistics.stdev(values), means[row.label])}" if len(values) > 1 else ""
                text = f"{_num(means[row.label])}{spread} (n={len(values)})"
            else:
                text = ", ".join(sorted(states)) if states else "missing"
            ref, ref_std = (row.get("paper") or {}).get(metric), (row.get("paper_std") or {}).get(metric)
            if paper and ref is not None:
                text += f" [paper {ref}" + (f" ± {ref_std}" if ref_std is not None else "") + "]"
            line[row.label] = text
        delta = (
            _num(means[other.label] - means[base.label], means[base.label], sign=True)
            if len(means) == 2
            else "missing"
        )
        ref = (other.get("paper_delta") or {}).get(metric)
        line["Δ"] = delta + (f" [paper {ref:+}]" if paper and ref is not None else "")
        out.append(line)
    return out


def record_value(rec: dict, key: str) -> Any:
    """A plot's x: a setting of the run's config (`method.r`), or with `record.` a field of the record
    itself (`record.params.trainable_without_head`: BLEU against trainable parameters)."""
    if key.startswith("record."):
        value: Any = rec
        for part in key.removeprefix("record.").split("."):
            value = value.get(part) if isinstance(value, dict) else None
        return value
    return OmegaConf.select(OmegaConf.create(rec["config"]), key)


def plot_series(
    preset: DictConfig, spec: DictConfig, records: list[dict], stat: str
) -> dict[str, list[tuple]]:
    """series label -> [(x, y, std, n)] sorted by x, for one plot spec of the preset. A series is a method
    (default), a config key's value (`series: method.targets`), or each row by itself (`series: row`: rows
    of one method at other settings stay apart instead of pooling into one mean at the same x)."""
    rows = [r for r in preset.rows if r.label in set(spec.rows)]
    series: dict[str, dict[Any, list[float]]] = {}
    for row in rows:
        for rec in records:
            if rec.get("row") != row.label or rec["task"] != spec.task or rec["status"] != "finished":
                continue
            x = record_value(rec, spec.x)
            if spec.get("series") == "row":  # one point set per row: rows of one method are not pooled
                label = str(row.label)
            elif spec.get("series"):
                label = str(OmegaConf.select(OmegaConf.create(rec["config"]), spec.series))
            else:
                label = row.method
            series.setdefault(label, {}).setdefault(x, []).append(rec["best"]["metrics"][spec.metric])
    return {
        label: sorted(
            (x, center(v, stat), statistics.stdev(v) if len(v) > 1 else 0.0, len(v)) for x, v in pts.items()
        )
        for label, pts in series.items()
    }


def threshold_dimension(preset: DictConfig, records: list[dict], stat: str) -> list[str]:
    """Aghajanyan et al.'s d90 for each task of a `threshold:` section: the smallest swept value (`x`, e.g.
    method.d) whose metric reaches `fraction` of the reference row's (full fine-tuning), as one line each."""
    spec = preset.get("threshold")
    if not spec:
        return []
    lines = []
    for task in preset.tasks:
        ref, _ = cell_values(records, spec.reference, task, spec.metric)
        name = f"d{round(100 * spec.fraction)} ({task} {spec.metric})"
        if not ref:
            lines.append(f"{name}: needs the '{spec.reference}' run")
            continue
        full = center(ref, stat)
        goal = spec.fraction * full
        points = plot_series(preset, OmegaConf.create({**spec, "task": task}), records, stat)
        swept = sorted(pt[:2] for pts in points.values() for pt in pts)
        if not swept:
            lines.append(f"{name}: no finished run of the swept rows")
            continue
        reached = [(x, y) for x, y in swept if y >= goal]
        best_x, best_y = max(swept, key=lambda xy: xy[1])
        lines.append(
            f"{name}: {reached[0][0]} ({_num(reached[0][1])} >= {spec.fraction} x {_num(full)})"
            if reached
            else f"{name}: not reached up to {swept[-1][0]} (best {_num(best_y)} at {best_x} < "
            f"{spec.fraction} x {_num(full)} = {_num(goal)})"
        )
    return lines
