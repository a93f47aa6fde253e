"""Prompt format (answer choices ranked by the LM head): encoding per family, T-Few's losses on known values,
in-context learning's demonstrations, order sensitivity and contextual calibration. (Every method training
through the LM head: test_matrix.py, format prompt.)"""

import json
import math

import pytest
import torch
from conftest import QUICK, overfit, require_data

from peftbench.errors import UserError
from peftbench.formats.logprobs import tfew_loss
from peftbench.formats.prompt import RankBatcher
from peftbench.formats.prompt_text import format_prompt
from peftbench.models import family

PROMPT = ["task=rte", "task.format=prompt", "task.max_length=48", "train.max_train_samples=8"]


def test_tfew_losses_on_known_values():
    """One row, two choices: the correct one has tokens with log p -0.5, -1.0; the wrong one -2.0 (+ pad)."""
    lp = torch.tensor([[[-0.5, -1.0], [-2.0, 0.0]]])
    mask = torch.tensor([[[True, True], [True, False]]])
    y = torch.tensor([0])
    lm = (0.5 + 1.0) / 2
    ul = -math.log(1 - math.exp(-2.0) + 1e-2)
    ln = math.log(1 + math.exp(-2.0 + 0.75))  # softmax CE over mean log p: (-0.75, -2.0)
    assert tfew_loss(lp, mask, y, 1, 0, 0).item() == pytest.approx(lm, abs=1e-6)
    assert tfew_loss(lp, mask, y, 0, 1, 0).item() == pytest.approx(ul, abs=1e-6)
    assert tfew_loss(lp, mask, y, 0, 0, 1).item() == pytest.approx(ln, abs=1e-6)
    assert tfew_loss(lp, mask, y, 1, 1, 1).item() == pytest.approx(lm + ul + ln, abs=1e-6)


def test_tfew_losses_on_a_two_example_batch():
    """T-Few's batch reductions: L_LM and L_UL average over tokens of the whole batch, L_LN over rows.
    Row A (answer 0): choices [-0.5, -1.0] and [-2.0]; row B (answer 1): [-1.5, -0.2] and [-0.3]."""
    lp = torch.tensor([[[-0.5, -1.0], [-2.0, 0.0]], [[-1.5, -0.2], [-0.3, 0.0]]])
    mask = torch.tensor([[[True, True], [True, False]], [[True, True], [True, False]]])
    y = torch.tensor([0, 1])
    lm = (0.5 + 1.0 + 0.3) / 3  # the correct choices' tokens
    ul = sum(-math.log(1 - math.exp(v) + 1e-2) for v in (-2.0, -1.5, -0.2)) / 3  # the wrong choices' tokens
    ln = (
        math.log(1 + math.exp(-2.0 + 0.75)) + math.log(1 + math.exp(-0.85 + 0.3))
    ) / 2  # means -0.75/-2, -0.85/-0.3
    assert tfew_loss(lp, mask, y, 1, 0, 0).item() == pytest.approx(lm, abs=1e-6)
    assert tfew_loss(lp, mask, y, 0, 1, 0).item() == pytest.approx(ul, abs=1e-6)
    assert tfew_loss(lp, mask, y, 0, 0, 1).item() == pytest.approx(ln, abs=1e-6)


