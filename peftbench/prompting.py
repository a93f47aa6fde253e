"""Prompt format: a task as text with answer choices, scored by the model's own LM head (rank classification).

`task.format=prompt` turns each row into a context (`task.prompt.template`) and one answer text per class
(`task.prompt.choices`, in label order; fields like "{choice1}" for multiple choice). Every choice is scored
by its log-likelihood under the model, and the best-scoring choice is the prediction (rank classification:
Brown et al. 2020; Sanh et al. 2022 (T0); Liu et al. 2022 (T-Few) Sec. 3.1). By family:

- decoder (GPT-2): the choice continues the context; its tokens are scored left to right;
- encoder-decoder (T5, BART): the context is the encoder input, the choice the decoder target;
- encoder (BERT, RoBERTa): as many [MASK] tokens as the choice has tokens follow the context (PET, Schick &
  Schütze 2021); each mask is scored with its choice token.

A choice's score is its summed token log-likelihood, divided by its length (`train.rank_length_norm`, as
T-Few and GPT-3 do). Training losses (T-Few Sec. 3.2, each weighted by `train.loss.*`, 0 turns it off):

- lm: cross-entropy of the correct choice's tokens (token mean over the batch);
- ul: unlikelihood of the wrong choices' tokens, -sum log(1 - p(y_t | x, y_<t)) / #tokens (Eq. 2);
- ln: softmax cross-entropy over the length-normalised choice scores (Eq. 3).

The sums, the token masking and the 1e-2 inside the unlikelihood log follow T-Few's code
(github.com/r-three/t-few, src/models/EncoderDecoder.py).

In-context learning (`method=icl`) puts k solved training rows in front of every context
(`demonstrations`), and contextual calibration (Zhao et al. 2021) divides the choice probabilities by those
the same prompt gives a content-free input (`content_free_prior`).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from peftbench.errors import UserError
from peftbench.tasks.classification import fields_of, group_of


class Fields(dict):
    def __missing__(self, key: str) -> str:
        raise UserError(f"task.prompt uses the field {{{key}}}, which the rows do not have")


def row_fields(task_cfg: DictConfig, row: dict) -> dict:
    fields = fields_of(task_cfg, row)
    return Fields({k: v.strip() if isinstance(v, str) else v for k, v in fields.items()})


def format_prompt(task_cfg: DictConfig, row: dict, key: str = "template") -> tuple[str, list[str]]:
    """(context, answer choices) of one row; key="anchored": P-tuning's template with [P] prompt slots."""
    prompt = task_cfg.get("prompt")
    if not prompt:
        raise UserError(f"task {task_cfg.name} has no task.prompt (template + choices); use task.format=head")
    if not prompt.get(key):
        raise UserError(
            f"task {task_cfg.name} has no task.prompt.{key}; set it or use method.placement=prepend"
        )
    fields = row_fields(task_cfg, row)
    return prompt[key].format_map(fields), [c.format_map(fields) for c in prompt.choices]


SLOT = "[P]"


def anchored(cfg: DictConfig) -> bool:
    """P-tuning's placement: the prompt vectors fill the [P] slots of task.prompt.anchored."""
    return cfg.method.get("placement") == "template"


def tokenize_with_slots(tokenizer, text: str) -> list[int]:
    """Token ids of text whose i-th "[P]" becomes the placeholder id -(i + 1): P-tuning's prompt slot i,
    filled with the prompt encoder's i-th vector by the soft-prompt hook (peftbench.methods.prompt)."""
    pieces = text.split(SLOT)
    ids: list[int] = []
    for i, piece in enumerate(pieces):
        if i:
            ids.append(-i)
        if piece.strip():
            ids += tokenizer(piece.rstrip() if i < len(pieces) - 1 else piece, add_special_tokens=False)[
                "input_ids"
            ]
    return ids


def solved(task_cfg: DictConfig, row: dict) -> str:
    """A demonstration: the row's context followed by its correct answer."""
    context, choices = format_prompt(task_cfg, row)
    return f"{context} {choices[row['label']]}"


def demonstrations(train: list[dict], method_cfg: DictConfig, seed: int) -> list[dict]:
    """k training rows drawn with the run seed, put in the order drawn with method.order_seed (Zhao et al.
    2021 Sec. 3: the same k examples in another order can swing accuracy from near chance to near SOTA)."""
    k = method_cfg.shots
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= len(train):
        raise UserError(f"method.shots={k!r}: choose 0..{len(train)} (the train rows available)")
    picked = random.Random(seed).sample(train, k)
    random.Random(int(method_cfg.order_seed)).shuffle(picked)
    return picked


def demonstration_text(task_cfg: DictConfig, demos: list[dict], separator: str = "\n\n") -> str:
    """The solved demonstrations that go in front of every input (what in-context learning stores)."""
    return "".join(solved(task_cfg, d) + separator for d in demos)


