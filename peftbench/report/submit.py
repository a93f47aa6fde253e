"""`peftbench raft-submit`: the RAFT leaderboard's submission from finished runs' test predictions.

The leaderboard (huggingface.co/datasets/ought/raft-submission) takes one `data/<task>/predictions.csv` per
task with exactly two columns, ID and Label (the label's name), one row per unlabelled test row. Runs write
their predictions with `train.predict_test=true` (usually `task.fold=null`: trained on all 50 rows); this
collects the newest finished one per task, checks it against the task's test split, and lays them out.
"""

from __future__ import annotations

import csv
from pathlib import Path

from peftbench.errors import UserError
from peftbench.record import write_atomic

RAFT_SUBSETS = (
    "ade_corpus_v2",
    "banking_77",
    "neurips_impact_statement_risks",
    "one_stop_english",
    "overruling",
    "semiconductor_org_types",
    "systematic_review_inclusion",
    "tai_safety_research",
    "terms_of_service",
    "tweet_eval_hate",
    "twitter_complaints",
)


def newest_predictions(records: list[dict]) -> dict[str, dict]:
    """subset -> the newest finished record that predicted the whole test split of raft_<subset>."""
    best: dict[str, dict] = {}
    for r in records:
        preds = r.get("test_predictions")
        if r.get("status") != "finished" or not preds or not r["task"].startswith("raft_"):
            continue
        subset = r["task"].removeprefix("raft_")
        if preds["rows"] == preds["of"] and r["finished_at"] >= best.get(subset, {}).get("finished_at", ""):
            best[subset] = r
    return best


def check(path: Path, subset: str, test_ids: list[int], labels: list[str]) -> int:
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    if not rows or rows[0] != ["ID", "Label"]:
        raise UserError(f"{path}: header {rows[0] if rows else None} is not ['ID', 'Label']")
    body = rows[1:]
    if len(body) != len(test_ids):
        raise UserError(f"{path}: {len(body)} rows, but {subset}'s test split has {len(test_ids)}")
    if [int(r[0]) for r in body] != test_ids:
        raise UserError(f"{path}: the IDs are not {subset}'s test IDs in order")
    bad = sorted({r[1] for r in body} - set(labels))
    if bad:
        raise UserError(f"{path}: labels {bad} are not among {subset}'s label names")
    return len(body)


def write_submission(records: list[dict], out: Path, partial: bool = False) -> list[dict]:
    """Copy each task's checked predictions to out/data/<task>/predictions.csv; one summary row per task."""
    from peftbench.cli import compose
    from peftbench.tasks import load_task

    chosen = newest_predictions(records)
    missing = [s for s in RAFT_SUBSETS if s not in chosen]
    if missing and not partial:
        raise UserError(
            f"no finished run with test predictions for {', '.join(missing)}; run them with "
            "train.predict_test=true (and task.fold=null), or pass --partial to write the others"
        )
    summary = []
    for subset in RAFT_SUBSETS:
        if subset not in chosen:
            summary.append({"task": subset, "rows": 0, "test rows": "", "run": "missing"})
            continue
        rec = chosen[subset]
        task = load_task(compose([f"task=raft_{subset}"]).task, seed=0)
        src = Path(rec["test_predictions"]["path"])
        n = check(src, subset, [r["idx"] for r in task.test], task.label_names)
        write_atomic(out / "data" / subset / "predictions.csv", src.read_text(encoding="utf-8"))
        summary.append({"task": subset, "rows": n, "test rows": len(task.test), "run": rec["run_id"]})
    return summary
