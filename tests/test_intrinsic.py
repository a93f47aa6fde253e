"""Intrinsic-dimension fine-tuning: exactly d trainable numbers, θ₀ exactly at θ_d = 0, the Fastfood transform
is the matrix H G Π H B it stands for, and training moves the loss through θ_d alone."""

import pytest
import torch
from conftest import overfit, require_data
from scipy.linalg import hadamard

from peftbench.methods.intrinsic import Dense, Fastfood
from peftbench.methods.intrinsic import hadamard as fwht

QUICK = ["task=rte", "task.max_length=48", "train.max_train_samples=16", "train.max_eval_samples=8"]
QUICK += ["train.batch_size=16"]


def test_walsh_hadamard_and_fastfood_equal_their_matrices():
    x = torch.randn(16, dtype=torch.float64)
    assert torch.allclose(fwht(x), torch.from_numpy(hadamard(16).astype("float64")) @ x)
    gen = torch.Generator().manual_seed(0)
    ff = Fastfood(5, 12, gen).double()
    H = torch.from_numpy(hadamard(16).astype("float64"))
    # V = H G Π H B on the first d coordinates, the first n rows, times the scale
    explicit = H @ torch.diag(ff.G) @ torch.eye(16, dtype=torch.float64)[ff.Pi] @ H @ torch.diag(ff.B)
    explicit = (explicit[:12, :5] * ff.scale).double()
    columns = torch.stack([ff(e) for e in torch.eye(5, dtype=torch.float64)], dim=1)
    assert torch.allclose(columns, explicit, atol=1e-12)
    # each column of the full L x L transform has norm 1 (before cutting to n rows)
    big = Fastfood(3, 4096, torch.Generator().manual_seed(1))
    norms = torch.stack([big(e).norm() for e in torch.eye(3)])
    assert torch.allclose(norms, torch.ones(3), atol=1e-4)
    dense = Dense(4, 1000, torch.Generator().manual_seed(0))
    assert torch.allclose(dense.P.norm(dim=0), torch.ones(4), atol=1e-5)


@pytest.mark.parametrize(
    "extra,d,kind",
    [
        (["method.d=10"], 10, "dense"),
        (["method.d=300", "method.projection=fastfood"], 300, "fastfood"),
        (["method.d=300", "method.said=true"], 300, "fastfood"),
    ],
)
def test_exactly_d_trainable_and_theta0_at_zero(compose, extra, d, kind):
    require_data()
    from peftbench.setup import prepare

    plain = prepare(compose("model=tiny-bert", "method=full", *QUICK), {})
    record: dict = {}
    setup = prepare(compose("model=tiny-bert", "method=intrinsic", *QUICK, *extra), record)
    model = setup.model
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert sum(trainable.values()) == d == record["params"]["trainable"]
    assert record["params"]["total"] == sum(p.numel() for p in plain.model.parameters()) + d
    assert model.intrinsic.kind == kind
    if "method.said=true" in extra:
        n_tensors = len(list(plain.model.parameters()))
        assert trainable == {"intrinsic.theta": d - n_tensors, "intrinsic.lam": n_tensors}
    batch = next(iter(setup.eval_loader))
    plain.model.eval(), model.eval()
    with torch.no_grad():
        a = setup.fmt.logits(plain.model, batch)
        b = setup.fmt.logits(model, batch)
    assert torch.equal(a, b)  # θ_d = 0: bit for bit the model it started from
    weights = dict(plain.model.named_parameters())
    assert all(
        torch.equal(m.weight, weights[n + ".weight"])
        for n, m in model.named_modules()
        if n + ".weight" in weights
    )


@pytest.mark.parametrize("model", ["tiny-bert", "tiny-gpt2", "tiny-t5"])
def test_loss_falls_through_theta_d_alone(compose, model):
    require_data()
    from peftbench.setup import prepare

    setup = prepare(compose(f"model={model}", "method=intrinsic", "method.d=2000", *QUICK), {})
    theta0 = {n: b.clone() for n, b in setup.model.named_buffers() if n.endswith("_theta0")}
    grads: set[str] = set()
    losses = overfit(setup, lr=0.01, steps=30, first_grads=grads)
    # a random tiny model's features barely separate 16 RTE pairs (see the BitFit case): a fall, not a fit
    assert losses[-1] < losses[0] - 0.03, losses
    assert grads == {"intrinsic.theta"}  # the only leaf with a gradient
    assert all(torch.equal(b, theta0[n]) for n, b in setup.model.named_buffers() if n in theta0)
    assert setup.model.intrinsic.theta.abs().sum() > 0


