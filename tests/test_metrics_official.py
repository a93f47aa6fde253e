"""GLUE / SuperGLUE / RAFT / SQuAD metrics against their official definitions, on fixed inputs.

Every expected value is a literal, worked by hand in a comment. Where the official code is a few lines it is
reproduced here (source cited) and must give the same literal. Inputs are chosen so that a near-miss
definition gives another number: binary vs macro F1, per-answer vs per-question EM, tied ranks, classes
predicted but never true, unnormalised answers. Hugging Face `evaluate` cannot load these metrics offline
(its scripts live on the hub; see the README), so the official code is reproduced rather than imported.
"""

import math
import re
import string
from collections import Counter
from pathlib import Path

import pytest
import yaml
from sklearn.metrics import f1_score, matthews_corrcoef

from peftbench import metrics as M
from peftbench.metrics.qa import normalize_answer, squad

TASKS = Path(__file__).resolve().parents[1] / "configs" / "task"


def f1_from_counts(tp: int, fp: int, fn: int) -> float:
    """F1 = 2PR / (P + R) = 2TP / (2TP + FP + FN)."""
    return 2 * tp / (2 * tp + fp + fn)


# -- GLUE: huggingface/evaluate metrics/glue/glue.py and jiant jiant/tasks/evaluate/core.py ----------------
# accuracy = mean(preds == labels); MRPC/QQP f1 = sklearn f1_score(labels, preds) (binary, pos_label=1);
# CoLA = matthews_corrcoef(labels, preds); STS-B = scipy pearsonr / spearmanr(preds, labels).


def test_accuracy():
    # SST-2, MNLI, QNLI, RTE, BoolQ, COPA, WiC, WSC, SuperGLUE RTE, CB
    refs = [0, 1, 2, 2, 1, 0, 2]
    preds = [0, 2, 2, 2, 1, 1, 0]  # right at 0, 2, 3, 4 -> 4/7
    assert M.compute(["accuracy"], preds, refs)["accuracy"] == pytest.approx(400 / 7)


# one 2x2 table for MRPC's F1 and CoLA's MCC: positive class 1
BIN_REFS = [1, 1, 1, 0, 0, 0, 0, 1]
BIN_PREDS = [1, 0, 1, 1, 0, 0, 1, 1]
TP, FP, FN, TN = 3, 2, 1, 2  # tp at 0, 2, 7; fp at 3, 6; fn at 1; tn at 4, 5


def test_mrpc_qqp_f1_is_the_binary_f1_of_class_1():
    got = M.compute(["accuracy", "f1"], BIN_PREDS, BIN_REFS)  # configs/task/mrpc.yaml, qqp.yaml
    # F1(class 1) = 2*3 / (2*3 + 2 + 1) = 6/9; accuracy = 5/8
    assert got["f1"] == pytest.approx(200 / 3)
    assert got["accuracy"] == pytest.approx(62.5)
    assert got["f1"] == pytest.approx(100 * f1_from_counts(TP, FP, FN))
    assert got["f1"] == pytest.approx(100 * f1_score(BIN_REFS, BIN_PREDS))  # glue.py acc_and_f1
    # the near misses give other numbers: F1 of class 0 = 4/7, macro = (2/3 + 4/7)/2 = 13/21
    assert got["f1"] != pytest.approx(400 / 7)
    assert got["f1"] != pytest.approx(1300 / 21)


def test_cola_mcc_by_formula():
    # MCC = (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (6 - 2) / sqrt(5*4*4*3) = 4/sqrt(240)
    assert 4 / math.sqrt(240) == pytest.approx(0.2581988897)
    assert M.compute(["mcc"], BIN_PREDS, BIN_REFS)["mcc"] == pytest.approx(25.81988897)
    assert M.mcc(BIN_PREDS, BIN_REFS) == pytest.approx(100 * matthews_corrcoef(BIN_REFS, BIN_PREDS))
    # a constant prediction: one margin is 0, sklearn (so the official code) defines MCC = 0
    assert M.mcc([1] * 8, BIN_REFS) == 0.0


def test_stsb_pearson_by_formula():
    preds, refs = [1.0, 2.0, 3.0, 4.0, 10.0], [1.0, 3.0, 2.0, 4.0, 5.0]
    # means 4 and 3; deviations (-3,-2,-1,0,6) and (-2,0,-1,1,2): cov = 6+0+1+0+12 = 19, var 50 and 10
    # r = 19 / sqrt(50*10) = 0.8497058314
    assert M.pearson(preds, refs) == pytest.approx(84.97058314)
    # Spearman on the same pairs (ranks 1..5 vs 1,3,2,4,5): 1 - 6*2/(5*24) = 0.9, not Pearson's value
    assert M.spearman(preds, refs) == pytest.approx(90.0)


