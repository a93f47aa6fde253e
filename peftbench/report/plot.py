"""Sweeps to PNG (matplotlib, headless): metric vs a swept setting, one line per series, ± std over seeds."""

from __future__ import annotations

import io
from pathlib import Path

from omegaconf import DictConfig

from peftbench.record import write_atomic


def short(x: float) -> str:
    """A tick's value as a reader counts parameters: 460800 -> 461k, 2442240 -> 2.44M, 64 -> 64."""
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:g}"


def draw(
    series: dict[str, list[tuple]], spec: DictConfig, path: Path, lines: dict[str, float] | None = None
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    outside = len(series) > 5  # a long legend goes beside the axes, not over the points
    fig, ax = plt.subplots(figsize=(8.5 if outside else 5.5, 3.8), dpi=120)
    colors = plt.get_cmap("tab20" if len(series) > 10 else "tab10").colors  # no two series share a colour
    for i, (label, points) in enumerate(sorted(series.items())):
        xs, ys, errs, _ = zip(*points)
        ax.errorbar(xs, ys, yerr=errs, marker="osD^v"[i % 5], capsize=3, label=label, color=colors[i % len(colors)])
    for (label, y), style in zip((lines or {}).items(), ("--", ":")):
        ax.axhline(y, linestyle=style, color="grey", label=label)
    if spec.get("xlog"):
        ax.set_xscale("log", base=spec.get("xlog_base", 2))
        ax.set_xticks(sorted({x for pts in series.values() for x, *_ in pts}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: short(x)))
        ax.get_xaxis().set_minor_formatter(matplotlib.ticker.NullFormatter())
        plt.setp(ax.get_xticklabels(), rotation=40, ha="right", fontsize=8)
    ax.set_xlabel(spec.get("xlabel", spec.x))
    ax.set_ylabel(spec.get("ylabel", f"{spec.task} {spec.metric}"))
    ax.set_title(spec.get("title", ""), fontsize=10)
    ax.grid(alpha=0.3)
    if outside:
        ax.legend(fontsize=7, title=spec.get("series_title"), loc="center left", bbox_to_anchor=(1.01, 0.5))
    elif len(series) > 1 or spec.get("series") or lines:
        ax.legend(fontsize=8, title=spec.get("series_title"))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})  # no timestamp: same records, same bytes
    plt.close(fig)
    write_atomic(path, buf.getvalue())
