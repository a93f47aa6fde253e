"""Extractive QA metrics: F1 and exact match of the SQuAD v1.1 / MRQA official evaluation scripts."""

from __future__ import annotations

import re
from collections import Counter


def normalize_answer(s: str) -> str:
    """SQuAD v1.1's `evaluate-v1.1.py` (and MRQA's `mrqa_official_eval.py`): lower case, drop punctuation,
    the articles a / an / the, and extra white space."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", s).split())


_PUNCT = frozenset("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")  # string.punctuation


def answer_f1(prediction: str, gold: str) -> float:
    return _token_f1(normalize_answer(prediction).split(), normalize_answer(gold).split())


def _token_f1(pred: list[str], ref: list[str]) -> float:
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def squad(hyps: list[str], refs: list[list[str]]) -> dict[str, float]:
    """F1 and exact match x 100 as the SQuAD v1.1 / MRQA scripts: each question's best gold answer,
    averaged over the questions (every answer normalised once)."""
    f1 = em = 0.0
    for h, gs in zip(hyps, refs):
        pred, golds = normalize_answer(h), [normalize_answer(g) for g in gs]
        f1 += max(_token_f1(pred.split(), g.split()) for g in golds)
        em += max(float(pred == g) for g in golds)
    n = max(len(hyps), 1)
    return {"f1": 100.0 * f1 / n, "em": 100.0 * em / n}
