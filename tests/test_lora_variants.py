"""The LoRA family beyond LoRA: DoRA, VeRA, AdaLoRA, PiSSA (peft 0.21.2) and LoRA+ (LoRA with its own optimizer
groups). Exact trainable counts on the real paper models (meta device) against the papers' formulas; on tiny
random models: each starts from the pretrained function, trains only its own tensors and the head, and merges
(or reloads) to the same logits; AdaLoRA's hooks change ranks and add the regulariser; LoRA+'s groups."""

import pytest
import torch

from peftbench.errors import UserError
from peftbench.methods import apply_method, capabilities, finish, hook, save_trainable
from peftbench.models import build_meta, count, family, load_model

VARIANTS = ["dora", "vera", "adalora", "pissa", "loraplus"]
TINY = ["tiny-roberta", "tiny-gpt2"]


@pytest.fixture
def make_cfg(tmp_path, monkeypatch):
    try:
        from peftbench.config import compose
    except ImportError:
        from peftbench.cli import compose
    monkeypatch.setenv("PEFTBENCH_RESULTS_DIR", str(tmp_path / "results"))
    return lambda *overrides: compose(["task=rte", *overrides])


# --- exact trainable counts on RoBERTa-base and GPT-2 medium (meta device, as `peftbench params`) -----------


def lora_pair(d_in: int, d_out: int, r: int) -> int:
    """LoRA's A (r x d_in) and B (d_out x r) (Hu et al. 2021, Sec. 4)."""
    return r * d_in + d_out * r


def roberta_base(method: str) -> int:
    """12 layers, d = 768, d_ff = 3072; W_q, W_v unless the method says otherwise."""
    L, d, dff = 12, 768, 3072
    if method in ("pissa", "loraplus"):  # LoRA's count: r = 8 on W_q, W_v
        return L * 2 * lora_pair(d, d, 8)  # 294,912 (LoRA Table 2: 0.3M)
    if method == "dora":  # + the magnitude m, d_out entries per adapted matrix (DoRA Eq. 5)
        return L * 2 * (lora_pair(d, d, 8) + d)
    if method == "vera":  # d (r) and b (d_out) per matrix, A and B frozen and shared: VeRA Table 1 L (d + r)
        return L * 2 * (1024 + d)  # 43,008 (VeRA Table 2: 0.043M)
    if method == "adalora":  # P (d_out x r), Λ (r), Q (r x d_in) at init_r = 12 on all six weight matrices
        shapes = [(d, d)] * 4 + [(d, dff), (dff, d)]  # q, k, v, o, ffn_in, ffn_out as (d_in, d_out)
        return L * sum(12 * (d_in + d_out + 1) for d_in, d_out in shapes)
    raise KeyError(method)


def gpt2_medium(method: str) -> int:
    """24 layers, d = 1024, d_ff = 4096; q|k|v fused in c_attn (d -> 3d): the peft variants adapt it whole."""
    L, d, dff = 24, 1024, 4096
    if method == "loraplus":  # LoRA's FusedLoRA: r = 8 on the q and v slices of c_attn
        return L * 2 * lora_pair(d, d, 8)
    if method == "pissa":  # LoRA r = 8 on the whole c_attn (d -> 3d)
        return L * lora_pair(d, 3 * d, 8)
    if method == "dora":
        return L * (lora_pair(d, 3 * d, 8) + 3 * d)
    if method == "vera":  # b has 3d entries on the whole c_attn, d has r = 1024
        return L * (3 * d + 1024)
    if method == "adalora":  # c_attn (one matrix), attn.c_proj, mlp.c_fc, mlp.c_proj at init_r = 12
        shapes = [(d, 3 * d), (d, d), (d, dff), (dff, d)]
        return L * sum(12 * (d_in + d_out + 1) for d_in, d_out in shapes)
    raise KeyError(method)


def meta_count(cfg):
    fam = family(cfg.model)
    model = apply_method(build_meta(cfg.model, cfg.task.kind, len(cfg.task.labels)), cfg.method, fam)
    return count(model, fam.head), model


@pytest.mark.parametrize("method", VARIANTS)
@pytest.mark.parametrize("model,formula", [("roberta-base", roberta_base), ("gpt2-medium", gpt2_medium)])
def test_trainable_counts_follow_the_papers_formulas(make_cfg, method, model, formula):
    c, _ = meta_count(make_cfg(f"method={method}", f"model={model}"))
    assert c["trainable_without_head"] == formula(method)


