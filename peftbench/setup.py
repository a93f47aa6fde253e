"""Task + model + method + format -> a ready run (`prepare`): data encoded by the format, the model with the
method applied, loaders, and the record's parameter counts and costs. Nothing trains here."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from peftbench.cost import static_cost
from peftbench.errors import UserError
from peftbench.formats import Format, format_class, model_family, model_kind
from peftbench.methods import apply_method, hook, stored_count
from peftbench.models import (
    Family,
    base_model,
    build_meta,
    count,
    load_model,
    model_revision,
    transformer_blocks,
)
from peftbench.paths import data_dir
from peftbench.tasks import TaskData, check_rows, load_task
from peftbench.tasks.classification import shot_seed


@dataclass
class Setup:
    model: torch.nn.Module
    task: TaskData
    fmt: Format  # the input format: collate function, loss and evaluation (formats/)
    cfg: DictConfig
    train_loader: DataLoader
    eval_loader: DataLoader
    generator: torch.Generator  # draws the train order; its state at an epoch's start fixes that epoch
    test_loader: DataLoader | None = None  # unlabelled test rows to predict (train.predict_test)
    artifacts: Path | None = None  # the run's folder (generated outputs of each evaluation go there)
    n_evals: int = 0
    gather: Any = None  # the processes' shares of an evaluation batch, in order (accelerate)
    main: bool = True  # the process that writes (the only one without data parallelism)
    blocks: tuple[str, ...] = ()  # the model's transformer blocks (torch.compile and FSDP units)

    def gathered(self, data):
        """Every process's share of an evaluation batch, in the loader's order (as is without parallelism)."""
        return data if self.gather is None else self.gather(data)

    def loader(self, features: list[dict]) -> DataLoader:
        """An evaluation loader of features, in order."""
        return DataLoader(features, self.cfg.train.eval_batch_size, shuffle=False, collate_fn=self.fmt)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare(cfg: DictConfig, record: dict[str, Any], artifacts: Path | None = None) -> Setup:
    """Data and model, with the method applied; parameter counts, data and costs go into the record."""
    seed_everything(cfg.seed)
    if cfg.train.num_threads:
        torch.set_num_threads(int(cfg.train.num_threads))
    task = load_task(cfg.task, seed=int(cfg.seed), max_train=cfg.train.max_train_samples)
    check_rows(task, needs_train=cfg.train.max_steps != 0)
    fmt_cls, fam = format_class(cfg), model_family(cfg)
    model, tokenizer = load_model(cfg.model, model_kind(cfg), max(1, len(task.label_names)), lm=fmt_cls.lm)
    if cfg.train.gradient_checkpointing:  # keep only the blocks' inputs; recompute the rest in backward
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = apply_method(model, cfg.method, fam)
    if cfg.train.compile:
        compile_blocks(model, fam, cfg.train.compile)
    counts = count(model, fam.head)
    counts["trainable_percent"] = 100.0 * counts["trainable_without_head"] / counts["total_without_head"]
    record["params"] = counts
    options = hook(cfg.method, "format_options")
    fmt = fmt_cls(cfg, task, tokenizer, fam, **(options(cfg, task, record) if options else {}))
    train = fmt.encode_train(task.train)
    evals = fmt.encode(fmt.eval_rows(task.validation, cfg.train.max_eval_samples))
    generator = torch.Generator().manual_seed(int(cfg.seed))
    s = Setup(model, task, fmt, cfg, train_loader(train, fmt, cfg.train, generator), None, generator)
    s.eval_loader, s.test_loader, s.artifacts, s.blocks = (
        s.loader(evals),
        test_loader(s),
        artifacts,
        fam.blocks,
    )
    record["data"] = {
        "sources": {k: portable(v) for k, v in task.sources.items()},
        "n_train": len(train),
        "n_eval": len(evals),
        **task.notes,
    }
    # the weights' revision: the package version of packaged weights, the hub commit transformers resolved
    record["model_revision"] = model_revision(cfg.model, model)
    record["cost"] = costs(model, fmt, counts, train, evals, fam)
    if cfg.task.get("n_shot") or cfg.task.get("shots_from"):  # which few-shot rows, reproducibly
        record["data"].update(
            shots_from=cfg.task.get("shots_from"),
            shot_seed=shot_seed(cfg.task, int(cfg.seed)),
            train_ids=[r["idx"] for r in task.train],
        )
    return s


def portable(source: str) -> str:
    """A data file as `$PEFTBENCH_DATA_DIR/<path>` (a record says which file, not where this machine keeps it);
    a hub id or a path outside the data folder as it is."""
    root = data_dir()
    if root is not None:
        try:
            return f"$PEFTBENCH_DATA_DIR/{Path(source).resolve().relative_to(root)}"
        except (ValueError, OSError):
            pass
    return str(source)


def train_loader(train: list[dict], fmt: Format, t: DictConfig, generator: torch.Generator) -> DataLoader:
    if t.group_by_length:
        sampler = LengthGroupedBatches([fmt.length(f) for f in train], t.batch_size, generator)
        return DataLoader(train, batch_sampler=sampler, collate_fn=fmt)
    return DataLoader(train, t.batch_size, shuffle=True, generator=generator, collate_fn=fmt)


def test_loader(s: Setup) -> DataLoader | None:
    """The unlabelled test rows (RAFT) when train.predict_test asks for them."""
    if not s.cfg.train.predict_test:
        return None
    if not s.task.test:
        raise UserError(f"train.predict_test=true but task {s.cfg.task.name} has no unlabelled test split")
    return s.loader(s.fmt.encode(s.task.test[: s.cfg.train.max_test_samples or None]))


def costs(model: torch.nn.Module, fmt: Format, counts: dict, train: list, evals: list, fam: Family) -> dict:
    """The run's static costs (cost.py): what it stores (the trained tensors, or ICL's demonstrations) and
    the tokens and FLOPs of an example."""
    head = counts["trainable"] - counts["trainable_without_head"]
    stored = stored_count(model, counts["trainable_without_head"]) + head
    seq2seq = fmt.lm and fam.kind == "encoder-decoder"
    return static_cost(model, counts["total"], stored, train, evals, seq2seq, fmt.stored_text, fmt.tokens_of)


def meta_model(cfg: DictConfig) -> tuple[torch.nn.Module, Family]:
    """A run config's model on the meta device (no weights), with its family as the task format uses it."""
    n_labels = max(1, len(cfg.task.labels or []))
    return build_meta(cfg.model, model_kind(cfg), n_labels, lm=format_class(cfg).lm), model_family(cfg)


