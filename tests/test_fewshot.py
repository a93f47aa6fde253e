"""Few-shot: T-Few's recipe end to end on a published 32-shot file, and the cost accounting (inference and
training FLOPs, disk per task) of in-context learning against IA3, checked against the formula on tokens
counted here independently."""

import pytest
import torch
from conftest import require_data

from peftbench.formats.prompt_text import demonstration_text, format_prompt

FEW = ["task=rte", "task.format=prompt", "task.shots_from=tfew", "seed=42", "model=tiny-gpt2"]
FEW += ["task.max_length=512", "train.max_eval_samples=6", "train.progress=false", "train.save_adapter=false"]


def independent_tokens(cfg, rows, demos=()):
    """Tokens per example as the formula means them, for GPT-2 with the context shared by the choices: the
    context (+ demonstrations) once, cut from the left to task.max_length less the longest answer, then
    every answer."""
    from peftbench.models import load_model

    _, tok = load_model(cfg.model, "classification", 2, lm=True)
    prefix = demonstration_text(cfg.task, list(demos))
    total = 0
    for row in rows:
        context, choices = format_prompt(cfg.task, row)
        ctx = len(tok(prefix + context, add_special_tokens=False)["input_ids"])
        answers = [len(tok(" " + c, add_special_tokens=False)["input_ids"]) for c in choices]
        total += min(cfg.task.max_length - max(answers), ctx) + sum(answers)
    return total / len(rows)


def test_icl_and_ia3_costs_follow_the_formula(compose):
    require_data()
    from peftbench.run import execute
    from peftbench.tasks import load_task

    icl_cfg = compose(*FEW, "method=icl", "method.shots=4")
    ia3_cfg = compose(*FEW, "method=ia3", "train.max_steps=2", "train.batch_size=4", "train.eval_every=2")
    icl, ia3 = execute(icl_cfg), execute(ia3_cfg)
    task = load_task(icl_cfg.task, seed=42)
    rows = task.validation[:6]
    demos = [next(r for r in task.train if r["idx"] == i) for i in icl["demonstrations"]]

    for rec, want_tokens in (
        (icl, independent_tokens(icl_cfg, rows, demos)),
        (ia3, independent_tokens(ia3_cfg, rows)),
    ):
        c = rec["cost"]
        assert c["params"] == rec["params"]["total"]
        assert c["inference_tokens_per_example"] == pytest.approx(want_tokens, abs=0.01)
        assert c["inference_flops_per_example"] == pytest.approx(2 * c["params"] * want_tokens, rel=1e-6)
    # k demonstrations multiply what every example costs; the demonstrations are what ICL stores
    assert icl["cost"]["inference_flops_per_example"] > 3 * ia3["cost"]["inference_flops_per_example"]
    assert icl["cost"]["training_flops"] == 0
    assert icl["cost"]["disk_bytes"] == len(demonstration_text(icl_cfg.task, demos).encode())
    # IA3 stores its vectors (fp32), and trained 2 steps x 4 examples at 3 forward passes each
    assert ia3["cost"]["disk_bytes"] == 4 * ia3["params"]["trainable"]
    train_rows = task.train  # the 32-shot file: every training example's tokens, averaged
    per_train = independent_tokens(ia3_cfg, train_rows)
    assert ia3["cost"]["train_tokens_per_example"] == pytest.approx(per_train, abs=0.01)
    assert ia3["cost"]["training_flops"] == pytest.approx(6 * ia3["cost"]["params"] * per_train * 8, rel=1e-4)


def test_tfew_recipe_runs_offline_on_the_32_shot_file(compose, capsys):
    """`peftbench train experiment=tfew task=rte model=tiny-t5`: IA3 + L_LM + L_UL + L_LN, Adafactor, on
    T-Few's 32-shot file of each seed; shortened to 40 steps and 16 dev rows here."""
    require_data()
    from peftbench.cli import main
    from peftbench.record import load_records

    rc = main(
        [
            "train",
            "experiment=tfew",
            "task=rte",
            "model=tiny-t5",
            "only=row=T-Few (IA3 + L_LM + L_UL + L_LN),seed=42|1024",
            "train.max_steps=40",
            "train.eval_every=40",
            "train.max_eval_samples=16",
            "task.max_length=96",
            "train.num_threads=1",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "tfew 1/2" in out and "tfew 2/2" in out  # one run per seed, not per (task, seed) of the grid
    import os
    from pathlib import Path

    records = load_records(Path(os.environ["PEFTBENCH_RESULTS_DIR"]) / "tfew")
    assert sorted(r["seed"] for r in records) == [42, 1024]
    for r in records:
        cfg = r["config"]
        assert r["status"] == "finished" and r["method"] == "ia3" and r["task"] == "rte"
        assert cfg["train"]["optimizer"] == "adafactor" and cfg["train"]["lr"] == 3e-3
        assert cfg["train"]["loss"] == {"lm": 1, "ul": 1, "ln": 1} and cfg["train"]["batch_size"] == 8
        assert r["data"]["shots_from"] == "tfew" and r["data"]["shot_seed"] == r["seed"]
        assert r["data"]["sources"]["train"].endswith(f"rte/32_shot/{r['seed']}_seed.jsonl")
        assert len(r["data"]["train_ids"]) == 32 and r["train"]["samples"] == 40 * 8
        curve = r["train"]["loss_curve"]  # the summed T-Few loss falls
        assert sum(curve[-10:]) / 10 < sum(curve[:10]) / 10 - 0.05
    assert records[0]["data"]["train_ids"] != records[1]["data"]["train_ids"]
    assert torch.isfinite(torch.tensor(records[0]["cost"]["training_flops"]))
