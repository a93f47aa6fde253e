"""Records -> tables (Markdown, CSV, LaTeX). Pure functions of the records: no torch, no GPU (params_table imports torch lazily).

A row is (model, method + whatever method / train settings differ between the row's records, e.g.
"lora r=4"), a column is task x metric, a cell is the mean (or median) ± std of the best evaluation over
seeds, "failed" / "running" where no finished run exists.
"""

from __future__ import annotations

import csv
import io
import re
import statistics
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from tabulate import tabulate

from peftbench.errors import UserError
from peftbench.record import NON_SEMANTIC_TRAIN_KEYS

TASK_ORDER = (
    "mnli",
    "mnli_mm",
    "sst2",
    "mrpc",
    "cola",
    "qnli",
    "qqp",
    "rte",
    "stsb",
    "boolq",
    "cb",
    "copa",
    "multirc",
    "superglue_rte",
    "wic",
    "wsc",
)
METRIC_SHORT = {"accuracy": "acc", "macro_f1": "mF1", "pearson": "P", "spearman": "S", "mcc": "MCC"}
_NLG = {"bleu": "BLEU", "nist": "NIST", "meteor": "MET", "rouge_l": "R-L", "cider": "CIDEr", "ter": "TER"}
_NLG |= {
    "moverscore": "MoverScore",
    "bertscore": "BERTScore",
    "bleurt": "BLEURT",
    "rouge_1": "R-1",
    "rouge_2": "R-2",
}
METRIC_SHORT |= _NLG | {
    f"{k}_{c}": f"{v}-{c[0].upper()}" for k, v in _NLG.items() for c in ("seen", "unseen")
}


def format_params(n: int | None) -> str:
    if n is None:
        return ""
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    if n >= 1e6:
        return f"{n / 1e6:.1f}M"
    if n < 1_000:  # a handful of numbers (intrinsic dimension d): exactly
        return f"{n:,}"
    return f"{n / 1e6:.3f}M"


def _varying(records: list[dict], section: str, skip: set[str]) -> list[str]:
    values = defaultdict(set)
    for r in records:
        for k, v in r["config"][section].items():
            if k not in skip:
                values[k].add(repr(v))
    return sorted(k for k, vs in values.items() if len(vs) > 1)


def row_labels(records: list[dict]) -> dict[str, tuple[str, str]]:
    """run_id -> (model, method label); the label names the settings that tell the row's runs apart."""
    by_row = defaultdict(list)
    for r in records:
        by_row[(r["model"], r["method"])].append(r)
    labels = {}
    for (model, method), rs in by_row.items():
        m_keys = _varying(rs, "method", {"name", "description", "_target_"})
        t_keys = _varying(rs, "train", NON_SEMANTIC_TRAIN_KEYS)
        for r in rs:
            parts = [f"{k}={_short(r['config']['method'][k])}" for k in m_keys]
            parts += [f"train.{k}={_short(r['config']['train'][k])}" for k in t_keys]
            labels[r["run_id"]] = (model, " ".join([method, *parts]))
    return labels


def _short(v: Any) -> str:
    return ",".join(map(str, v)) if isinstance(v, list) else str(v)


def center(values: list[float], stat: str) -> float:
    """The statistic of a cell over seeds: median or mean (the preset's protocol, or --stat)."""
    return statistics.median(values) if stat == "median" else statistics.fmean(values)


def _cell(values: list[float], stat: str) -> str:
    mid = center(values, stat)
    if len(values) == 1:
        return f"{mid:.2f}"
    return f"{mid:.2f} ± {statistics.stdev(values):.2f} (n={len(values)})"


def format_bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


EFFICIENCY = {  # column -> (where in a record, format); each the mean over a row's finished runs
    "% trainable": (("params", "trainable_percent"), lambda v: f"{v:.3f}"),
    "peak MiB": (("memory", "peak_mib"), lambda v: f"{v:.0f}"),
    "train s": (("train", "train_s"), lambda v: f"{v:.0f}"),
    "tokens/s": (("train", "tokens_per_s"), lambda v: f"{v:.0f}"),
    "stored / task": (("cost", "disk_bytes"), format_bytes),
}


