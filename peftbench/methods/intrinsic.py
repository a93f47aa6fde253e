"""Intrinsic-dimension fine-tuning (Li et al. 2018; Aghajanyan et al. 2021, "Intrinsic Dimensionality Explains
the Effectiveness of Language Model Fine-Tuning"): every weight moves only inside a random d-dimensional
subspace, θ = θ₀ + P θ_d, with θ_d ∈ R^d the only trainable parameters (zero at the start, so the model
starts exactly at θ₀) and P a fixed random projection.

- The subspace covers every weight tensor of the model, the new task head included (its random init is part of
  θ₀), as Li et al. and Aghajanyan et al. do, so the run trains exactly d numbers. `method.exclude` leaves
  tensors out (frozen at θ₀): e.g. the word embeddings, to save the projection's cost on CPU.
- P per weight tensor. `dense`: a d × n Gaussian matrix with unit-norm columns, O(d·n) memory, for small
  models. `fastfood` (Le et al. 2013, as the papers use it): P = H G Π H B / (σ √n) on θ_d zero-padded to the
  next power of two L, with B random signs, Π a random permutation, G Gaussian, H the Walsh-Hadamard transform:
  O(L) memory and O(L log L) time, never the d × n matrix. `auto` takes dense while d·n stays under 2^26
  entries in all, else Fastfood.
- `said: true` is Aghajanyan et al.'s structure-aware variant (SAID): θ_i = θ₀,i + λ_i P_i θ_{d−m}, one scale
  λ_i per weight tensor (m of them, starting at 1) and d − m subspace coordinates: still d trainable numbers.

The original weights become buffers; a forward pre-hook writes θ₀ + P θ_d into the modules before each forward
(so every forward, generation's too, sees the current θ_d); a no-grad forward after no change to θ_d (an
evaluation's every batch after the first) reuses what was written. The weights saved are θ_d (and λ) and the seed.
"""

from __future__ import annotations

import fnmatch
import math

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from peftbench.errors import UserError
from peftbench.methods import Capabilities
from peftbench.models import FROZEN_SUFFIX, Family
from peftbench.schema import SEED, Bool, ListOf, OneOf, PositiveInt, Text

# d trainable numbers: its table is intrinsic_dimension
CAN = Capabilities(in_params_table=False, tensors=("intrinsic.",))
FIELDS = {
    "d": PositiveInt(doc="trainable numbers"),
    "projection": OneOf("auto", "dense", "fastfood"),
    "said": Bool(),
    "projection_seed": SEED,
    "exclude": ListOf(Text(), doc="glob patterns of parameter names kept at theta_0"),
}

