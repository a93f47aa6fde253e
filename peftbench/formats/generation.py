"""Generation format: data-to-text, summaries and generative QA: encoding, the training loss, batched
decoding and scoring with the task's official evaluation.

GPT-2 is a causal LM over `source <|endoftext|> target <|endoftext|>` with the loss on the target tokens only
(Li & Liang 2021's and LoRA's E2E / WebNLG / DART data format); T5 and BART read the source and decode the
target. Any decoder takes the same path with its tokenizer's BOS as the separator and its EOS as the end
(what decoding stops at): SmolLM2-Instruct's `source <|im_start|> target <|im_end|>`, padded with <|im_end|>,
no chat template. Decoding is batched: a decoder's prompts are left-padded so every row continues at the same
position (generate() derives the positions, GPT-2's learned and Llama's rotary ones, from the mask) and
the KV cache stays on; beam search, its length penalty and no-repeat n-gram size, greedy and sampling are
`task.decode` settings. Scores come from `peftbench.metrics.nlg`, which reproduces each task's official
evaluation.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from transformers import LogitsProcessorList, NoRepeatNGramLogitsProcessor

from peftbench.errors import UserError
from peftbench.formats import Format, save_predictions
from peftbench.formats.logprobs import pad_to, scored_positions_only
from peftbench.log import bar
from peftbench.models import family, inner
from peftbench.record import write_atomic


def encode_train(rows: list[dict], task_cfg: DictConfig, tokenizer, kind: str) -> list[dict[str, Any]]:
    """One (source, target) pair per row: input ids and labels (-100 where no loss is taken)."""
    max_len = int(task_cfg.max_length)
    out = []
    for row in rows:
        src = source_ids(tokenizer, kind, row["source"], max_len)
        if kind == "decoder":
            tgt = tokenizer(" " + row["target"], add_special_tokens=False)["input_ids"] + [
                tokenizer.eos_token_id
            ]
            tgt = tgt[: max(1, max_len - len(src))]
            ids, labels = src + tgt, [-100] * len(src) + tgt
        else:
            ids, labels = (
                src,
                tokenizer(text_target=row["target"], truncation=True, max_length=max_len)["input_ids"],
            )
        out.append({"input_ids": ids, "labels": labels, "idx": row["idx"]})
    return out


def source_ids(tokenizer, kind: str, source: str, max_len: int) -> list[int]:
    """The prompt the model continues: GPT-2 `source <|endoftext|>` (the separator Li & Liang use), the
    encoder input with its special tokens for T5 / BART; at most half the length budget for GPT-2."""
    if kind == "decoder":
        ids = tokenizer(source, add_special_tokens=False)["input_ids"][: max_len // 2 - 1]
        return ids + [tokenizer.bos_token_id]
    return tokenizer(source, truncation=True, max_length=max_len)["input_ids"]


def encode_eval(rows: list[dict], task_cfg: DictConfig, tokenizer, kind: str) -> list[dict[str, Any]]:
    return [
        {"input_ids": source_ids(tokenizer, kind, r["source"], int(task_cfg.max_length)), "idx": r["idx"]}
        for r in rows
    ]


class GenerationFormat(Format):
    """Collate, loss (cross-entropy on target tokens, optional label smoothing) and batched decoding."""

    name = "generation"
    lm = True

    def __init__(self, cfg: DictConfig, task, tokenizer, fam, **options):
        super().__init__(cfg, task, tokenizer, fam)
        task_cfg = cfg.task
        self.smoothing = float(task_cfg.get("label_smoothing") or 0.0)
        self.decode_cfg = task_cfg.decode
        self.pad = tokenizer.pad_token_id
        self.synced = False  # FSDP: every process keeps stepping until all are done

    @classmethod
    def check(cls, cfg: DictConfig) -> None:
        fam = family(cfg.model)
        if fam.kind == "encoder":
            raise UserError(
                f"task {cfg.task.name} generates text and model {cfg.model.name} ({fam.name}) has no decoder; "
                "use a GPT-2, Llama, T5 or BART model"
            )

    def encode_train(self, rows: list[dict]) -> list[dict[str, Any]]:
        return encode_train(rows, self.cfg.task, self.tokenizer, self.kind)

    def encode(self, rows: list[dict]) -> list[dict[str, Any]]:
        return encode_eval(rows, self.cfg.task, self.tokenizer, self.kind)

    def eval_rows(self, rows: list[dict], cap: int | None) -> list[dict]:
        """Evenly spaced inputs (WebNLG's test lists seen before unseen), longest first (less padding;
        they are scored by idx)."""
        if cap:
            rows = rows[:: max(1, len(rows) // int(cap))][: int(cap)]
        return sorted(rows, key=lambda r: -len(r["source"]))

    def evaluate(self, model, loader, ev, rows=None, name=None) -> dict[str, Any]:
        texts = decode_all(inner(model), loader, self, ev.gathered)
        return score_outputs({f["idx"]: t for f, t in zip(loader.dataset, texts)}, ev, rows, name)

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        if "labels" not in features[0]:  # evaluation: prompts only, left-padded for GPT-2
            return left_pad([f["input_ids"] for f in features], self.pad, left=self.kind == "decoder")
        batch = left_pad([f["input_ids"] for f in features], self.pad, left=False)
        batch["labels"] = pad_to([f["labels"] for f in features], -100)
        return batch

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        labels = batch["labels"]
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if self.kind == "decoder":  # position t predicts token t + 1; only those reach the vocabulary
            keep = F.pad(labels[:, 1:] != -100, (0, 1), value=False)
            with scored_positions_only(model, keep):
                logits = model(**inputs).logits
            targets = labels[:, 1:][keep[:, :-1]]
        else:  # the model shifts the labels into decoder inputs itself
            logits = model(**inputs, labels=labels).logits
            logits, targets = logits[labels != -100], labels[labels != -100]
        return F.cross_entropy(logits.float(), targets, label_smoothing=self.smoothing)

    @torch.no_grad()
    def generate(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> list[str]:
        d = self.decode_cfg
        kwargs: dict[str, Any] = {
            "max_new_tokens": int(d.max_new_tokens),
            "pad_token_id": self.pad,
            "eos_token_id": self.tokenizer.eos_token_id,
            "use_cache": True,
            "synced_gpus": self.synced,
        }
        no_repeat = int(d.no_repeat_ngram_size)
        if self.kind == "decoder" and no_repeat and d.strategy != "sample":
            # among the generated tokens only (below): not transformers' processor, which reads the prompt too
            kwargs["logits_processor"] = LogitsProcessorList(
                [GeneratedNoRepeatNGram(no_repeat, batch["input_ids"].shape[1])]
            )
            no_repeat = 0
        if d.strategy == "beam":
            kwargs.update(
                num_beams=int(d.num_beams),
                length_penalty=float(d.length_penalty),
                no_repeat_ngram_size=no_repeat,
                early_stopping=True,
                do_sample=False,
            )
        elif d.strategy == "greedy":
            kwargs.update(num_beams=1, do_sample=False, no_repeat_ngram_size=no_repeat)
        else:  # sample
            kwargs.update(do_sample=True, top_p=float(d.top_p), temperature=float(d.temperature), num_beams=1)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if self.kind == "encoder-decoder" and hasattr(model, "prompt_encoder"):  # soft prompt (prompt.py)
            from peftbench.methods.prompt import prompted_inputs

            inputs = prompted_inputs(model, **inputs)
        out = model.generate(**inputs, **kwargs)
        if self.kind == "decoder":  # drop the (left-padded) prompt: every row continues at the same position
            out = out[:, batch["input_ids"].shape[1] :]
        texts = self.tokenizer.batch_decode(out, skip_special_tokens=True)
        return [" ".join(t.split()) for t in texts]


class GeneratedNoRepeatNGram(NoRepeatNGramLogitsProcessor):
    """No n-gram twice among a decoder's generated tokens, the prompt left out: LoRA's beam search
    (microsoft/LoRA@c4593f060e6a368d7bb5af5273b8e42810cdef90:examples/NLG/src/gpt2_beam.py L96-L124, fairseq's
    `_calc_banned_ngram_tokens` over `history`, the tokens generated so far; L262-L275, L298-L302).
    transformers' NoRepeatNGramLogitsProcessor reads all of a decoder's input_ids, the prompt and its left padding
    included: of SmolLM2 LoRA's 630 greedy E2E test outputs (results/offline_e2e_smollm2), 422 hold a 4-gram of
    their prompt that it would ban ("5 out of 5", "Crowne Plaza Hotel"), 6 repeat one of their own (beam 10,
    length penalty 0.8 with it: BLEU 53.7, greedy 63.1). `start` is where every row's generated tokens begin
    (the prompts are left-padded to one width)."""

    def __init__(self, ngram_size: int, start: int):
        super().__init__(ngram_size)
        self.start = start

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return super().__call__(input_ids[:, self.start :], scores)


def left_pad(seqs: list[list[int]], pad: int, left: bool) -> dict[str, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, sl] = torch.tensor(s, dtype=torch.long)
        mask[i, sl] = 1
    return {"input_ids": ids, "attention_mask": mask}


def decode_all(model: torch.nn.Module, loader, batcher: GenerationFormat, gather=None) -> list[str]:
    """Outputs for every input of the loader, in its order; `gather` collects the processes' shares of each
    batch under data parallelism."""
    model.eval()
    texts: list[str] = []
    for batch in bar(loader, desc="decode", unit="batch"):
        out = batcher.generate(model, batch)
        texts += gather(out) if gather is not None else out
    return texts


def score_outputs(by_idx: dict[int, str], ev, rows=None, name=None) -> dict[str, Any]:
    """Score the outputs (input idx -> text) as the task's official evaluation does, on all inputs and per
    category (WebNLG seen / unseen), and save them: one line per input, in the split's order."""
    from peftbench.metrics.nlg import score_by_category, shared_meteor

    rows = [r for r in (ev.task.validation if rows is None else rows) if r["idx"] in by_idx]
    rows.sort(key=lambda r: r["idx"])
    hyps = [by_idx[r["idx"]] for r in rows]
    result: dict[str, Any] = {"metrics": {}, "unavailable": {}}
    for group, scores in score_by_category(ev.cfg.task.scorer, hyps, rows, shared_meteor()).items():
        suffix = "" if group == "all" else f"_{group}"
        for metric, value in scores.values.items():
            if value is None:
                result["unavailable"][metric + suffix] = scores.unavailable.get(metric, "not computed")
            else:
                result["metrics"][metric + suffix] = round(float(value), 4)
    if ev.artifacts is not None and ev.main:
        path = ev.artifacts / "predictions" / (f"{name}.txt" if name else f"eval_{ev.n_evals}.txt")
        write_atomic(path, "".join(h + "\n" for h in hyps))  # the official scorers' input: a line per input
        examples = []
        for r, h in zip(rows, hyps):
            example = {"idx": r["idx"], "input": r.get("source"), "prediction": h}
            if r.get("category"):
                example["category"] = r["category"]
            examples.append({**example, "references": r.get("references")})
        result["predictions"] = save_predictions(ev, examples, name)
    return result
