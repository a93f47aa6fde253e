"""Reading-comprehension QA (SQuAD, MRQA transfer sets): the official file formats, the SQuAD / MRQA
evaluation script's F1 and EM, the span-extraction head (windows, labels, best span), T5 text-to-text
training (model tuning and prompt tuning, whose prompt reaches generate()), zero-shot transfer evaluation,
and the prompt_tuning_domain table."""

import gzip
import json
import os
import random
import subprocess
import sys

import pytest
import torch
from conftest import overfit

from peftbench import experiment
from peftbench.cli import main
from peftbench.errors import UserError
from peftbench.formats.span import best_answers, encode_spans
from peftbench.methods.prompt import prompted_inputs
from peftbench.metrics.nlg import score
from peftbench.metrics.qa import answer_f1
from peftbench.report import presets
from peftbench.run import execute
from peftbench.setup import prepare
from peftbench.tasks import load_task
from peftbench.tasks.qa import _from_hub

COLOURS = "red blue green amber violet silver golden crimson".split()
TOPICS = "tower bridge castle harbor museum garden library station".split()
FILLER = "the city council met on monday and a report said new homes would be built near the river".split()


def qa_items(rng, n):
    """Contexts of filler words around one fact `the <topic> is <colour> .`; the question asks for the
    colour, one colour per topic (so a generator can learn it without copying)."""
    out = []
    for i in range(n):
        topic = rng.choice(TOPICS)
        colour = COLOURS[TOPICS.index(topic)]
        words = rng.choices(FILLER, k=rng.randint(8, 20))
        at = rng.randint(0, len(words))
        fact = f"the {topic} is {colour} ."
        context = " ".join(x for x in (" ".join(words[:at]), fact, " ".join(words[at:])) if x)
        start = context.index(fact) + len(f"the {topic} is ")
        out.append({"id": f"q{i}", "question": f"what colour is the {topic}?", "context": context,
                    "answer": colour, "start": start})  # fmt: skip
    return out


def write_squad(path, items, unanswerable=0):
    """SQuAD's official JSON (two annotators each); `unanswerable` more questions without answers (2.0)."""
    qas = lambda it: {  # noqa: E731
        "id": it["id"],
        "question": it["question"],
        "answers": [{"text": it["answer"], "answer_start": it["start"]}] * 2,
    }
    paras = [{"context": it["context"], "qas": [qas(it)]} for it in items]
    paras[0]["qas"] += [{"id": f"u{i}", "question": "why?", "answers": []} for i in range(unanswerable)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"version": "1.1", "data": [{"title": "fixture", "paragraphs": paras}]}))