def test_evaluation_reuses_the_written_weights_until_theta_changes(compose):
    """The pre-hook computes θ₀ + P θ_d once for consecutive no-grad forwards (an evaluation), again after an
    optimizer step changes θ_d, and on every forward that builds a graph; outputs always match θ_d."""
    require_data()
    from peftbench.setup import prepare

    setup = prepare(compose("model=tiny-bert", "method=intrinsic", "method.d=50", *QUICK), {})
    model, sub = setup.model, setup.model.intrinsic
    calls = []
    real = sub.deltas
    sub.deltas = lambda: calls.append(1) or real()
    batch = next(iter(setup.train_loader))
    model.eval()
    with torch.no_grad():
        first = setup.fmt.logits(model, batch)
        again = setup.fmt.logits(model, batch)
    assert len(calls) == 1 and torch.equal(first, again)
    opt = torch.optim.AdamW([sub.theta], lr=0.1)
    setup.fmt.loss(model, batch).backward()
    assert len(calls) == 2  # a training forward always writes (its graph reaches θ_d)
    opt.step()
    with torch.no_grad():
        moved = setup.fmt.logits(model, batch)
        moved_again = setup.fmt.logits(model, batch)
    assert len(calls) == 3 and torch.equal(moved, moved_again) and not torch.equal(moved, first)
    with torch.no_grad():  # what a fresh write of the current θ_d gives
        sub.theta.add_(0.0)  # an in-place write: the next forward recomputes
        fresh = setup.fmt.logits(model, batch)
    assert len(calls) == 4 and torch.equal(fresh, moved)


def test_paper_model_counts_on_the_meta_device(compose):
    from peftbench.cli import main

    assert main(["params", "method=intrinsic", "model=roberta-large", "method.d=200", "task=mrpc"]) == 0


def test_bad_settings_are_one_line_errors(compose):
    require_data()
    from peftbench.errors import UserError
    from peftbench.setup import prepare
    from peftbench.validate import validate

    with pytest.raises(UserError, match="SAID spends one of the d numbers"):
        prepare(compose("model=tiny-bert", "method=intrinsic", "method.d=10", "method.said=true", *QUICK), {})
    with pytest.raises(UserError, match="choose from: auto, dense, fastfood"):  # the schema's
        validate(compose("model=tiny-bert", "method=intrinsic", "method.projection=sparse", *QUICK))


def fake(row: str, acc: float, d: int | None = None) -> dict:
    method = {"name": "intrinsic", "d": d} if d else {"name": "full"}
    return {
        "row": row,
        "task": "mrpc",
        "model": "minilm",
        "status": "finished",
        "best": {"metrics": {"accuracy": acc, "f1": acc}},
        "config": {"method": method},
        "params": {"trainable_without_head": d or 22_713_216},
    }


def test_d90_is_the_smallest_d_reaching_90_percent_of_full_fine_tuning():
    from peftbench.experiment import load_preset
    from peftbench.report.presets import threshold_dimension

    preset = load_preset("intrinsic_dimension")
    records = [fake("Full FT", 80.0), fake("d=10", 60.0, 10), fake("d=200", 71.0, 200)]
    records += [fake("d=1000", 72.5, 1000), fake("d=5000", 75.0, 5000)]
    lines = threshold_dimension(preset, records, "mean")
    assert lines[0] == "d90 (mrpc accuracy): 1000 (72.5 >= 0.9 x 80.0)"  # 71.0 < 72.0 <= 72.5
    assert lines[1] == "d90 (sst2 accuracy): needs the 'Full FT' run"
    records[-2:] = []
    assert threshold_dimension(preset, records, "mean")[0] == (
        "d90 (mrpc accuracy): not reached up to 200 (best 71.0 at 200 < 0.9 x 80.0 = 72.0)"
    )
