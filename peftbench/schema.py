"""The one schema of a run config: every key of every group with its type and range (`Field`).
`validate.validate` runs it (and then the rules that tie keys of different groups together) on every point
of a sweep or preset before any data, weights, lock or record is touched. A method's own keys are declared in
its module (`FIELDS`), beside its code, so adding a method stays its module and its YAML."""

from __future__ import annotations

import difflib
import importlib
import math
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from peftbench.errors import UserError, choice_error
from peftbench.formats import TASK_FORMATS
from peftbench.optim import OPTIMIZERS


@dataclass(frozen=True)
class Field:
    kind: str  # int | number | bool | text | choice | list | map | any
    low: float | None = None  # bounds of int / number (and of a list's length)
    high: float | None = None
    open_low: bool = False  # low itself is out of range
    open_high: bool = False
    choices: tuple = ()
    null: bool = False  # null is allowed
    item: Field | None = None  # a list's items
    length: int | None = None  # a list's exact length
    fields: dict[str, Field] | None = None  # a map's keys (None: any keys; checked by whoever reads it)
    other: Field | None = None  # an alternative form (eval_every: "epoch" or a number of steps)
    added: bool = False  # no YAML sets it: a user adds it with +group.key=value
    doc: str = ""

    def describe(self) -> str:
        text = self._describe()
        if self.other is not None:
            text += f" or {self.other.describe()}"
        return text + (" or null" if self.null else "")

    def _describe(self) -> str:
        if self.kind in ("int", "number"):
            noun = "integer" if self.kind == "int" else "number"
            if self.low == 0 and self.open_low and self.high is None:
                return f"a positive {noun}"
            if self.low == 1 and self.kind == "int" and self.high is None:
                return "a positive integer"
            article = "an" if noun == "integer" else "a"
            if self.low is not None and self.high is None:
                return f"{article} {noun} {'>' if self.open_low else '>='} {self.low:g}"
            if self.low is None and self.high is None:
                return f"{article} {noun}"
            lo = "(" if self.open_low else "["
            hi = ")" if self.open_high else "]"
            return f"{article} {noun} in {lo}{self.low:.15g}, {self.high:.15g}{hi}"
        if self.kind == "bool":
            return "true or false"
        if self.kind == "choice":
            return "one of: " + ", ".join(map(str, self.choices))
        if self.kind == "list":
            n = f"{self.length} " if self.length is not None else ""
            return f"a list of {n}values" + (f" (each {self.item.describe()})" if self.item else "")
        if self.kind == "map":
            return "a mapping {key: value}"
        names = {"text": "non-empty text", "string": "text", "target": "an importable function (module.name)"}
        return names.get(self.kind, "any value")

    def problem(self, value: Any) -> str | None:
        """Why `value` does not fit (None: it fits)."""
        if value is None:
            return None if self.null else "must not be null"
        if self.other is not None:
            if self.other.problem(value) is None or self._problem(value) is None:
                return None
            return f"must be {self.describe()}"
        return self._problem(value)

    def _problem(self, value: Any) -> str | None:  # noqa: C901 (one branch per kind)
        bad = f"must be {self.describe()}"
        if self.kind in ("int", "number"):
            ok_type = (int,) if self.kind == "int" else (int, float)
            if isinstance(value, bool) or not isinstance(value, ok_type) or not math.isfinite(value):
                return bad
            if self.low is not None and (value < self.low or (self.open_low and value == self.low)):
                return bad
            if self.high is not None and (value > self.high or (self.open_high and value == self.high)):
                return bad
            return None
        if self.kind == "bool":
            return None if isinstance(value, bool) else bad
        if self.kind == "text":
            return None if isinstance(value, str) and value.strip() else "must be non-empty text"
        if self.kind == "string":
            return None if isinstance(value, str) else "must be text"
        if self.kind == "choice":
            return None if isinstance(value, (str, int)) and value in self.choices else "choice"
        if self.kind == "list":
            if not isinstance(value, (list, ListConfig)):
                return bad
            if self.length is not None and len(value) != self.length:
                return bad
            if self.item is not None and any(self.item.problem(v) for v in value):
                return bad
            return None
        if self.kind == "map":
            return None if isinstance(value, (dict, DictConfig)) else bad
        if self.kind == "target":
            return None if importable(value) else bad
        return None


def importable(value: Any) -> bool:
    """`module.function` names a function that imports (what Hydra's `_target_` calls)."""
    if not isinstance(value, str) or "." not in value:
        return False
    module, _, name = value.rpartition(".")
    try:
        return callable(getattr(importlib.import_module(module), name, None))
    except Exception:  # not importable, or its import fails
        return False


def Int(low: int | None = None, high: int | None = None, null: bool = False, doc: str = "") -> Field:
    return Field("int", low, high, null=null, doc=doc)