def test_the_counts_written_out():
    """The numbers the report quotes (and `peftbench params` prints)."""
    assert [roberta_base(m) for m in VARIANTS] == [313_344, 43_008, 1_991_520, 294_912, 294_912]
    assert [gpt2_medium(m) for m in VARIANTS] == [860_160, 98_304, 4_719_744, 786_432, 786_432]


def test_vera_projections_are_frozen_buffers_not_parameters(make_cfg):
    _, model = meta_count(make_cfg("method=vera", "model=roberta-base"))
    assert not any("vera_A" in n or "vera_B" in n for n, _ in model.named_parameters())
    shared = {n: b.shape for n, b in model.named_buffers() if ".vera_A." in n or ".vera_B." in n}
    assert torch.Size([1024, 768]) in shared.values() and torch.Size([768, 1024]) in shared.values()


@pytest.mark.parametrize("method", ["dora", "vera", "adalora", "pissa"])
def test_gpt2_q_v_slices_without_fused_whole_is_a_one_line_error(make_cfg, method):
    with pytest.raises(UserError, match="fused=whole") as e:
        meta_count(make_cfg(f"method={method}", "model=gpt2-medium", "method.fused=slices"))
    assert "\n" not in str(e.value)


def test_plain_lora_on_gpt2_keeps_its_q_v_slices(make_cfg):
    from peftbench.methods.lora import FusedLoRA

    c, model = meta_count(make_cfg("method=lora", "model=gpt2-medium"))
    assert c["trainable_without_head"] == 24 * 2 * lora_pair(1024, 1024, 8)
    assert not hasattr(model, "peft_config")
    assert sum(isinstance(m, FusedLoRA) for m in model.modules()) == 24


# --- tiny models: the training loop's calls, on one fixed random batch -------------------------------------

OWN = {  # the method's own parameters, by name (the head trains too)
    "dora": ("lora_A", "lora_B", "lora_magnitude_vector"),
    "pissa": ("lora_A", "lora_B"),
    "loraplus": ("lora_A", "lora_B"),
    "vera": ("vera_lambda_b", "vera_lambda_d"),
    "adalora": ("lora_A", "lora_B", "lora_E"),
}
SMALL = {"adalora": ["method.init_r=4", "method.target_r=2"]}  # a few singular values per tiny matrix


def tiny(make_cfg, method, model, *more):
    """(cfg, fam, the base model's logits before the method, the model with the method, batch)."""
    cfg = make_cfg(f"method={method}", f"model={model}", *SMALL.get(method, []), *more)
    fam = family(cfg.model)
    base, _ = load_model(cfg.model, "classification", 2)
    base.eval()
    g = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(3, 1000, (8, 12), generator=g),
        "attention_mask": torch.ones(8, 12, dtype=torch.long),
        "labels": torch.tensor([0, 1] * 4),
    }
    with torch.no_grad():
        before = logits(base, batch)
    model = apply_method(base, cfg.method, fam).eval()  # eval: no dropout, so one batch must fit
    return cfg, fam, before, model, batch


