"""`peftbench VERB`: train | list | params | table | plot | score | raft-submit.

`train` is a Hydra app (overrides, -m sweeps, launchers); the other verbs are plain argparse commands that
compose the same configs. Every bad input ends as one line on stderr and a non-zero exit code; pass --debug
(anywhere: `peftbench --debug train ...`, `peftbench train --debug ...`) or set PEFTBENCH_DEBUG=1 (or
HYDRA_FULL_ERROR=1) for the traceback.
"""

from __future__ import annotations

import argparse
import itertools
import os
import signal
import sys
import warnings
from pathlib import Path

from omegaconf import DictConfig

from peftbench import log
from peftbench.config import GROUPS, compose, load_option, sweep_points
from peftbench.errors import UserError, choice_error
from peftbench.paths import config_dir, group_options

VERBS = ("train", "list", "params", "table", "plot", "score", "raft-submit")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--debug" not in argv:
        return _main(argv)
    saved = {k: os.environ.get(k) for k in ("PEFTBENCH_DEBUG", "HYDRA_FULL_ERROR")}
    os.environ.update(PEFTBENCH_DEBUG="1", HYDRA_FULL_ERROR="1")  # Hydra reads its own variable
    try:
        return _main([a for a in argv if a != "--debug"])
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _main(argv: list[str]) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `peftbench list | head` ends quietly
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation notes from peft
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip().splitlines()[0])
        print(f"usage: peftbench [--debug] {{{','.join(VERBS)}}} ...   (peftbench VERB --help for each)")
        return 0
    verb, rest = argv[0], argv[1:]
    try:
        if verb == "train":
            return cmd_train(rest)
        if verb == "list":
            return cmd_list(rest)
        if verb == "params":
            return cmd_params(rest)
        if verb == "table":
            return cmd_table(rest)
        if verb == "plot":
            return cmd_plot(rest)
        if verb == "raft-submit":
            return cmd_raft_submit(rest)
        if verb == "score":
            return cmd_score(rest)
        raise choice_error("verb", verb, VERBS)
    except UserError as e:
        return fail(e)
    except KeyboardInterrupt:
        if debug():
            raise
        print(
            "peftbench: interrupted; rerun the same command to resume from the last checkpoint",
            file=sys.stderr,
        )
        return 130


def debug() -> bool:
    return os.environ.get("PEFTBENCH_DEBUG") == "1" or os.environ.get("HYDRA_FULL_ERROR") == "1"


def fail(e: BaseException) -> int:
    if debug():
        raise e
    print(f"peftbench: error: {e}", file=sys.stderr)
    return 2


# --- verbs -----------------------------------------------------------------------------------------------


# Hydra's own flags (a plain Hydra app's): those that only print (passed to Hydra as they are, nothing runs)
# and those that move the config search path (the points are then checked inside each job, by Hydra's
# composition of them: peftbench's checks before the first job read configs/ only)
HYDRA_PRINTS = ("--cfg", "-c", "--info", "-i", "--hydra-help", "--shell-completion", "-sc", "--resolve")
HYDRA_PATHS = ("--config-dir", "-cd", "--config-path", "-cp", "--config-name", "-cn", "hydra.searchpath")


def hydra_flag(args: list[str], flags: tuple[str, ...]) -> bool:
    return any(a.split("=", 1)[0].lstrip("+") in flags for a in args)


def cmd_train(args: list[str]) -> int:
    if any(a in ("-h", "--help") for a in args):
        print(train_help())
        return 0
    log.setup()  # what is said before a Hydra job configures its own log (a preset's grid: log.setup(file))
    presets = [a.split("=", 1)[1] for a in args if a.startswith("experiment=")]
    if presets:
        from peftbench.experiment import launch_grid, run_grid

        rest = [a for a in args if not a.startswith("experiment=")]
        if any(a in ("-m", "--multirun") for a in rest) and "--dry-run" not in rest:  # one job per point
            hydra_args = [a for a in rest if a.split("=", 1)[0].lstrip("+").startswith("hydra")]
            return launch_grid(presets[0], [a for a in rest if a not in hydra_args], hydra_args)
        return run_grid(presets[0], rest)
    if not hydra_flag(args, HYDRA_PRINTS + HYDRA_PATHS):
        check_sweep(args)
    return run_hydra(args)