@pytest.mark.parametrize(
    "model", ["tiny-gpt2", "tiny-t5", "tiny-bart", "tiny-bert", "tiny-roberta", "tiny-albert"]
)
def test_each_family_scores_the_answer_tokens(compose, model):
    require_data()
    from peftbench.setup import prepare

    cfg = compose(f"model={model}", "method=lora", *PROMPT, "train.max_eval_samples=4")
    s = prepare(cfg, {})
    tok = s.fmt.tokenizer
    feature = s.eval_loader.dataset[0]
    context, choices = format_prompt(cfg.task, s.task.validation[0])
    assert choices == ["True", "False"] and context.endswith("True or False? Answer:")
    for seq, choice in zip(s.fmt.sequences(feature), choices):
        scored = [t for t in seq["labels"] if t != -100]
        assert tok.decode(scored, skip_special_tokens=True).strip().lower() == choice.lower()  # BERT: uncased
        kind = family(cfg.model).kind
        if kind == "decoder":  # the answer is the continuation: the last tokens of the input
            assert seq["input_ids"][-len(scored) :] == scored
        elif kind == "encoder":  # one [MASK] per answer token, where the labels are
            masked = [i for i, t in zip(seq["input_ids"], seq["labels"]) if t != -100]
            assert masked == [tok.mask_token_id] * len(scored)
    batch = next(iter(s.eval_loader))
    logits = s.fmt.logits(s.model.eval(), batch)
    assert logits.shape == (4, 2) and torch.isfinite(logits).all()


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-t5", "tiny-bart", "tiny-bert", "tiny-roberta"])
def test_shared_context_scores_equal_one_sequence_per_choice(compose, model):
    """RAFT banking_77: 77 answers of 1 to 7+ tokens. Scoring them on one pass of the context (GPT-2: the
    key/value cache, T5 / BART: one encoder pass, masked LM: one sequence per answer length) gives the
    token log-probs, the T-Few loss and the gradients of one sequence per choice."""
    require_data()
    from peftbench.setup import prepare

    cfg = compose(
        f"model={model}",
        "method=lora",
        "task=raft_banking_77",
        "task.format=prompt",
        "task.max_length=40",  # contexts cut from the left: the shared cut is the one every choice sees
        "train.max_eval_samples=3",
        "train.eval_batch_size=3",
        "train.loss.ul=1",
        "train.loss.ln=1",
        "+model.dims.initializer_range=0.5" if model != "tiny-t5" else "seed=42",
    )
    s = prepare(cfg, {})
    shared = s.fmt
    assert shared.share_context
    single = RankBatcher(shared.tokenizer, shared.kind, cfg.train, share_context=False)
    features = list(s.eval_loader.dataset)
    lengths = {len(a) for f in features for a in f["answers"]}
    assert len(features[0]["answers"]) == 77 and len(lengths) >= 4
    model_ = (
        s.model.eval()
    )  # no dropout: the two passes must compute the same function (gradients still flow)
    results = []
    for batcher in (shared, single):
        model_.zero_grad()
        lp, mask = batcher.token_logprobs(model_, batcher(features))
        loss = tfew_loss(lp, mask, torch.tensor([f["label"] for f in features]), 1, 1, 1)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model_.named_parameters() if p.requires_grad}
        results.append(((lp * mask).sum(-1).detach(), mask.sum(-1), loss.item(), grads))
    (a, na, la, ga), (b, nb, lb, gb) = results
    assert torch.equal(na, nb)  # the same tokens scored
    assert a.shape == (3, 77) and torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
    assert a.std() > 0.1  # the scores really differ between answers
    assert la == pytest.approx(lb, rel=1e-4)
    assert ga.keys() == gb.keys() and len(ga) > 0
    for n in ga:
        assert torch.allclose(ga[n], gb[n], atol=1e-5, rtol=1e-3), n
    # what a row costs: the context once and the answers after it, against every choice's own sequence
    f = features[0]
    assert (
        shared.tokens(f)
        < single.tokens(f)
        == sum(
            len(q["input_ids"]) + (shared.kind == "encoder-decoder") * len(q["labels"])
            for q in single.sequences(f)
        )
    )


def test_tfew_ia3_trains_end_to_end_with_all_three_losses(compose):
    """`peftbench train` with IA3 on tiny T5, L_LM + L_UL + L_LN: finished record, falling loss, rank
    classification accuracy in the record, the merged model evaluates like the unmerged one."""
    require_data()
    from peftbench.run import execute

    cfg = compose(
        "model=tiny-t5",
        "method=ia3",
        *PROMPT,
        *QUICK,
        "train.max_steps=12",
        "train.lr=5e-2",
        "train.loss.ul=1",
        "train.loss.ln=1",
        "train.max_train_samples=8",
    )
    rec = execute(cfg)
    assert rec["status"] == "finished"
    losses = rec["train"]["loss_curve"]
    assert losses[-1] < losses[0]
    assert rec["params"]["trainable"] == 2 * (32 + 32 + 64) + 2 * (2 * 32 + 2 * 32 + 64)  # no new head
    assert rec["final"]["metrics"]["accuracy"] == rec["best"]["metrics"]["accuracy"]


