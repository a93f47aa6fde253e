"""Data-to-text training and decoding: the loss is the target tokens' cross-entropy (as transformers computes
it), batched left-padded decoding gives what one-at-a-time `generate` gives, and training on the offline E2E,
WebNLG and DART files makes the generated text better than the untrained model's, with the official metrics
in the record and the outputs saved one line per input."""

import json
import re
from pathlib import Path

import pytest
from conftest import require_data

from peftbench.errors import UserError
from peftbench.formats.generation import GenerationFormat, encode_eval, encode_train

ROWS = [
    {"idx": 0, "source": "name : The Vaults | Type : pub", "target": "The Vaults is a pub."},
    {
        "idx": 1,
        "source": "name : Aromi | food : Chinese | area : riverside",
        "target": "Aromi serves Chinese food.",
    },
]


def setup(compose, model, *more):
    from peftbench.models import family, load_model

    cfg = compose("task=e2e", f"model={model}", "method=full", *more)
    fam = family(cfg.model, True)
    net, tok = load_model(cfg.model, "generation", 1, lm=True)
    return cfg, fam.kind, net.eval(), tok, GenerationFormat(cfg, None, tok, fam)


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-t5", "tiny-bart"])
def test_loss_is_the_target_tokens_cross_entropy(compose, model):
    cfg, kind, net, tok, b = setup(compose, model)
    feats = encode_train(ROWS, cfg.task, tok, kind)
    if kind == "decoder":  # the source and its separator take no loss; the target ends with <|endoftext|>
        src = tok(ROWS[0]["source"], add_special_tokens=False)["input_ids"] + [tok.bos_token_id]
        assert feats[0]["labels"][: len(src)] == [-100] * len(src)
        assert feats[0]["labels"][-1] == tok.eos_token_id
        assert tok.decode(feats[0]["labels"][len(src) : -1]) == " The Vaults is a pub."
    batch = b(feats)
    ours = b.loss(net, batch)
    theirs = net(**batch).loss  # transformers' own shifted, -100-ignoring cross-entropy
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_batched_left_padded_decoding_equals_one_at_a_time(compose, strategy):
    """GPT-2's prompts of different lengths are left-padded into one batch; the KV cache stays on."""
    require_data()
    from peftbench.tasks import load_task

    cfg, kind, net, tok, b = setup(
        compose,
        "tiny-gpt2",
        f"task.decode.strategy={strategy}",
        "task.decode.num_beams=3",
        "task.decode.max_new_tokens=8",
        "+model.dims.initializer_range=0.5",  # a random model whose outputs depend on the prompt
    )
    rows = load_task(cfg.task, seed=0).validation[:6]
    feats = encode_eval(rows, cfg.task, tok, kind)
    assert len({len(f["input_ids"]) for f in feats}) > 1
    batch = b(feats)
    assert (batch["attention_mask"][:, -1] == 1).all() and (batch["attention_mask"][:, 0] == 0).any()
    together = b.generate(net, batch)
    alone = [b.generate(net, b([f]))[0] for f in feats]
    assert together == alone and len(set(alone)) > 1


def test_no_repeat_ngram_reads_the_generated_tokens_only():
    """LoRA's beam search bans an n-gram seen among the tokens generated so far (gpt2_beam.py's `history`), not
    one of the prompt: "5 out of 5" in the table can be said again."""
    import torch
    from transformers import NoRepeatNGramLogitsProcessor

    from peftbench.formats.generation import GeneratedNoRepeatNGram

    prompt = [7, 5, 6, 7, 5]
    ids = torch.tensor([prompt + [6, 7, 5]])  # generated so far: 6 7 5
    scores = torch.zeros(1, 10)
    ours = GeneratedNoRepeatNGram(3, start=len(prompt))(ids, scores.clone())
    theirs = NoRepeatNGramLogitsProcessor(3)(ids, scores.clone())
    # the prompt's "7 5 6" bans 6 after "7 5"
    assert torch.isinf(theirs[0]).nonzero().flatten().tolist() == [6]
    assert not torch.isinf(ours).any()  # the output's only 3-gram, "6 7 5", does not start with "7 5"
    ids = torch.tensor([prompt + [6, 7, 5, 6, 7]])  # now "6 7 5" was generated: after "6 7" comes no 5
    ours = GeneratedNoRepeatNGram(3, start=len(prompt))(ids, scores.clone())
    assert torch.isinf(ours[0]).nonzero().flatten().tolist() == [5]


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-llama"])
def test_beam_with_no_repeat_batched_equals_one_at_a_time(compose, model):
    """LoRA's decoding (beam, length penalty 0.8, no-repeat n-gram) on left-padded batches: the padding and the
    prompt are outside what no-repeat reads, so a row decodes alike whatever its batch."""
    require_data()
    from peftbench.tasks import load_task

    cfg, kind, net, tok, b = setup(
        compose,
        model,
        "task.decode.strategy=beam",
        "task.decode.num_beams=3",
        "task.decode.length_penalty=0.8",
        "task.decode.no_repeat_ngram_size=2",
        "task.decode.max_new_tokens=12",
        "+model.dims.initializer_range=0.5",
    )
    rows = load_task(cfg.task, seed=0).validation[:4]
    feats = encode_eval(rows, cfg.task, tok, kind)
    batch = b(feats)
    generate, outputs = net.generate, []
    net.generate = lambda *a, **k: outputs.append(generate(*a, **k)) or outputs[-1]
    together = b.generate(net, batch)
    alone = [b.generate(net, b([f]))[0] for f in feats]
    assert together == alone and len(set(alone)) > 1
    for row in outputs[0][:, batch["input_ids"].shape[1] :].tolist():  # no 2-gram twice in an output's tokens
        out = row[: row.index(tok.eos_token_id)] if tok.eos_token_id in row else row
        grams = list(zip(out, out[1:]))
        assert len(grams) == len(set(grams)) and len(out) > 2, out