def test_stsb_spearman_ranks_ties_by_their_average():
    preds, refs = [0.5, 0.5, 2.0, 3.0, 1.0], [1.0, 2.0, 3.0, 5.0, 4.0]
    # scipy spearmanr = Pearson of the ranks, ties getting their mean rank: preds -> (1.5, 1.5, 4, 5, 3),
    # refs -> (1, 2, 3, 5, 4); deviations from 3: (-1.5,-1.5,1,2,0) and (-2,-1,0,2,1):
    # cov = 3 + 1.5 + 0 + 4 + 0 = 8.5, sums of squares 9.5 and 10 -> 8.5/sqrt(95) = 0.8720815993
    assert M.spearman(preds, refs) == pytest.approx(87.20815993)
    # near misses: the no-ties shortcut 1 - 6*sum(d^2)/(n(n^2-1)) = 1 - 6*2.5/120 = 0.875; ordinal ranks
    # (1,2,4,5,3) give 0.9
    assert M.spearman(preds, refs) != pytest.approx(87.5)
    assert M.spearman(preds, refs) != pytest.approx(90.0)


# -- SuperGLUE CB: accuracy + macro-F1 ----------------------------------------------------------------------
# huggingface/evaluate metrics/super_glue/super_glue.py: cb -> f1_score(labels, preds, average="macro")
# (sklearn's default labels: every class in the references or the predictions). jiant's
# CommitmentBankEvaluationScheme (jiant/tasks/evaluate/core.py): mean of the binary F1 of classes 0, 1, 2.


def jiant_cb_f1(preds, refs, n_classes=3):
    return (
        sum(f1_score([r == c for r in refs], [p == c for p in preds]) for c in range(n_classes)) / n_classes
    )


def test_cb_macro_f1_counts_a_class_predicted_but_never_true():
    refs = [0, 0, 1, 1, 0, 1]  # no `neutral` (2) in these references
    preds = [0, 2, 1, 1, 1, 1]
    # class 0: tp 1 (at 0), fp 0, fn 2 (at 1, 4) -> 2/4 = 1/2
    # class 1: tp 3 (at 2, 3, 5), fp 1 (at 4), fn 0 -> 6/7
    # class 2: tp 0 (predicted at 1, never true) -> 0
    # macro over the 3 classes = (1/2 + 6/7 + 0)/3 = 19/42
    got = M.compute(["accuracy", "macro_f1"], preds, refs)  # configs/task/cb.yaml
    assert got["macro_f1"] == pytest.approx(1900 / 42)
    assert got["accuracy"] == pytest.approx(400 / 6)
    assert got["macro_f1"] == pytest.approx(100 * f1_score(refs, preds, average="macro"))  # super_glue.py
    assert got["macro_f1"] == pytest.approx(100 * jiant_cb_f1(preds, refs))
    # near miss: averaging over the references' classes only, (1/2 + 6/7)/2 = 19/28
    assert got["macro_f1"] != pytest.approx(1900 / 28)


def test_cb_macro_f1_is_not_weighted_or_micro():
    refs = [0, 0, 0, 0, 1, 1, 2, 2]
    preds = [0, 0, 0, 1, 1, 2, 2, 0]
    # class 0: tp 3, fp 1 (at 7), fn 1 (at 3) -> 6/8 = 3/4
    # class 1: tp 1 (at 4), fp 1 (at 3), fn 1 (at 5) -> 2/4 = 1/2
    # class 2: tp 1 (at 6), fp 1 (at 5), fn 1 (at 7) -> 2/4 = 1/2
    # macro = (3/4 + 1/2 + 1/2)/3 = 7/12; weighted by support (4,2,2) = 5/8; micro = accuracy = 5/8
    assert M.macro_f1(preds, refs) == pytest.approx(700 / 12)
    assert M.macro_f1(preds, refs) == pytest.approx(100 * jiant_cb_f1(preds, refs))
    assert M.macro_f1(preds, refs) != pytest.approx(62.5)


# -- SuperGLUE MultiRC: F1a over all answer options + EM over questions -------------------------------------
# huggingface/evaluate metrics/super_glue/super_glue.py evaluate_multirc: question id "paragraph-question",
# em = mean over questions of [every option of the question right], f1_a = f1_score(labels, preds) over all
# options (binary). jiant's MultiRCEvaluationScheme: the same em (groupby question, all()) and f1.


