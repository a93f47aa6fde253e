"""The prompt format's text side: a row as a prompt (task.prompt.template) with its answer choices,
P-tuning's [P] slots, in-context demonstrations, and their token ids (`encode_prompted`)."""

from __future__ import annotations

from typing import Any

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
    """Per row: {context, answers, label, idx, group}: the context's token ids and each choice's answer ids;
    RankBatcher builds the model inputs from them. The context is cut from the left to fit task.max_length
    with the longest answer (the query stays; the oldest demonstrations go first), the same context for
    every choice. `anchored`: the context is task.prompt.anchored, real anchor words around [P] prompt
    slots (P-tuning, Liu et al. 2021 Sec. 3)."""
    prefix = demonstration_text(task_cfg, demos, separator)
    max_len = int(task_cfg.max_length)
    n_specials = 0 if kind == "decoder" else len(tokenizer("")["input_ids"])
    answers: dict[str, list[int]] = {}  # one token list per distinct choice text, shared by every row
    out = []
    for row in rows:
        context, choices = format_prompt(task_cfg, row, "anchored" if anchored else "template")
        text = prefix + context
        ctx = (
            tokenize_with_slots(tokenizer, text)
            if anchored
            else tokenizer(text, add_special_tokens=False)["input_ids"]
        )
        for c in choices:
            if c not in answers:
                answers[c] = answer_ids(tokenizer, kind, c)
        ans = [answers[c] for c in choices]
        room = max_len - n_specials - (0 if kind == "encoder-decoder" else max(map(len, ans)))
        out.append(
            {
                "context": ctx[-max(1, room) :],
                "answers": ans,
                "label": row["label"],
                "idx": row["idx"],
                "group": group_of(task_cfg, row),
            }
        )
    return out


def answer_ids(tokenizer, kind: str, choice: str) -> list[int]:
    """The tokens that score a choice: T5 / BART's decoder target (with its special tokens), else the
    choice's words as they continue the context (" True")."""
    if kind == "encoder-decoder":
        return tokenizer(choice)["input_ids"]
    ids = tokenizer(" " + choice, add_special_tokens=False)["input_ids"]
    if not ids:
        raise UserError(f"answer choice {choice!r} has no tokens")
    return ids