def run(compose, *overrides):
    from peftbench.run import execute

    return execute(compose(*overrides, "train.progress=false", "train.save_adapter=false"))


def untrained_scores(compose, *overrides):
    """The same evaluation on the untrained model (the bar the trained one must clear)."""
    from peftbench.evaluate import evaluate
    from peftbench.setup import prepare

    cfg = compose(*overrides)
    s = prepare(cfg, {})
    return evaluate(s.model, s.eval_loader, s)["metrics"]


E2E = ["task=e2e", "model=small-gpt2", "task.decode.strategy=greedy", "task.decode.max_new_tokens=32"]
E2E += ["train.max_eval_samples=16", "train.batch_size=16", "train.eval_every=40", "train.max_steps=40"]


def test_full_ft_on_e2e_beats_the_untrained_model(compose):
    require_data()
    more = ["method=full", "train.lr=2e-3", "train.max_train_samples=640"]
    before = untrained_scores(compose, *E2E, *more)
    rec = run(compose, *E2E, *more)
    after = rec["best"]["metrics"]
    assert set(after) == {"bleu", "nist", "meteor", "rouge_l", "cider"}  # E2E's five, all computed
    # 40 steps: past the untrained model on every metric (BLEU 0.04 -> 1.3, ROUGE-L 0 -> 23 here); the
    # committed offline_nlg runs train longer (BLEU in the 20s)
    assert after["bleu"] > before["bleu"] + 0.5 and after["rouge_l"] > before["rouge_l"] + 10
    assert after["meteor"] > before["meteor"] + 2
    lines = Path(rec["best"]["predictions"]).read_text().splitlines()
    assert len(lines) == 16 and all(lines)  # one output per input
    assert rec["train"]["loss_last"] < rec["train"]["loss_first"]


@pytest.mark.parametrize("method,lr", [("lora", "1e-2"), ("prefix_tuning", "1e-2")])
def test_lora_and_prefix_on_e2e_write_the_five_metrics_and_learn(compose, method, lr):
    require_data()
    small = [*E2E[:4], "model=tiny-gpt2", "task.decode.max_new_tokens=12", "train.max_eval_samples=8"]
    more = ["train.batch_size=16", "train.max_steps=12", "train.max_train_samples=192", "train.log_every=4"]
    rec = run(compose, *small, *more, f"method={method}", f"train.lr={lr}")
    assert rec["status"] == "finished" and set(rec["best"]["metrics"]) >= {
        "bleu",
        "nist",
        "meteor",
        "rouge_l",
        "cider",
    }
    assert rec["params"]["trainable"] < rec["params"]["total"] / 5
    assert rec["train"]["loss_last"] < rec["train"]["loss_first"]


QUICK_GEN = ["model=tiny-gpt2", "method=full", "task.decode.strategy=greedy", "task.decode.max_new_tokens=12"]
QUICK_GEN += ["train.max_train_samples=64", "train.max_steps=4", "train.batch_size=16"]


def test_webnlg_test_split_is_scored_on_seen_unseen_and_all(compose):
    require_data()
    rec = run(compose, "task=webnlg", "task.eval_split=test", *QUICK_GEN, "train.max_eval_samples=12")
    m = rec["best"]["metrics"]
    for name in ("bleu", "meteor", "ter"):
        assert {name, f"{name}_seen", f"{name}_unseen"} <= set(m)
    lines = Path(rec["best"]["predictions"]).read_text().splitlines()
    assert len(lines) == 12