def official_multirc(preds, refs, question_ids):
    by_q: dict = {}
    for p, r, q in zip(preds, refs, question_ids):
        by_q.setdefault(q, []).append((p, r))
    em = sum(all(p == r for p, r in pairs) for pairs in by_q.values()) / len(by_q)
    return {"em": 100 * em, "f1a": 100 * f1_score(refs, preds)}


def test_multirc_f1a_over_options_em_over_questions():
    # question "1-0" repeats question index 0 in another paragraph: a different question (multirc.yaml's
    # group is "{idx[paragraph]}-{idx[question]}"); the options of a question are interleaved with others'
    groups = ["0-0", "0-1", "0-0", "1-0", "0-1", "0-0", "1-0", "1-0"]
    refs = [1, 0, 0, 1, 1, 1, 1, 0]
    preds = [1, 0, 1, 1, 1, 1, 1, 1]
    # "0-0": options 0, 2, 5 -> wrong at 2; "0-1": options 1, 4 -> all right; "1-0": options 3, 6, 7 ->
    # wrong at 7. EM = 1/3 (per-option accuracy would be 6/8)
    # F1a over all 8 options: tp 5 (at 0, 3, 4, 5, 6), fp 2 (at 2, 7), fn 0 -> 10/12 = 5/6
    got = M.compute(["f1a", "em"], preds, refs, groups)  # configs/task/multirc.yaml
    assert got["em"] == pytest.approx(100 / 3)
    assert got["f1a"] == pytest.approx(500 / 6)
    official = official_multirc(preds, refs, groups)
    assert got["em"] == pytest.approx(official["em"])
    assert got["f1a"] == pytest.approx(official["f1a"])
    # near misses: per-option accuracy 75; questions keyed by the question index alone ("0-0" and "1-0"
    # merged: 0 of 2 right) -> 50
    assert got["em"] != pytest.approx(75.0)
    assert got["em"] != pytest.approx(50.0)
    # super_glue.py's f1_m (mean over questions of each question's macro F1): "0-0" (4/5 + 0)/2, "0-1" 1,
    # "1-0" (4/5 + 0)/2 -> (0.4 + 1 + 0.4)/3 = 0.6: not F1a
    assert got["f1a"] != pytest.approx(60.0)


# -- RAFT: macro-F1 -----------------------------------------------------------------------------------------
# oughtinc/raft-baselines src/raft_baselines/scripts/raft_train_experiment.py: f1_score(gold, predictions,
# labels=list(range(1, num_classes)), average="macro"), label 0 being "Unlabeled" (peftbench: 0-based).


def official_raft_f1(preds, refs, n_task_labels):
    gold, pred = [r + 1 for r in refs], [p + 1 for p in preds]  # the dataset's ids: 0 = Unlabeled
    return 100 * f1_score(gold, pred, labels=list(range(1, n_task_labels + 1)), average="macro")


def test_raft_macro_f1_over_every_class_seen():
    # raft_one_stop_english: advanced (0), elementary (1), intermediate (2); a fold without `intermediate`
    refs = [0, 0, 1, 1, 1, 0, 1, 0, 0, 1]
    preds = [0, 2, 1, 1, 0, 0, 1, 2, 0, 1]
    # class 0: tp 3 (at 0, 5, 8), fp 1 (at 4), fn 2 (at 1, 7) -> 6/9 = 2/3
    # class 1: tp 4 (at 2, 3, 6, 9), fp 0, fn 1 (at 4) -> 8/9
    # class 2: tp 0 (predicted at 1 and 7) -> 0;  macro = (2/3 + 8/9 + 0)/3 = 14/27
    got = M.compute(["accuracy", "macro_f1"], preds, refs)  # configs/task/_raft.yaml
    assert got["macro_f1"] == pytest.approx(1400 / 27)
    assert got["macro_f1"] == pytest.approx(official_raft_f1(preds, refs, 3))
    assert got["accuracy"] == pytest.approx(70.0)
    assert got["macro_f1"] != pytest.approx(100 * (2 / 3 + 8 / 9) / 2)  # the references' classes only


# -- SQuAD v1.1 (and MRQA, ReCoRD: the same normalisation and max over gold answers) ------------------------
# rajpurkar/SQuAD-explorer evaluate-v1.1.py, reproduced: normalize_answer, f1_score, exact_match_score,
# metric_max_over_ground_truths, then 100 * mean over questions.


def official_normalize(s: str) -> str:
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def official_f1(prediction: str, ground_truth: str) -> float:
    pred, gold = official_normalize(prediction).split(), official_normalize(ground_truth).split()
    num_same = sum((Counter(pred) & Counter(gold)).values())
    if num_same == 0:
        return 0
    precision, recall = num_same / len(pred), num_same / len(gold)
    return 2 * precision * recall / (precision + recall)