def train_help() -> str:
    groups = "\n".join(f"  {g:<11} {', '.join(group_options(g))}" for g in GROUPS)
    return (
        "usage: peftbench train [-m] [group=option ...] [key=value ...] [Hydra's flags]\n"
        "  e.g. peftbench train method=lora task=rte; sweep: peftbench train -m method=lora method.r=1,2,4,8\n"
        "  a preset: peftbench train experiment=NAME [only=row=...|task=...|seed=...] [--dry-run]\n"
        f"config groups (peftbench list GROUP: one line each):\n{groups}\n"
        "every key with its type and range: peftbench/schema.py; the composed config: peftbench train --cfg job\n"
        "Hydra's flags as in any Hydra app: --cfg job|hydra|all, --info, --config-dir DIR, hydra.searchpath=[...],\n"
        "  -sc install=bash, hydra/launcher=parallel|slurm, --hydra-help"
    )


def check_sweep(args: list[str]) -> None:
    """Every point of the sweep (every combination of the swept values) before the first one runs; a bad
    point is named with the swept values that make it."""
    from peftbench.validate import validate

    points = list(sweep_points(args))
    for point in points:
        try:
            validate(compose(point))
        except UserError as e:
            if len(points) == 1:
                raise
            swept = [o for o in point if o not in args]
            raise UserError(f"sweep point {' '.join(swept)} (of {len(points)} points): {e}") from None


def run_hydra(args: list[str]) -> int:
    import hydra

    from peftbench.run import execute

    @hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")
    def _app(cfg: DictConfig) -> float | None:
        """One job; its return value, the run's best main metric, is what a sweeper (Optuna) optimises."""
        try:
            if cfg.get("grid"):  # a launched preset's job: its point of the grid
                from peftbench.experiment import grid_point

                cfg = grid_point(cfg.grid.preset, int(cfg.grid.point))
            record = execute(cfg)
        except UserError as e:
            sys.exit(fail(e))
        best = record.get("best") or {}
        return (best.get("metrics") or {}).get(record.get("main_metric"))

    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()  # the app initializes Hydra itself
    saved = sys.argv
    sys.argv = ["peftbench train", *args]
    try:
        _app()
    except SystemExit as e:  # Hydra and our one-line errors end the app with sys.exit
        return e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = saved
        log.setup()  # the job's log file closed: later lines of this process are not the job's
    return 0


def cmd_list(args: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="peftbench list", description="Config options with one-line descriptions."
    )
    p.add_argument(
        "group", nargs="?", choices=(*GROUPS, "pairs"), help="only this group; pairs: method x model family"
    )
    a = p.parse_args(args)
    for group in [a.group] if a.group else GROUPS:
        if group == "pairs":
            continue
        print(f"{group}:")
        for name in group_options(group):
            cfg = load_option(group, name)
            print(f"  {name:<20} {cfg.get('description', '')}")
    if a.group == "pairs":
        print_pairs()
    elif a.group is None:
        print("pairs: `peftbench list pairs` shows which method applies to which model family, and why not")
    return 0


def print_pairs() -> None:
    """Which method applies to which family (classification head / LM head with task.format=prompt)."""
    print(
        "pairs (method x family; head: a new classification head, prompt: task.format=prompt, the LM head):"
    )
    from peftbench.validate import pairs

    for method, fam, fmt, reason in pairs():
        print(f"  {method:<17} {fam:<8} {fmt:<6} {'applies' if reason is None else 'n/a: ' + reason}")


PAPER_MODELS = (
    "roberta-base",
    "roberta-large",
    "bert-base",
    "bert-large",
    "deberta-v2-xxlarge",
    "gpt2",
    "gpt2-medium",
    "gpt2-large",
    "t5-small",
    "t5-base",
    "t5-large",
    "bart-base",
    "bart-large",
)


