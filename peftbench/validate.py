"""Check a composed config before any data or weights load, so a bad value fails in a second, not after
minutes of loading, and every point of a sweep is checked before the first one runs."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from peftbench.errors import UserError, choice_error
from peftbench.methods import apply_method
from peftbench.metrics import METRICS
from peftbench.models import family, meta_model, span_head, uses_lm
from peftbench.prompting import SLOT, anchored
from peftbench.span import check_stride

OPTIMIZERS = ("adamw", "adafactor")
DECODE_STRATEGIES = ("beam", "greedy", "sample")
NO_GENERATION = {  # soft prompts generate with T5 / BART (the encoder reads the prompt once), not with GPT-2
    "prompt_tuning": "its prompt is prepended in one forward call, which GPT-2's step-by-step decoding "
    "does not repeat; use a T5 / BART model, or method=prefix_tuning",
    "p_tuning": "its prompt is prepended in one forward call, which GPT-2's step-by-step decoding "
    "does not repeat; use a T5 / BART model (method.placement=prepend), or method=prefix_tuning",
    "icl": "in-context learning ranks answer choices here; it has no generation path",
}

FORMATS = ("head", "prompt")


# methods whose trained model is a plain transformers model (peft's LoRA / IA3 merge into the weights)
EXPORTABLE = ("full", "ft_top2", "bitfit", "lora", "ia3")


def _positive(value, name: str, kind=(int,), allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, kind) or value <= 0:
        raise UserError(f"{name}={value!r}: must be a positive {'integer' if kind == (int,) else 'number'}")


def validate(cfg: DictConfig) -> None:
    t = cfg.train
    _positive(t.lr, "train.lr", (int, float))
    _positive(t.batch_size, "train.batch_size")
    _positive(t.eval_batch_size, "train.eval_batch_size")
    _positive(t.grad_accum, "train.grad_accum")
    _positive(t.epochs, "train.epochs")
    if t.max_steps != 0:  # 0: evaluate the model as loaded (an untrained / zero-shot baseline)
        _positive(t.max_steps, "train.max_steps", allow_none=True)
    _positive(t.max_train_samples, "train.max_train_samples", allow_none=True)
    _positive(t.max_eval_samples, "train.max_eval_samples", allow_none=True)
    _positive(t.max_test_samples, "train.max_test_samples", allow_none=True)
    _positive(t.log_every, "train.log_every")
    if not 0 <= t.warmup_ratio < 1:
        raise UserError(f"train.warmup_ratio={t.warmup_ratio!r}: must be in [0, 1)")
    if t.get("export_model") and cfg.method.name not in EXPORTABLE:
        raise UserError(
            f"train.export_model with method={cfg.method.name}: its trained parameters are not weights of the "
            f"base model; export works with: {', '.join(EXPORTABLE)}"
        )
    if t.optimizer not in OPTIMIZERS:
        raise choice_error("train.optimizer", t.optimizer, OPTIMIZERS)
    if t.weight_decay < 0:
        raise UserError(f"train.weight_decay={t.weight_decay!r}: must be >= 0")
    if t.eval_every != "epoch":
        _positive(t.eval_every, "train.eval_every")
    if t.checkpoint_every not in ("epoch", None):
        _positive(t.checkpoint_every, "train.checkpoint_every")
    if isinstance(t.lock_wait_s, bool) or not isinstance(t.lock_wait_s, (int, float)) or t.lock_wait_s < 0:
        raise UserError(
            f"train.lock_wait_s={t.lock_wait_s!r}: must be a number of seconds >= 0 (0: skip at once)"
        )
    _positive(t.lock_stale_s, "train.lock_stale_s", (int, float))
    if t.mixed_precision not in ("no", "bf16", "fp16"):
        raise choice_error("train.mixed_precision", t.mixed_precision, ["no", "bf16", "fp16"])
    if t.get("compile"):
        if t.compile not in torch._dynamo.list_backends(exclude_tags=()):
            shown = {"null", "eager", "aot_eager", *torch._dynamo.list_backends()}  # not the test-only ones
            raise choice_error("train.compile", t.compile, shown)
    if t.get("fsdp"):
        from peftbench.parallel import FSDP_METHODS

        if cfg.method.name not in FSDP_METHODS:
            raise UserError(
                f"train.fsdp=true with method={cfg.method.name}: FSDP here shards full fine-tuning; "
                f"use it with: {', '.join(FSDP_METHODS)}"
            )
        if uses_lm(cfg) and cfg.task.kind != "generation":
            raise UserError(
                "train.fsdp=true with task.format=prompt: rank classification projects the "
                "scored positions outside the model's forward; use task.format=head"
            )
        if t.mixed_precision == "fp16":
            raise UserError("train.fsdp=true with train.mixed_precision=fp16: use bf16 (or no)")
    if t.device not in ("auto", "cpu", "cuda"):
        raise choice_error("train.device", t.device, ["auto", "cpu", "cuda"])
    if t.device == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device=cuda but no CUDA device is visible; use train.device=auto or cpu")
    if t.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UserError("train.mixed_precision=fp16 needs a CUDA device; use no (or bf16) on CPU")
    _positive(cfg.task.max_length, "task.max_length")
    if cfg.task.max_length < 8:
        raise UserError(f"task.max_length={cfg.task.max_length}: too small to hold the input; use >= 8")
    for name in cfg.task.metrics:
        if name not in METRICS:
            raise choice_error("metric", name, METRICS)
    if cfg.task.main_metric not in cfg.task.metrics:
        raise UserError(
            f"task.main_metric={cfg.task.main_metric!r} is not in task.metrics {list(cfg.task.metrics)}"
        )
    if not isinstance(cfg.seed, int):
        raise UserError(f"seed={cfg.seed!r}: must be an integer")
    # The method's own checks (rank > 0, k <= blocks, applicable to the family) on a weightless copy.
    check_format(cfg)
    model, fam = meta_model(cfg)
    apply_method(model, cfg.method, fam)


def check_format(cfg: DictConfig) -> None:
    """The task format fits the method and the task (ICL needs the LM head; regression has no choices)."""
    if cfg.task.get("format", "head") not in FORMATS:
        raise choice_error("task.format", cfg.task.format, FORMATS)
    if span_head(cfg):
        check_stride(cfg.task)
    if cfg.task.kind == "generation" and not span_head(cfg):
        fam = family(cfg.model)
        if fam.kind == "encoder":
            raise UserError(
                f"task {cfg.task.name} generates text and model {cfg.model.name} ({fam.name}) has no decoder; "
                "use a GPT-2, T5 or BART model"
            )
        soft_prompt_ok = fam.kind == "encoder-decoder" and cfg.method.get("placement", "prepend") == "prepend"
        if cfg.method.name in NO_GENERATION and not (soft_prompt_ok and cfg.method.name != "icl"):
            raise UserError(f"method={cfg.method.name} cannot generate: {NO_GENERATION[cfg.method.name]}")
        d = cfg.task.decode
        if d.strategy not in DECODE_STRATEGIES:
            raise choice_error("task.decode.strategy", d.strategy, DECODE_STRATEGIES)
        _positive(d.num_beams, "task.decode.num_beams")
        _positive(d.max_new_tokens, "task.decode.max_new_tokens")
        if (
            isinstance(d.no_repeat_ngram_size, bool)
            or not isinstance(d.no_repeat_ngram_size, int)
            or d.no_repeat_ngram_size < 0
        ):
            raise UserError(
                f"task.decode.no_repeat_ngram_size={d.no_repeat_ngram_size!r}: must be an integer >= 0"
            )
    if cfg.method.get("needs_prompt_format") and not uses_lm(cfg):
        raise UserError(
            f"method={cfg.method.name} scores answer choices with the LM head: add task.format=prompt"
        )
    if anchored(cfg):
        if not uses_lm(cfg):
            raise UserError(
                "method.placement=template fills the [P] slots of task.prompt.anchored: add task.format=prompt"
            )
        template = (cfg.task.get("prompt") or {}).get("anchored")
        if not template:
            raise UserError(
                f"task {cfg.task.name} has no task.prompt.anchored template; use method.placement=prepend"
            )
        if template.count(SLOT) != cfg.method.length:
            raise UserError(
                f"method.length={cfg.method.length} but task.prompt.anchored has {template.count(SLOT)} [P] "
                f"slots; set method.length={template.count(SLOT)}"
            )
    if uses_lm(cfg) and cfg.task.kind == "regression":
        raise UserError(f"task.format=prompt needs answer choices; {cfg.task.name} is a regression task")