def write_mrqa(path, items, name):
    """MRQA's gzipped JSON lines: a header, then a context per line with its questions."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(json.dumps({"header": {"dataset": name, "split": "dev"}}) + "\n")
        for it in items:
            span = [it["start"], it["start"] + len(it["answer"]) - 1]  # MRQA's spans are inclusive
            detected = [{"text": it["answer"], "char_spans": [span], "token_spans": [[0, 0]]}]
            qa = {"qid": it["id"], "question": it["question"], "answers": [it["answer"]],
                  "detected_answers": detected}  # fmt: skip
            f.write(json.dumps({"id": it["id"], "context": it["context"], "qas": [qa]}) + "\n")


def write_fixture(root, n_train=64, n_dev=16):
    rng = random.Random(0)
    write_squad(root / "squad" / "train-v1.1.json", qa_items(rng, n_train))
    write_squad(root / "squad" / "dev-v1.1.json", qa_items(rng, n_dev), unanswerable=2)
    for name in ("TextbookQA", "BioASQ"):
        write_mrqa(root / "mrqa" / f"{name}.jsonl.gz", qa_items(rng, 8), name)


@pytest.fixture
def data(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTBENCH_DATA_DIR", str(tmp_path / "data"))
    write_fixture(tmp_path / "data")
    return tmp_path / "data"


def test_f1_and_em_equal_the_official_squad_and_mrqa_scripts():
    """Values printed by SQuAD's evaluate-v1.1.py and MRQA's mrqa_official_eval.py (both give the same) on
    these six questions: {"exact_match": 33.333333333333336, "f1": 65.97222222222221}."""
    golds = [
        ["Denver Broncos", "Denver Broncos"],
        ["Santa Clara, California", "Levi's Stadium", "Levi's Stadium in the San Francisco Bay Area at Santa Clara, California."],
        ["the Eiffel Tower"],
        ["1,500", "about 1500"],
        ["an apple a day"],
        ["Paris", "France"],
    ]  # fmt: skip
    preds = ["Denver Broncos", "Levi's Stadium in Santa Clara", "Eiffel tower!", "1500 people", "banana", "Paris, France"]  # fmt: skip
    out = score("squad", preds, golds).values
    assert out["f1"] == pytest.approx(65.97222222222221, abs=1e-9)
    assert out["em"] == pytest.approx(33.333333333333336, abs=1e-9)
    # per question, as the scripts' f1_score: q2 against its best gold 0.625, q4 "1,500" -> "1500": 2/3
    assert [round(answer_f1(preds[1], g), 6) for g in golds[1]] == [0.5, 0.571429, 0.625]
    assert answer_f1(preds[3], golds[3][0]) == pytest.approx(2 / 3)


def test_squad_and_mrqa_files_load_and_a_missing_copy_says_what_to_download(compose, tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTBENCH_DATA_DIR", str(tmp_path / "empty"))
    with pytest.raises(UserError, match=r"dev-v1.1.json .*put them in \$PEFTBENCH_DATA_DIR/squad/"):
        load_task(compose("task=squad").task, seed=0)
    monkeypatch.setenv("PEFTBENCH_DATA_DIR", str(tmp_path / "data"))
    write_fixture(tmp_path / "data")
    with pytest.raises(UserError, match=r"RACE.jsonl.gz.*\$PEFTBENCH_DATA_DIR/mrqa/"):
        load_task(compose("task=squad", "task.transfer=[race]").task, seed=0)
    with pytest.raises(UserError, match="choose from: bioasq, drop, duorc, race, re, textbookqa"):
        load_task(compose("task=squad", "task.transfer=[quac]").task, seed=0)
    task = load_task(compose("task=squad", "task.transfer=[textbookqa,bioasq]").task, seed=0)
    # 16 dev questions: the 2 unanswerable ones (SQuAD 2.0 style) are left out
    assert (len(task.train), len(task.validation)) == (64, 16)
    assert {k: len(v) for k, v in task.transfer.items()} == {"textbookqa": 8, "bioasq": 8}
    assert task.sources["transfer_bioasq"].endswith("mrqa/BioASQ.jsonl.gz")
    for row in task.train + task.validation + task.transfer["bioasq"]:
        ans, start = row["references"][0], row["answer_starts"][0]
        assert row["context"][start : start + len(ans)] == ans
        assert row["source"] == f"question: {row['question']} context: {row['context']}"
        assert row["target"] == ans
    # the hub's schemas map onto the same rows
    squad_hub = {
        "id": "a",
        "question": " q?",
        "context": "x yz",
        "answers": {"text": ["yz"], "answer_start": [2]},
    }
    mrqa_hub = {"qid": "b", "question": "q?", "context": "x yz", "answers": ["yz"], "subset": "BioASQ",
                "detected_answers": {"text": ["yz"], "char_spans": [{"start": [2], "end": [3]}]}}  # fmt: skip
    assert _from_hub(squad_hub)["answer_starts"] == [2] and _from_hub(squad_hub)["question"] == "q?"
    assert _from_hub(mrqa_hub)["answer_starts"] == [2] and _from_hub(mrqa_hub)["references"] == ["yz"]


@pytest.mark.parametrize(
    "stride,message",
    [
        ("-1", "task.doc_stride=-1: must be an integer >= 0"),
        ("12", "task.doc_stride=12 must be >= 0 and below half"),
    ],
)
def test_doc_stride_outside_half_a_window_is_one_line_at_validation(compose, stride, message):
    from peftbench.validate import validate

    cfg = compose("task=squad", "model=tiny-bert", "task.max_length=24", f"task.doc_stride={stride}")
    with pytest.raises(UserError, match=message):
        validate(cfg)
    assert (
        validate(compose("task=squad", "model=tiny-bert", "task.max_length=24", "task.doc_stride=11")) is None
    )


def test_span_windows_label_the_answer_and_the_best_span_recovers_it(compose, data):
    """Short windows (24 tokens, stride 8) cut each context into several; a window holding the whole answer
    labels its tokens, the others [CLS]; logits peaked on the labels give back every answer's text."""
    cfg = compose("task=squad", "model=tiny-bert", "task.max_length=24", "task.doc_stride=8")
    setup = prepare(cfg, {})
    rows = setup.task.validation
    features = encode_spans(rows, cfg.task, setup.fmt.tokenizer)
    assert len(features) > 1.5 * len(rows)  # windows
    tok = setup.fmt.tokenizer
    by_idx = {r["idx"]: r for r in rows}
    labelled = set()
    for f in features:
        start, end = f["labels"]
        if (start, end) == (0, 0):
            continue
        labelled.add(f["idx"])
        assert tok.decode(f["input_ids"][start : end + 1]) == by_idx[f["idx"]]["references"][0]
        assert f["offsets"][start] is not None and f["offsets"][end] is not None
    assert labelled == set(by_idx)  # every question has a window with its answer
    logits = []
    for f in features:
        lg = torch.full((24, 2), -5.0)
        if f["labels"] != [0, 0]:
            lg[f["labels"][0], 0] = lg[f["labels"][1], 1] = 5.0
        logits.append(lg)
    answers = best_answers(features, logits, {i: r["context"] for i, r in by_idx.items()}, cfg.task)
    assert answers == {i: r["references"][0] for i, r in by_idx.items()}


