"""Head format: a new classification / regression / multiple-choice head on the model (sequence
classification): rows to padded tensors, the loss and prediction rule of each task kind, and the evaluation
of predicted classes (shared with the prompt format)."""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig

from peftbench import metrics as M
from peftbench.errors import UserError
from peftbench.formats import Format, save_predictions
from peftbench.log import bar
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


class ClassScores:
    """Evaluation and test prediction of formats whose `logits` score the classes (head, prompt)."""

    def evaluate(self, model, loader, ev, rows=None, name=None) -> dict[str, Any]:
        return evaluate_classes(self, model, loader, ev, name)

    def predict_labels(self, model: torch.nn.Module, loader, ev) -> list[int]:
        return predict_labels(self, model, loader, ev)


class HeadFormat(ClassScores, Format):
    """Collate function plus the forward / loss / predict rule for classification, regression and multiple
    choice (each choice scored by a 1-logit head, softmax over the choices)."""

    name = "head"

    def __init__(self, cfg: DictConfig, task, tokenizer, fam, **options):
        super().__init__(cfg, task, tokenizer, fam)
        kind = task.kind
        if kind not in ("classification", "regression", "multiple_choice"):
            raise UserError(
                f"task.kind={kind!r} needs a generation or prompt runner; choose a classification task"
            )
        self.kind = kind

    def encode(self, rows: list[dict]) -> list[dict[str, Any]]:
        return encode(rows, self.cfg.task, self.tokenizer)

    def length(self, feature: dict) -> int:
        return sum(len(c["input_ids"]) for c in feature["choices"])

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


@torch.no_grad()
def evaluate_classes(fmt, model: torch.nn.Module, loader, ev, name: str | None = None) -> dict[str, Any]:
    """Predicted classes (or scores) of every row against its label: the task's metrics and the mean loss,
    and every row's prediction saved (predictions/eval_<n>.jsonl). `ev.gathered` collects the processes'
    shares of each batch, in order."""
    model.eval()
    preds, refs, scores, total_loss, n = [], [], [], 0.0, 0
    for batch in bar(loader, desc="evaluate", unit="batch"):
        logits, labels = ev.gathered((fmt.logits(model, batch), batch["labels"]))
        total_loss += float(fmt.loss_from_logits(logits, labels)) * len(labels)
        n += len(labels)
        preds += fmt.predict(logits).tolist()
        refs += labels.tolist()
        scores += logits.float().tolist()
    task_cfg = fmt.cfg.task
    groups = [ex.get("group") for ex in loader.dataset] if task_cfg.get("group") else None
    values = M.compute(list(task_cfg.metrics), preds, refs, groups)
    result = {
        "metrics": {k: round(v, 4) for k, v in values.items()},
        "loss": round(total_loss / max(n, 1), 5),
    }
    if ev.artifacts is not None and ev.main:
        rows = per_example(loader.dataset, preds, refs, scores, ev.task.label_names)
        result["predictions"] = save_predictions(ev, rows, name)
    return result


def per_example(features, preds: list, refs: list, scores: list, label_names: list[str]) -> list[dict]:
    """One line per evaluated row (lm-evaluation-harness's --log_samples): its idx (the row of the split),
    group (MultiRC's question, ReCoRD's passage), gold label and prediction (with their names), whether they
    agree, and the scores the prediction came from (class logits; choice log-likelihoods)."""
    out = []
    for f, pred, ref, score in zip(features, preds, refs, scores):
        row = {"idx": f["idx"]}
        if f.get("group") is not None:
            row["group"] = f["group"]
        row.update(label=ref, prediction=pred)
        if label_names and isinstance(ref, int) and isinstance(pred, int):
            named = 0 <= ref < len(label_names) and 0 <= pred < len(label_names)
            if named:
                row.update(label_name=label_names[ref], prediction_name=label_names[pred])
            row["correct"] = pred == ref
        row["scores"] = [round(x, 5) for x in score] if isinstance(score, list) else round(score, 5)
        out.append(row)
    if all(isinstance(r["idx"], int) for r in out):  # evaluated longest first; saved in the split's order
        out.sort(key=lambda r: r["idx"])
    return out


@torch.no_grad()
def predict_labels(fmt, model: torch.nn.Module, loader, ev) -> list[int]:
    """The predicted class of every (unlabelled) row of the loader, in its order."""
    model.eval()
    preds: list[int] = []
    for batch in bar(loader, desc="predict", unit="batch"):
        preds += fmt.predict(ev.gathered(fmt.logits(model, batch))).tolist()
    return preds
