"""`peftbench VERB`: train | list | params | table | plot | score | raft-submit.

`train` is a Hydra app (overrides, -m sweeps, launchers); the other verbs are plain argparse commands that
compose the same configs. Every bad input ends as one line on stderr and a non-zero exit code; pass --debug
(anywhere: `peftbench --debug train ...`, `peftbench train --debug ...`) or set PEFTBENCH_DEBUG=1 (or
HYDRA_FULL_ERROR=1) for the traceback.
"""

from __future__ import annotations

import argparse
import itertools
import json
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
VERBS = ("train", "list", "params", "table", "plot", "score", "raft-submit")


def default_jobs() -> int:
    """Parallel runs on one machine (hydra/launcher=parallel): $PEFTBENCH_JOBS, else one per visible GPU,
    else half the CPU cores."""
    if os.environ.get("PEFTBENCH_JOBS"):
        return int(os.environ["PEFTBENCH_JOBS"])
    import torch

    if torch.cuda.is_available():
        return torch.cuda.device_count()
    return max(1, (os.cpu_count() or 2) // 2)


OmegaConf.register_new_resolver("peftbench_jobs", default_jobs, replace=True)


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


# --- composing configs outside Hydra's app (validation, params) ------------------------------------------


def compose(overrides: list[str]) -> DictConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    global _composing_from
    check_groups(overrides)
    if not GlobalHydra.instance().is_initialized() or _composing_from != config_dir():
        GlobalHydra.instance().clear()
        initialize_config_dir(config_dir=str(config_dir()), version_base="1.3")  # stays set: compose is fast
        _composing_from = config_dir()
    try:
        return hydra_compose("config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        raise UserError(f"bad override in {' '.join(overrides)!r}: {str(e).splitlines()[0]}") from None


_composing_from = None


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
    from hydra.core.override_parser.types import Glob

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
        key = o.get_key_element()
        if isinstance(o.value(), Glob):  # task=glob(raft_*): the group's options that match
            values = o.value().filter(group_options(key.lstrip("+~")))
        else:
            values = list(o.sweep_string_iterator())
        for value in values:
            yield [*fixed, f"{key}={value}"]


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

    presets = [a.split("=", 1)[1] for a in args if a.startswith("experiment=")]
    if presets:
        return run_experiment(presets[0], [a for a in args if not a.startswith("experiment=")])
    for point in sweep_points(args):
        validate(compose(point))
    return run_hydra(args)


def run_experiment(name: str, args: list[str]) -> int:
    """The whole grid of a preset (or the `only=` slice), every point checked first, finished runs skipped.
    A run that fails is recorded as failed and the grid goes on; the exit code says whether any failed."""
    from peftbench.experiment import expand, load_preset
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


def unique_runs(points: list, configs: list[DictConfig]) -> tuple[list, list[DictConfig]]:
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


def run_hydra(args: list[str]) -> int:
    import hydra

    from peftbench.run import execute

    @hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")
    def _app(cfg: DictConfig) -> None:
        try:
            execute(cfg)
        except UserError as e:
            sys.exit(fail(e))

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
    return 0


def warm_started(preset, points: list, configs: list[DictConfig], extra: list[str]) -> list[DictConfig]:
    """Rows with `warm_start: {from: mnli, tasks: [...]}` start those tasks' LoRA from the same row and seed's
    `from` run: its adapter folder (results/<name>/<run id>/adapter) becomes method.init_from."""
    from peftbench.experiment import expand
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
            cfg = OmegaConf.load(config_dir() / group / f"{name}.yaml")
            print(f"  {name:<20} {cfg.get('description', '')}")
    if a.group == "pairs":
        print_pairs()
    elif a.group is None:
        print("pairs: `peftbench list pairs` shows which method applies to which model family, and why not")
    return 0


PAIR_FAMILIES = ("bert", "roberta", "deberta", "gpt2", "t5", "bart")


def pairs() -> list[tuple[str, str, str, str | None]]:
    """(method, family, format, reason it does not apply or None) for every method x family x task format,
    decided by applying the method to the family's tiny model on the meta device."""
    from peftbench.methods import apply_method
    from peftbench.models import meta_model
    from peftbench.validate import check_format

    base = compose(["task=rte"])  # one composition; the method and model YAMLs are swapped in (fast)
    out = []
    for method in group_options("method"):
        for fam in PAIR_FAMILIES:
            for fmt in ("head", "prompt"):
                cfg = base.copy()
                cfg.method = OmegaConf.load(config_dir() / "method" / f"{method}.yaml")
                cfg.model = OmegaConf.load(config_dir() / "model" / f"tiny-{fam}.yaml")
                cfg.task.format = fmt
                try:
                    check_format(cfg)
                    model, family_ = meta_model(cfg)
                    apply_method(model, cfg.method, family_)
                    reason = None
                except UserError as e:
                    reason = str(e)
                out.append((method, fam, fmt, reason))
    return out


def print_pairs() -> None:
    """Which method applies to which family (classification head / LM head with task.format=prompt)."""
    print(
        "pairs (method x family; head: a new classification head, prompt: task.format=prompt, the LM head):"
    )
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
    from peftbench.record import write_atomic

    root = a.results or results_root()
    if a.check:
        return check_tables(root)
    text = make_table(root, a.name, a.format, a.stat, not a.no_paper, a.efficiency)
    print(text)
    if a.out:
        write_atomic(a.out, text + "\n")
    return 0


def results_root() -> Path:
    return Path(os.environ.get("PEFTBENCH_RESULTS_DIR", "results"))


def make_table(
    root: Path,
    name: str,
    fmt: str = "md",
    stat: str | None = None,
    paper: bool = True,
    with_efficiency: bool = False,
) -> str:
    from peftbench import experiment
    from peftbench.record import load_records
    from peftbench.report import records_table, render

    if experiment.is_preset(name):  # the layout is the preset's: cells without runs say "missing"
        records = load_records(root / name) if (root / name).is_dir() else []
        preset = experiment.load_preset(name)
        text = render(experiment.table(preset, records, stat, paper, with_efficiency), fmt)
        notes = experiment.threshold_dimension(preset, records, stat or preset.protocol.stat)
        return text + "".join(f"\n\n{line}" if fmt == "md" else f"\n# {line}" for line in notes)
    records = load_records(root / name)
    if not records:
        raise UserError(f"no records in {root / name}; run `peftbench train name={name} ...` first")
    return render(records_table(records, stat or "mean", with_efficiency), fmt)


def check_tables(root: Path) -> int:
    """Every committed table results/<name>.md must equal what its records give now."""
    tables = sorted(root.glob("*.md"))
    if not tables:
        print(f"no committed tables (*.md) in {root}: nothing to check")
        return 0
    stale = [t.name for t in tables if t.read_text() != make_table(root, t.stem) + "\n"]
    for t in tables:
        print(f"{'STALE' if t.name in stale else 'ok'}: {t}")
    if stale:
        raise UserError(
            f"{', '.join(stale)} differ from their records; regenerate with "
            f"`peftbench table NAME --out {root}/NAME.md`"
        )
    return 0


def cmd_plot(args: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="peftbench plot", description="Sweeps of an experiment preset -> PNG files."
    )
    p.add_argument("name", help="experiment preset with a `plots:` section")
    p.add_argument("--results", type=Path, default=None)
    p.add_argument("--stat", choices=("mean", "median"), default=None)
    a = p.parse_args(args)
    from peftbench import experiment
    from peftbench.plot import draw
    from peftbench.record import load_records

    root = a.results or results_root()
    preset = experiment.load_preset(a.name)
    if not preset.get("plots"):
        raise UserError(f"experiment {a.name} declares no plots")
    records = load_records(root / a.name)
    stat = a.stat or preset.protocol.stat
    for spec in preset.plots:
        series = experiment.plot_series(preset, spec, records, stat)
        if not series:
            raise UserError(f"plot {spec.file}: no finished runs of rows {list(spec.rows)} on {spec.task}")
        path = root / a.name / spec.file
        lines = {}  # horizontal reference lines: a row's value (full fine-tuning) and a fraction of it
        if spec.get("reference"):
            ref, _ = experiment.cell_values(records, spec.reference, spec.task, spec.metric)
            if ref:
                value = experiment._stat(ref, stat)
                lines[spec.reference] = value
                if spec.get("fraction"):
                    lines[f"{spec.fraction:.0%} of {spec.reference}"] = spec.fraction * value
        draw(series, spec, path, lines)
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
    from peftbench.record import load_records
    from peftbench.report import render
    from peftbench.submit import write_submission

    summary = write_submission(load_records((a.results or results_root()) / a.name), a.out, a.partial)
    print(render(summary, "md"))
    print(f"wrote {sum(1 for r in summary if r['rows'])} of {len(summary)} tasks to {a.out / 'data'}")
    return 0


SCORE_KEYS = ("task", "predictions", "split", "out")


def cmd_score(args: list[str]) -> int:
    usage = (
        "usage: peftbench score task=TASK predictions=FILE [split=test] [out=FILE.json]\n"
        "Scores a file of outputs (one line per distinct input of the split, in its order) with the task's "
        "official metrics (peftbench/nlg_metrics.py); WebNLG also by seen / unseen category."
    )
    if not args or any(a in ("-h", "--help") for a in args):
        print(usage)
        return 0
    opts = {}
    for a in args:
        key, sep, value = a.partition("=")
        if not sep or key not in SCORE_KEYS:
            raise UserError(
                f"bad argument {a!r}; expected key=value with key one of: {', '.join(SCORE_KEYS)}"
            )
        opts[key] = value
    for key in ("task", "predictions"):
        if not opts.get(key):
            raise UserError(f"missing {key}=...; {usage.splitlines()[0]}")
    from peftbench.nlg_metrics import score_by_category
    from peftbench.record import write_atomic

    generation = [t for t in group_options("task") if {"_generation", "_qa"} & set(task_defaults(t))]
    if opts["task"] not in generation:
        if opts["task"] in group_options("task"):
            raise UserError(
                f"task {opts['task']} is not a generation task; choose from: {', '.join(generation)}"
            )
        raise choice_error("task", opts["task"], generation)
    task = compose([f"task={opts['task']}"]).task
    split = opts.get("split", "test")
    path = Path(opts["predictions"])
    if not path.is_file():
        raise UserError(f"predictions file {path} does not exist")
    hyps = path.read_text(encoding="utf-8").splitlines()
    from hydra.utils import get_method

    load_split = get_method(task._target_.rsplit(".", 1)[0] + ".load_split")  # generation.py, qa.py
    entries, source = load_split(task, split)
    if len(hyps) != len(entries):
        raise UserError(
            f"{path} has {len(hyps)} lines but {task.name} {split} has {len(entries)} distinct inputs: "
            f"expected {len(entries)} (one output per line, in the order of {source})"
        )
    result = {name: s.as_dict() for name, s in score_by_category(task.scorer, hyps, entries).items()}
    print(f"{task.name} {split} ({len(entries)} inputs, {source}); official scorer: {task.scorer}")
    for name, values in result.items():
        cells = [f"{k}={'n/a' if v is None else f'{v:.4f}'}" for k, v in values.items() if k != "unavailable"]
        print(f"  {name:<7} " + "  ".join(cells))
        for metric, why in values["unavailable"].items():
            print(f"  {name:<7} {metric} unavailable: {why}")
    if opts.get("out"):
        record = {"task": task.name, "split": split, "predictions": str(path), "scores": result}
        write_atomic(Path(opts["out"]), json.dumps(record, indent=2) + "\n")
        print(f"wrote {opts['out']}")
    return 0


def task_defaults(name: str) -> list:
    """The bases a task YAML composes (`defaults:`), read without composing it."""
    return list(OmegaConf.load(config_dir() / "task" / f"{name}.yaml").get("defaults") or [])


if __name__ == "__main__":
    sys.exit(main())
