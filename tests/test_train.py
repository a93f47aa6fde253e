"""End to end on tiny random models: every task with local files trains and evaluates; records are complete;
merged adapters equal unmerged ones. (Every method x family x format: test_matrix.py.)"""

import json

import pytest
import torch
from conftest import QUICK, require_data

from peftbench.record import run_id
from peftbench.run import execute

LOCAL_TASKS = ["cola", "sst2", "mrpc", "stsb", "rte", "cb", "copa", "superglue_rte", "wic", "wsc", "multirc"]


@pytest.mark.parametrize("task", LOCAL_TASKS)
def test_every_local_task_trains_and_evaluates(compose, task):
    require_data()
    cfg = compose(f"task={task}", "model=tiny-bert", "method=lora", "task.max_length=64", *QUICK)
    rec = execute(cfg)
    assert rec["status"] == "finished"
    assert rec["train"]["steps"] == 3
    assert set(rec["best"]["metrics"]) == set(cfg.task.metrics)
    for value in rec["best"]["metrics"].values():
        assert -100.0 <= value <= 100.0


def test_record_is_complete_and_rerun_skips(compose, capsys):
    require_data()
    cfg = compose("task=rte", "model=tiny-bert", "method=lora", *QUICK[:-1], "train.save_adapter=true")
    rec = execute(cfg)
    path = f"{cfg.paths.results}/runs/{run_id(cfg)}.json"
    on_disk = json.load(open(path))
    assert on_disk["status"] == "finished" and on_disk["run_id"] == run_id(cfg)
    for key in (
        "config",
        "evals",
        "best",
        "params",
        "memory",
        "train",
        "versions",
        "git_sha",
        "device",
        "seed",
        "wall_s",
        "adapter",
        "data",
    ):
        assert key in on_disk, key
    assert on_disk["versions"]["transformers"] == "5.23.0" and on_disk["versions"]["peft"] == "0.21.2"
    # provenance: the metric packages, Java, the GPU stack (None here), the data identity; no machine paths
    assert on_disk["versions"]["sacrebleu"] == "2.6.0" and on_disk["versions"]["pycocoevalcap"] == "1.2"
    assert {"java", "cuda", "cudnn", "driver"} <= set(on_disk["versions"])  # None where absent
    assert on_disk["data"]["sources"] == {
        "train": "$PEFTBENCH_DATA_DIR/glue/RTE/train.tsv",
        "validation": "$PEFTBENCH_DATA_DIR/glue/RTE/dev.tsv",
    }
    assert on_disk["data_identity"]["glue/RTE"].startswith("3 files, ") and "model_revision" in on_disk
    assert on_disk["params"]["trainable_without_head"] == 2 * 2 * 2 * 32 * 8  # 2 layers x q,v x 2 d r
    assert on_disk["memory"]["peak_mib"] > 0 and on_disk["train"]["tokens_per_s"] > 0
    assert on_disk["adapter"]["format"] == "peft" and on_disk["adapter"]["bytes"] > 0
    capsys.readouterr()
    again = execute(cfg)
    assert "skip" in capsys.readouterr().out and again["finished_at"] == rec["finished_at"]


def test_peft_adapter_loads_with_peft_and_matches_the_merged_model(compose):
    require_data()
    from peft import PeftModel

    from peftbench.models import load_model
    from peftbench.record import run_id

    cfg = compose("task=rte", "model=tiny-roberta", "method=lora", "train.lr=0.01", *QUICK[:-1])
    rec = execute(cfg)
    base, tok = load_model(cfg.model, "classification", 2)
    loaded = PeftModel.from_pretrained(base, rec["adapter"]["path"]).eval()
    assert sum(p.abs().sum() for n, p in loaded.named_parameters() if "lora_B" in n) > 0  # trained, not zero
    # merged (final eval) and unmerged (best eval) weights give the same predictions
    assert rec["final"]["metrics"] == rec["best"]["metrics"]
    assert rec["final"]["loss"] == pytest.approx(rec["best"]["loss"], abs=1e-4)
    assert run_id(cfg) in rec["adapter"]["path"]


