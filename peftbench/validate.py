"""Check a composed config before any data or weights load, so a bad value fails in a second, not after
minutes of loading, and every point of a sweep is checked before the first one runs."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
from omegaconf import DictConfig

from peftbench.errors import UserError, choice_error
from peftbench.formats import TASK_FORMATS, format_class, model_family
from peftbench.methods import apply_method, capabilities, hook
from peftbench.metrics import METRICS
from peftbench.models import FAMILIES, family
from peftbench.schema import check_values


def validate(cfg: DictConfig, here: bool = True) -> None:
    """Every key (the schema: type, range), then the rules across keys and groups, then the method on a
    weightless copy of the model (rank > 0, k <= blocks, applicable to the family, fits the positions).
    `here=False` (a preset's --dry-run) leaves out what depends on this machine (CUDA for fp16)."""
    check_values(cfg)
    check_method_train(cfg)
    check_devices(cfg.train, here)
    check_processes(cfg.train)
    check_task(cfg)
    check_format(cfg)
    from peftbench.setup import meta_model

    model, fam = meta_model(cfg)
    apply_method(model, cfg.method, fam)
    check_positions(cfg, model.config)


def check_processes(t: DictConfig, n: int | None = None) -> None:
    """Under torchrun / accelerate launch every batch is split over the processes (n, else WORLD_SIZE)."""
    n = n if n is not None else int(os.environ.get("WORLD_SIZE", "1") or 1)
    for key in ("batch_size", "eval_batch_size"):
        if n > 1 and int(t[key]) % n:
            raise UserError(
                f"train.{key}={t[key]} with {n} processes: each batch is split over the processes, "
                f"so it must be a multiple of {n}"
            )


def positions(config) -> int | None:
    """Input positions the model can embed (None: relative positions, no limit)."""
    if config.model_type == "t5" or (config.model_type == "deberta-v2" and not config.position_biased_input):
        return None
    n = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if config.model_type == "roberta" and n:  # positions start after the padding index
        n -= config.pad_token_id + 1
    return n


def check_positions(cfg: DictConfig, config) -> None:
    """task.max_length, plus the soft prompt a method prepends, fits the model's position embeddings."""
    limit = positions(config)
    prompt_positions = hook(cfg.method, "input_positions")
    added = prompt_positions(cfg) if prompt_positions else 0
    if limit is not None and cfg.task.max_length + added > limit:
        extra = f" + method.length={added}" if added else ""
        raise UserError(
            f"task.max_length={cfg.task.max_length}{extra} is more than model {cfg.model.name}'s {limit} "
            f"positions; lower {'task.max_length or method.length' if added else 'task.max_length'}"
        )


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


def check_devices(t: DictConfig, here: bool = True) -> None:
    if t.get("compile") and t.compile not in torch._dynamo.list_backends(exclude_tags=()):
        shown = {"null", "eager", "aot_eager", *torch._dynamo.list_backends()}  # not the test-only ones
        raise choice_error("train.compile", t.compile, shown)
    if not here:
        return
    from peftbench.log import PACKAGES, missing_tracker

    if name := missing_tracker(t.get("report_to")):
        raise UserError(
            f"train.report_to={name} needs the {PACKAGES[name]} package, which is not installed "
            f"(pip install {PACKAGES[name]}); or train.report_to=none"
        )
    if t.device == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device=cuda but no CUDA device is visible; use train.device=auto or cpu")
    if t.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UserError("train.mixed_precision=fp16 needs a CUDA device; use no (or bf16) on CPU")


def check_task(cfg: DictConfig) -> None:
    for name in cfg.task.metrics:
        if name not in METRICS:
            raise choice_error("metric", name, METRICS)
    if cfg.task.main_metric not in cfg.task.metrics:
        raise UserError(
            f"task.main_metric={cfg.task.main_metric!r} is not in task.metrics {list(cfg.task.metrics)}"
        )
    if cfg.model.family not in FAMILIES:
        raise choice_error("model.family", cfg.model.family, FAMILIES)


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