DENSE_LIMIT = 2**26  # dense projections, all tensors together: at most this many entries (256 MiB in fp32)


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised fast Walsh-Hadamard transform of a vector whose length is a power of two: H_L = H_16 ⊗ ...
    ⊗ H_16 ⊗ H_2^k, applied one factor at a time (a 16 x 16 product does 4 of the radix-2 butterfly stages in
    one pass over memory)."""
    n = x.shape[-1]
    h = 1
    while h < n:
        r = min(16, n // h)
        H = _hadamard_matrix(r, x)  # symmetric
        x = x.reshape(-1, r) @ H if h == 1 else torch.matmul(H, x.reshape(-1, r, h))
        h *= r
    return x.reshape(n)


def _hadamard_matrix(r: int, like: torch.Tensor) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=like.dtype, device=like.device)
    while len(h) < r:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h


class Permute(torch.autograd.Function):
    """x[perm], whose gradient is g[perm⁻¹]: a gather both ways (autograd's default scatters with atomics)."""

    @staticmethod
    def forward(ctx, x, perm, inverse):
        ctx.save_for_backward(inverse)
        return x[perm]

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad[inverse], None, None


class Fastfood(torch.nn.Module):
    """R^d -> R^n: H G Π H B on the zero-padded input, scaled so each of the d columns has about unit norm."""

    def __init__(self, d: int, n: int, generator: torch.Generator | None):
        super().__init__()
        self.d, self.n = d, n
        self.L = L = 2 ** math.ceil(math.log2(max(d, n, 2)))
        if generator is None:  # the meta device (parameter counts): shapes only
            for name, dtype in (
                ("B", torch.float),
                ("Pi", torch.long),
                ("Pi_inv", torch.long),
                ("G", torch.float),
            ):
                self.register_buffer(name, torch.empty(L, dtype=dtype, device="meta"))
            self.register_buffer("scale", torch.empty((), device="meta"))
            return
        self.register_buffer("B", torch.randint(0, 2, (L,), generator=generator).float() * 2 - 1)
        self.register_buffer("Pi", torch.randperm(L, generator=generator))
        self.register_buffer("Pi_inv", torch.argsort(self.Pi))
        self.register_buffer("G", torch.randn(L, generator=generator))
        # ‖H G Π H B e_j‖² = L ‖G‖² for every unit vector e_j: divide by √(L ‖G‖²)
        self.register_buffer("scale", 1.0 / torch.sqrt(L * (self.G**2).sum()))

    def forward(self, theta: torch.Tensor) -> torch.Tensor:
        x = hadamard(F.pad(theta, (0, self.L - self.d)) * self.B)
        x = hadamard(Permute.apply(x, self.Pi, self.Pi_inv) * self.G)
        return x[: self.n] * self.scale


class Dense(torch.nn.Module):
    """R^d -> R^n: a stored Gaussian matrix with unit-norm columns."""

    def __init__(self, d: int, n: int, generator: torch.Generator | None):
        super().__init__()
        if generator is None:
            self.register_buffer("P", torch.empty(n, d, device="meta"))
            return
        p = torch.randn(n, d, generator=generator)
        self.register_buffer("P", p / p.norm(dim=0, keepdim=True))

    def forward(self, theta: torch.Tensor) -> torch.Tensor:
        return self.P @ theta


class Subspace(torch.nn.Module):
    """θ_d (and SAID's λ), the projections of every covered weight tensor, and their θ₀ (as buffers)."""

    def __init__(self, targets: list[tuple[str, torch.nn.Parameter]], cfg: DictConfig):
        super().__init__()
        d = cfg.d
        self.said = bool(cfg.said)
        m = len(targets) if self.said else 0
        if d <= m:
            raise UserError(
                f"method.d={d} with method.said=true: SAID spends one of the d numbers per weight tensor "
                f"({m} here); use d > {m} or said=false"
            )
        meta = targets[0][1].device.type == "meta"
        device = targets[0][1].device
        self.theta = torch.nn.Parameter(torch.zeros(d - m, device=device))
        self.lam = torch.nn.Parameter(torch.ones(m, device=device)) if self.said else None
        sizes = [p.numel() for _, p in targets]
        kind = cfg.projection
        if kind == "auto":
            kind = "dense" if (d - m) * sum(sizes) <= DENSE_LIMIT else "fastfood"
        if kind == "dense" and (d - m) * sum(sizes) > DENSE_LIMIT:
            raise UserError(
                f"method.projection=dense with d={d}: a {d - m} x {sum(sizes):,} matrix is over 2^26 entries; "
                "use projection=fastfood (or auto)"
            )
        self.kind = kind
        gen = None if meta else torch.Generator().manual_seed(int(cfg.projection_seed))
        make = Dense if kind == "dense" else Fastfood
        self.projections = torch.nn.ModuleList(make(d - m, n, gen) for n in sizes)

    def deltas(self) -> list[torch.Tensor]:
        out = [proj(self.theta) for proj in self.projections]
        if self.lam is not None:
            out = [delta * lam for delta, lam in zip(out, self.lam)]
        return out


Slots = list[list[tuple[torch.nn.Module, str]]]  # per covered tensor: the (module, attribute) holding it


def apply(model: torch.nn.Module, cfg: DictConfig, fam: Family) -> torch.nn.Module:
    targets = _covered(model, list(cfg.exclude or []))
    for p in model.parameters():
        p.requires_grad_(False)
    subspace = Subspace(targets, cfg)
    slots = _slots(model, targets)
    _to_buffers(targets, slots)
    model.add_module("intrinsic", subspace)
    write = _weight_writer(subspace, slots)
    model.register_forward_pre_hook(write, with_kwargs=True)
    get_encoder = getattr(model, "get_encoder", None)
    encoder = get_encoder() if model.config.is_encoder_decoder and get_encoder else None
    if encoder is not None:  # rank classification runs the encoder alone, once for every answer
        _write_when_called_alone(model, encoder, write)
    return model


def _write_when_called_alone(model: torch.nn.Module, encoder: torch.nn.Module, write) -> None:
    """The encoder of a T5 / BART, called by itself (not from the model's forward, whose own hook has just
    written the weights), writes θ₀ + P θ_d first: else it would read the weights of the previous forward,
    whose graph a backward has freed."""
    depth = 0

    def enter(module, args, kwargs):
        nonlocal depth
        depth += 1

    def leave(module, args, kwargs, output):
        nonlocal depth
        depth -= 1

    def encoder_alone(module, args, kwargs):
        return (args, kwargs) if depth else write(module, args, kwargs)

    model.register_forward_pre_hook(enter, with_kwargs=True)
    model.register_forward_hook(leave, with_kwargs=True, always_call=True)
    encoder.register_forward_pre_hook(encoder_alone, with_kwargs=True)


def _covered(model: torch.nn.Module, excluded: list) -> list[tuple[str, torch.nn.Parameter]]:
    """The weight tensors the subspace covers, in the model's order: each once (a tied one under its first
    name that `method.exclude` does not match)."""
    targets, seen = [], set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen or any(fnmatch.fnmatch(name, pattern) for pattern in excluded):
            continue
        seen.add(id(p))
        targets.append((name, p))
    if not targets:
        raise UserError(f"method.exclude={excluded} leaves no weight in the subspace")
    return targets


def _slots(model: torch.nn.Module, targets: list[tuple[str, torch.nn.Parameter]]) -> Slots:
    """Every module slot that holds a covered tensor (a tied tensor has several)."""
    slots: Slots = [[] for _ in targets]
    index = {id(p): i for i, (_, p) in enumerate(targets)}
    for module in model.modules():
        for attr, p in list(module._parameters.items()):
            if p is not None and id(p) in index:
                slots[index[id(p)]].append((module, attr))
    return slots


def _to_buffers(targets: list[tuple[str, torch.nn.Parameter]], slots: Slots) -> None:
    """Each slot's parameter becomes a buffer θ₀ (`<attr>` + FROZEN_SUFFIX) and a plain tensor attribute."""
    for (_, p), where in zip(targets, slots):
        for module, attr in where:
            del module._parameters[attr]
            module.register_buffer(attr + FROZEN_SUFFIX, p.data, persistent=False)
            setattr(module, attr, p.data)


def _weight_writer(subspace: Subspace, slots: Slots):
    """The forward pre-hook that writes θ₀ + P θ_d into every slot, skipped in a no-grad forward when θ_d (and
    λ) are unchanged since its last write."""
    written = None  # which θ_d (and λ) the weights now hold

    def write_weights(module, args, kwargs):
        nonlocal written
        key = [(t.data_ptr(), t._version, t.device) for t in subspace.parameters()]
        if not torch.is_grad_enabled() and key == written:
            return args, kwargs  # evaluation with θ_d unchanged since the last write: nothing to recompute
        for delta, where in zip(subspace.deltas(), slots):
            for owner, attr in where:
                theta0 = getattr(owner, attr + FROZEN_SUFFIX)
                setattr(owner, attr, theta0 + delta.view_as(theta0).to(theta0.dtype))
        written = key
        return args, kwargs

    return write_weights
