"""The methods added to the classification runner (adapters, IA3, prompt tuning, P-tuning, prefix tuning):
each fits a batch on the real MiniLM, the trainable counts equal the papers' formulas on the real model sizes
(meta device), saved methods reload to identical logits, merges are exact. (Every method x family x format
trains with only its own weights moving: test_matrix.py.)"""

import pytest
import torch
from conftest import overfit, perturb, require_data

from peftbench.errors import UserError
from peftbench.methods import apply_method, finish, load_trainable, save_trainable
from peftbench.models import build_meta, count, family, load_model

FAMILIES = ["tiny-bert", "tiny-roberta", "tiny-deberta", "tiny-gpt2", "tiny-t5", "tiny-bart"]
# The method's own parameters, by name (the task head trains too, for every method).
OWN = {
    "ia3": ("ia3_",),
    "adapter_houlsby": (".adapter.", "LayerNorm", "layer_norm", "layernorm", "ln_"),
    "adapter_pfeiffer": (".adapter.",),
    "prompt_tuning": ("prompt_encoder.",),
    "p_tuning": ("prompt_encoder.",),
    "prefix_tuning": ("prefix_encoder.",),
}
SMALL = ["task=rte", "task.max_length=48", "train.max_train_samples=16", "train.max_eval_samples=8"]
EXTRA = {"p_tuning": ["method.hidden=32"]}  # a small prompt encoder for tiny models


def overrides(method, model, *more):
    base = [*SMALL, "train.batch_size=16", *EXTRA.get(method, [])]
    keys = {o.split("=")[0] for o in more}
    return [f"model={model}", f"method={method}", *[o for o in base if o.split("=")[0] not in keys], *more]


# The real MiniLM fits a batch of 8 RTE pairs with every method: (factor the loss falls below, most steps).
# BitFit and LoRA: under 0.5x; the others under 0.6x.
MINILM = {**{m: (0.6, 20) for m in OWN}, "bitfit": (0.5, 30), "lora": (0.5, 30)}


@pytest.mark.parametrize("method", MINILM)
def test_real_minilm_overfits(compose, method):
    require_data()
    from peftbench.setup import prepare

    # The MLP-reparameterised prefix needs far more steps than 20 (Li & Liang train for epochs at 5e-5); the
    # prefix itself (mlp=false) must fit the batch as fast as the other methods.
    more = ["method.mlp=false"] if method == "prefix_tuning" else []
    cfg = compose(*overrides(method, "minilm", *more), "train.max_train_samples=8", "train.batch_size=8")
    factor, steps = MINILM[method]
    losses = overfit(prepare(cfg, {}), lr=1e-2, steps=steps, until=factor)
    assert losses[-1] < factor * losses[0], losses


# --- trainable counts on the real paper models (meta device) ---------------------------------------------


def counts(compose, *more):
    cfg = compose(*more)
    fam = family(cfg.model)
    model = apply_method(build_meta(cfg.model, cfg.task.kind, len(cfg.task.labels)), cfg.method, fam)
    return count(model, fam.head), model


@pytest.mark.parametrize(
    "model,expected",
    [
        ("roberta-base", 12 * (768 + 768 + 3072)),  # encoder: L (d_k + d_v + d_ff) = 55,296
        ("gpt2-medium", 24 * (1024 + 1024 + 4096)),  # decoder without cross-attention: 147,456
        ("t5-base", 12 * (768 + 768 + 3072) + 12 * (2 * 768 + 2 * 768 + 3072)),  # enc + dec: 129,024
        ("bart-base", 6 * (768 + 768 + 3072) + 6 * (2 * 768 + 2 * 768 + 3072)),
        # T-Few's T0-3B (d_k = d_v = 32 heads x 64, gated d_ff 5120): 540,672, the paper's 0.01 %
        ("t0-3b", 24 * (2048 + 2048 + 5120) + 24 * (2 * 2048 + 2 * 2048 + 5120)),
    ],
)
def test_ia3_counts_follow_the_formula(compose, model, expected):
    c, _ = counts(compose, "method=ia3", f"model={model}")
    assert c["trainable_without_head"] == expected


