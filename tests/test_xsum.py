"""XSum: the BART / Prefix-Tuning file format (<split>.source / <split>.target), ROUGE-1/2/L via rouge-score,
training on a tiny BART with prefix tuning and full fine-tuning, `peftbench score`, and the preset's layout."""

import json
import random

import pytest

from peftbench.cli import main
from peftbench.metrics.nlg import score
from peftbench.run import execute

WORDS = "the council said new homes would be built near the river after a vote on monday".split()


def write_fixture(root, n_train=48, n_val=8):
    """Documents and summaries in the official one-per-line files; every summary is the document's first
    six words, so a model can learn it from 48 examples."""
    rng = random.Random(0)
    folder = root / "xsum"
    folder.mkdir(parents=True)
    for split, n in (("train", n_train), ("val", n_val), ("test", n_val)):
        docs = [" ".join(rng.choices(WORDS, k=30)) for _ in range(n)]
        (folder / f"{split}.source").write_text("".join(d + "\n" for d in docs))
        (folder / f"{split}.target").write_text("".join(" ".join(d.split()[:6]) + "\n" for d in docs))
    return folder


def test_rouge_on_known_inputs():
    out = score(
        "rouge",
        ["the cat sat on the mat", "police arrested two men"],
        [["a cat was sitting on the mat"], ["two men were arrested by police", "police held two"]],
    )
    # by hand, Porter stems, F1 = 2PR / (P + R), each metric's best reference:
    # 1: the/cat/on/mat match 4 of 6 hyp, 4 of 7 ref tokens: 0.6154; bigrams "on the", "the mat": 2/5, 2/6;
    #    LCS "cat on the mat" = 4: as unigrams
    # 2: ref a: 4/4, 4/6 -> R-1 0.8; bigram "two men": 1/3, 1/5 -> 0.25; LCS 2 -> 0.4; ref b "polic held two":
    #    R-1 2/4, 2/3 -> 0.5714, no bigram, LCS "polic two" -> 0.5714 (R-L takes ref b)
    first = {"rouge_1": 61.53846, "rouge_2": 36.36364, "rouge_l": 61.53846}
    second = {"rouge_1": 80.0, "rouge_2": 25.0, "rouge_l": 57.14286}
    for key in first:
        assert out.values[key] == pytest.approx((first[key] + second[key]) / 2, abs=1e-4)


def test_xsum_loads_its_files_and_says_what_to_download(compose, tmp_path, monkeypatch):
    from peftbench.errors import UserError
    from peftbench.tasks import load_task

    monkeypatch.setenv("PEFTBENCH_DATA_DIR", str(tmp_path))
    with pytest.raises(UserError, match=r"put them in \$PEFTBENCH_DATA_DIR/xsum/"):
        load_task(compose("task=xsum").task, seed=0)
    write_fixture(tmp_path)
    task = load_task(compose("task=xsum").task, seed=0)
    assert (len(task.train), len(task.validation)) == (48, 8)
    assert task.validation[0]["references"] == [" ".join(task.validation[0]["source"].split()[:6])]
    assert task.sources["train"].endswith("xsum/train.source")


@pytest.mark.parametrize("method,lr", [("full", 3e-3), ("prefix_tuning", 1e-2)])
def test_tiny_bart_learns_the_summaries(compose, tmp_path, monkeypatch, method, lr):
    monkeypatch.setenv("PEFTBENCH_DATA_DIR", str(tmp_path))
    write_fixture(tmp_path)
    common = [
        "task=xsum",
        "model=tiny-bart",
        f"method={method}",
        "train.batch_size=8",
        "train.progress=false",
    ]
    common += ["task.decode.num_beams=1", "task.decode.max_new_tokens=10", "task.max_length=64"]
    before = execute(compose(*common, "train.max_steps=0", "name=untrained"))
    after = execute(compose(*common, f"train.lr={lr}", "train.max_steps=60", "train.eval_every=60"))
    assert set(after["best"]["metrics"]) == {"rouge_1", "rouge_2", "rouge_l"}
    if method == "full":  # learns the task from scratch
        assert after["train"]["loss_last"] < 0.8 * after["train"]["loss_first"]
        assert after["best"]["metrics"]["rouge_1"] > before["best"]["metrics"]["rouge_1"] + 5
    else:  # steers a frozen *random* BART: the loss moves, the summaries barely (see offline_nlg in README)
        assert after["train"]["loss_last"] < after["train"]["loss_first"] - 0.1
    lines = open(after["evals"][-1]["predictions"]).read().splitlines()
    assert len(lines) == 8
    # the same outputs scored from the file, as for a system trained elsewhere
    out = tmp_path / "scores.json"
    assert (
        main(
            [
                "score",
                "task=xsum",
                f"predictions={after['evals'][-1]['predictions']}",
                "split=validation",
                f"out={out}",
            ]
        )
        == 0
    )
    scored = json.loads(out.read_text())["scores"]["all"]["rouge_2"]
    assert scored == pytest.approx(after["best"]["metrics"]["rouge_2"], abs=1e-4)  # the record rounds to 4


def test_prefix_xsum_preset_composes_and_prints_its_layout(capsys):
    from peftbench.config import compose
    from peftbench.experiment import expand, load_preset

    preset = load_preset("prefix_xsum")
    points = expand(preset)
    cfgs = [compose(list(p.overrides)) for p in points]
    prefix = [c for c in cfgs if c.method.name == "prefix_tuning" and not c.task.get("n_shot")][0]
    assert (prefix.method.length, prefix.method.mid_dim, prefix.model.name) == (200, 800, "bart-large")
    assert {c.task.get("n_shot") for c in cfgs} >= {50, 100, 200, 500}
    assert main(["table", "prefix_xsum"]) == 0
    text = capsys.readouterr().out
    assert "XSum R-2" in text and "missing" in text