def icl(compose, *more):
    from peftbench.run import execute

    return execute(
        compose(
            "model=tiny-gpt2",
            "method=icl",
            "task=rte",
            "task.format=prompt",
            "task.max_length=512",
            "train.max_eval_samples=64",
            "train.progress=false",
            "+model.dims.initializer_range=1.0",  # a sharp random model: its outputs depend on the context
            *more,
        )
    )


def test_icl_demonstrations_drawn_by_seed_and_ordered_by_order_seed(compose):
    """Same seed: the same 4 rows; another order_seed: the same rows in another order, and other scores
    (Zhao et al. 2021: the order alone moves accuracy). Nothing trains."""
    require_data()
    runs = [icl(compose, f"method.order_seed={o}") for o in (0, 1, 2)]
    demos = [r["demonstrations"] for r in runs]
    assert all(sorted(d) == sorted(demos[0]) for d in demos) and len(demos[0]) == 4
    assert len({tuple(d) for d in demos}) == 3
    assert all(r["params"]["trainable"] == 0 and r["train"]["steps"] == 0 for r in runs)
    accuracies = {r["best"]["metrics"]["accuracy"] for r in runs}
    assert len(accuracies) > 1, accuracies
    other = icl(compose, "seed=7")
    assert sorted(other["demonstrations"]) != sorted(demos[0])


def test_contextual_calibration_divides_by_the_content_free_prior(compose):
    require_data()
    rec = icl(compose, "method.calibrate=true")
    p_cf = rec["calibration"]["p_cf"]
    assert len(p_cf) == 2 and sum(p_cf) == pytest.approx(1, abs=1e-4)
    batcher = RankBatcher(None, "decoder", compose().train)
    scores = torch.tensor([[-1.0, -1.2], [-3.0, -1.0]])
    assert torch.equal(batcher.calibrate(scores), scores)  # no prior: untouched
    batcher.prior = torch.tensor([0.8, 0.2])  # the prompt alone leans to choice 0
    calibrated = batcher.calibrate(scores)
    assert torch.allclose(calibrated, scores.log_softmax(-1) - torch.tensor([0.8, 0.2]).log())
    assert batcher.predict(scores).tolist() == [0, 1] and batcher.predict(calibrated).tolist() == [1, 1]


def test_prompt_format_errors_name_the_fix(compose):
    require_data()
    from peftbench.validate import validate

    with pytest.raises(UserError, match="task.format=prompt"):
        validate(compose("method=icl", "task=rte"))
    with pytest.raises(UserError, match="regression"):
        validate(compose("method=lora", "task=stsb", "task.format=prompt"))
    with pytest.raises(UserError, match="task.format"):
        validate(compose("task.format=lm"))
    with pytest.raises(UserError, match="method.shots"):
        icl(compose, "method.shots=100000")


def test_icl_record_lists_its_demonstrations_in_the_json(compose, tmp_path):
    require_data()
    rec = icl(compose, "method.shots=2", "train.max_eval_samples=8")
    saved = json.loads(next((tmp_path / "results" / "runs").glob("*.json")).read_text())
    assert saved["demonstrations"] == rec["demonstrations"] and len(rec["demonstrations"]) == 2


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-t5", "tiny-bart"])
def test_prefix_tuning_generates_with_and_without_the_kv_cache_alike(compose, model):
    """Li & Liang's setting is generation: the prefixes enter every attention at each decoding step, so greedy
    decoding with the KV cache equals decoding without it (the prefix is not cached twice or dropped)."""
    from peftbench.methods import apply_method
    from peftbench.models import load_model

    cfg = compose(
        f"model={model}", "method=prefix_tuning", "task.format=prompt", "+model.dims.initializer_range=0.5"
    )
    m, tok = load_model(cfg.model, "classification", 2, lm=True)
    m = apply_method(m, cfg.method, family(cfg.model, lm=True)).eval()
    ids = tok(["The cat sat on the"], return_tensors="pt")
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": tok.pad_token_id}
    plain = load_model(cfg.model, "classification", 2, lm=True)[0].eval().generate(**ids, **kw)
    with torch.no_grad():
        cached, uncached = m.generate(**ids, use_cache=True, **kw), m.generate(**ids, use_cache=False, **kw)
    assert torch.equal(cached, uncached) and cached.shape[1] > ids["input_ids"].shape[1] * (
        model == "tiny-gpt2"
    )
    assert not torch.equal(cached, plain)  # the prefix steers what is generated


