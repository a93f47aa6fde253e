"""Sweeps to PNG (matplotlib, headless): metric vs a swept setting, one line per series, ± std over seeds."""

from __future__ import annotations

import io
from pathlib import Path

from omegaconf import DictConfig

from peftbench.record import write_atomic


def draw(
    series: dict[str, list[tuple]], spec: DictConfig, path: Path, lines: dict[str, float] | None = None
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    for label, points in sorted(series.items()):
        xs, ys, errs, _ = zip(*points)
        ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=label)
    for (label, y), style in zip((lines or {}).items(), ("--", ":")):
        ax.axhline(y, linestyle=style, color="grey", label=label)
    if spec.get("xlog"):
        ax.set_xscale("log", base=spec.get("xlog_base", 2))
        ax.set_xticks(sorted({x for pts in series.values() for x, *_ in pts}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel(spec.get("xlabel", spec.x))
    ax.set_ylabel(spec.get("ylabel", f"{spec.task} {spec.metric}"))
    ax.set_title(spec.get("title", ""), fontsize=10)
    ax.grid(alpha=0.3)
    if len(series) > 1 or spec.get("series") or lines:
        ax.legend(fontsize=8, title=spec.get("series_title"))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})  # no timestamp: same records, same bytes
    plt.close(fig)
    write_atomic(path, buf.getvalue())
