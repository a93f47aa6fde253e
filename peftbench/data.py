"""From task rows to padded tensors, and the loss / prediction rule of each task kind."""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig

from peftbench.errors import UserError
from peftbench.tasks.classification import format_pairs, group_of


def encode(rows: list[dict], task_cfg: DictConfig, tokenizer) -> list[dict[str, Any]]:
    """Tokenize every (text_a, text_b) pair of every row in one batched call; truncate to task.max_length."""
    pairs = [format_pairs(task_cfg, row) for row in rows]
    flat = [p for ps in pairs for p in ps]
    if not flat:
        return []
    first, second = [a for a, _ in flat], [b for _, b in flat]
    has_pair = second[0] is not None
    enc = tokenizer(first, second if has_pair else None, truncation=True, max_length=int(task_cfg.max_length))
    keys = [k for k in enc.keys() if k in ("input_ids", "attention_mask", "token_type_ids")]
    out, i = [], 0
    for row, ps in zip(rows, pairs):
        choices = [{k: enc[k][j] for k in keys} for j in range(i, i + len(ps))]
        i += len(ps)
        out.append(
            {"choices": choices, "label": row["label"], "idx": row["idx"], "group": group_of(task_cfg, row)}
        )
    return out


class Batcher:
    """Collate function plus the forward / loss / predict rule for classification, regression and multiple
    choice (each choice scored by a 1-logit head, softmax over the choices)."""

    def __init__(self, tokenizer, kind: str):
        if kind not in ("classification", "regression", "multiple_choice"):
            raise UserError(
                f"task.kind={kind!r} needs a generation or prompt runner; choose a classification task"
            )
        self.tokenizer = tokenizer
        self.kind = kind

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        flat = [c for f in features for c in f["choices"]]
        batch = dict(self.tokenizer.pad(flat, return_tensors="pt"))
        dtype = torch.float32 if self.kind == "regression" else torch.long
        batch["labels"] = torch.tensor([f["label"] for f in features], dtype=dtype)
        return batch

    def logits(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = model(**inputs).logits
        if self.kind == "multiple_choice":
            return logits.view(len(batch["labels"]), -1)
        if self.kind == "regression":
            return logits.squeeze(-1)
        return logits

    def loss_from_logits(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.kind == "regression":
            return torch.nn.functional.mse_loss(logits.float(), labels)
        return torch.nn.functional.cross_entropy(logits.float(), labels)

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.loss_from_logits(self.logits(model, batch), batch["labels"])

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.float() if self.kind == "regression" else logits.argmax(-1)


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


def feature_length(feature: dict) -> int:
    """Tokens of a feature: every choice's sequence (prompt format: context + answer per choice), or the one
    sequence (generation)."""
    if "answers" in feature:
        return sum(len(feature["context"]) + len(a) for a in feature["answers"])
    return sum(len(c["input_ids"]) for c in feature.get("choices") or [feature])