def efficiency(runs: list[dict]) -> dict[str, str]:
    """The efficiency columns of one table row (`peftbench table --efficiency`)."""
    out = {}
    for column, ((section, key), fmt) in EFFICIENCY.items():
        values = [
            v
            for r in runs
            if r.get("status") == "finished" and (v := (r.get(section) or {}).get(key)) is not None
        ]
        out[column] = fmt(statistics.fmean(values)) if values else ""
    return out


def records_table(
    records: list[dict], stat: str = "mean", with_efficiency: bool = False
) -> list[dict[str, str]]:
    labels = row_labels(records)
    tasks = sorted(
        {r["task"] for r in records}, key=lambda t: (TASK_ORDER.index(t) if t in TASK_ORDER else 99, t)
    )
    metrics = {r["task"]: list(r["config"]["task"]["metrics"]) for r in records}
    main = {r["task"]: r["main_metric"] for r in records}
    cells: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    params: dict[tuple, int] = {}
    for r in records:
        row = labels[r["run_id"]]
        cells[row][r["task"]].append(r)
        if r.get("params"):
            params.setdefault(row, r["params"]["trainable_without_head"])
    table = []
    for row in sorted(cells, key=lambda x: (x[0], x[1])):
        out = {"model": row[0], "method": row[1], "# trainable": format_params(params.get(row))}
        mains = []
        for task in tasks:
            runs = cells[row].get(task, [])
            done = [r for r in runs if r["status"] == "finished"]
            for m in metrics[task]:
                col = f"{task} {METRIC_SHORT.get(m, m)}"
                if done:
                    values = [r["best"]["metrics"][m] for r in done]
                    out[col] = _cell(values, stat)
                    if m == main[task]:
                        mains.append(center(values, stat))
                else:
                    out[col] = ", ".join(sorted({r["status"] for r in runs})) if runs else ""
        if len(tasks) > 1:
            out["Avg"] = f"{statistics.fmean(mains):.2f}" if len(mains) == len(tasks) else ""
        if with_efficiency:
            out |= efficiency([r for runs in cells[row].values() for r in runs])
        table.append(out)
    return table


def params_table(points: Iterable[tuple[str, str, Any]]) -> list[dict[str, str]]:
    """Trainable parameters of each (model, method), on the meta device."""
    from peftbench.methods import apply_method, stored_count
    from peftbench.models import count
    from peftbench.setup import meta_model

    rows = []
    for model_name, method_name, cfg in points:
        row = {"model": model_name, "method": method_name}
        try:
            model, fam = meta_model(cfg)
            model = apply_method(model, cfg.method, fam)
            c = count(model, fam.head)
        except UserError as e:
            rows.append(
                {
                    **row,
                    "trainable (no head)": "n/a",
                    "stored (no head)": "",
                    "%": "",
                    "trainable (with head)": "",
                    "total (no head)": "",
                    "note": str(e).split(";")[0],
                }
            )
            continue
        rows.append(
            {
                **row,
                "trainable (no head)": f"{c['trainable_without_head']:,}",
                "stored (no head)": f"{stored_count(model, c['trainable_without_head']):,}",
                "%": f"{100 * c['trainable_without_head'] / c['total_without_head']:.4f}",
                "trainable (with head)": f"{c['trainable']:,}",
                "total (no head)": f"{c['total_without_head']:,}",
                "note": "",
            }
        )
    return rows


# a table cell: "51.3 ± 2.5 (n=3) [paper 87.5, Δ -1.2]" (each part optional), or a word (missing, n/a: ...)
CELL = re.compile(
    r"^(?P<value>-?\d+(?:\.\d+)?)(?: ± (?P<std>\d+(?:\.\d+)?))?(?: \(n=(?P<n>\d+)\))?"
    r"|^(?P<note>[^\[]*?)(?= \[|$)"
)
STAT = re.compile(r"^-?\d+(?:\.\d+)?(?: ± \d+(?:\.\d+)?)? \(n=\d+\)")
PAPER = re.compile(r"\[paper(?:, [^:\]]+:)? (?P<paper>-?\d+(?:\.\d+)?)(?:, Δ (?P<delta>[+-]?\d+(?:\.\d+)?))?\]")


