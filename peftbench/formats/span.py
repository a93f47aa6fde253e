"""Span format: extractive QA with a span head (BERT / RoBERTa `...ForQuestionAnswering`: a start and an end logit per
token), as BERT's `run_squad.py` and transformers' `run_qa.py` do it.

- Encoding: `question [SEP] context`, the context cut into windows of `task.max_length` tokens that overlap
  by `task.doc_stride`; each window is labelled with the first gold answer's start / end token, or with the
  [CLS] position (0) where the answer is not wholly inside it.
- Loss: the mean of the start and end cross-entropies.
- Prediction: for each question, over all its windows, the `task.n_best` highest start and end logits;
  a candidate is a span inside the context, end >= start, at most `task.max_answer_length` tokens; the
  best by start + end logit gives the answer, the context's characters from its first to its last token.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from peftbench.errors import UserError
from peftbench.formats import Format
from peftbench.formats.generation import score_outputs
from peftbench.log import bar

NEG = -1e4  # logits of the padding added to gather windows of different lengths


def check_stride(task_cfg: DictConfig) -> None:
    """Two windows of a context overlap by `doc_stride` tokens: at least 0, below half a window."""
    if not 0 <= int(task_cfg.doc_stride) < int(task_cfg.max_length) // 2:
        raise UserError(
            f"task.doc_stride={task_cfg.doc_stride} must be >= 0 and below half of "
            f"task.max_length={task_cfg.max_length} (the overlap of two windows of the context)"
        )


def encode_spans(rows: list[dict], task_cfg: DictConfig, tokenizer) -> list[dict[str, Any]]:
    """One feature per window: input ids, `labels` [start, end] token of the answer (0, 0: not inside),
    the question's `idx`, and `offsets`: each token's character span in the context (None outside it)."""
    if not rows:
        return []
    if not getattr(tokenizer, "is_fast", False):
        raise UserError("a span-extraction head needs a fast tokenizer (character offsets of every token)")
    check_stride(task_cfg)
    max_len, stride = int(task_cfg.max_length), int(task_cfg.doc_stride)
    enc = tokenizer(
        [r["question"].lstrip() for r in rows],
        [r["context"] for r in rows],
        truncation="only_second",
        max_length=max_len,
        stride=stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
    )
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    out = []
    for i, row_i in enumerate(enc["overflow_to_sample_mapping"]):
        row = rows[row_i]
        seq = enc.sequence_ids(i)
        offsets = [o if s == 1 else None for o, s in zip(enc["offset_mapping"][i], seq)]
        out.append(
            {
                **{k: enc[k][i] for k in keys},
                "labels": answer_tokens(row, offsets),
                "idx": row["idx"],
                "offsets": offsets,
            }
        )
    return out


def answer_tokens(row: dict, offsets: list) -> list[int]:
    """[start, end] token of the first gold answer with a known position, if inside this window; else
    [0, 0] (the [CLS] token: "no answer here", as BERT's SQuAD recipe trains it)."""
    known = [(a, s) for a, s in zip(row["references"], row["answer_starts"]) if s >= 0]
    inside = [i for i, o in enumerate(offsets) if o is not None]
    if not known or not inside:
        return [0, 0]
    text, start = known[0]
    end = start + len(text)
    if offsets[inside[0]][0] > start or offsets[inside[-1]][1] < end:
        return [0, 0]
    first = next(i for i in inside if offsets[i][1] > start)
    last = next(i for i in reversed(inside) if offsets[i][0] < end)
    return [first, max(first, last)]


class SpanFormat(Format):
    """Collate (pad the windows), loss, and start / end logits of a span-extraction head."""

    name = "span"
    span = True

    @classmethod
    def check(cls, cfg: DictConfig) -> None:
        check_stride(cfg.task)

    def encode(self, rows: list[dict]) -> list[dict[str, Any]]:
        return encode_spans(rows, self.cfg.task, self.tokenizer)

    def evaluate(self, model, loader, ev, rows=None, name=None) -> dict[str, Any]:
        return evaluate_spans(self, model, loader, ev, rows, name)

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in features[0]]
        batch = dict(self.tokenizer.pad([{k: f[k] for k in keys} for f in features], return_tensors="pt"))
        batch["labels"] = torch.tensor([f["labels"] for f in features], dtype=torch.long)
        return batch

    def logits(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(batch, tokens, 2): start and end logits, NEG at padding (so the loss does not depend on how far
        a batch is padded: one process or several, the same windows give the same loss)."""
        out = model(**{k: v for k, v in batch.items() if k != "labels"})
        logits = torch.stack([out.start_logits, out.end_logits], dim=-1).float()
        return logits.masked_fill(batch["attention_mask"][..., None] == 0, NEG)

    def loss_from_logits(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """`logits` as `logits()` gives them (float32, padding at NEG)."""
        return (
            F.cross_entropy(logits[..., 0], labels[:, 0]) + F.cross_entropy(logits[..., 1], labels[:, 1])
        ) / 2

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.loss_from_logits(self.logits(model, batch), batch["labels"])


def pad_tokens(logits: torch.Tensor, width: int) -> torch.Tensor:
    """Windows padded to one width (processes' batches differ in length), padding never chosen."""
    return F.pad(logits, (0, 0, 0, max(0, width - logits.shape[1])), value=NEG)


def best_answers(
    features: list[dict], logits: list[torch.Tensor], contexts: dict[int, str], task_cfg: DictConfig
) -> dict[int, str]:
    """Each question's answer text from its windows' start / end logits (`logits[i]`: (tokens, 2))."""
    n_best, longest = int(task_cfg.n_best), int(task_cfg.max_answer_length)
    best: dict[int, tuple[float, str]] = {}
    for f, lg in zip(features, logits):
        offsets = f["offsets"]
        n = len(offsets)
        start, end = lg[:n, 0], lg[:n, 1]
        k = min(n_best, n)
        for s in start.topk(k).indices.tolist():
            if offsets[s] is None:
                continue
            for e in end.topk(k).indices.tolist():
                if offsets[e] is None or e < s or e - s + 1 > longest:
                    continue
                score = float(start[s] + end[e])
                if f["idx"] not in best or score > best[f["idx"]][0]:
                    best[f["idx"]] = (score, contexts[f["idx"]][offsets[s][0] : offsets[e][1]])
    return {idx: text for idx, (_, text) in best.items()}


@torch.no_grad()
def evaluate_spans(
    fmt: SpanFormat, model: torch.nn.Module, loader, ev, rows=None, name=None
) -> dict[str, Any]:
    """Start / end logits of every window, the best span per question, scored like generated answers; the
    loss is the windows' mean start / end cross-entropy."""
    model.eval()
    width = int(fmt.cfg.task.max_length)
    logits_all: list[torch.Tensor] = []
    total_loss, n = 0.0, 0
    for batch in bar(loader, desc="evaluate", unit="batch"):
        logits, labels = ev.gathered((pad_tokens(fmt.logits(model, batch), width), batch["labels"]))
        total_loss += float(fmt.loss_from_logits(logits, labels)) * len(labels)
        n += len(labels)
        logits_all += list(logits.cpu())
    rows = ev.task.validation if rows is None else rows
    contexts = {r["idx"]: r["context"] for r in rows}
    answers = best_answers(loader.dataset, logits_all, contexts, fmt.cfg.task)
    result = score_outputs({f["idx"]: answers.get(f["idx"], "") for f in loader.dataset}, ev, rows, name)
    result["loss"] = round(total_loss / max(n, 1), 5)
    return result
