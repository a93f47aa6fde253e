"""RAFT: all 11 tasks from the offline release (sizes, label names, T-Few's cross-validation folds), each run
end to end on a tiny model through the prompt format, and the leaderboard submission (ID,Label per task,
one row per unlabelled test row)."""

import csv
import json
import os
from pathlib import Path

import pytest
from conftest import require_data

from peftbench.errors import UserError
from peftbench.report.submit import RAFT_SUBSETS
from peftbench.tasks import load_task

# unlabelled test rows of this (pre-release) copy: the final release has 516 / 2,243 for OSE / SRI
TEST_ROWS = {
    "ade_corpus_v2": 5000,
    "banking_77": 5000,
    "neurips_impact_statement_risks": 150,
    "one_stop_english": 518,
    "overruling": 2350,
    "semiconductor_org_types": 449,
    "systematic_review_inclusion": 2244,
    "tai_safety_research": 1639,
    "terms_of_service": 5000,
    "tweet_eval_hate": 2966,
    "twitter_complaints": 3399,
}


@pytest.mark.parametrize("subset", RAFT_SUBSETS)
def test_each_raft_task_loads_with_its_folds(compose, subset):
    from peftbench.tasks.raft import split_folds

    spec = json.loads(require_data("raft", subset, "task.json").read_text())
    d = load_task(compose(f"task=raft_{subset}", "task.fold=null").task, seed=0)
    assert d.label_names == spec["label_columns"]["Label"] and len(d.test) == TEST_ROWS[subset]
    assert all(r["label"] == -1 for r in d.test) and len(d.train) == 50
    fields = [c for c in spec["data_columns"] if c != "ID"]
    assert all(set(fields) <= set(r) for r in d.train + d.test)
    held = []
    for k in range(5):  # fold k holds out rows 10k..10k+9 of the 50, in the release's order
        train, validation, notes = split_folds(compose(f"task=raft_{subset}", f"task.fold={k}").task, d.train)
        assert len(train) == 40 and len(validation) == 10 and notes == {"fold": k, "n_folds": 5}
        assert {r["idx"] for r in train}.isdisjoint(r["idx"] for r in validation)
        held += [r["idx"] for r in validation]
    with open(require_data("raft", subset, "train.csv"), newline="") as fh:
        assert held == [int(r["ID"]) for r in csv.DictReader(fh)]  # the 5 folds cover the 50 rows once


def test_fold_null_trains_on_all_50_and_says_the_eval_is_on_train_rows(compose):
    require_data()
    d = load_task(compose("task=raft_overruling", "task.fold=null").task, seed=0)
    assert len(d.train) == 50 and d.validation == d.train and d.notes == {"eval_on_train_rows": True}
    with pytest.raises(UserError, match=r"task.fold=7: choose 0..4 \(task.n_folds=5\) or null"):
        load_task(compose("task=raft_overruling", "task.fold=7").task, seed=0)


TINY = ["model=tiny-gpt2", "method=ia3", "task.format=prompt", "task.max_length=64", "train.max_steps=2"]
TINY += ["train.batch_size=8", "train.progress=false", "train.save_adapter=false"]


def test_every_raft_task_runs_end_to_end_on_a_tiny_model(compose):
    """The 11 tasks through training and rank classification over their label names (77 for banking_77)."""
    require_data()
    from peftbench.run import execute

    for subset in RAFT_SUBSETS:
        rec = execute(compose(f"task=raft_{subset}", *TINY))
        assert rec["status"] == "finished" and rec["data"]["n_eval"] == 10 and rec["data"]["fold"] == 0
        assert set(rec["best"]["metrics"]) == {"accuracy", "macro_f1"}
        assert rec["cost"]["inference_tokens_per_example"] > 0


def test_submission_has_the_leaderboards_columns_and_rows(compose, tmp_path, capsys):
    require_data()
    from peftbench.cli import main

    task = ["task=raft_semiconductor_org_types", "task.fold=null", "train.predict_test=true"]
    assert main(["train", *TINY, *task]) == 0
    results = Path(os.environ["PEFTBENCH_RESULTS_DIR"])
    out = tmp_path / "submission"
    assert main(["raft-submit", "--results", str(results), "--out", str(out)]) == 2  # 10 tasks missing
    assert "no finished run with test predictions for ade_corpus_v2, banking_77" in capsys.readouterr().err
    assert main(["raft-submit", "--results", str(results), "--out", str(out), "--partial"]) == 0
    assert "wrote 1 of 11 tasks" in capsys.readouterr().out
    with open(out / "data" / "semiconductor_org_types" / "predictions.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["ID", "Label"] and len(rows) == 1 + 449
    with open(require_data("raft", "semiconductor_org_types", "test_unlabeled.csv"), newline="") as f:
        assert [int(r[0]) for r in rows[1:]] == [int(r["ID"]) for r in csv.DictReader(f)]
    assert {r[1] for r in rows[1:]} <= {"company", "research institute", "university"}


@pytest.mark.slow
def test_full_submission_of_all_11_tasks(compose, tmp_path):
    """Every test row of every task predicted (about 28,700 rows; minutes on 2 CPU cores)."""
    require_data()
    from peftbench.cli import main

    for subset in RAFT_SUBSETS:
        assert main(["train", *TINY, f"task=raft_{subset}", "task.fold=null", "train.predict_test=true"]) == 0
    out = tmp_path / "submission"
    assert main(["raft-submit", "--results", os.environ["PEFTBENCH_RESULTS_DIR"], "--out", str(out)]) == 0
    for subset, n in TEST_ROWS.items():
        lines = (out / "data" / subset / "predictions.csv").read_text().splitlines()
        assert lines[0] == "ID,Label" and len(lines) == 1 + n
