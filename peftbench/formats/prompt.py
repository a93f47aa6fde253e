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

In-context learning (`method=icl`, methods/icl.py) puts k solved training rows in front of every context
(`demonstration_text`); its contextual calibration sets `RankBatcher.prior`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from peftbench.errors import UserError
from peftbench.formats import Format
from peftbench.formats.head import ClassScores
from peftbench.formats.logprobs import logprobs_at, mean_logprob, pad_to, scored_hidden, tfew_loss
from peftbench.formats.prompt_text import demonstration_text, encode_prompted
from peftbench.methods import capabilities
from peftbench.models import inner


def sequence(
    kind: str, ctx: list[int], answer: list[int], specials: list[int], mask_id
) -> dict[str, list[int]]:
    """One choice as its own sequence {input_ids, attention_mask, labels}; labels are -100 except on the
    tokens that score the choice."""
    if kind == "encoder-decoder":  # T5 / BART: the answer is the decoder's target
        ids = with_specials(specials, ctx)
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": answer}
    if kind == "decoder":  # GPT-2: context + answer, scored left to right
        ids = ctx + answer
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * len(ctx) + answer}
    # encoder (masked LM): [CLS] context [MASK] * len(answer) [SEP]; each mask scores one answer token
    ids = with_specials(specials, ctx + [mask_id] * len(answer))
    start = mask_start(specials, ctx)
    labels = [-100] * len(ids)
    labels[start : start + len(answer)] = answer
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def mask_start(specials: list[int], ctx: list[int]) -> int:
    return len(ctx) + (1 if len(specials) == 2 else 0)


def with_specials(specials: list[int], body: list[int]) -> list[int]:
    """body with the tokenizer's own special tokens around it: [CLS] .. [SEP] (BERT), <s> .. </s> (RoBERTa,
    BART), .. </s> (T5), as the tokenizer encodes the empty string (`specials`)."""
    if len(specials) == 2:
        return specials[:1] + body + specials[1:]
    return body + specials