def numeric_rows(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """CSV for a spreadsheet or pandas: a column of statistic cells becomes numeric columns (the value, `std`,
    `n`, `paper`, `delta`; `note` for a cell that is a word: missing, failed, n/a: reason)."""
    stat_columns = {
        k for r in rows for k, v in r.items() if isinstance(v, str) and (STAT.match(v) or "[paper" in v)
    }
    out = []
    for r in rows:
        new: dict[str, str] = {}
        for k, v in r.items():
            if k not in stat_columns:
                new[k] = v
                continue
            m, p = CELL.match(str(v)), PAPER.search(str(v))
            new[k] = (m and m.group("value")) or ""
            new[f"{k} std"] = (m and m.group("std")) or ""
            new[f"{k} n"] = (m and m.group("n")) or ("1" if m and m.group("value") else "")
            new[f"{k} paper"] = (p and p.group("paper")) or ""
            new[f"{k} delta"] = (p and p.group("delta")) or ""
            new[f"{k} note"] = ((m and m.group("note")) or "").strip()
        out.append(new)
    return out


def latex(text) -> str:
    """A cell as LaTeX source: its special characters escaped, ± and Δ as math."""
    out = str(text)
    for char, escaped in (
        ("\\", "\\textbackslash{}"),
        ("&", "\\&"),
        ("%", "\\%"),
        ("#", "\\#"),
        ("_", "\\_"),
    ):
        out = out.replace(char, escaped)
    return out.replace("±", "$\\pm$").replace("Δ", "$\\Delta$")


# columns that are not scores: no best to mark
NOT_SCORES = {"model", "method", "row", "# trainable", "# trainable params", *EFFICIENCY}


def lower_is_better(header: str) -> bool:
    return header.split()[-1] in ("TER", "ter", "loss")


def best_cells(headers: list[str], data: list[list[str]]) -> set[tuple[int, int]]:
    """(row, column) of the best value of each score column (ties: all of them), as the papers set theirs in
    bold: the highest, or the lowest for TER; columns with fewer than two values have none."""
    out = set()
    for j, h in enumerate(headers):
        if h in NOT_SCORES:
            continue
        values = {i: float(m.group("value")) for i, row in enumerate(data)
                  if (m := CELL.match(str(row[j]))) and m.group("value")}  # fmt: skip
        if len(values) < 2:
            continue
        target = (min if lower_is_better(h) else max)(values.values())
        out |= {(i, j) for i, v in values.items() if v == target}
    return out


def bold_value(cell: str) -> str:
    """`\\textbf{}` around a LaTeX cell's value (not its spread, count or the paper's number)."""
    value = re.match(r"-?\d+(?:\.\d+)?", cell)
    return f"\\textbf{{{value.group()}}}{cell[value.end() :]}" if value else cell


def render(rows: list[dict[str, str]], fmt: str = "md") -> str:
    if not rows:
        return ""
    if fmt == "csv":
        rows = numeric_rows(rows)
    headers = list(dict.fromkeys(k for r in rows for k in r))
    data = [[r.get(h, "") for h in headers] for r in rows]
    if fmt == "latex":
        best = best_cells(headers, data)
        data = [[bold_value(latex(c)) if (i, j) in best else latex(c) for j, c in enumerate(row)]
                for i, row in enumerate(data)]  # fmt: skip
        headers = [latex(h) for h in headers]
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(headers)
        writer.writerows(data)
        return buf.getvalue().rstrip("\n")
    if fmt == "latex":
        text = tabulate(data, headers=headers, tablefmt="latex_raw", disable_numparse=True)
        for rule in (
            "toprule",
            "midrule",
            "bottomrule",
        ):  # booktabs rules (latex_booktabs would escape $\pm$)
            text = text.replace("\\hline", f"\\{rule}", 1)
        return text
    if fmt != "md":
        raise UserError(f"unknown format {fmt!r}; choose from: md, csv, latex")
    return tabulate(data, headers=headers, tablefmt="github", disable_numparse=True)
