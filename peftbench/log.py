"""What a run says while it works: `logging` (so Hydra's job log file keeps it: logs/runs/<time>/train.log),
progress bars on the loops a user waits on (only on a terminal: a log file gets no carriage-return frames),
and the experiment trackers (TensorBoard, W&B, MLflow) through accelerate."""

from __future__ import annotations

import logging
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tqdm import tqdm

log = logging.getLogger(
    "peftbench"
)  # its lines: "[peftbench] ..." on stdout, with time and level in a log file

CONSOLE_FORMAT = "[peftbench] %(message)s"
FILE_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"
BARS = {"on": True}  # train.progress of the run in this process (a bar still needs a terminal)


class Stdout(logging.StreamHandler):
    """A handler on whatever sys.stdout is when a line is written (a test's capture, a redirect), not the
    stream of the moment it was made."""

    def __init__(self):
        super().__init__(sys.stdout)

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ sets it; the property answers instead
        pass


def console() -> logging.Handler:
    handler = Stdout()
    handler.setFormatter(logging.Formatter(CONSOLE_FORMAT))
    return handler


def setup(file: Path | None = None) -> None:
    """peftbench's INFO lines on stdout, and into `file` when given, in place of where they went before (a
    preset's grid keeps its own log file; a Hydra job configures the same itself in
    configs/hydra/job_logging/peftbench.yaml, and the CLI sets it back after the job)."""
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    log.addHandler(console())
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(file)
        handler.setFormatter(logging.Formatter(FILE_FORMAT))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False  # the root logger's handlers are other libraries' (and Hydra's for them)


setup()  # from the first import: a run called from Python (execute) says what it does too


def log_file() -> str | None:
    """The file peftbench logs into (Hydra's job log or setup's), for the record: log and record name each
    other."""
    for h in log.handlers:
        if isinstance(h, logging.FileHandler):
            return portable(Path(h.baseFilename))
    return None


def portable(path: Path) -> str:
    """A path as the user gave it: relative to the working folder when inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def on_terminal() -> bool:
    return sys.stderr.isatty()


def bar(
    iterable=None, *, total: int | None = None, desc: str = "", unit: str = "it", initial: int = 0
) -> tqdm:
    """A progress bar on stderr, shown only when stderr is a terminal and train.progress is on."""
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        initial=initial,
        leave=False,
        dynamic_ncols=True,
        disable=not (BARS["on"] and on_terminal()),
    )


@contextmanager
def stage(stages: tqdm, name: str, steps: int = 1):
    """One named stage of a bar of stages (a scorer's metrics): its name shown while it runs, then counted."""
    stages.set_postfix_str(name)
    yield
    stages.update(steps)


def library_bars() -> None:
    """transformers' and datasets' own bars (loading weights, converting GGUF, generating splits) follow the
    same rule: none into a log file or a pipe."""
    if BARS["on"] and on_terminal():
        return
    import datasets
    import transformers

    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()


def lines_above_bars():
    """Log lines printed above the bars instead of through them (on a terminal)."""
    from contextlib import nullcontext

    from tqdm.contrib.logging import logging_redirect_tqdm

    return logging_redirect_tqdm() if BARS["on"] and on_terminal() else nullcontext()


# --- trackers --------------------------------------------------------------------------------------------

TRACKERS = ("tensorboard", "wandb", "mlflow")
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def tracker_names(report_to: Any) -> list[str]:
    """train.report_to: none | one tracker | a list of them."""
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    return [n for n in names if n != "none"]


def missing_tracker(report_to: Any) -> str | None:
    """The first tracker whose package is not installed (checked before any work), or None."""
    import importlib.util

    for name in tracker_names(report_to):
        if importlib.util.find_spec(PACKAGES[name]) is None:
            return name
    return None


def trackers(cfg, rid: str) -> tuple[list, dict]:
    """accelerate's `log_with` and `init_kwargs` for train.report_to. TensorBoard writes one folder per run:
    <paths.logs>/tensorboard/<experiment>/<run id> (`tensorboard --logdir logs/tensorboard`); W&B and
    MLflow get the project / experiment `peftbench-<experiment>` and the run id as the run's name."""
    from accelerate.tracking import TensorBoardTracker

    log_with: list = []
    kwargs: dict[str, dict] = {}
    for name in tracker_names(cfg.train.get("report_to")):
        if name == "tensorboard":
            log_with.append(TensorBoardTracker(rid, Path(cfg.paths.logs) / "tensorboard" / cfg.name))
        elif name == "wandb":
            log_with.append("wandb")
            kwargs["wandb"] = {"name": rid, "group": cfg.get("row") or cfg.method.name}
        elif name == "mlflow":
            log_with.append("mlflow")
            kwargs["mlflow"] = {"run_name": rid}
    return log_with, kwargs


def flat(config: dict, prefix: str = "") -> dict[str, Any]:
    """A nested config as `group.key: value` with scalar values (what hyperparameter panels take)."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat(v, key + "."))
        elif isinstance(v, (bool, int, float, str)):
            out[key] = v
        else:  # None, lists
            out[key] = str(v)
    return out