def PositiveInt(null: bool = False, doc: str = "") -> Field:
    return Field("int", 1, null=null, doc=doc)


def Number(low=None, high=None, open_low=False, open_high=False, null=False, doc="") -> Field:
    return Field("number", low, high, open_low, open_high, null=null, doc=doc)


def Positive(null: bool = False, doc: str = "") -> Field:
    return Field("number", 0, None, open_low=True, null=null, doc=doc)


def Rate(doc: str = "") -> Field:
    """A probability that may be 0 but not 1 (dropout)."""
    return Field("number", 0, 1, open_high=True, doc=doc)


def Bool(doc: str = "") -> Field:
    return Field("bool", doc=doc)


def Text(null: bool = False, doc: str = "") -> Field:
    return Field("text", null=null, doc=doc)


def String(doc: str = "") -> Field:
    """Text that may be empty (ICL's content-free inputs)."""
    return Field("string", doc=doc)


def OneOf(*choices, null: bool = False, doc: str = "") -> Field:
    return Field("choice", choices=tuple(choices), null=null, doc=doc)


def ListOf(item: Field | None = None, length: int | None = None, null: bool = False, doc: str = "") -> Field:
    return Field("list", item=item, length=length, null=null, doc=doc)


def Map(
    fields: dict[str, Field] | None = None, null: bool = False, doc: str = "", added: bool = False
) -> Field:
    return Field("map", fields=fields, null=null, doc=doc, added=added)


def Either(first: Field, second: Field) -> Field:
    return Field(**{**first.__dict__, "other": second})


TARGET = Field("target")
SEED = Int(0, 2**32 - 1)  # numpy's seeds are 32-bit

# --- the groups -------------------------------------------------------------------------------------------

TOP: dict[str, Field] = {
    "name": Text(doc="results folder of the runs"),
    "row": Text(null=True, doc="the preset table row of a run"),
    "seed": SEED,
    "paths": Map({"results": Text(), "logs": Text()}),
    # a launched preset's job (peftbench train -m experiment=NAME): which point of which preset it runs
    "grid": Map({"preset": Text(), "point": Int(0)}, added=True),
}

TRAIN: dict[str, Field] = {
    "epochs": PositiveInt(),
    "max_steps": Int(0, null=True, doc="0: evaluate the model as loaded"),
    "batch_size": PositiveInt(),
    "group_by_length": Bool(),
    "grad_accum": PositiveInt(),
    "eval_batch_size": PositiveInt(),
    "optimizer": OneOf(*OPTIMIZERS),
    "adafactor_scale_parameter": Bool(),
    "lr": Positive(),
    "weight_decay": Number(0),
    "adam_betas": ListOf(Number(0, 1, open_high=True), length=2),
    "adam_eps": Positive(),
    "warmup_ratio": Number(0, 1, open_high=True),
    "warmup_steps": Int(0, null=True, doc="overrides warmup_ratio"),
    "schedule": OneOf("linear", "constant"),
    "decay_bias_and_norm": Bool(),
    # clip_grad_norm_ scales the gradient by max_norm / norm: a negative max_norm is gradient ascent, 0 zeroes it
    "max_grad_norm": Positive(null=True),
    "max_train_samples": PositiveInt(null=True),
    "max_eval_samples": PositiveInt(null=True),
    "max_test_samples": PositiveInt(null=True),
    "predict_test": Bool(),
    "eval_every": Either(OneOf("epoch"), PositiveInt()),
    "mixed_precision": OneOf("no", "bf16", "fp16"),
    "device": OneOf("auto", "cpu", "cuda"),
    "gradient_checkpointing": Bool(),
    "compile": Text(null=True, doc="a torch.compile backend"),
    "fsdp": Bool(),
    "num_threads": PositiveInt(null=True),
    "export_model": Text(null=True),
    "save_adapter": Bool(),
    "force": Bool(),
    "checkpoint_every": Either(OneOf("epoch", null=True), PositiveInt()),
    "lock_wait_s": Number(0),
    "lock_stale_s": Positive(),
    "progress": Bool(),
    "log_every": PositiveInt(),
    "report_to": Either(
        OneOf("none", "tensorboard", "wandb", "mlflow"),
        ListOf(OneOf("tensorboard", "wandb", "mlflow")),
    ),
    "loss": Map({"lm": Number(0), "ul": Number(0), "ln": Number(0)}),
    "share_context": Bool(),
    "rank_length_norm": Bool(),
}

MODEL: dict[str, Field] = {
    "name": Text(),
    "description": Text(),
    "family": Text(),  # checked against models.FAMILIES by validate (with its choices)
    "source": OneOf("hub", "minilm_package", "smollm2_package", "random"),
    "hub_id": Text(null=True),
    "path": Text(null=True),
    "tokenizer": Text(null=True),
    "init_seed": SEED,
    "dims": Map(),  # a transformers config's fields: transformers checks them
    # +model.config_overrides.hidden_dropout_prob=0: transformers config attributes for one run
    "config_overrides": Map(added=True, doc="transformers config attributes for this run"),
}

