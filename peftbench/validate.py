"""Check a composed config before any data or weights load, so a bad value fails in a second, not after
minutes of loading, and every point of a sweep is checked before the first one runs."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from omegaconf import DictConfig

from peftbench.errors import UserError, choice_error
from peftbench.formats import TASK_FORMATS, format_class, model_family
from peftbench.methods import apply_method, capabilities, hook
from peftbench.metrics import METRICS
from peftbench.models import family
from peftbench.optim import OPTIMIZERS


def _positive(value, name: str, kind=(int,), allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, kind) or value <= 0:
        raise UserError(f"{name}={value!r}: must be a positive {'integer' if kind == (int,) else 'number'}")


def validate(cfg: DictConfig) -> None:
    check_train(cfg.train)
    check_method_train(cfg)
    check_devices(cfg.train)
    check_task(cfg)
    if not isinstance(cfg.seed, int):
        raise UserError(f"seed={cfg.seed!r}: must be an integer")
    # The method's own checks (rank > 0, k <= blocks, applicable to the family) on a weightless copy.
    check_format(cfg)
    from peftbench.setup import meta_model

    model, fam = meta_model(cfg)
    apply_method(model, cfg.method, fam)


def check_train(t: DictConfig) -> None:
    """Sizes, counts and rates of the training loop."""
    _positive(t.lr, "train.lr", (int, float))
    for key in ("batch_size", "eval_batch_size", "grad_accum", "epochs", "log_every"):
        _positive(t[key], f"train.{key}")
    if t.max_steps != 0:  # 0: evaluate the model as loaded (an untrained / zero-shot baseline)
        _positive(t.max_steps, "train.max_steps", allow_none=True)
    for key in ("max_train_samples", "max_eval_samples", "max_test_samples"):
        _positive(t[key], f"train.{key}", allow_none=True)
    if not 0 <= t.warmup_ratio < 1:
        raise UserError(f"train.warmup_ratio={t.warmup_ratio!r}: must be in [0, 1)")
    if t.optimizer not in OPTIMIZERS:
        raise choice_error("train.optimizer", t.optimizer, OPTIMIZERS)
    if t.weight_decay < 0:
        raise UserError(f"train.weight_decay={t.weight_decay!r}: must be >= 0")
    # clip_grad_norm_ scales the gradient by max_norm / norm: a negative max_norm flips it (gradient ascent),
    # 0 zeroes it
    _positive(t.max_grad_norm, "train.max_grad_norm", (int, float), allow_none=True)
    if t.eval_every != "epoch":
        _positive(t.eval_every, "train.eval_every")
    if t.checkpoint_every not in ("epoch", None):
        _positive(t.checkpoint_every, "train.checkpoint_every")
    if isinstance(t.lock_wait_s, bool) or not isinstance(t.lock_wait_s, (int, float)) or t.lock_wait_s < 0:
        raise UserError(
            f"train.lock_wait_s={t.lock_wait_s!r}: must be a number of seconds >= 0 (0: skip at once)"
        )
    _positive(t.lock_stale_s, "train.lock_stale_s", (int, float))


def check_method_train(cfg: DictConfig) -> None:
    """Training settings that only some methods support (they say so in their capabilities)."""
    t, can = cfg.train, capabilities(cfg.method)
    if t.get("export_model") and not can.exportable:
        raise UserError(
            f"train.export_model with method={cfg.method.name}: its trained parameters are not weights of the "
            f"base model; export works with: {', '.join(with_capability('exportable'))}"
        )
    if not t.get("fsdp"):
        return
    if not can.fsdp:
        raise UserError(
            f"train.fsdp=true with method={cfg.method.name}: FSDP here shards full fine-tuning; "
            f"use it with: {', '.join(with_capability('fsdp'))}"
        )
    if format_class(cfg).name == "prompt":
        raise UserError(
            "train.fsdp=true with task.format=prompt: rank classification projects the "
            "scored positions outside the model's forward; use task.format=head"
        )
    if t.mixed_precision == "fp16":
        raise UserError("train.fsdp=true with train.mixed_precision=fp16: use bf16 (or no)")


def with_capability(name: str) -> list[str]:
    """The methods (configs/method/*.yaml) whose module declares the capability."""
    from peftbench.config import load_option
    from peftbench.paths import group_options

    return [m for m in group_options("method") if getattr(capabilities(load_option("method", m)), name)]


def check_devices(t: DictConfig) -> None:
    if t.mixed_precision not in ("no", "bf16", "fp16"):
        raise choice_error("train.mixed_precision", t.mixed_precision, ["no", "bf16", "fp16"])
    if t.get("compile") and t.compile not in torch._dynamo.list_backends(exclude_tags=()):
        shown = {"null", "eager", "aot_eager", *torch._dynamo.list_backends()}  # not the test-only ones
        raise choice_error("train.compile", t.compile, shown)
    if t.device not in ("auto", "cpu", "cuda"):
        raise choice_error("train.device", t.device, ["auto", "cpu", "cuda"])
    if t.device == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device=cuda but no CUDA device is visible; use train.device=auto or cpu")
    if t.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UserError("train.mixed_precision=fp16 needs a CUDA device; use no (or bf16) on CPU")


def check_task(cfg: DictConfig) -> None:
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


def check_format(cfg: DictConfig) -> None:
    """The task format fits the task, the model and the method: the format's own checks, then the method's
    (`check` hook: e.g. soft prompts generate only with T5 / BART)."""
    fmt = format_class(cfg)
    fmt.check(cfg)
    if method_check := hook(cfg.method, "check"):
        method_check(cfg, family(cfg.model), fmt.name)
    if cfg.method.get("needs_prompt_format") and not fmt.lm:
        raise UserError(
            f"method={cfg.method.name} scores answer choices with the LM head: add task.format=prompt"
        )
    model_family(cfg)  # the family is known


def pair_families() -> list[str]:
    """The families with a tiny model config (configs/model/tiny-<family>.yaml) to decide applicability on."""
    from peftbench.paths import group_options

    return [m.removeprefix("tiny-") for m in group_options("model") if m.startswith("tiny-")]


def pairs() -> list[tuple[str, str, str, str | None]]:
    """(method, family, format, reason it does not apply or None) for every method x family x task format,
    decided by applying the method to the family's tiny model on the meta device."""
    from peftbench.paths import config_dir

    return list(_pairs(config_dir()))


@functools.cache
def _pairs(configs: Path) -> tuple[tuple[str, str, str, str | None], ...]:
    """pairs() of one config folder, worked out once per process (a few seconds: every method on every
    family's meta model)."""
    from peftbench.config import compose, load_option
    from peftbench.paths import group_options
    from peftbench.setup import meta_model

    base = compose(["task=rte"])  # one composition; the method and model YAMLs are swapped in (fast)
    out = []
    for method in group_options("method"):
        for fam in pair_families():
            for fmt in TASK_FORMATS:
                cfg = base.copy()
                cfg.method = load_option("method", method)
                cfg.model = load_option("model", f"tiny-{fam}")
                cfg.task.format = fmt
                try:
                    check_format(cfg)
                    model, family_ = meta_model(cfg)
                    apply_method(model, cfg.method, family_)
                    reason = None
                except UserError as e:
                    reason = str(e)
                out.append((method, fam, fmt, reason))
    return tuple(out)