def test_same_seed_same_metrics(compose, tmp_path):
    require_data()
    args = ["task=mrpc", "model=tiny-bert", "method=lora", *QUICK]
    a = execute(compose(*args, "train.force=true"))
    b = execute(compose(*args, "train.force=true"))
    assert a["best"] == b["best"] and a["train"]["loss_curve"] == b["train"]["loss_curve"]


def test_gradient_accumulation_counts_optimizer_steps(compose):
    require_data()
    quick = [o for o in QUICK if not o.startswith("train.max_train_samples")]
    rec = execute(
        compose(
            "task=rte",
            "model=tiny-bert",
            "method=lora",
            "train.grad_accum=2",
            "train.max_train_samples=32",
            *quick,
        )
    )
    # 32 rows = 4 micro-batches of 8 = 2 optimizer steps per epoch; 3 steps = 6 micro-batches
    assert rec["train"]["steps"] == 3 and rec["train"]["samples"] == 3 * 2 * 8


def test_model_from_a_local_checkpoint_folder(compose, tmp_path):
    require_data()
    from peftbench.models import load_model

    cfg = compose("model=tiny-bert")
    model, tok = load_model(cfg.model, "classification", 2)
    model.save_pretrained(tmp_path / "ckpt")
    tok.save_pretrained(tmp_path / "ckpt")
    cfg = compose(
        "model=tiny-bert", "model.source=hub", "model.tokenizer=null", f"model.path={tmp_path / 'ckpt'}"
    )
    again, _ = load_model(cfg.model, "classification", 2)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_gradient_checkpointing_and_compiled_blocks_train_the_same(compose):
    """Recomputed activations and torch.compile'd blocks change memory and speed, not the numbers: the loss
    curve and the metric equal the eager run's (same run id: they are not part of it)."""
    require_data()
    args = ["task=rte", "model=tiny-gpt2", "method=lora", *QUICK, "train.max_steps=4", "train.force=true"]
    eager = execute(compose(*args))
    recomputed = execute(compose(*args, "train.gradient_checkpointing=true"))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = execute(compose(*args, "train.compile=eager"))  # dynamo's graphs, run without a code generator
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2  # the 2 blocks really were compiled
    torch._dynamo.reset()
    assert eager["run_id"] == recomputed["run_id"] == compiled["run_id"]
    for other in (recomputed, compiled):
        assert other["train"]["loss_curve"] == pytest.approx(eager["train"]["loss_curve"], abs=1e-5)
        assert other["best"]["metrics"] == eager["best"]["metrics"]
    assert recomputed["config"]["train"]["gradient_checkpointing"] is True


def test_training_flops_per_pass_and_mfu(monkeypatch):
    """Forward 2N per token; backward 2N (activations) + 2N_trainable (weights): full fine-tuning is T-Few's
    6N, a frozen base ~4N. MFU divides by the card's dense bf16 peak, where the card is in the table."""
    from peftbench import env
    from peftbench.cost import add_training

    full = {"params": 1000, "train_tokens_per_example": 10.0}
    add_training(full, 5, trainable=1000)
    assert full["training_flops_by_pass"]["total"] == full["training_flops"] == 6 * 1000 * 10 * 5
    lora = {"params": 1000, "train_tokens_per_example": 10.0}
    add_training(lora, 5, trainable=10)
    assert lora["training_flops_by_pass"]["forward"] == 2 * 1000 * 50
    assert lora["training_flops_by_pass"]["backward"] == (2 * 1000 + 2 * 10) * 50
    assert lora["training_flops"] == full["training_flops"]  # T-Few's convention counts every method alike

    cuda = torch.device("cuda", 0)
    for name, peak in [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
    ]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None, n=name: n)
        assert env.peak_flops(cuda, "bf16")[0] == peak
    assert env.peak_flops(cuda, "no") == (None, "peaks are tabulated for bf16 / fp16 (train.mixed_precision)")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Tesla T4")
    assert env.peak_flops(cuda, "fp16")[0] is None
    assert env.peak_flops(torch.device("cpu"), "bf16")[0] is None
