"""`peftbench VERB`: train | list | params | table.

`train` is a Hydra app (overrides, -m sweeps, launchers); the other verbs are plain argparse commands that
compose the same configs. Every bad input ends as one line on stderr and a non-zero exit code; set
PEFTBENCH_DEBUG=1 (or HYDRA_FULL_ERROR=1) for the traceback.
"""

from __future__ import annotations

import argparse
import itertools
import os
import signal
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from peftbench.errors import UserError, choice_error
from peftbench.paths import config_dir, group_options

GROUPS = ("method", "model", "task", "train", "experiment")
VERBS = ("train", "list", "params", "table")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `peftbench list | head` ends quietly
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation notes from peft
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip().splitlines()[0])
        print(f"usage: peftbench {{{','.join(VERBS)}}} ...   (peftbench VERB --help for each)")
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
        raise choice_error("verb", verb, VERBS)
    except UserError as e:
        return fail(e)


def fail(e: BaseException) -> int:
    if os.environ.get("PEFTBENCH_DEBUG") == "1" or os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise e
    print(f"peftbench: error: {e}", file=sys.stderr)
    return 2


# --- composing configs outside Hydra's app (validation, params) ------------------------------------------


def compose(overrides: list[str]) -> DictConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    check_groups(overrides)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            return hydra_compose("config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        raise UserError(f"bad override in {' '.join(overrides)!r}: {str(e).splitlines()[0]}") from None
    finally:
        GlobalHydra.instance().clear()


def check_groups(overrides: list[str]) -> None:
    """`method=lorra` -> unknown method 'lorra' (did you mean 'lora'?); choose from: ..."""
    for o in overrides:
        key, sep, value = o.partition("=")
        key = key.lstrip("+~")
        if sep and key in GROUPS and value not in ("null", ""):
            options = group_options(key)
            if value not in options:
                raise choice_error(key, value, options)


def sweep_points(args: list[str]) -> Iterator[list[str]]:
    """Each value of each swept override, with the fixed overrides: enough to check every value once."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    plain = [a for a in args if not a.startswith("-") and not a.startswith("hydra")]
    try:
        parsed = OverridesParser.create().parse_overrides(plain)
    except Exception as e:  # Hydra's grammar errors are already one readable sentence
        raise UserError(f"cannot parse overrides {' '.join(plain)!r}: {str(e).splitlines()[0]}") from None
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    swept = [o for o in parsed if o.is_sweep_override()]
    if not swept:
        yield fixed
    for o in swept:
        for value in o.sweep_string_iterator():
            yield [*fixed, f"{o.get_key_element()}={value}"]


# --- verbs -----------------------------------------------------------------------------------------------


def cmd_train(args: list[str]) -> int:
    if any(a in ("-h", "--help") for a in args):
        print(
            "usage: peftbench train [-m] [group=option ...] [key=value ...]\n"
            f"groups: {', '.join(GROUPS)} (see `peftbench list`); e.g. peftbench train method=lora task=rte\n"
            "sweep: peftbench train -m method=lora method.r=1,2,4,8 task=rte"
        )
        return 0
    from peftbench.validate import validate

    for point in sweep_points(args):
        validate(compose(point))
    return run_hydra(args)


def run_hydra(args: list[str]) -> int:
    import hydra

    from peftbench.run import execute

    @hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")
    def _app(cfg: DictConfig) -> None:
        try:
            execute(cfg)
        except UserError as e:
            sys.exit(fail(e))

    saved = sys.argv
    sys.argv = ["peftbench train", *args]
    try:
        _app()
    except SystemExit as e:  # Hydra and our one-line errors end the app with sys.exit
        return e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = saved
    return 0


def cmd_list(args: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="peftbench list", description="Config options with one-line descriptions."
    )
    p.add_argument("group", nargs="?", choices=GROUPS, help="only this group")
    a = p.parse_args(args)
    for group in [a.group] if a.group else GROUPS:
        print(f"{group}:")
        for name in group_options(group):
            cfg = OmegaConf.load(config_dir() / group / f"{name}.yaml")
            print(f"  {name:<20} {cfg.get('description', '')}")
    return 0


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
TABLE_METHODS = (
    "full",
    "ft_top2",
    "bitfit",
    "lora",
    "adapter_houlsby",
    "adapter_pfeiffer",
    "ia3",
    "prompt_tuning",
    "p_tuning",
    "prefix_tuning",
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

    fixed = [o for o in a.overrides if o.split("=")[0] not in ("method", "model")]
    models = [o.split("=", 1)[1] for o in a.overrides if o.startswith("model=")] or PAPER_MODELS
    methods = [o.split("=", 1)[1] for o in a.overrides if o.startswith("method=")] or TABLE_METHODS
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
    p.add_argument("--stat", choices=("mean", "median"), default="mean", help="over seeds (± std either way)")
    p.add_argument("--out", type=Path, default=None, help="also write the table to this file (atomically)")
    a = p.parse_args(args)
    from peftbench.record import load_records, write_atomic
    from peftbench.report import records_table, render

    root = a.results or Path(os.environ.get("PEFTBENCH_RESULTS_DIR", "results"))
    records = load_records(root / a.name)
    if not records:
        raise UserError(f"no records in {root / a.name}; run `peftbench train name={a.name} ...` first")
    text = render(records_table(records, a.stat), a.format)
    print(text)
    if a.out:
        write_atomic(a.out, text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