def test_dart_trains_offline_on_its_dev_file_and_says_train_is_missing(compose):
    """The offline copy has DART's dev and test only: training on train is one line naming the file and the
    hub; task.train_split=validation trains on dev and evaluates on test."""
    require_data()
    from peftbench.config import compose as compose_cfg
    from peftbench.tasks import load_task

    with pytest.raises(UserError, match="dart-v1.1.1-full-train.json.*Yale-LILY/dart"):
        load_task(compose_cfg(["task=dart"]).task, seed=0)
    split = ["task.train_split=validation", "task.eval_split=test"]
    rec = run(compose, "task=dart", *split, *QUICK_GEN, "train.max_eval_samples=8")
    assert {"bleu", "meteor", "ter"} <= set(rec["best"]["metrics"])
    assert {"bertscore", "bleurt", "moverscore"} <= set(rec["best"]["unavailable"])  # never 0
    assert rec["data"]["sources"]["train"].endswith("dart-v1.1.1-full-dev.json")


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["model=tiny-bert"], "generates text and model tiny-bert (bert) has no decoder"),
        (["model=tiny-gpt2", "method=prompt_tuning"], "method=prompt_tuning cannot generate"),
        (["model=tiny-gpt2", "task.decode.strategy=nucleus"], "unknown task.decode.strategy 'nucleus'"),
    ],
)
def test_generation_config_errors_are_one_line(compose, overrides, message):
    from peftbench.validate import validate

    with pytest.raises(UserError, match=re.escape(message)):
        validate(compose("task=e2e", *overrides))


def test_generation_cost_counts_prompt_and_target_tokens(compose):
    cfg, kind, net, tok, b = setup(compose, "tiny-t5")
    from peftbench.cost import example_tokens

    f = encode_train(ROWS[:1], cfg.task, tok, kind)[0]
    assert example_tokens(f, seq2seq=True) == len(f["input_ids"]) + len(f["labels"])


def test_exported_model_is_a_base_that_reproduces_the_run(compose, tmp_path):
    """train.export_model: LoRA merged into the weights and saved as a transformers folder; loading it with
    model.path and evaluating without training gives the trained run's outputs and scores."""
    require_data()
    out = tmp_path / "base"
    small = ["task=e2e", "model=tiny-gpt2", "task.decode.strategy=greedy", "task.decode.max_new_tokens=12"]
    small += ["train.max_eval_samples=8", "train.batch_size=16", "train.max_train_samples=64"]
    rec = run(
        compose, *small, "method=lora", "train.lr=1e-2", "train.max_steps=4", f"train.export_model={out}"
    )
    assert json.loads((out / "export.json").read_text())["run_id"] == rec["run_id"]
    assert rec["export"]["bytes"] > 0 and (out / "config.json").exists()
    again = run(compose, *small, "method=full", "train.max_steps=0", f"model.path={out}")
    assert again["model"] == "tiny-gpt2" and again["config"]["model"]["path"] == str(out)
    assert Path(again["best"]["predictions"]).read_text() == Path(rec["best"]["predictions"]).read_text()
    assert again["best"]["metrics"] == rec["best"]["metrics"]


def test_export_refuses_methods_whose_parameters_are_not_base_weights(compose):
    from peftbench.validate import validate

    with pytest.raises(UserError, match="export works with: adalora, bitfit, dora, ft_top2, full, ia3, lora, loraplus, pissa, vera"):
        validate(compose("task=e2e", "method=prefix_tuning", "train.export_model=/tmp/x"))


def test_text_only_trains_a_plain_language_model_of_the_references(compose):
    """task.text_only=true (domain pre-training of a base): training rows keep their reference but lose
    their source, so GPT-2 sees `<|endoftext|> reference <|endoftext|>` with the loss on every reference
    token; the evaluation inputs keep their linearised triples."""
    require_data()
    from peftbench.config import compose as compose_cfg
    from peftbench.tasks import load_task

    cfg = compose_cfg(["task=webnlg", "task.text_only=true", "model=tiny-gpt2"])
    data = load_task(cfg.task, seed=0, max_train=32)
    assert len(data.train) == 32 and all(r["source"] == "" and r["target"] for r in data.train)
    assert all(" : " in r["source"] for r in data.validation)  # `subject : predicate : object | ...`
    _, kind, _, tok, _ = setup(compose, "tiny-gpt2")
    f = encode_train(data.train[:1], cfg.task, tok, kind)[0]
    assert f["input_ids"][0] == tok.bos_token_id and f["labels"][0] == -100
    assert (
        f["labels"][1:] == f["input_ids"][1:]
        and tok.decode(f["labels"][1:-1]) == " " + data.train[0]["target"]
    )
