"""The method x family x format matrix, driven by one table: `peftbench list pairs` (validate.pairs), which
applies every method to every family's tiny model on the meta device. Every applicable cell trains here on
the real tiny model: gradients reach only the method's parameters (and a new head), a few AdamW steps on one
batch lower the loss, and the base weights stay bit-identical. A new method YAML joins with no test edit."""

import pytest
import torch
from conftest import require_data

from peftbench.methods import capabilities
from peftbench.validate import pairs

TABLE = pairs()
APPLIES = [(m, f, fmt) for m, f, fmt, why in TABLE if why is None]
# Cells the table says apply but that fail when trained: defects this matrix found, not yet mended. Strict:
# a cell that starts to pass must leave this list.
BROKEN: dict[tuple[str, str, str], str] = {}
CASES = [pytest.param(*c, marks=pytest.mark.xfail(reason=BROKEN[c], strict=True)) if c in BROKEN else c
         for c in APPLIES]  # fmt: skip


def test_the_table_covers_every_method_family_and_format():
    from peftbench.formats import TASK_FORMATS
    from peftbench.paths import group_options
    from peftbench.validate import pair_families

    cells = {(m, f, fmt) for m, f, fmt, _ in TABLE}
    assert cells == {(m, f, x) for m in group_options("method") for f in pair_families() for x in TASK_FORMATS}
    assert all(why is None or (why and "\n" not in why) for *_, why in TABLE)  # a reason is one line
    assert {m for m, _, _ in APPLIES} == set(group_options("method"))  # every method applies somewhere


@pytest.mark.parametrize("method,fam,fmt", CASES, ids=["-".join(c) for c in APPLIES])
def test_matrix_cell_trains_only_the_methods_parameters(compose, method, fam, fmt):
    require_data()
    from conftest import overfit

    from peftbench.setup import prepare

    cfg = compose(
        "task=rte", f"model=tiny-{fam}", f"method={method}", f"task.format={fmt}", "train.max_train_samples=8",
        "train.batch_size=4", "task.max_length=48", "train.max_eval_samples=4", "train.num_threads=1",
    )  # fmt: skip
    if method == "icl":
        cfg.method.shots = 1
    s = prepare(cfg, {})
    trainable = {n for n, p in s.model.named_parameters() if p.requires_grad}
    if not capabilities(cfg.method).trains:
        assert not trainable
        return
    frozen = {n: p.detach().clone() for n, p in s.model.named_parameters() if not p.requires_grad}
    reached: set[str] = set()
    losses = overfit(s, lr=2e-2, steps=6, first_grads=reached)
    assert reached and reached <= trainable
    assert all(torch.isfinite(torch.tensor(losses)))
    assert min(losses[1:]) < losses[0]
    after = dict(s.model.named_parameters())
    assert all(torch.equal(after[n], w) for n, w in frozen.items())