def logits(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def train(cfg, model, batch, steps: int, lr: float = 1e-2, first_grads: set | None = None) -> list[float]:
    """The loop's calls (peftbench/loop.py): make_optimizer or AdamW, on_train_start, then per step the loss,
    adjust_loss, backward, optimizer step, after_step(steps taken, this one included), zero_grad. Returns the
    losses; `first_grads` receives the names of the parameters the first backward pass reached."""
    t = cfg.train.copy()
    t.lr, t.weight_decay = lr, 0.0
    params = [p for p in model.parameters() if p.requires_grad]
    make = hook(cfg.method, "make_optimizer")
    opt = make(params, model, t, cfg.method) if make else torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    if start := hook(cfg.method, "on_train_start"):
        start(model, steps, cfg.method)
    adjust, after = hook(cfg.method, "adjust_loss"), hook(cfg.method, "after_step")
    losses = []
    for step in range(steps):
        loss = torch.nn.functional.cross_entropy(logits(model, batch), batch["labels"])
        losses.append(loss.item())
        if adjust:
            loss = adjust(model, loss, cfg.method)
        loss.backward()
        if first_grads is not None and step == 0:
            first_grads.update(n for n, p in model.named_parameters() if p.grad is not None)
        opt.step()
        if after:
            after(model, step + 1, cfg.method)
        opt.zero_grad(set_to_none=True)
    return losses


@pytest.mark.parametrize("model", TINY)
@pytest.mark.parametrize("method", VARIANTS)
def test_tiny_training_moves_only_the_method_and_the_head(make_cfg, method, model):
    """Starts from the pretrained function (B = 0, b = 0, Λ = 0, m = ||W||, PiSSA's W_res + B A = W); the loss
    falls; only the method's tensors and the head get gradients and move; the frozen weights (PiSSA: the
    residual) stay bit-identical."""
    cfg, fam, before, m, batch = tiny(make_cfg, method, model)
    with torch.no_grad():
        assert torch.allclose(logits(m, batch), before, atol=1e-5)
    head = set(fam.head)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    own = {n for n in trainable if head.isdisjoint(n.split("."))}
    assert own and all(any(k in n for k in OWN[method]) for n in own), sorted(own)[:4]
    assert trainable - own, "the head trains"
    start = {n: p.detach().clone() for n, p in m.named_parameters()}
    got_grad: set[str] = set()
    losses = train(cfg, m, batch, steps=12, first_grads=got_grad)
    assert losses[-1] < 0.9 * losses[0], losses
    assert got_grad <= trainable and got_grad & own and got_grad - own
    moved = {n for n, p in m.named_parameters() if not torch.equal(p.detach(), start[n])}
    assert moved <= trainable and moved & own, sorted(moved)[:4]
    assert all(torch.equal(p, start[n]) for n, p in m.named_parameters() if n not in trainable)


# --- AdaLoRA: the hooks drive peft's rank allocator and add the orthogonal regulariser -------------------


def test_adalora_allocator_prunes_ranks_to_the_target_budget(make_cfg):
    from peftbench.methods.adalora import ranks, tuner

    cfg, _, _, m, batch = tiny(make_cfg, "adalora", "tiny-roberta")  # init_r 4, target_r 2
    assert set(ranks(m).values()) == {4}
    # 20 steps: tinit 3, tfinal 9; the budget falls over steps 4-10, the final allocation is at step 11
    train(cfg, m, batch, steps=20)
    config = tuner(m).peft_config["default"]
    assert (config.total_step, config.tinit, config.tfinal) == (20, 3, 9)
    r = ranks(m)
    assert len(r) == 2 * 6 and sum(r.values()) == 2 * len(r)  # the final budget: target_r per matrix
    assert len(set(r.values())) > 1  # allocated by importance, not uniformly
    singular = dict(tuner(m).model.named_parameters())
    for name, keep in config.rank_pattern.items():  # pruned singular values stay zero after tfinal
        assert torch.all(singular[name].squeeze(1)[~torch.tensor(keep)] == 0)
    # resumed from a checkpoint after the final allocation: the pattern (not checkpointed) is rebuilt
    kept, config.rank_pattern = config.rank_pattern, None
    loss = torch.nn.functional.cross_entropy(logits(m, batch), batch["labels"])
    loss.backward()
    hook(cfg.method, "after_step")(m, 15, cfg.method)
    assert config.rank_pattern == kept


def test_adalora_regulariser_is_added_as_peft_adds_it(make_cfg):
    from peftbench.methods.adalora import tuner

    cfg, _, _, m, batch = tiny(make_cfg, "adalora", "tiny-roberta")
    adjust = hook(cfg.method, "adjust_loss")
    plain = torch.nn.functional.cross_entropy(logits(m, batch), batch["labels"])
    adjusted = adjust(m, plain, cfg.method)
    assert adjusted > plain
    # peft's AdaLoraModel.forward adds the same term to outputs.loss when labels go to it (PeftModel.forward
    # without a task_type, as here, calls the transformers model directly: no term at all)
    assert torch.allclose(adjusted, tuner(m)(**batch).loss, atol=1e-6)
    assert torch.allclose(m(**batch).loss, plain, atol=1e-6)
    cfg0, _, _, m0, _ = tiny(make_cfg, "adalora", "tiny-roberta", "method.orth_reg_weight=0")
    plain0 = torch.nn.functional.cross_entropy(logits(m0, batch), batch["labels"])
    assert hook(cfg0.method, "adjust_loss")(m0, plain0, cfg0.method) is plain0


def test_adalora_run_too_short_for_its_schedule_is_a_user_error(make_cfg):
    cfg, _, _, m, _ = tiny(make_cfg, "adalora", "tiny-roberta", "method.tinit_frac=0.5")
    with pytest.raises(UserError, match="no budgeting steps"):  # tinit 1, tfinal 1 of 2 steps
        hook(cfg.method, "on_train_start")(m, 2, cfg.method)
    hook(cfg.method, "on_train_start")(m, 20, cfg.method)  # tinit 10, tfinal 9


# --- LoRA+: B at lr_ratio x lr, everything else at lr ------------------------------------------------------


@pytest.mark.parametrize("model", TINY)
def test_loraplus_groups_b_at_ratio_times_lr(make_cfg, model):
    cfg, fam, _, m, _ = tiny(make_cfg, "loraplus", model)
    t = cfg.train
    assert cfg.method.lr_ratio == 20  # nikhil-ghosh-berkeley/loraplus@a0c44bf:README.md and @58fec99 GLUE script
    params = [p for p in m.parameters() if p.requires_grad]
    opt = hook(cfg.method, "make_optimizer")(params, m, t, cfg.method)
    assert isinstance(opt, torch.optim.AdamW)
    names = {id(p): n for n, p in m.named_parameters()}
    groups = {g["lr"]: {names[id(p)] for p in g["params"]} for g in opt.param_groups}
    assert set(groups) == {t.lr, 20 * t.lr}
    b, rest = groups[20 * t.lr], groups[t.lr]
    assert b == {names[id(p)] for p in params if ".lora_B." in names[id(p)]} and b
    in_head = {n for n in rest if not set(fam.head).isdisjoint(n.split("."))}
    assert {n for n in rest if "lora_A" in n} and in_head
    assert len(b) + len(rest) == len(params)
    for g in opt.param_groups:  # the default optimizer's settings (train/default.yaml)
        assert (g["weight_decay"], g["betas"], g["eps"]) == (t.weight_decay, tuple(t.adam_betas), t.adam_eps)
    t.optimizer = "adafactor"
    with pytest.raises(UserError, match="choose from: adamw"):
        hook(cfg.method, "make_optimizer")(params, m, t, cfg.method)


# --- merged into the weights: the same logits; exportable says so ------------------------------------------


def perturbed(make_cfg, method, model, *more):
    """The method's tensors set to random values, as after training."""
    cfg, fam, _, m, batch = tiny(make_cfg, method, model, *more)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    return cfg, m, batch


@pytest.mark.parametrize("model", TINY)
@pytest.mark.parametrize("method", ["dora", "pissa", "vera", "adalora"])
def test_merged_equals_unmerged_and_capabilities_say_exportable(make_cfg, method, model):
    from transformers import PreTrainedModel

    cfg, m, batch = perturbed(make_cfg, method, model)
    assert capabilities(cfg.method).exportable and cfg.method.merge
    with torch.no_grad():
        unmerged = logits(m, batch)
        merged = finish(m)  # what the loop does after training (peft's merge_and_unload)
        assert isinstance(merged, PreTrainedModel) and not hasattr(merged, "peft_config")
        names = [n for n, _ in [*merged.named_parameters(), *merged.named_buffers()]]
        left = [n for n in names if "lora_" in n or "vera_" in n]
        assert not left, left[:3]
        assert torch.allclose(logits(merged, batch), unmerged, atol=1e-5)


@pytest.mark.parametrize("method", ["pissa", "vera"])
def test_saved_adapter_reloads_with_peft_alone(make_cfg, tmp_path, method):
    """PiSSA's frozen weight is the residual W - B0 A0: peft's loader recomputes it from the base (full SVD is
    deterministic); VeRA's shared A, B are saved with the adapter."""
    from peft import PeftModel

    cfg, m, batch = perturbed(make_cfg, method, "tiny-roberta")
    with torch.no_grad():
        expected = logits(m, batch)
    assert save_trainable(m, tmp_path).startswith("peft")
    base, _ = load_model(cfg.model, "classification", 2)
    loaded = PeftModel.from_pretrained(base, tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(logits(loaded, batch), expected, atol=1e-5)
