"""Metric values on inputs small enough to check by hand."""

import math

import pytest

from peftbench import metrics as M


def test_accuracy_and_binary_f1():
    preds, refs = [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]
    assert M.accuracy(preds, refs) == pytest.approx(60.0)
    # tp=2 fp=1 fn=1 -> P=R=2/3 -> F1=2/3
    assert M.f1(preds, refs) == pytest.approx(200 / 3)


def test_mcc_by_formula():
    preds, refs = [1, 1, 0, 0, 1, 0], [1, 0, 0, 1, 1, 0]
    tp, tn, fp, fn = 2, 2, 1, 1
    expected = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert M.mcc(preds, refs) == pytest.approx(100 * expected)


def test_macro_f1_cb_three_classes():
    refs = [0, 0, 1, 1, 2, 2]
    preds = [0, 1, 1, 1, 2, 0]
    # class 0: P=1/2 R=1/2 F=1/2; class 1: P=2/3 R=1 F=0.8; class 2: P=1 R=1/2 F=2/3
    assert M.macro_f1(preds, refs) == pytest.approx(100 * (0.5 + 0.8 + 2 / 3) / 3)


def test_pearson_spearman():
    refs = [0.0, 1.0, 2.0, 3.0]
    assert M.pearson([0.0, 2.0, 4.0, 6.0], refs) == pytest.approx(100.0)
    assert M.spearman([0.0, 1.0, 8.0, 27.0], refs) == pytest.approx(100.0)
    assert M.pearson([3.0, 2.0, 1.0, 0.0], refs) == pytest.approx(-100.0)
    assert M.pearson([1.0, 1.0, 1.0, 1.0], refs) == 0.0  # constant output: no correlation, not nan


def test_multirc_em_needs_every_answer_of_a_question_right():
    groups = ["q1", "q1", "q1", "q2", "q2", "q3"]
    refs = [1, 0, 1, 0, 0, 1]
    preds = [1, 0, 0, 0, 0, 1]  # q1 has one wrong option
    assert M.exact_match_groups(preds, refs, groups) == pytest.approx(200 / 3)
    assert M.compute(["f1a", "em"], preds, refs, groups)["em"] == pytest.approx(200 / 3)


def test_registry_knows_direction_and_rejects_unknown():
    assert all(M.higher_is_better(n) for n in ("accuracy", "f1", "mcc", "pearson", "em"))
    with pytest.raises(Exception, match="did you mean 'accuracy'"):
        M.get_metric("acuracy")


def test_bleu_breakdown_script_parts_on_known_outputs(tmp_path):
    """scripts/bleu_breakdown.py (the README's precision / brevity-penalty figures): outputs equal to a
    reference score 100 with no penalty; outputs 8 of 10 words long with every n-gram right lose only the
    brevity penalty exp(1 - 10/8)."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / "bleu_breakdown.py"
    spec = importlib.util.spec_from_file_location("bleu_breakdown", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ref = "a b c d e f g h i j"
    exact = mod.breakdown([{"prediction": ref, "references": [ref, "x y z"]}])
    assert exact["bleu"] == 100.0 and exact["bp"] == 1.0 and exact["precisions"] == [100.0] * 4
    short = mod.breakdown([{"prediction": "a b c d e f g h", "references": [ref]}])
    assert short["precisions"] == [100.0] * 4 and (short["sys_len"], short["ref_len"]) == (8, 10)
    assert short["bp"] == pytest.approx(math.exp(1 - 10 / 8), abs=1e-3)
    assert short["bleu"] == pytest.approx(100 * math.exp(-0.25), abs=0.01)
    f = tmp_path / "eval_1.jsonl"
    f.write_text(json.dumps({"prediction": "a b c d e f g h", "references": [ref]}) + "\n")
    assert mod.main(["--files", str(f)]) == 0