def official_squad(hyps, refs):
    f1 = sum(max(official_f1(h, g) for g in gs) for h, gs in zip(hyps, refs))
    em = sum(max(official_normalize(h) == official_normalize(g) for g in gs) for h, gs in zip(hyps, refs))
    return {"f1": 100 * f1 / len(hyps), "em": 100 * em / len(hyps)}


SQUAD_HYPS = [
    "The Eiffel Tower!",  # -> "eiffel tower" = gold: EM 1, F1 1 (unnormalised: EM 0)
    "an apple a day",  # -> "apple day" = the first gold: EM 1, F1 1
    "in 1990 and 1991",  # 4 tokens; gold "1990": F1 2(1/4)(1)/(5/4) = 0.4; gold "in 1991": P 1/2 R 1 -> 2/3
    "the the cat cat cat",  # -> "cat cat cat" vs "cat": 1 shared (multiset), P 1/3 R 1 -> F1 1/2
    "dog",  # nothing shared: 0
    "well-known",  # punctuation deleted, not spaced: "wellknown" vs "well known": EM 0, F1 0
    "U.S.A.",  # -> "usa" = "usa": EM 1, F1 1
    "Theatre",  # "the" only as a word: "theatre" vs "theatre of absurd": P 1, R 1/3 -> F1 1/2
]
SQUAD_REFS = [
    ["eiffel tower"],
    ["apple day", "An apple a day keeps"],
    ["1990", "in 1991"],
    ["cat"],
    ["cat"],
    ["well known"],
    ["USA"],
    ["theatre of the absurd"],
]
# F1 = (1 + 1 + 2/3 + 1/2 + 0 + 0 + 1 + 1/2)/8 = (14/3)/8 = 7/12; EM = 3/8
SQUAD_F1, SQUAD_EM = 700 / 12, 37.5


def test_squad_f1_em_literal_and_official():
    got = squad(SQUAD_HYPS, SQUAD_REFS)
    assert got["f1"] == pytest.approx(SQUAD_F1)
    assert got["em"] == pytest.approx(SQUAD_EM)
    official = official_squad(SQUAD_HYPS, SQUAD_REFS)
    assert got == pytest.approx(official)
    # near miss: the first gold answer only -> question 3 gives 0.4: F1 (1+1+0.4+0.5+0+0+1+0.5)/8 = 55
    assert got["f1"] != pytest.approx(55.0)
    # the registry path a QA task's evaluation takes (configs/task/_qa.yaml: scorer squad, metrics f1, em)
    assert M.compute(["f1", "em"], SQUAD_HYPS, SQUAD_REFS, scorer="squad") == pytest.approx(got)


@pytest.mark.parametrize(
    "text",
    [
        "  The  Cat\tsat\n",
        "A banana, an ANT; the end.",
        "Anna's theory",
        "“curly” quotes — dash",
        "a-an-the",
        "The",
    ],
)
def test_normalize_answer_is_squads(text):
    # non-ASCII punctuation stays (string.punctuation is ASCII); "a-an-the" -> "aanthe" (one word, kept)
    assert normalize_answer(text) == official_normalize(text)


def test_squad_expected_normalisations():
    assert normalize_answer("A banana, an ANT; the end.") == "banana ant end"
    assert normalize_answer("“curly” quotes — dash") == "“curly” quotes — dash"
    assert normalize_answer("a-an-the") == "aanthe"


# -- coverage: every metric the GLUE / SuperGLUE / RAFT / SQuAD task configs name is tested above ----------

COVERED = {"accuracy", "f1", "mcc", "pearson", "spearman", "macro_f1", "f1a", "em"}


def _task_metrics(name: str) -> tuple[str | None, list[str], str | None]:
    cfg = yaml.safe_load((TASKS / f"{name}.yaml").read_text())
    parents = [d for d in cfg.get("defaults", []) if d != "_self_"]
    bench, metrics, scorer = None, None, None
    for parent in parents:
        bench, metrics, scorer = _task_metrics(parent)
    return cfg.get("benchmark", bench), cfg.get("metrics", metrics), cfg.get("scorer", scorer)


def test_every_classification_and_qa_metric_is_covered():
    seen = set()
    for path in sorted(TASKS.glob("*.yaml")):
        if path.stem.startswith("_"):
            continue
        bench, metrics, scorer = _task_metrics(path.stem)
        if bench in ("glue", "superglue", "raft") or scorer == "squad":
            seen |= set(metrics)
    assert {"mcc", "pearson", "spearman", "macro_f1", "f1a", "em", "f1", "accuracy"} <= seen
    assert seen <= COVERED, f"metrics without an official-definition test: {seen - COVERED}"
