"""Input formats: how a task's rows reach a model and come back as scores, one plug-in per format.

- head: a new classification / regression / multiple-choice head (formats/head.py);
- prompt: answer choices ranked by the model's own LM head (formats/prompt.py);
- generation: the LM head writes the output, scored by the task's official scorer (formats/generation.py);
- span: start / end logits of an extractive QA head over the context's windows (formats/span.py).

The format of a run is chosen once, here, from the task's config (`choose`). Every format is a class with
the same small protocol (`Format`): it is the collate function of the data loaders and holds the loss and
the evaluation, so the recipe (setup, loop, evaluate) never asks which format it runs.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from omegaconf import DictConfig

from peftbench.errors import choice_error
from peftbench.models import Family, family

TASK_FORMATS = ("head", "prompt")  # the values of task.format; generation and span follow from the task


class Format:
    """The protocol every format implements. Built by setup.py with the run's config, the task, the
    tokenizer and the model's family; `options` come from the method's `format_options` hook."""

    name: ClassVar[str] = ""
    lm: ClassVar[bool] = False  # the model keeps its own LM head (no new head)
    span: ClassVar[bool] = False  # the model gets a span-extraction head

    def __init__(self, cfg: DictConfig, task, tokenizer, fam: Family, **options):
        self.cfg, self.task, self.tokenizer, self.fam = cfg, task, tokenizer, fam
        self.kind = fam.kind

    @classmethod
    def check(cls, cfg: DictConfig) -> None:
        """Refuse a config this format cannot run (before any data or weights load)."""

    def encode_train(self, rows: list[dict]) -> list[dict[str, Any]]:
        return self.encode(rows)

    def encode(self, rows: list[dict]) -> list[dict[str, Any]]:
        """Evaluation (and test) rows -> features."""
        raise NotImplementedError

    def eval_rows(self, rows: list[dict], cap: int | None) -> list[dict]:
        """The validation rows evaluated (train.max_eval_samples: the first N)."""
        return rows[: cap or None]

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        """Collate features into a batch."""
        raise NotImplementedError

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def length(self, feature: dict) -> int:
        """Tokens of a feature (for batches of similar length)."""
        return len(feature["input_ids"])

    tokens_of = None  # tokens a feature costs, if not cost.example_tokens
    stored_text: str | None = None  # what the method stores instead of weights (ICL's demonstrations)

    def evaluate(self, model, loader, ev, rows: list[dict] | None, name: str | None) -> dict[str, Any]:
        """One evaluation of the loader's features: {"metrics": {...}, "loss": ...}; `ev` is the run's
        Setup (gather, main process, artifacts); `rows`/`name`: another set of the task's rows."""
        raise NotImplementedError


def choose(cfg: DictConfig) -> str:
    """The run's format, from the task's config: an extractive task on an encoder-only model gets a span
    head; a generation task generates; otherwise task.format (head | prompt)."""
    if cfg.task.get("extractive") and family(cfg.model).kind == "encoder":
        return "span"
    if cfg.task.kind == "generation":
        return "generation"
    fmt = cfg.task.get("format", "head")
    if fmt not in TASK_FORMATS:
        raise choice_error("task.format", fmt, TASK_FORMATS)
    return fmt


def format_class(cfg: DictConfig) -> type[Format]:
    from peftbench.formats.generation import GenerationFormat
    from peftbench.formats.head import HeadFormat
    from peftbench.formats.prompt import PromptFormat
    from peftbench.formats.span import SpanFormat

    classes = {c.name: c for c in (HeadFormat, PromptFormat, GenerationFormat, SpanFormat)}
    return classes[choose(cfg)]


def model_family(cfg: DictConfig) -> Family:
    """The model's family as the format uses it (with a new head, its LM head, or a span head)."""
    fmt = format_class(cfg)
    return family(cfg.model, fmt.lm, fmt.span)


def model_kind(cfg: DictConfig) -> str:
    """What `models.load_model` builds the model for: the task's kind, or "span"."""
    return "span" if format_class(cfg).span else cfg.task.kind


def save_predictions(ev, examples: list[dict], name: str | None = None) -> str:
    """An evaluation's per-example predictions as JSON lines: predictions/eval_<n>.jsonl (or <name>.jsonl);
    the path, for the evaluation's result."""
    import json

    from peftbench.errors import disk_full_is_user_error
    from peftbench.record import write_atomic

    path = ev.artifacts / "predictions" / (f"{name}.jsonl" if name else f"eval_{ev.n_evals}.jsonl")
    with disk_full_is_user_error(f"the predictions {path}", "free space and rerun: the run resumes"):
        write_atomic(path, "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in examples))
    return str(path)