class RankBatcher:
    """Collate + forward / loss / predict for the prompt format, with the same interface as data.Batcher:
    `logits` are the choices' scores (B, C), so evaluation, metrics and the best-checkpoint logic are shared.

    `share_context`: the context of a row goes through the model once for all its choices, as t-few's
    EncoderDecoder does for T5: GPT-2 scores the answers on the context's key/value cache, T5 / BART decode
    every answer from one encoder pass, and a masked LM runs one sequence per distinct answer length (the
    inputs of equally long answers are identical). Same scores as one sequence per choice (tested); with
    77 choices (RAFT banking_77) it is what makes prediction feasible. Methods that change the input
    sequence itself (prefix tuning, prompt tuning, P-tuning) take one sequence per choice."""

    def __init__(self, tokenizer, kind: str, train_cfg: DictConfig, share_context: bool = False):
        self.tokenizer, self.kind, self.share_context = tokenizer, kind, share_context
        self.specials = tokenizer("")["input_ids"] if tokenizer is not None else []
        loss = train_cfg.get("loss") or {}
        self.w_lm = float(loss.get("lm", 1.0))
        self.w_ul = float(loss.get("ul", 0.0))
        self.w_ln = float(loss.get("ln", 0.0))
        self.length_norm = bool(train_cfg.get("rank_length_norm", True))
        self.prior: torch.Tensor | None = None  # contextual calibration: p_cf over the choices

    def sequences(self, feature: dict) -> list[dict[str, list[int]]]:
        """A row's choices, each as its own sequence."""
        mask_id = self.tokenizer.mask_token_id
        return [
            sequence(self.kind, feature["context"], a, self.specials, mask_id) for a in feature["answers"]
        ]

    def tokens(self, feature: dict) -> int:
        """Tokens fed to the model for one row (what cost.py counts): the context once and every answer
        when shared, else every choice's own sequence (T5 / BART: with its decoder target)."""
        ctx, answers = len(feature["context"]), feature["answers"]
        if not self.share_context:
            seq2seq = self.kind == "encoder-decoder"
            return sum(len(q["input_ids"]) + seq2seq * len(q["labels"]) for q in self.sequences(feature))
        if self.kind == "decoder":
            return ctx + sum(map(len, answers))
        if self.kind == "encoder-decoder":
            return ctx + len(self.specials) + sum(map(len, answers))
        return sum(ctx + len(self.specials) + n for n in {len(a) for a in answers})

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        n_choices = {len(f["answers"]) for f in features}
        if len(n_choices) != 1:
            raise UserError("rows of one batch have different numbers of answer choices")
        labels = torch.tensor([f["label"] for f in features], dtype=torch.long)
        if self.share_context:
            return {**self.collate_shared(features), "labels": labels}
        flat = [c for f in features for c in self.sequences(f)]
        pad = self.tokenizer.pad_token_id
        return {
            "input_ids": pad_to([c["input_ids"] for c in flat], pad),
            "attention_mask": pad_to([c["attention_mask"] for c in flat], 0),
            "choice_labels": pad_to([c["labels"] for c in flat], -100),
            "labels": labels,
        }

    def collate_shared(self, features: list[dict]) -> dict[str, torch.Tensor]:
        pad = self.tokenizer.pad_token_id
        answers = [a for f in features for a in f["answers"]]
        batch = {"choice_labels": pad_to(answers, -100)}
        if self.kind == "decoder":  # contexts left-padded: every answer continues at the last column
            ctx = [f["context"] for f in features]
            batch["input_ids"] = pad_to(ctx, pad, left=True)
            batch["attention_mask"] = pad_to([[1] * len(c) for c in ctx], 0, left=True)
            batch["answer_ids"] = pad_to(answers, pad)
            batch["answer_mask"] = pad_to([[1] * len(a) for a in answers], 0)
        elif self.kind == "encoder-decoder":
            ctx = [with_specials(self.specials, f["context"]) for f in features]
            batch["input_ids"] = pad_to(ctx, pad)
            batch["attention_mask"] = pad_to([[1] * len(c) for c in ctx], 0)
        else:  # masked LM: one sequence per (row, answer length); each choice reads its masks from it
            mask_id = self.tokenizer.mask_token_id
            seqs, spans, rows = [], [], []  # spans: (start, length, first scored row) per sequence
            for f in features:
                by_length: dict[int, int] = {}
                for a in f["answers"]:
                    if len(a) not in by_length:
                        by_length[len(a)] = len(seqs)
                        seqs.append(with_specials(self.specials, f["context"] + [mask_id] * len(a)))
                        first = spans[-1][2] + spans[-1][1] if spans else 0
                        spans.append((mask_start(self.specials, f["context"]), len(a), first))
                    first = spans[by_length[len(a)]][2]
                    rows.append(list(range(first, first + len(a))))
            scored = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.bool)
            for u, (start, n, _) in enumerate(spans):
                scored[u, start : start + n] = True
            batch["input_ids"] = pad_to(seqs, pad)
            batch["attention_mask"] = pad_to([[1] * len(q) for q in seqs], 0)
            batch["scored"] = scored  # the mask positions, in the order their logits come out
            batch["score_rows"] = pad_to(rows, 0)  # per answer token: its row among those logits
        return batch

    def token_logprobs(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """log p of every scored token, (B, C, T), and the mask of scored tokens. Only the scored positions
        reach the vocabulary projection, in chunks (`scored_hidden`, `logprobs_at`): a 512-token GPT-2
        prompt would otherwise need 512 x 50,257 logits per choice, and 64 rows x 77 choices of a few
        tokens each are 30,000 positions, 6 GB of logits at once."""
        if self.share_context:
            lp, keep = self.shared_logprobs(model, batch)
        else:
            lp, keep = self.sequence_logprobs(model, batch)
        b = len(batch["labels"])
        return lp.view(b, -1, lp.shape[-1]), keep.view(b, -1, keep.shape[-1])

    def sequence_logprobs(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        targets = batch["choice_labels"]
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if self.kind == "encoder-decoder":  # the targets are the decoder's tokens
            inputs["decoder_input_ids"] = inner(model).prepare_decoder_input_ids_from_labels(labels=targets)
            keep = scored = targets != -100
            tokens = targets[keep]
        elif self.kind == "decoder":  # position t predicts token t + 1
            scored = targets != -100
            keep = F.pad(scored[:, 1:], (0, 1), value=False)
            tokens = targets[:, 1:][keep[:, :-1]]
        else:
            keep = scored = targets != -100
            tokens = targets[keep]
        with scored_hidden(model, keep) as hidden:
            model(**inputs)
        lp = targets.new_zeros(targets.shape, dtype=torch.float32)
        lp[scored] = logprobs_at(model, hidden[0], tokens)
        return lp, scored

    def shared_logprobs(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        targets = batch["choice_labels"]  # (B * C, T): the answers' tokens
        scored = targets != -100
        c = len(targets) // len(batch["labels"])
        lp = targets.new_zeros(targets.shape, dtype=torch.float32)
        mask = batch["attention_mask"]
        if self.kind == "encoder-decoder":  # one encoder pass; every answer is decoded from it
            encoded = inner(model).get_encoder()(input_ids=batch["input_ids"], attention_mask=mask)
            with scored_hidden(model, scored) as hidden:
                model(
                    encoder_outputs=(encoded.last_hidden_state.repeat_interleave(c, 0),),
                    attention_mask=mask.repeat_interleave(c, 0),
                    decoder_input_ids=inner(model).prepare_decoder_input_ids_from_labels(labels=targets),
                )
            lp[scored] = logprobs_at(model, hidden[0], targets[scored])
        elif self.kind == "decoder":  # the context's last position predicts every answer's first token
            last = torch.zeros_like(mask, dtype=torch.bool)
            last[:, -1] = True  # contexts are left-padded
            with scored_hidden(model, last) as hidden:
                out = model(
                    input_ids=batch["input_ids"],
                    attention_mask=mask,
                    position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                    use_cache=True,
                )
            rows = torch.arange(len(mask), device=mask.device).repeat_interleave(c)
            lp[:, 0] = logprobs_at(model, hidden[0], targets[:, 0], rows)
            keep = F.pad(scored[:, 1:], (0, 1), value=False)  # answer position t predicts token t + 1
            if keep.any():  # the answers continue on the context's key/value cache, one copy per choice
                cache = out.past_key_values
                cache.batch_repeat_interleave(c)
                start = mask.sum(-1).repeat_interleave(c, 0)[:, None]
                with scored_hidden(model, keep) as hidden:
                    model(
                        input_ids=batch["answer_ids"],
                        attention_mask=torch.cat([mask.repeat_interleave(c, 0), batch["answer_mask"]], -1),
                        position_ids=start + torch.arange(targets.shape[1], device=targets.device),
                        past_key_values=cache,
                        use_cache=True,
                    )
                lp[:, 1:][scored[:, 1:]] = logprobs_at(model, hidden[0], targets[:, 1:][scored[:, 1:]])
        else:  # masked LM: each answer token reads the mask position of its answer length's sequence
            with scored_hidden(model, batch["scored"]) as hidden:
                model(input_ids=batch["input_ids"], attention_mask=mask)
            lp[scored] = logprobs_at(model, hidden[0], targets[scored], batch["score_rows"][scored])
        return lp, scored

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


class PromptFormat(RankBatcher, ClassScores, Format):
    """The prompt format of a run: rows as prompts with answer choices (`encode_prompted`), scored by the
    LM head (RankBatcher), evaluated as predicted classes. Options from the method: `demos` (in-context
    learning's solved rows) and `anchored` (P-tuning's [P] slots in task.prompt.anchored)."""

    name = "prompt"
    lm = True

    def __init__(
        self, cfg: DictConfig, task, tokenizer, fam, demos: list[dict] | None = None, anchored=False
    ):
        Format.__init__(self, cfg, task, tokenizer, fam)
        share = bool(cfg.train.share_context) and not capabilities(cfg.method).changes_input
        # a decoder under gradient checkpointing returns no key/value cache while training
        share = share and not (cfg.train.gradient_checkpointing and fam.kind == "decoder")
        RankBatcher.__init__(self, tokenizer, fam.kind, cfg.train, share_context=share)
        self.demos, self.anchored = demos, anchored
        if demos is not None:
            self.stored_text = demonstration_text(cfg.task, demos)
        self.tokens_of = self.tokens

    @classmethod
    def check(cls, cfg: DictConfig) -> None:
        if cfg.task.kind == "regression":
            raise UserError(f"task.format=prompt needs answer choices; {cfg.task.name} is a regression task")

    def encode_train(self, rows: list[dict]) -> list[dict[str, Any]]:
        return encode_prompted(rows, self.cfg.task, self.tokenizer, self.kind, anchored=self.anchored)

    def encode(self, rows: list[dict]) -> list[dict[str, Any]]:
        demos = self.demos or []
        return encode_prompted(rows, self.cfg.task, self.tokenizer, self.kind, demos, anchored=self.anchored)

    def length(self, feature: dict) -> int:
        return sum(len(feature["context"]) + len(a) for a in feature["answers"])
