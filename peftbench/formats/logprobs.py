"""Log-probabilities of chosen tokens without whole (positions x vocabulary) logits, and T-Few's losses:
the pieces the prompt and generation formats score with."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from peftbench.models import base_model


@contextmanager
def scored_hidden(model: torch.nn.Module, keep: torch.Tensor) -> Iterator[list[torch.Tensor]]:
    """While active, the vocabulary projection (the output embedding) takes only the hidden states at `keep`
    (B, T), hands them to the caller (the yielded list) and returns no rows: `logprobs_at` then projects
    them in chunks. The model's own logits come back empty."""
    kept: list[torch.Tensor] = []

    def take(module, args):
        kept.append(args[0][keep])
        return (kept[-1][:0], *args[1:])

    handle = base_model(model).get_output_embeddings().register_forward_pre_hook(take)
    try:
        yield kept
    finally:
        handle.remove()


def logprobs_at(
    model: torch.nn.Module,
    hidden: torch.Tensor,
    tokens: torch.Tensor,
    rows: torch.Tensor | None = None,
    chunk: int = 1024,
) -> torch.Tensor:
    """log p(tokens[i]) under the vocabulary distribution of hidden[rows[i]] (default: hidden[i]), for hidden
    states taken by `scored_hidden`. The projection runs over `chunk` hidden states at a time (with gradients
    each chunk is recomputed in the backward pass), so no (positions x vocabulary) tensor is ever whole."""
    if rows is None:
        rows = torch.arange(len(tokens), device=tokens.device)
    base = base_model(model)
    head = base.get_output_embeddings()
    bias = getattr(base, "final_logits_bias", None)  # BART adds it after the projection

    def part(h: torch.Tensor, r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logits = head(h).float()
        if bias is not None:
            logits = logits + bias.float()
        return logits.log_softmax(-1)[r, t]

    pieces, order = [], []
    for start in range(0, len(hidden), chunk):
        sel = ((rows >= start) & (rows < start + chunk)).nonzero().squeeze(1)
        if len(sel):
            args = (hidden[start : start + chunk], rows[sel] - start, tokens[sel])
            grad = torch.is_grad_enabled() and hidden.requires_grad
            pieces.append(checkpoint(part, *args, use_reentrant=False) if grad else part(*args))
            order.append(sel)
    if not pieces:
        return hidden.new_zeros(0, dtype=torch.float32)
    return torch.cat(pieces)[torch.argsort(torch.cat(order))]


@contextmanager
def scored_positions_only(model: torch.nn.Module, keep: torch.Tensor) -> Iterator[None]:
    """While active, the output embedding (the vocabulary projection) sees only the hidden states at `keep`
    (B, T) and returns (keep.sum(), V) logits (generation's training loss)."""
    head = base_model(model).get_output_embeddings()
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


def pad_to(seqs: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    if left:
        return torch.tensor([[value] * (width - len(s)) + s for s in seqs], dtype=torch.long)
    return torch.tensor([s + [value] * (width - len(s)) for s in seqs], dtype=torch.long)