def test_span_head_learns_the_fixture_and_scores_the_transfer_sets(compose, data, capsys):
    """Tiny RoBERTa (real BPE offsets) with a span head: the loss falls, dev F1 rises from the untrained
    model's to over 90, the transfer sets are scored with the best weights, and `peftbench score` on the saved
    predictions gives the record's F1."""
    common = ["task=squad", "model=tiny-roberta", "method=full", "task.transfer=[textbookqa,bioasq]",
              "task.max_length=64", "task.doc_stride=16", "train.batch_size=16", "train.progress=false"]  # fmt: skip
    before = execute(compose(*common, "train.max_steps=0", "name=untrained"))
    after = execute(compose(*common, "train.lr=3e-3", "train.max_steps=40", "train.eval_every=20"))
    assert after["train"]["loss_last"] < 0.5 * after["train"]["loss_first"]
    best = after["best"]["metrics"]
    assert best["f1"] > 90 and best["f1"] > before["best"]["metrics"]["f1"] + 40
    assert {"f1_textbookqa", "em_textbookqa", "f1_bioasq", "em_bioasq"} <= set(best)
    assert best["f1_bioasq"] > 80 and after["transfer"]["bioasq"]["n_eval"] == 8
    assert after["params"]["head"] == 2 * 32 + 2  # qa_outputs: hidden 32 -> start, end
    pred = after["best"]["predictions"]
    assert len(open(pred).read().splitlines()) == 16
    capsys.readouterr()
    assert main(["score", "task=squad", "split=validation", f"predictions={pred}"]) == 0
    assert f"f1={best['f1']:.4f}" in capsys.readouterr().out


def test_t5_text_to_text_learns_and_the_prompt_reaches_generate(compose, data):
    """Model tuning: tiny T5 generates answers better than untrained. Prompt tuning: only the prompt trains,
    the loss falls, and generate() decodes with the prompt: its greedy tokens equal a step-by-step greedy
    decoding through the training forward pass (which prepends the prompt)."""
    common = ["task=squad", "model=tiny-t5", "task.transfer=[textbookqa]", "task.max_length=256",
              "train.batch_size=16", "train.progress=false"]  # fmt: skip
    before = execute(compose(*common, "method=full", "train.max_steps=0", "name=untrained"))
    after = execute(
        compose(*common, "method=full", "train.lr=3e-3", "train.max_steps=120", "train.eval_every=120")
    )
    assert after["best"]["metrics"]["f1"] > before["best"]["metrics"]["f1"] + 10
    assert "f1_textbookqa" in after["best"]["metrics"]

    cfg = compose(*common, "method=prompt_tuning", "method.init=sampled_vocab", "method.length=5")
    setup = prepare(cfg, {})
    trainable = {n for n, p in setup.model.named_parameters() if p.requires_grad}
    assert trainable == {"prompt_encoder.embedding"}
    losses = overfit(setup, lr=0.3, steps=30)
    assert losses[-1] < losses[0] - 0.1  # a prompt steers a frozen *random* T5: the loss moves, slowly
    model, batch = setup.model.eval(), next(iter(setup.eval_loader))
    ids, mask = batch["input_ids"][:2], batch["attention_mask"][:2]
    with torch.no_grad():
        gen = model.generate(**prompted_inputs(model, ids, mask), max_new_tokens=6, min_new_tokens=6,
                             do_sample=False, num_beams=1, output_scores=True, return_dict_in_generate=True)  # fmt: skip
        dec = torch.full((2, 1), model.config.decoder_start_token_id)
        for step in range(6):  # the training forward: the hook prepends the prompt to the encoder input
            logits = model(ids, attention_mask=mask, decoder_input_ids=dec).logits[:, -1]
            logits[:, model.config.eos_token_id] = -float("inf")  # as min_new_tokens does
            assert torch.allclose(gen.scores[step], logits, atol=1e-4)
            dec = torch.cat([dec, logits.argmax(-1, keepdim=True)], dim=1)
        assert torch.equal(gen.sequences, dec)
        # the batcher decodes through the same path; without the prompt the model scores differently
        setup.model.prompt_encoder.embedding.data.zero_()
        plain = model(ids, attention_mask=mask, decoder_input_ids=dec[:, :1]).logits[:, -1]
        assert not torch.allclose(plain, gen.scores[0], atol=1e-3)