def encode_prompted(
    rows: list[dict],
    task_cfg: DictConfig,
    tokenizer,
    kind: str,
    demos: list[dict] = (),
    separator: str = "\n\n",
    anchored: bool = False,
) -> list[dict[str, Any]]:
    """Per row: one sequence per choice, {input_ids, attention_mask, labels}; labels are -100 except on the
    tokens that score the choice. The context is cut from the left to fit task.max_length (the query and
    its answer stay; the oldest demonstrations go first). `anchored`: the context is task.prompt.anchored,
    real anchor words around [P] prompt slots (P-tuning, Liu et al. 2021 Sec. 3)."""
    prefix = demonstration_text(task_cfg, demos, separator)
    max_len = int(task_cfg.max_length)
    specials = tokenizer("")["input_ids"]  # how the tokenizer wraps a text: [CLS] [SEP], <s> </s>, </s>
    out = []
    for row in rows:
        context, choices = format_prompt(task_cfg, row, "anchored" if anchored else "template")
        text = prefix + context
        ctx = (
            tokenize_with_slots(tokenizer, text)
            if anchored
            else tokenizer(text, add_special_tokens=False)["input_ids"]
        )
        seqs = [sequence(tokenizer, kind, ctx, c, max_len, specials) for c in choices]
        out.append(
            {"choices": seqs, "label": row["label"], "idx": row["idx"], "group": group_of(task_cfg, row)}
        )
    return out


def sequence(
    tokenizer, kind: str, ctx: list[int], choice: str, max_len: int, specials: list[int]
) -> dict[str, list[int]]:
    if kind == "encoder-decoder":  # T5 / BART: the answer is the decoder's target (with its special tokens)
        target = tokenizer(choice)["input_ids"]
        ids = with_specials(specials, ctx[-(max_len - 2) :])
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": target}
    answer = tokenizer(" " + choice, add_special_tokens=False)["input_ids"]
    if not answer:
        raise UserError(f"answer choice {choice!r} has no tokens")
    if kind == "decoder":  # GPT-2: context + answer, scored left to right
        ids = ctx[-max(1, max_len - len(answer)) :] + answer
        labels = [-100] * (len(ids) - len(answer)) + answer
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}
    # encoder (masked LM): [CLS] context [MASK] * len(answer) [SEP]; each mask scores one answer token
    body = ctx[-max(1, max_len - len(answer) - 2) :] + [tokenizer.mask_token_id] * len(answer)
    ids = with_specials(specials, body)
    start = ids.index(tokenizer.mask_token_id, len(ids) - len(answer) - 2)
    labels = [-100] * len(ids)
    labels[start : start + len(answer)] = answer
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def with_specials(specials: list[int], body: list[int]) -> list[int]:
    """body with the tokenizer's own special tokens around it: [CLS] .. [SEP] (BERT), <s> .. </s> (RoBERTa,
    BART), .. </s> (T5), as the tokenizer encodes the empty string (`specials`)."""
    if len(specials) == 2:
        return specials[:1] + body + specials[1:]
    return body + specials


