"""Tests run offline: no hub, tiny random models, the official data files from PEFTBENCH_DATA_DIR (CI points
it at ../shared/data) or small fixture files written by the tests themselves."""

import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
_shared = Path(__file__).resolve().parents[2] / "shared" / "data"
if "PEFTBENCH_DATA_DIR" not in os.environ and _shared.is_dir():
    os.environ["PEFTBENCH_DATA_DIR"] = str(_shared)

import pytest  # noqa: E402
import torch  # noqa: E402

# 2 cores in CI: one test process with 2 threads, or (pytest -n 2) two with one each. On a machine busy with
# other work, PEFTBENCH_TEST_THREADS=1 avoids threads waiting on each other (an oversubscribed core makes
# torch's parallel regions many times slower)
_threads = "1" if os.environ.get("PYTEST_XDIST_WORKER") else "2"
torch.set_num_threads(int(os.environ.get("PEFTBENCH_TEST_THREADS", _threads)))

DATA = Path(os.environ["PEFTBENCH_DATA_DIR"]) if os.environ.get("PEFTBENCH_DATA_DIR") else None


@pytest.fixture
def compose(tmp_path, monkeypatch):
    """Compose the app's config with overrides, results going to a temp folder."""
    from peftbench.config import compose as _compose

    monkeypatch.setenv("PEFTBENCH_RESULTS_DIR", str(tmp_path / "results"))

    def make(*overrides: str):
        return _compose(list(overrides))

    return make


def require_data(*parts: str) -> Path:
    """The offline data are part of this project's test set-up (CI sets PEFTBENCH_DATA_DIR); a missing
    folder is a failed set-up, not a skip."""
    assert DATA is not None and DATA.is_dir(), "set PEFTBENCH_DATA_DIR to the official data folder"
    path = DATA.joinpath(*parts)
    assert path.exists(), f"missing {path}"
    return path


def perturb(model: torch.nn.Module, scale: float = 0.1, seed: int = 1) -> torch.nn.Module:
    """The trainable tensors moved away from their init by seeded noise (as after training), in eval mode:
    a saved-and-reloaded or merged model then has something to get wrong."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn_like(p))
    return model.eval()


def overfit(
    setup, lr: float, steps: int, first_grads: set[str] | None = None, until: float | None = None
) -> list[float]:
    """AdamW on one fixed batch of a prepared run, without dropout; the loss after each step. `first_grads`
    (if given) receives the names of the parameters the first backward pass reached. `until`: stop early, at
    the first step whose loss is below `until` x the first loss."""
    params = [p for p in setup.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    batch = next(iter(setup.train_loader))
    setup.model.eval()
    losses = []
    for _ in range(steps):
        loss = setup.fmt.loss(setup.model, batch)
        loss.backward()
        if first_grads is not None and not losses:
            first_grads.update(n for n, p in setup.model.named_parameters() if p.grad is not None)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        if until is not None and losses[-1] < until * losses[0]:
            break
    return losses


QUICK = [
    "train.max_steps=3",
    "train.max_train_samples=24",
    "train.max_eval_samples=16",
    "train.batch_size=8",
    "train.progress=false",
    "train.save_adapter=false",
]