SPAN_OWN = {"lora": ("lora_",), "bitfit": ("bias",), "prompt_tuning": ("prompt_encoder.",), "adapter_houlsby": (".adapter.", "LayerNorm")}  # fmt: skip


@pytest.mark.parametrize("method", list(SPAN_OWN))
def test_span_head_method_matrix(compose, data, method):
    """Methods on a span head (tiny BERT): the loss falls, gradients reach only the method's parameters and
    the new qa_outputs head, the base stays bit-identical."""
    extra = ["method.init=sampled_vocab"] if method == "prompt_tuning" else []
    cfg = compose(
        "task=squad",
        "model=tiny-bert",
        f"method={method}",
        "task.max_length=64",
        "task.doc_stride=16",
        *extra,
    )
    setup = prepare(cfg, {})
    m = setup.model
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    own = {n for n in trainable if not n.startswith(("qa_outputs", "base_model.model.qa_outputs"))}
    assert own and all(any(k in n for k in SPAN_OWN[method]) for n in own), sorted(own)[:5]
    assert any("qa_outputs" in n for n in trainable)
    grads: set[str] = set()
    losses = overfit(setup, lr=1e-2, steps=20, first_grads=grads)
    assert grads <= trainable and grads & own
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, before[n]) for n, p in m.named_parameters() if n not in trainable)


def test_prompt_tuning_domain_table_layout_and_delta():
    preset = experiment.load_preset("prompt_tuning_domain")
    empty = presets.table(preset, [])
    assert [line["dataset"] for line in empty] == [
        "SQuAD",
        "TextbookQA",
        "BioASQ",
        "RACE",
        "RE",
        "DuoRC",
        "DROP",
    ]
    assert empty[1]["Model tuning"] == "missing [paper 54.3 ± 3.7]"
    assert empty[1]["Prompt tuning"] == "missing [paper 66.8 ± 2.9]"
    assert empty[1]["Δ"] == "missing [paper +12.5]"

    def rec(row, seed, f1, tb):
        return {"row": row, "task": "squad", "seed": seed, "status": "finished",
                "best": {"metrics": {"f1": f1, "f1_textbookqa": tb}}}  # fmt: skip

    records = [rec("Model tuning", 0, 90.0, 50.0), rec("Model tuning", 1, 92.0, 52.0), rec("Prompt tuning", 0, 91.0, 60.0)]  # fmt: skip
    lines = presets.table(preset, records)
    assert lines[0]["Model tuning"] == "91.0 ± 1.4 (n=2) [paper 94.9 ± 0.2]"
    assert lines[1]["Δ"] == "+9.0 [paper +12.5]" and lines[2]["Δ"] == "missing [paper +1.2]"


def test_span_head_under_two_processes_equals_one_process(tmp_path):
    """Data parallelism on the span head: each process scores its share of the windows, the padded logits are
    gathered in order, so 2 CPU processes (torchrun, gloo) give the losses, the evaluation, the transfer
    scores and the saved answers of 1 process (4 steps of 16 windows, within the first epoch, dropout off)."""
    write_fixture(tmp_path / "data")
    env = {**os.environ, "PEFTBENCH_DATA_DIR": str(tmp_path / "data"), "OMP_NUM_THREADS": "1"}
    env["PEFTBENCH_RESULTS_DIR"] = str(tmp_path / "results")
    run = ["task=squad", "model=tiny-roberta", "method=full", "task.transfer=[textbookqa]", "task.max_length=32",
           "task.doc_stride=8", "train.batch_size=16", "train.lr=3e-3", "train.max_steps=4", "train.eval_every=4",
           "train.progress=false", "train.num_threads=1", "+model.config_overrides.hidden_dropout_prob=0",
           "+model.config_overrides.attention_probs_dropout_prob=0"]  # fmt: skip
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    records = {}
    for name, launcher in (("two", torchrun), ("one", [sys.executable])):
        cmd = [*launcher, "-m", "peftbench.cli", "train", *run, f"name={name}"]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        (path,) = (tmp_path / "results" / name).glob("*.json")
        records[name] = json.loads(path.read_text())
    two, one = records["two"], records["one"]
    assert two["device"]["processes"] == 2 and one["device"]["processes"] == 1
    assert two["train"]["loss_curve"] == pytest.approx(one["train"]["loss_curve"], abs=1e-4)
    assert two["best"]["metrics"] == one["best"]["metrics"] and two["best"]["loss"] == pytest.approx(
        one["best"]["loss"], abs=1e-4
    )
    assert two["transfer"]["textbookqa"]["metrics"] == one["transfer"]["textbookqa"]["metrics"]
    read = lambda r: open(r["best"]["predictions"]).read()  # noqa: E731
    assert read(two) == read(one) and len(read(one).splitlines()) == 16