def test_soft_prompted_t5_generates_only_with_its_prompt(compose):
    """model.generate(input_ids=...) would run the encoder without the prompt: a one-line error naming the
    way that keeps it (prompted_inputs, which peftbench's decoding uses; tests/test_qa.py checks its tokens)."""
    from peftbench.methods import apply_method
    from peftbench.methods.prompt import prompted_inputs
    from peftbench.models import load_model

    cfg = compose("model=tiny-t5", "method=prompt_tuning", "method.init=random_uniform", "task.format=prompt")
    m, tok = load_model(cfg.model, "classification", 2, lm=True)
    m = apply_method(m, cfg.method, family(cfg.model, lm=True)).eval()
    enc = tok(["a b"], return_tensors="pt")
    with pytest.raises(UserError, match="would skip the prompt"):
        m.generate(**enc, max_new_tokens=2)
    assert m.generate(**prompted_inputs(m, **enc), max_new_tokens=2).shape == (1, 3)


@pytest.mark.parametrize("model", ["tiny-roberta", "tiny-gpt2", "tiny-t5", "tiny-albert"])
def test_p_tuning_fills_the_anchored_template_slots(compose, model):
    """P-tuning's placement: the prompt encoder's 3 vectors sit in the [P] slots between the anchor tokens
    ("?", "Answer:"), not in front; the slots are in every choice's input and the loss falls."""
    require_data()
    from peftbench.setup import prepare

    cfg = compose(
        f"model={model}",
        "method=p_tuning",
        "method.placement=template",
        "method.length=3",
        "method.hidden=32",
        "task=superglue_rte",
        "task.format=prompt",
        "task.max_length=64",
        "train.max_train_samples=8",
        "train.batch_size=8",
        *([] if model == "tiny-t5" else ["+model.dims.initializer_range=0.5"]),  # as in the matrix above
    )
    s = prepare(cfg, {})
    seq = s.fmt.sequences(s.train_loader.dataset[0])[0]["input_ids"]
    assert [i for i in seq if i < 0] == [-1, -2, -3]
    tail = s.fmt.tokenizer.decode([i for i in seq[seq.index(-3) + 1 :] if i >= 0])
    assert "answer:" in tail.lower().replace(" ", "")  # WordPiece (BERT, ALBERT here) is uncased
    losses = overfit(s, lr=3e-2, steps=15)
    assert losses[-1] < losses[0] - 0.1, losses  # 3 vectors steer a frozen random model: nats, not factors


def test_p_tuning_template_slot_count_must_match_the_length(compose):
    from peftbench.validate import validate

    with pytest.raises(UserError, match="set method.length=3"):
        validate(compose("method=p_tuning", "method.placement=template", "task=cb", "task.format=prompt"))
    with pytest.raises(UserError, match="add task.format=prompt"):
        validate(compose("method=p_tuning", "method.placement=template", "method.length=3", "task=cb"))
    with pytest.raises(UserError, match="no task.prompt.anchored"):
        validate(compose("method=p_tuning", "method.placement=template", "task=sst2", "task.format=prompt"))


@pytest.mark.parametrize("encoder", ["lstm", "mlp", "emb"])
def test_albert_p_tuning_encoders_train_through_the_mlm_head(compose, encoder):
    """The P-tuning few-shot tables' setting on a tiny ALBERT: the prompt encoder's vectors (ALBERT's
    factorised embedding width, 16 here, not its hidden 32) in the anchored template, backbone tuned."""
    require_data()
    from peftbench.setup import prepare

    cfg = compose(
        "model=tiny-albert",
        "method=p_tuning",
        f"method.encoder={encoder}",
        "method.placement=template",
        "method.length=3",
        "method.tune_backbone=true",
        "task=cb",
        "task.format=prompt",
        "task.max_length=64",
        "train.max_train_samples=8",
        "train.batch_size=8",
        "+model.dims.initializer_range=0.5",
    )
    s = prepare(cfg, {})
    assert s.model.base_model.get_input_embeddings().weight.shape[1] == 16
    losses = overfit(s, lr=1e-2, steps=15)
    assert losses[-1] < losses[0] - 0.1, losses
