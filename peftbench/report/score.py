"""The `score` verb: a file of outputs scored with a generation task's official evaluation, on all inputs
and per category (WebNLG seen / unseen), as a training run scores its own outputs."""

from __future__ import annotations

import json
from pathlib import Path

from peftbench.errors import UserError, choice_error

SCORE_KEYS = ("task", "predictions", "split", "out")
USAGE = (
    "usage: peftbench score task=TASK predictions=FILE [split=test] [out=FILE.json]\n"
    "Scores a file of outputs (one line per distinct input of the split, in its order; or a run's "
    "predictions.jsonl) with the task's "
    "official metrics (peftbench/metrics/nlg.py); WebNLG also by seen / unseen category."
)


def parse(args: list[str]) -> dict[str, str]:
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
            raise UserError(f"missing {key}=...; {USAGE.splitlines()[0]}")
    return opts


def generation_task(name: str):
    """The composed config of a task whose outputs are text (kind: generation), or a one-line error."""
    from peftbench.config import compose
    from peftbench.paths import group_options

    tasks = group_options("task")
    if name in tasks and (task := compose([f"task={name}"]).task).kind == "generation":
        return task
    generation = [t for t in tasks if compose([f"task={t}"]).task.kind == "generation"]  # for the message
    if name in tasks:
        raise UserError(f"task {name} is not a generation task; choose from: {', '.join(generation)}")
    raise choice_error("task", name, generation)


def jsonl_predictions(path: Path, lines: list[str]) -> list[str]:
    rows = []
    for n, line in enumerate(lines, start=1):
        try:
            row = json.loads(line)
            rows.append((row["idx"], row["prediction"]))
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{path}:{n}: not a JSON object with idx and prediction") from None
    return [text for _, text in sorted(rows, key=lambda r: r[0])]


def score_file(opts: dict[str, str]) -> dict:
    """{category: scores} of the predictions file against the task's split."""
    from hydra.utils import get_method

    from peftbench.metrics.nlg import score_by_category

    task = generation_task(opts["task"])
    split = opts.get("split", "test")
    path = Path(opts["predictions"])
    if not path.is_file():
        raise UserError(f"predictions file {path} does not exist")
    from peftbench.tasks import text_file

    with text_file(path):
        hyps = path.read_text(encoding="utf-8").splitlines()
    if path.suffix == ".jsonl":  # a run's predictions.jsonl: its "prediction" fields, in the order of idx
        hyps = jsonl_predictions(path, hyps)
    load_split = get_method(task._target_.rsplit(".", 1)[0] + ".load_split")  # tasks/generation.py, qa.py
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
    return {"task": task.name, "split": split, "predictions": str(path), "scores": result}


def write(record: dict, out: str) -> None:
    from peftbench.record import write_atomic

    write_atomic(Path(out), json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")
