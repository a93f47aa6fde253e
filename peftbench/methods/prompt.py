"""Soft prompts for classification models: the machinery shared by prompt tuning and P-tuning.

Both prepend n trainable vectors P to the input embeddings, [P; E(x)], and extend the attention mask with
ones (Lester et al. 2021, Sec. 2; Liu et al. 2021, Sec. 3). peft's prompt learning does this by calling the
model with `inputs_embeds`, which transformers 5.x refuses for T5 / BART sequence classification ("Passing
input embeddings is currently not supported") and which makes GPT-2's head read the last position (a pad
token) instead of the last real token. So we hook the backbone (`model.base_model`) instead:

- before it runs: input_ids -> [P; E(x)] as inputs_embeds, attention_mask (and token_type_ids) extended;
  for encoder-decoder models the prompt goes in front of the encoder input only, as in Lester et al. (T5),
  and the decoder input is shifted from the original input_ids;
- after it runs (encoder-only and decoder models): the n prompt positions are dropped from the output, so
  the task head reads what it always reads ([CLS] / the pooler for BERT-likes, the last real token for
  GPT-2); the prompt still shapes every real token through attention.

The prompt is `PromptEncoder.forward()`: the plain vectors (prompt tuning; P-tuning's EMB), or an MLP / LSTM
reparameterisation of them (P-tuning).
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from peftbench.errors import UserError
from peftbench.methods import freeze, unfreeze_head
from peftbench.models import Family


class PromptEncoder(nn.Module):
    """n vectors of size d, optionally reparameterised (P-tuning Sec. 3.2: bidirectional LSTM + 2-layer MLP
    head; or an MLP), as peft's PromptEncoder."""

    def __init__(self, n: int, d: int, kind: str = "none", hidden: int = 0, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.n, self.kind = n, kind
        self.embedding = nn.Parameter(torch.empty(n, d, **kw))
        if kind == "lstm":
            self.lstm = nn.LSTM(d, hidden, num_layers=2, bidirectional=True, batch_first=True, **kw)
            self.head = nn.Sequential(
                nn.Linear(2 * hidden, 2 * hidden, **kw), nn.ReLU(), nn.Linear(2 * hidden, d, **kw)
            )
        elif kind == "mlp":
            self.head = nn.Sequential(
                nn.Linear(d, hidden, **kw),
                nn.ReLU(),
                nn.Linear(hidden, hidden, **kw),
                nn.ReLU(),
                nn.Linear(hidden, d, **kw),
            )

    def forward(self) -> torch.Tensor:
        x = self.embedding
        if self.kind == "lstm":
            return self.head(self.lstm(x.unsqueeze(0))[0]).squeeze(0)
        if self.kind == "mlp":
            return self.head(x)
        return x


def add_prompt(
    model: nn.Module, fam: Family, encoder: PromptEncoder, placement: str = "prepend"
) -> nn.Module:
    """Attach the prompt encoder as `model.prompt_encoder` and hook the backbone to prepend it, or (placement
    "template") to put its vectors where the input has the slot ids -1..-n (formats/prompt_text.tokenize_with_slots)."""
    model.prompt_encoder = encoder
    backbone = model.base_model
    n = 0 if placement == "template" else encoder.n
    seq2seq = fam.kind == "encoder-decoder"

    def before(module, args, kwargs):
        args, kwargs, ids = _take_input_ids(args, kwargs)
        if seq2seq and ids is None and kwargs.get("encoder_outputs") is not None:
            return args, kwargs  # generate()'s decoding steps: the encoder read [P; x] (prompted_inputs)
        _check_one_call(ids, kwargs)
        if seq2seq and _no_decoder_input(kwargs):
            kwargs["decoder_input_ids"] = shift_right(model, ids)
        embeds = backbone.get_input_embeddings()(ids.clamp(min=0))
        if placement == "template":
            kwargs["inputs_embeds"] = _fill_slots(encoder, ids, embeds)
        else:
            _prepend(encoder, ids, embeds, kwargs, n)
        return args, kwargs

    def after(module, args, kwargs, output):
        if seq2seq or n == 0:  # the decoder's states (the head's input) have the original length already
            return output
        return _drop_prompt_positions(module, output, n)

    backbone.register_forward_pre_hook(before, with_kwargs=True)
    backbone.register_forward_hook(after, with_kwargs=True)
    if seq2seq:  # the model's own forward hands the encoder [P; x] as inputs_embeds; anything else skips P
        model.get_encoder().register_forward_pre_hook(_encoder_reads_embeddings, with_kwargs=True)
    return model


def _take_input_ids(args: tuple, kwargs: dict) -> tuple[tuple, dict, torch.Tensor | None]:
    """The backbone call's input_ids (positional or keyword), and its other arguments without them."""
    kwargs = dict(kwargs)
    if args:
        kwargs["input_ids"], args = args[0], args[1:]
    ids = kwargs.pop("input_ids", None)
    return args, kwargs, ids


def _check_one_call(ids: torch.Tensor | None, kwargs: dict) -> None:
    if ids is None or kwargs.get("position_ids") is not None or kwargs.get("encoder_outputs") is not None:
        raise UserError(
            "a soft prompt is prepended to input_ids in one forward call (training, rank classification); "
            "step-by-step generate() is not supported with it: use method=prefix_tuning to generate"
        )


def _no_decoder_input(kwargs: dict) -> bool:
    """A seq2seq call with no decoder input to use: the hook builds it from input_ids."""
    return (
        kwargs.get("decoder_input_ids") is None
        and kwargs.get("decoder_inputs_embeds") is None
        and kwargs.get("labels") is None  # a seq2seq LM builds the decoder input from its labels
    )


def _fill_slots(encoder: PromptEncoder, ids: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
    """Placement "template": prompt vector k where the input has slot id -k, token embeddings elsewhere."""
    slots = ids < 0
    if slots.any() and int(-ids.min()) > encoder.n:
        raise UserError(f"the template has {int(-ids.min())} [P] slots; set method.length to that")
    prompt = encoder().to(embeds.dtype)[(-ids - 1).clamp(min=0)]
    return torch.where(slots[..., None], prompt, embeds)


def _prepend(encoder: PromptEncoder, ids: torch.Tensor, embeds: torch.Tensor, kwargs: dict, n: int) -> None:
    """Placement "prepend": [P; E(x)] as inputs_embeds, attention_mask (and token_type_ids) extended by n."""
    prompt = encoder().to(embeds.dtype).unsqueeze(0).expand(ids.shape[0], -1, -1)
    kwargs["inputs_embeds"] = torch.cat([prompt, embeds], dim=1)
    mask = kwargs.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(ids)
    kwargs["attention_mask"] = torch.cat([mask.new_ones(ids.shape[0], n), mask], dim=1)
    if kwargs.get("token_type_ids") is not None:
        tt = kwargs["token_type_ids"]
        kwargs["token_type_ids"] = torch.cat([tt.new_zeros(ids.shape[0], n), tt], dim=1)


def _drop_prompt_positions(module: nn.Module, output, n: int):
    """The backbone's output without the n prompt positions (a BERT-like's pooler rerun on what is left)."""
    output["last_hidden_state"] = output["last_hidden_state"][:, n:]
    pooler = getattr(module, "pooler", None)
    if pooler is not None and output.get("pooler_output") is not None:
        h = output["last_hidden_state"]
        act = getattr(module, "pooler_activation", None)  # ALBERT: a bare Linear + tanh on the first token
        output["pooler_output"] = pooler(h) if act is None else act(pooler(h[:, 0]))
    return output


def _encoder_reads_embeddings(module, args, kwargs):
    if args or kwargs.get("input_ids") is not None:
        raise UserError(
            "the encoder of a soft-prompted T5 / BART was called with input_ids, which would skip the "
            "prompt (model.generate(input_ids=...) does that): generate with "
            "peftbench.methods.prompt.prompted_inputs(model, input_ids, attention_mask)"
        )


def prompted_inputs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
    """T5 / BART generate(): the encoder input with the soft prompt in front, as embeddings, and its mask
    (the encoder runs once on it; each decoding step then passes the hook above untouched), as peft's
    prompt-tuned seq2seq generate does."""
    embeds = model.base_model.get_input_embeddings()(input_ids)
    prompt = model.prompt_encoder().to(embeds.dtype).unsqueeze(0).expand(input_ids.shape[0], -1, -1)
    mask = torch.cat([attention_mask.new_ones(input_ids.shape[0], prompt.shape[1]), attention_mask], dim=1)
    return {"inputs_embeds": torch.cat([prompt, embeds], dim=1), "attention_mask": mask}


def shift_right(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The decoder input the model would build from input_ids itself (BART / T5 convention)."""
    c = model.config
    start = c.decoder_start_token_id if c.decoder_start_token_id is not None else c.pad_token_id
    out = ids.new_full(ids.shape, c.pad_token_id)
    out[:, 1:] = ids[:, :-1]
    out[:, 0] = start
    return out.masked_fill(out == -100, c.pad_token_id)


def init_prompt(encoder: PromptEncoder, model: nn.Module, cfg: DictConfig) -> None:
    """Lester et al. Sec. 3.2 (Fig. 3b): random uniform [-0.5, 0.5]; sampled vocabulary (embeddings of
    tokens drawn from the 5,000 first ids: sentencepiece / BPE vocabularies put frequent tokens first, the
    paper draws from the 5,000 most common); class label (the embedding of each class's label word, averaged
    over its subword tokens; slots beyond the classes get sampled vocabulary). `method.vocab_draw`: the ids
    drawn without replacement (the paper's code) or with it (this project's first runs)."""
    emb = model.base_model.get_input_embeddings()
    if cfg.init == "class_label" and not cfg.get("label_words"):
        raise UserError(
            "method.init=class_label needs label words (this task has no label names): "
            "set method.label_words=[...] or method.init=sampled_vocab"
        )
    if encoder.embedding.device.type == "meta":
        return
    with torch.no_grad():
        if cfg.init == "random_uniform":
            encoder.embedding.uniform_(-0.5, 0.5)
            return
        top = min(5000, emb.weight.shape[0])
        if cfg.get("vocab_draw", "with_replacement") == "without_replacement" and encoder.n <= top:
            ids = torch.randperm(top)[: encoder.n]  # google-research/prompt-tuning prompts.py L199-209
        else:
            ids = torch.randint(0, top, (encoder.n,))
        encoder.embedding.copy_(emb(ids))
        if cfg.init == "class_label":
            for i, ids in enumerate(label_token_ids(cfg)[: encoder.n]):
                encoder.embedding[i] = emb(torch.tensor(ids)).mean(0)


def label_token_ids(cfg: DictConfig) -> list[list[int]]:
    from peftbench.models import load_tokenizer

    words = list(cfg.label_words)
    tok = load_tokenizer(OmegaConf.create(OmegaConf.to_container(cfg.tokenizer, resolve=True)))
    out = []
    for w in words:
        ids = tok(str(w).replace("_", " "), add_special_tokens=False)["input_ids"]
        if not ids:
            raise UserError(f"label word {w!r} has no tokens in this model's vocabulary")
        out.append(ids)
    return out


def apply_prompt(
    model: nn.Module, cfg: DictConfig, fam: Family, kind: str, hidden: int = 0, placement: str = "prepend"
) -> nn.Module:
    n = cfg.length
    d = model.base_model.get_input_embeddings().weight.shape[1]
    # THUDM/P-tuning's prompt encoder (LAMA/p_tuning/prompt_encoder.py): a 2-layer bidirectional LSTM of d / 2
    # per direction, then Linear(d, d), ReLU, Linear(d, d); the MLP encoder's default width is d
    hidden = hidden or (d // 2 if kind == "lstm" else d)
    p = next(model.parameters())
    encoder = PromptEncoder(n, d, kind, hidden, p.device, p.dtype)
    if kind in ("lstm", "mlp") and p.device.type != "meta":
        torch.manual_seed(int(cfg.get("seed", 0)))
        for m in encoder.modules():
            if hasattr(m, "reset_parameters") and m is not encoder:
                m.reset_parameters()
    freeze(model)
    init_prompt(encoder, model, cfg)
    model = add_prompt(model, fam, encoder, placement)
    unfreeze_head(model, fam)
    return model