def test_ia3_scales_the_ffn_output_input_not_the_attention_output(compose):
    _, model = counts(compose, "method=ia3", "model=roberta-base")
    names = [n for n, _ in model.named_parameters() if "ia3_l" in n]
    assert not any("attention.output" in n for n in names)
    ff = [n for n in names if ".output.dense." in n]
    assert len(ff) == 12 and model.get_parameter(ff[0]).numel() == 3072  # l_ff has d_ff entries


def test_prefix_stored_count_and_trainable_count_with_the_mlp(compose):
    stored, _ = counts(compose, "method=prefix_tuning", "model=gpt2-medium", "method.mlp=false")
    assert stored["trainable_without_head"] == 10 * 24 * 2 * 1024 == 491_520
    with_mlp, model = counts(compose, "method=prefix_tuning", "model=gpt2-medium")
    mlp = 10 * 1024 + (1024 * 512 + 512) + (512 * 491_520 // 10 + 491_520 // 10)
    assert with_mlp["trainable_without_head"] == mlp == 25_750_016
    model.prefix_encoder.merge()  # drop the MLP (on meta: shapes only)
    assert sum(p.numel() for p in model.prefix_encoder.parameters()) == 491_520


@pytest.mark.parametrize("budget", [0.001, 0.03])
def test_adapter_budget_lands_within_10_percent_on_gpt2_medium(compose, budget):
    c, model = counts(
        compose,
        "method=adapter_houlsby",
        "model=gpt2-medium",
        f"method.budget={budget}",
        "method.bottleneck=null",
    )
    base = c["total_without_head"] - c["trainable_without_head"]  # the model's own parameters
    assert abs(c["trainable_without_head"] / base - budget) < 0.1 * budget
    assert model.peftbench_method["bottleneck"] >= 1


def test_adapter_counts_follow_the_formula(compose):
    d, m, L = 768, 64, 12
    adapter = 2 * d * m + m + d
    houlsby, _ = counts(compose, "method=adapter_houlsby", "model=roberta-base")
    norms = 2 * 2 * d * L + 2 * d  # two LayerNorms per layer + the embeddings' LayerNorm, weight and bias
    assert houlsby["trainable_without_head"] == 2 * L * adapter + norms
    pfeiffer, _ = counts(compose, "method=adapter_pfeiffer", "model=roberta-base", f"method.bottleneck={m}")
    assert pfeiffer["trainable_without_head"] == L * adapter
    t5, _ = counts(compose, "method=adapter_pfeiffer", "model=t5-base", f"method.bottleneck={m}")
    assert t5["trainable_without_head"] == 2 * L * adapter  # every encoder and decoder block
    cfg = compose("method=adapter_pfeiffer", "model=t5-base", f"method.bottleneck={m}")
    lm = apply_method(build_meta(cfg.model, lm=True), cfg.method, family(cfg.model, lm=True))  # rank classif.
    assert sum(p.numel() for p in lm.parameters() if p.requires_grad) == 2 * L * adapter


@pytest.mark.parametrize("model,d", [("roberta-base", 768), ("gpt2-medium", 1024), ("t5-base", 768)])
def test_prompt_tuning_adds_length_x_d_model(compose, model, d):
    c, _ = counts(compose, "method=prompt_tuning", f"model={model}", "method.length=100")
    assert c["trainable_without_head"] == 100 * d


def test_p_tuning_counts_the_prompt_encoder_and_the_backbone_option(compose):
    d, h, n = 768, 384, 20  # THUDM/P-tuning: LSTM of d / 2 per direction, MLP head d -> d -> d
    # 2-layer bidirectional LSTM (4 gates; the second layer reads both directions: 2h) + the MLP head
    lstm = 2 * (4 * h * (d + h) + 8 * h) + 2 * (4 * h * (2 * h + h) + 8 * h)
    mlp_head = (2 * h * 2 * h + 2 * h) + (2 * h * d + d)
    assert 2 * h == d
    c, _ = counts(compose, "method=p_tuning", "model=roberta-base")
    assert c["trainable_without_head"] == n * d + lstm + mlp_head
    tuned, _ = counts(compose, "method=p_tuning", "model=roberta-base", "method.tune_backbone=true")
    assert tuned["trainable_without_head"] == tuned["total_without_head"]


def test_prefix_tuning_not_applicable_to_deberta(compose):
    with pytest.raises(UserError, match="disentangled attention"):
        counts(compose, "method=prefix_tuning", "model=deberta-v2-xxlarge")


# --- save / reload, merge ---------------------------------------------------------------------------------


def trained(compose, method, model, *more):
    """A model with the method applied and its trainable weights set to random values (as after training),
    plus one batch."""
    from peftbench.setup import prepare

    cfg = compose(*overrides(method, model, *more))
    setup = prepare(cfg, {})
    perturb(setup.model)
    return cfg, setup, next(iter(setup.eval_loader))


@pytest.mark.parametrize(
    "method,model",
    [
        ("adapter_houlsby", "tiny-roberta"),
        ("adapter_pfeiffer", "tiny-t5"),
        ("prompt_tuning", "tiny-gpt2"),
        ("p_tuning", "tiny-bart"),
        ("prefix_tuning", "tiny-bert"),
        ("lora", "tiny-gpt2"),  # FusedLoRA on the q, v slices of c_attn
        ("ia3", "tiny-gpt2"),  # FusedIA3 on c_attn's k, v + peft's IA3 on mlp.c_proj
    ],
)
def test_own_methods_save_and_reload_to_identical_logits(compose, tmp_path, method, model):
    require_data()
    cfg, setup, batch = trained(compose, method, model)
    with torch.no_grad():
        expected = setup.fmt.logits(setup.model, batch)
    assert save_trainable(setup.model, tmp_path).endswith("safetensors")
    assert (tmp_path / "method.json").exists()
    base, _ = load_model(cfg.model, "classification", 2)
    loaded = load_trainable(base, tmp_path, family(cfg.model)).eval()
    with torch.no_grad():
        assert torch.equal(setup.fmt.logits(loaded, batch), expected)


def test_adapter_budget_reload_uses_the_solved_bottleneck(compose, tmp_path):
    require_data()
    from peftbench.methods.adapter import load_adapters

    cfg, setup, batch = trained(
        compose, "adapter_houlsby", "tiny-gpt2", "method.budget=0.03", "method.bottleneck=null"
    )
    save_trainable(setup.model, tmp_path)
    base, _ = load_model(cfg.model, "classification", 2)
    loaded = load_adapters(base, tmp_path, family(cfg.model)).eval()
    with torch.no_grad():
        assert torch.equal(setup.fmt.logits(loaded, batch), setup.fmt.logits(setup.model, batch))


def test_ia3_peft_checkpoint_reloads_with_peft(compose, tmp_path):
    require_data()
    from peft import PeftModel

    cfg, setup, batch = trained(compose, "ia3", "tiny-roberta")
    assert save_trainable(setup.model, tmp_path) == "peft"
    base, _ = load_model(cfg.model, "classification", 2)
    loaded = PeftModel.from_pretrained(base, tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(setup.fmt.logits(loaded, batch), setup.fmt.logits(setup.model, batch))


PEFT_SAVED = [("lora", "tiny-roberta"), ("lora", "tiny-t5"), ("ia3", "tiny-bert"), ("ia3", "tiny-t5")]


def test_peft_adapters_reload_in_a_fresh_process_to_identical_logits(compose, tmp_path):
    """The adapters peft saves (LoRA on separate q / v projections, IA3) with their trained heads
    (modules_to_save) load with peft alone in a new process, on a base rebuilt from the model config only."""
    require_data()
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from omegaconf import OmegaConf

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    helper = [sys.executable, str(root / "tests" / "peft_reload.py"), str(torch.get_num_threads())]
    # started first: it imports torch / transformers / peft while this process trains, then reads the jobs
    reload = subprocess.Popen(helper, stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    jobs, expected = [], {}
    for method, model in PEFT_SAVED:
        cfg, setup, batch = trained(compose, method, model)
        folder = tmp_path / f"{method}-{model}"
        assert save_trainable(setup.model, folder) == "peft"
        OmegaConf.save(cfg.model, folder / "model.yaml", resolve=True)
        torch.save(batch, folder / "batch.pt")
        with torch.no_grad():
            expected[folder.name] = setup.fmt.logits(setup.model, batch)
        files = {"model": "model.yaml", "adapter": "", "batch": "batch.pt", "out": "logits.pt"}
        jobs.append({k: str(folder / f) for k, f in files.items()})
    _, err = reload.communicate(json.dumps(jobs), timeout=120)
    assert reload.returncode == 0, err[-2000:]
    for name, logits in expected.items():
        assert torch.equal(torch.load(tmp_path / name / "logits.pt"), logits), name


@pytest.mark.parametrize("method", ["ia3", "lora"])
@pytest.mark.parametrize("model", ["tiny-roberta", "tiny-gpt2", "tiny-t5"])
def test_merged_equals_unmerged(compose, method, model):
    """IA3 and LoRA (peft's, and our fused GPT-2 modules) merged into the weights: no method module or
    parameter is left, and the logits equal the unmerged model's within 1e-5."""
    require_data()
    from peftbench.methods.ia3 import FusedIA3
    from peftbench.methods.lora import FusedLoRA

    _, setup, batch = trained(compose, method, model)
    with torch.no_grad():
        unmerged = setup.fmt.logits(setup.model, batch)
        merged_model = finish(setup.model)
        assert not any(isinstance(m, (FusedIA3, FusedLoRA)) for m in merged_model.modules())
        assert not any(k in n for n, _ in merged_model.named_parameters() for k in ("ia3_", "lora_"))
        assert torch.allclose(setup.fmt.logits(merged_model, batch), unmerged, atol=1e-5)


def test_prefix_mlp_dropped_after_training_gives_the_same_logits(compose):
    require_data()
    _, setup, batch = trained(compose, "prefix_tuning", "tiny-gpt2")
    with torch.no_grad():
        before = setup.fmt.logits(setup.model, batch)
        model = finish(setup.model)
        assert not hasattr(model.prefix_encoder, "mlp")
        assert sum(p.numel() for p in model.prefix_encoder.parameters()) == 10 * 2 * 2 * 32
        assert torch.allclose(setup.fmt.logits(model, batch), before, atol=1e-5)


# --- inits, faithfulness details --------------------------------------------------------------------------


def test_prompt_class_label_init_uses_label_word_embeddings(compose):
    require_data()
    from peftbench.models import load_tokenizer

    cfg = compose(*overrides("prompt_tuning", "tiny-gpt2"), "method.label_words=[yes,no]")
    model, tok = load_model(cfg.model, "classification", 2)
    model = apply_method(model, cfg.method, family(cfg.model))
    emb = model.base_model.get_input_embeddings()
    for i, word in enumerate(["yes", "no"]):
        ids = torch.tensor(load_tokenizer(cfg.model)(word, add_special_tokens=False)["input_ids"])
        assert torch.allclose(model.prompt_encoder.embedding[i], emb(ids).mean(0))


def test_prompt_head_reads_the_real_tokens(compose):
    """The prompt is in front of the input; GPT-2's head still reads the last real token, BERT's the [CLS]."""
    require_data()
    cfg, setup, batch = trained(compose, "prompt_tuning", "tiny-gpt2", "method.init=random_uniform")
    hidden = {}
    setup.model.base_model.register_forward_hook(lambda m, a, o: hidden.update(h=o.last_hidden_state))
    with torch.no_grad():
        setup.fmt.logits(setup.model, batch)
    assert hidden["h"].shape[1] == batch["input_ids"].shape[1]  # prompt positions dropped after the backbone


def test_prefix_init_from_real_words(compose):
    require_data()
    cfg = compose(
        *overrides("prefix_tuning", "tiny-bert"),
        "method.mlp=false",
        "method.length=3",
        "method.init_text='is the second sentence implied'",
    )
    model, _ = load_model(cfg.model, "classification", 2)
    model = apply_method(model, cfg.method, family(cfg.model))
    p = model.prefix_encoder.prefix
    assert p.shape == (3, 2 * 2 * 32) and p.abs().sum() > 0 and p.std() > 0.05  # activations, not N(0, 0.02)


def test_ft_top2_trains_what_prefix_tunings_code_trains(compose):
    """XiangLi1999/PrefixTuning@6519d30e:gpt2/run_language_modeling.py L797-802 (finetune-top, top_layers 2):
    transformer.ln_f, transformer.wte (tied to the LM head), transformer.h.23, transformer.h.22."""
    from peftbench.methods import apply_method
    from peftbench.setup import meta_model

    cfg = compose("task=e2e", "model=gpt2-medium", "method=ft_top2")
    model, fam = meta_model(cfg)
    model = apply_method(model, cfg.method, fam)
    trained = {
        ".".join(n.split(".")[: 3 if n.startswith("transformer.h.") else 2])
        for n, p in model.named_parameters()
        if p.requires_grad
    }
    assert trained == {"transformer.h.22", "transformer.h.23", "transformer.ln_f", "transformer.wte"}


@pytest.mark.parametrize(
    "method,act,std",
    [
        # adapter-bert: gelu, truncated normal (stddev 1e-3, cut at 2 std: its std is 0.8796 x 1e-3) on both
        ("adapter_houlsby", torch.nn.GELU, 0.8796e-3),
        ("adapter_pfeiffer", torch.nn.ReLU, 0.02),  # adapters' SeqBn: relu, "bert" init N(0, 0.02)
    ],
)
def test_adapter_activation_and_init_follow_their_sources(compose, method, act, std):
    from peftbench.methods import apply_method
    from peftbench.methods.adapter import Adapter
    from peftbench.models import family, load_model

    cfg = compose("task=rte", "model=tiny-bert", f"method={method}", "method.bottleneck=256")
    torch.manual_seed(0)
    model = apply_method(load_model(cfg.model, "classification", 2)[0], cfg.method, family(cfg.model))
    adapters = [m for m in model.modules() if isinstance(m, Adapter)]
    assert adapters and all(isinstance(a.act, act) for a in adapters)
    w = torch.cat([torch.cat([a.down.weight.flatten(), a.up.weight.flatten()]) for a in adapters])
    assert abs(w.std().item() - std) < 0.1 * std  # 2 x 32 x 256 weights per adapter
    if method == "adapter_houlsby":
        assert w.abs().max().item() <= 2e-3  # cut at 2 x stddev, as TF's truncated_normal_initializer
    biases = torch.cat([torch.cat([a.down.bias, a.up.bias]) for a in adapters])
    assert torch.count_nonzero(biases) == 0


def test_sampled_vocabulary_prompt_ids_are_drawn_without_replacement(compose):
    """google-research/prompt-tuning prompts.py L199-209: the sampled-vocabulary slots are distinct ids of the
    5,000 first; 600 slots drawn with replacement would repeat one with probability ~1 - e^-36."""
    from peftbench.methods import apply_method
    from peftbench.methods.prompt import PromptEncoder
    from peftbench.models import family, load_model

    cfg = compose(
        "task=rte",
        "model=tiny-bert",
        "method=prompt_tuning",
        "method.init=sampled_vocab",
        "method.length=600",
    )
    torch.manual_seed(0)
    base = load_model(cfg.model, "classification", 2)[0]
    emb = base.get_input_embeddings().weight.detach()[:5000].clone()
    model = apply_method(base, cfg.method, family(cfg.model))
    (encoder,) = [m for m in model.modules() if isinstance(m, PromptEncoder)]
    rows = encoder.embedding.detach()
    ids = [int(torch.nonzero((emb == r).all(1))[0]) for r in rows]
    assert len(set(ids)) == 600
