"""Metric registry: name -> (function of predictions and references, higher-is-better).

Classification metrics follow the GLUE / SuperGLUE official definitions (scores on a 0-100 scale, as the
papers report them). Generation metrics (BLEU, NIST, METEOR, ROUGE-L, CIDEr, TER, ...) are those of the
official data-to-text scorers (peftbench/metrics/nlg.py); their references are lists, one per input, and
`scorer` names the task's official evaluation; extractive QA's F1 / EM are SQuAD's (peftbench/metrics/qa.py).
Adding a metric = one function + one entry in METRICS.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import f1_score, matthews_corrcoef

from peftbench.errors import choice_error


@dataclass(frozen=True)
class Metric:
    fn: Callable[..., float]
    higher_is_better: bool = True


def accuracy(preds: Sequence, refs: Sequence, groups: Sequence | None = None) -> float:
    return 100.0 * float(np.mean(np.asarray(preds) == np.asarray(refs)))


def f1(preds: Sequence, refs: Sequence, groups: Sequence | None = None) -> float:
    """Binary F1 of the positive class (label 1): MRPC, QQP; MultiRC's F1a over all answer options."""
    return 100.0 * float(f1_score(refs, preds, average="binary", pos_label=1, zero_division=0))


def macro_f1(preds: Sequence, refs: Sequence, groups: Sequence | None = None) -> float:
    """Unweighted mean of per-class F1 over every class in the references OR the predictions (CB, RAFT):
    huggingface datasets / evaluate `super_glue.py` (cb: sklearn f1_score average="macro", default labels).
    A class predicted but never true counts, with F1 0 (averaging over the references' classes only would
    drop it and inflate the score). jiant's CB and RAFT's scorer average over the task's whole label set,
    which gives the same number unless a class is in neither the references nor the predictions."""
    return 100.0 * float(f1_score(refs, preds, average="macro", zero_division=0))


def mcc(preds: Sequence, refs: Sequence, groups: Sequence | None = None) -> float:
    return 100.0 * float(matthews_corrcoef(refs, preds))


def pearson(preds: Sequence, refs: Sequence, groups: Sequence | None = None) -> float:
    if np.std(preds) == 0:  # a constant prediction has no correlation (scipy would warn and give nan)
        return 0.0
    return 100.0 * float(pearsonr(preds, refs)[0])


def spearman(preds: Sequence, refs: Sequence, groups: Sequence | None = None) -> float:
    if np.std(preds) == 0:
        return 0.0
    return 100.0 * float(spearmanr(preds, refs)[0])


def exact_match_groups(preds: Sequence, refs: Sequence, groups: Sequence | None = None) -> float:
    """MultiRC EM: a question counts only if every one of its answer options is labelled right."""
    if groups is None:
        raise ValueError("exact_match_groups needs the group (question id) of every prediction")
    right: dict = defaultdict(lambda: True)
    for p, r, g in zip(preds, refs, groups):
        right[g] = right[g] and p == r
    return 100.0 * float(np.mean(list(right.values())))


def generation(name: str) -> Callable[..., float | None]:
    """One metric of a task's official generation evaluation (None: unavailable, see metrics.nlg.score)."""

    def fn(preds: Sequence[str], refs: Sequence[Sequence[str]], groups=None, scorer: str = "e2e"):
        from peftbench.metrics.nlg import score

        return score(scorer, preds, refs).values.get(name)

    return fn


METRICS: dict[str, Metric] = {
    "accuracy": Metric(accuracy),
    "f1": Metric(f1),
    "macro_f1": Metric(macro_f1),
    "mcc": Metric(mcc),
    "pearson": Metric(pearson),
    "spearman": Metric(spearman),
    "f1a": Metric(f1),
    "em": Metric(exact_match_groups),
    **{
        n: Metric(generation(n))
        for n in (
            "bleu",
            "nist",
            "meteor",
            "rouge_1",
            "rouge_2",
            "rouge_l",
            "cider",
            "bertscore",
            "bleurt",
            "moverscore",
        )
    },
    "ter": Metric(generation("ter"), higher_is_better=False),
}


def get_metric(name: str) -> Metric:
    if name not in METRICS:
        raise choice_error("metric", name, METRICS)
    return METRICS[name]


def compute(
    names: Sequence[str],
    preds: Sequence,
    refs: Sequence,
    groups: Sequence | None = None,
    scorer: str | None = None,
) -> dict:
    """Every metric in `names`; with `scorer` (a generation task's), one pass of its official evaluation."""
    if scorer is not None:
        from peftbench.metrics.nlg import score

        for name in names:
            get_metric(name)  # an unknown name fails with the valid ones
        values = score(scorer, preds, refs).values
        return {name: values.get(name) for name in names}
    return {name: get_metric(name).fn(preds, refs, groups) for name in names}


CATEGORIES = ("_seen", "_unseen")  # WebNLG's test categories: `bleu_seen` is BLEU on the seen ones


def higher_is_better(name: str) -> bool:
    """A metric or a copy of it named `<metric>_<part>` (WebNLG's `bleu_seen`, QA transfer's `f1_bioasq`)."""
    base = name
    while base not in METRICS and "_" in base:
        base = base.rsplit("_", 1)[0]
    return get_metric(base if base in METRICS else name).higher_is_better


def produced(task_cfg) -> set[str]:
    """The metric names a task's evaluation puts in a record: its metrics, a generation task's whole
    official suite (model-based ones may be recorded unavailable), WebNLG's per-category copies on test."""
    names = set(task_cfg.metrics)
    scorer = task_cfg.get("scorer")
    if scorer:
        from peftbench.metrics.nlg import SUITES

        names |= set(SUITES[scorer])
        if scorer == "webnlg" and task_cfg.get("eval_split") == "test":
            names |= {n + c for n in SUITES[scorer] for c in CATEGORIES}
        for name in task_cfg.get("transfer") or []:  # QA: scored zero-shot on other sets after training
            names |= {f"{n}_{name}" for n in SUITES[scorer]}
    return names