_SPLIT = Text(doc="a split name")
TASK: dict[str, Field] = {
    "_target_": TARGET,
    "name": Text(),
    "description": Text(),
    "version": PositiveInt(),
    "benchmark": Text(),
    "kind": OneOf("classification", "regression", "multiple_choice", "generation"),
    "max_length": Int(8, doc="tokens per input"),
    "n_shot": PositiveInt(null=True),
    "shot_seed": Field(**{**SEED.__dict__, "null": True}),
    "balanced": Bool(),
    "shots_from": OneOf("fewglue", "tfew", null=True),
    "shots_dev": Bool(),
    "shot_files": Map(),
    "format": OneOf(*TASK_FORMATS, doc="generation and span tasks choose their own format"),
    "prompt": Map(null=True),
    "labels": ListOf(Text(), null=True),
    "inputs": ListOf(Text()),
    "metrics": ListOf(Text()),
    "main_metric": Text(),
    "local": Map(null=True),
    "hub": Map(null=True),
    # generation
    "decode": Map(
        {
            "strategy": OneOf("beam", "greedy", "sample"),
            "num_beams": PositiveInt(),
            "length_penalty": Number(),
            "no_repeat_ngram_size": Int(0, doc="0: off"),
            "max_new_tokens": PositiveInt(),
            "top_p": Number(0, 1, open_low=True),
            "temperature": Positive(),
        }
    ),
    "eval_split": _SPLIT,
    "train_split": _SPLIT,
    "label_smoothing": Number(0, 1, open_high=True),
    "scorer": Text(),
    "text_only": Bool(),
    "derive_from": Text(),
    "derived": Map(),
    # span (SQuAD)
    "doc_stride": Int(0),
    "extractive": Bool(),
    "max_answer_length": PositiveInt(),
    "n_best": PositiveInt(),
    "mrqa": Map(),
    "mrqa_sets": Map(),
    "transfer": ListOf(Text()),
    "group": Text(),
    "choices": ListOf(Text()),
    # RAFT
    "subset": Text(),
    "fold": Int(0, null=True, doc="null: train on all labelled rows (the leaderboard run)"),
    "n_folds": PositiveInt(),
}

METHOD: dict[str, Field] = {  # every method's; its own keys are in its module's FIELDS
    "_target_": TARGET,
    "name": Text(),
    "description": Text(),
}

GROUP_FIELDS = {"train": TRAIN, "model": MODEL, "task": TASK}


def method_fields(method_cfg: DictConfig) -> dict[str, Field]:
    from peftbench.methods import method_module

    return {**METHOD, **getattr(method_module(method_cfg), "FIELDS", {})}


def fields_of(cfg: DictConfig) -> dict[str, dict[str, Field]]:
    """Group -> its keys' fields, for this config (the method's keys depend on the method)."""
    return {"": TOP, **GROUP_FIELDS, "method": method_fields(cfg.method)}


# --- checking ---------------------------------------------------------------------------------------------


def check_values(cfg: DictConfig) -> list[str]:
    """Every key of every group: known, and of its type and range. The first problem is one UserError that
    names the key, the value and what it must be. Returns the keys checked (the tests' coverage)."""
    done: list[str] = []
    check_field(
        "method._target_", TARGET, cfg.method.get("_target_")
    )  # its module declares the method's keys
    for group, fields in fields_of(cfg).items():
        node = cfg if not group else cfg[group]
        for key in node.keys():
            if not group and key in ("method", "model", "task", "train"):
                continue
            where = f"{group}.{key}" if group else str(key)
            if key not in fields:
                raise unknown_key(where, fields)
            value = node[key]
            check_field(where, fields[key], value)
            done.append(where)
    return done


def check_field(where: str, f: Field, value: Any) -> None:
    problem = f.problem(value)
    if problem == "choice":
        raise choice_error(where, value, [str(c) for c in f.choices])
    if problem:
        shown = OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value
        raise UserError(f"{where}={shown!r}: {problem}")
    if f.kind == "map" and f.fields is not None:
        for key in value.keys():
            if key not in f.fields:
                raise unknown_key(f"{where}.{key}", f.fields)
            check_field(f"{where}.{key}", f.fields[key], value[key])


def unknown_key(where: str, fields: dict[str, Field]) -> UserError:
    parent, _, name = where.rpartition(".")
    close = difflib.get_close_matches(name, list(fields), n=3, cutoff=0.6)
    prefix = f"{parent}." if parent else ""
    if close:
        return UserError(f"unknown key {where} (did you mean {' or '.join(prefix + c for c in close)}?)")
    return UserError(f"unknown key {where}; {parent or 'the config'} has: {', '.join(sorted(fields))}")