class RankBatcher:
    """Collate + forward / loss / predict for the prompt format, with the same interface as data.Batcher:
    `logits` are the choices' scores (B, C), so evaluation, metrics and the best-checkpoint logic are shared."""

    def __init__(self, tokenizer, kind: str, train_cfg: DictConfig):
        self.tokenizer, self.kind = tokenizer, kind
        loss = train_cfg.get("loss") or {}
        self.w_lm = float(loss.get("lm", 1.0))
        self.w_ul = float(loss.get("ul", 0.0))
        self.w_ln = float(loss.get("ln", 0.0))
        self.length_norm = bool(train_cfg.get("rank_length_norm", True))
        self.prior: torch.Tensor | None = None  # contextual calibration: p_cf over the choices

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        n_choices = {len(f["choices"]) for f in features}
        if len(n_choices) != 1:
            raise UserError("rows of one batch have different numbers of answer choices")
        flat = [c for f in features for c in f["choices"]]
        pad = self.tokenizer.pad_token_id
        batch = {
            "input_ids": pad_to([c["input_ids"] for c in flat], pad),
            "attention_mask": pad_to([c["attention_mask"] for c in flat], 0),
            "choice_labels": pad_to([c["labels"] for c in flat], -100),
            "labels": torch.tensor([f["label"] for f in features], dtype=torch.long),
        }
        return batch

    def token_logprobs(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """log p of every scored token, (B, C, T), and the mask of scored tokens. Decoder and masked-LM
        heads project only the scored positions onto the vocabulary (`scored_positions_only`): a 512-token
        GPT-2 prompt would otherwise need 512 x 50,257 logits per choice."""
        targets = batch["choice_labels"]
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if self.kind == "encoder-decoder":  # the targets are the short answers: all their logits
            logits = model(**inputs, labels=targets).logits
            keep = targets != -100
            logits, scored = logits[keep], targets[keep]
        else:
            if self.kind == "decoder":  # position t predicts token t + 1
                keep = F.pad(targets[:, 1:] != -100, (0, 1), value=False)
                scored = targets[:, 1:][keep[:, :-1]]
            else:
                keep = targets != -100
                scored = targets[keep]
            with scored_positions_only(model, keep):
                logits = model(**inputs).logits
        lp = targets.new_zeros(targets.shape, dtype=torch.float32)
        lp[keep] = -F.cross_entropy(logits.float(), scored, reduction="none")
        b = len(batch["labels"])
        return lp.view(b, -1, lp.shape[-1]), keep.view(b, -1, keep.shape[-1])

    def scores(self, lp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return mean_logprob(lp, mask) if self.length_norm else (lp * mask).sum(-1)

    def logits(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        return self.calibrate(self.scores(*self.token_logprobs(model, batch)))

    def calibrate(self, scores: torch.Tensor) -> torch.Tensor:
        """Zhao et al. 2021 Eq. 1 with W = diag(p_cf)^-1, b = 0: log p(choice) - log p_cf(choice)."""
        if self.prior is None:
            return scores
        return scores.log_softmax(-1) - self.prior.to(scores.device).log()

    def loss_from_logits(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), labels)

    def loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        lp, mask = self.token_logprobs(model, batch)
        return tfew_loss(lp, mask, batch["labels"], self.w_lm, self.w_ul, self.w_ln)

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(-1)


@contextmanager
def scored_positions_only(model: torch.nn.Module, keep: torch.Tensor) -> Iterator[None]:
    """While active, the output embedding (the vocabulary projection) sees only the hidden states at `keep`
    (B, T) and returns (keep.sum(), V) logits. transformers' `logits_to_keep` does this for causal LMs but
    not for masked LMs; a hook on the projection does it for both."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    handle = head.register_forward_pre_hook(lambda module, args: (args[0][keep], *args[1:]))
    try:
        yield
    finally:
        handle.remove()


def tfew_loss(
    lp: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, w_lm: float, w_ul: float, w_ln: float
) -> torch.Tensor:
    """T-Few's L = w_lm L_LM + w_ul L_UL + w_ln L_LN from token log-probs lp (B, C, T) and their mask."""
    rows = torch.arange(len(labels), device=lp.device)
    correct = torch.zeros(mask.shape[:2], dtype=torch.bool, device=lp.device)
    correct[rows, labels] = True
    loss = lp.new_zeros(())
    if w_lm:
        m = mask[rows, labels]
        loss = loss + w_lm * -(lp[rows, labels] * m).sum() / m.sum().clamp(min=1)
    if w_ul:
        wrong = mask & ~correct[..., None]
        ul = -torch.log(1 - lp.exp() + 1e-2)
        loss = loss + w_ul * (ul * wrong).sum() / wrong.sum().clamp(min=1)
    if w_ln:
        loss = loss + w_ln * F.cross_entropy(mean_logprob(lp, mask), labels)
    return loss


def mean_logprob(lp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each choice's length-normalised score: the mean log p of its tokens, (B, C)."""
    return (lp * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def pad_to(seqs: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([s + [value] * (width - len(s)) for s in seqs], dtype=torch.long)


@torch.no_grad()
def content_free_prior(
    model: torch.nn.Module,
    batcher: RankBatcher,
    task_cfg: DictConfig,
    method_cfg: DictConfig,
    demos: list[dict],
    like: dict,
    device: torch.device,
) -> torch.Tensor:
    """p_cf (Zhao et al. 2021 Sec. 5): the choice distribution the prompt gives content-free inputs ("N/A",
    "[MASK]", ""), each put in every text field of a row, averaged over those inputs."""
    prompt = task_cfg.prompt
    if any("{" in c for c in prompt.choices):
        raise UserError(
            f"method.calibrate=true needs fixed answer choices; task {task_cfg.name} builds them per row"
        )
    text_fields = [k for k, v in like.items() if isinstance(v, str)]
    rows = [{**like, **{k: cf for k in text_fields}, "label": 0} for cf in method_cfg.content_free]
    features = encode_prompted(rows, task_cfg, batcher.tokenizer, batcher.kind, demos)
    batch = {k: v.to(device) for k, v in batcher(features).items()}
    was, batcher.prior = batcher.prior, None
    model.eval()
    probs = batcher.logits(model, batch).softmax(-1).mean(0)
    batcher.prior = was
    return probs