def compile_blocks(model: torch.nn.Module, fam: Family, backend: str) -> None:
    """torch.compile each transformer block in place ("regional compilation"): the blocks are where the
    FLOPs are, they compile once and are reused, and the code around them (heads, hooks that pick the scored
    positions, key/value caches) stays eager Python."""
    for block in transformer_blocks(base_model(model), fam.blocks):
        block.compile(backend=backend)


class LengthGroupedBatches(torch.utils.data.Sampler):
    """Batches of similar length (less padding), in random order: shuffle, cut into mega-batches of
    `mega` batches, sort each by length, cut into batches, shuffle the batches. HF Trainer's
    `group_by_length` does the same; on SST-2 it cuts padded tokens per batch about 3x."""

    def __init__(self, lengths: list[int], batch_size: int, generator: torch.Generator, mega: int = 50):
        self.lengths, self.batch_size, self.generator, self.mega = lengths, batch_size, generator, mega

    def __iter__(self):
        order = torch.randperm(len(self.lengths), generator=self.generator).tolist()
        size = self.batch_size * self.mega
        batches = []
        for i in range(0, len(order), size):
            chunk = sorted(order[i : i + size], key=lambda j: -self.lengths[j])
            batches += [chunk[k : k + self.batch_size] for k in range(0, len(chunk), self.batch_size)]
        for b in torch.randperm(len(batches), generator=self.generator).tolist():
            yield batches[b]

    def __len__(self) -> int:
        return sum(
            -(-min(self.batch_size * self.mega, len(self.lengths) - i) // self.batch_size)
            for i in range(0, len(self.lengths), self.batch_size * self.mega)
        )