def cmd_params(args: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="peftbench params",
        description="Trainable / total parameters of method x model, counted on the meta device (no weights). "
        "Without method= / model= it prints every paper model x the core methods.",
    )
    p.add_argument("overrides", nargs="*", help="e.g. method=lora model=roberta-base method.r=16")
    p.add_argument("--format", choices=("md", "csv", "latex"), default="md")
    a = p.parse_args(args)
    from peftbench.report import params_table, render
    from peftbench.validate import with_capability

    fixed = [o for o in a.overrides if o.split("=")[0] not in ("method", "model")]
    models = [o.split("=", 1)[1] for o in a.overrides if o.startswith("model=")] or PAPER_MODELS
    methods = [o.split("=", 1)[1] for o in a.overrides if o.startswith("method=")] or with_capability(
        "in_params_table"
    )
    rows = params_table(
        (model, method, compose([f"model={model}", f"method={method}", *fixed]))
        for model, method in itertools.product(models, methods)
    )
    print(render(rows, a.format))
    return 0


def cmd_table(args: list[str]) -> int:
    p = argparse.ArgumentParser(prog="peftbench table", description="Records of one experiment -> a table.")
    p.add_argument("name", nargs="?", default="runs", help="experiment (results/<name>/); default: runs")
    p.add_argument(
        "--results", type=Path, default=None, help="results root (default: $PEFTBENCH_RESULTS_DIR or results)"
    )
    p.add_argument("--format", choices=("md", "csv", "latex"), default="md")
    p.add_argument(
        "--stat",
        choices=("mean", "median"),
        default=None,
        help="over seeds (default: the preset's protocol, else mean); ± std either way",
    )
    p.add_argument("--no-paper", action="store_true", help="leave out the paper's numbers")
    p.add_argument(
        "--efficiency",
        action="store_true",
        help="add %% trainable, peak memory, train time, tokens/s and bytes stored per task (means over runs)",
    )
    p.add_argument("--out", type=Path, default=None, help="also write the table to this file (atomically)")
    p.add_argument(
        "--check",
        action="store_true",
        help="regenerate every committed results/<name>.md and fail on any difference",
    )
    a = p.parse_args(args)
    from peftbench.record import check_out_file, write_atomic
    from peftbench.report.make import check_tables, make_table, results_root

    root = a.results or results_root()
    if a.out:
        check_out_file(a.out, "--out")
    if a.check:
        return check_tables(root)
    text = make_table(root, a.name, a.format, a.stat, not a.no_paper, a.efficiency)
    print(text)
    if a.out:
        write_atomic(a.out, text + "\n")
    return 0


def cmd_plot(args: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="peftbench plot", description="Sweeps of an experiment preset -> PNG files."
    )
    p.add_argument("name", help="experiment preset with a `plots:` section")
    p.add_argument("--results", type=Path, default=None)
    p.add_argument("--stat", choices=("mean", "median"), default=None)
    a = p.parse_args(args)
    from peftbench.report.make import plot_experiment, results_root

    for path in plot_experiment(a.results or results_root(), a.name, a.stat):
        print(f"wrote {path}")
    return 0


def cmd_raft_submit(args: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="peftbench raft-submit",
        description="RAFT leaderboard submission (data/<task>/predictions.csv: ID,Label) from the newest "
        "finished run per task that ran with train.predict_test=true.",
    )
    p.add_argument("name", nargs="?", default="runs", help="experiment (results/<name>/); default: runs")
    p.add_argument("--out", type=Path, required=True, help="folder of the submission (its data/ is written)")
    p.add_argument("--results", type=Path, default=None)
    p.add_argument(
        "--partial", action="store_true", help="write the tasks that have predictions, skip the rest"
    )
    a = p.parse_args(args)
    from peftbench.record import check_writable, load_records
    from peftbench.report import render
    from peftbench.report.make import results_root
    from peftbench.report.submit import write_submission

    check_writable(a.out / "data", "submission folder", "give another --out")
    summary = write_submission(load_records((a.results or results_root()) / a.name), a.out, a.partial)
    print(render(summary, "md"))
    print(f"wrote {sum(1 for r in summary if r['rows'])} of {len(summary)} tasks to {a.out / 'data'}")
    return 0


def cmd_score(args: list[str]) -> int:
    from peftbench.report import score

    if not args or any(a in ("-h", "--help") for a in args):
        print(score.USAGE)
        return 0
    opts = score.parse(args)
    if opts.get("out"):
        from peftbench.record import check_out_file

        check_out_file(opts["out"], "out")
    record = score.score_file(opts)
    if opts.get("out"):
        score.write(record, opts["out"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
