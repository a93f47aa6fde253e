"""What a run tells while and after it works: the loss lines in Hydra's job log (and the record and the log
naming each other), TensorBoard through accelerate's trackers, per-example predictions beside the record,
progress bars only on a terminal, and trackers that are not installed refused before any work."""

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from peftbench import log as L
from peftbench.cli import main

TINY = ["model=tiny-bert", "task=rte", "method=lora", "train.max_train_samples=24", "train.batch_size=8",
        "train.max_eval_samples=16", "train.save_adapter=false", "train.num_threads=1"]  # fmt: skip


@pytest.fixture(scope="module")
def tensorboard_run(tmp_path_factory):
    """One real `peftbench train` process, stdout and stderr pipes (not a terminal): 6 steps, an evaluation
    every 3, a loss line every 2, TensorBoard on."""
    tmp = tmp_path_factory.mktemp("tb")
    args = [*TINY, "train.max_steps=6", "train.eval_every=3", "train.log_every=2", "train.report_to=tensorboard",
            f"paths.results={tmp / 'results'}", f"paths.logs={tmp / 'logs'}", f"hydra.run.dir={tmp / 'job'}"]  # fmt: skip
    out = subprocess.run(
        [sys.executable, "-m", "peftbench.cli", "train", *args], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    (path,) = glob.glob(str(tmp / "results" / "runs" / "*.json"))
    return tmp, out, json.loads(Path(path).read_text())


def test_tensorboard_event_file_has_the_loss_curve_and_the_evaluations(tensorboard_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tmp, _, record = tensorboard_run
    folder = tmp / "logs" / "tensorboard" / "runs" / record["run_id"]
    assert glob.glob(str(folder / "events.out.tfevents.*"))
    events = EventAccumulator(str(folder))
    events.Reload()
    loss = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert [s for s, _ in loss] == [1, 2, 3, 4, 5, 6]
    assert [round(v, 5) for _, v in loss] == pytest.approx(record["train"]["loss_curve"], abs=1e-5)
    acc = [(e.step, round(e.value, 4)) for e in events.Scalars("eval/accuracy")]
    assert acc[:2] == [
        (3, record["evals"][0]["metrics"]["accuracy"]),
        (6, record["evals"][1]["metrics"]["accuracy"]),
    ]
    lr = [e.value for e in events.Scalars("train/lr")]
    assert lr[0] > lr[-1] == 0.0  # linear decay to 0 at the last step
    assert record["trackers"] == ["tensorboard"]


def test_hydra_log_file_has_loss_lines_every_log_every_and_names_the_record(tensorboard_run):
    tmp, out, record = tensorboard_run
    text = (tmp / "job" / "train.log").read_text()
    loss_lines = [
        line for line in text.splitlines() if " loss " in line and "][peftbench][INFO] - step " in line
    ]
    assert [line.split(" - step ")[1].split()[0] for line in loss_lines] == ["2/6", "4/6", "6/6"]
    assert f"record {tmp / 'results' / 'runs' / record['run_id']}.json" in text
    assert Path(record["log"]).resolve() == (tmp / "job" / "train.log").resolve()  # each names the other
    assert "[peftbench] step 2/6 epoch 0.67 loss " in out.stdout  # the same lines on the console


def test_no_progress_frames_when_not_a_terminal(tensorboard_run):
    _, out, _ = tensorboard_run
    assert "\r" not in out.stdout and "\r" not in out.stderr
    assert "it/s" not in out.stderr and "step/s" not in out.stderr


def test_classification_predictions_jsonl_beside_the_record(tensorboard_run):
    tmp, _, record = tensorboard_run
    path = Path(record["predictions"])
    assert path == tmp / "results" / "runs" / record["run_id"] / "predictions.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 16 and [r["idx"] for r in rows] == sorted(r["idx"] for r in rows)
    assert set(rows[0]) >= {
        "idx",
        "label",
        "prediction",
        "label_name",
        "prediction_name",
        "correct",
        "scores",
    }
    for r in rows:  # the prediction is the argmax of the saved scores, and `correct` says if it is the label
        assert r["prediction"] == max(range(2), key=lambda i: r["scores"][i])
        assert r["correct"] == (r["prediction"] == r["label"])
        assert r["label_name"] == ["entailment", "not_entailment"][r["label"]]
    reported = record.get("final") or record["best"]
    assert 100 * sum(r["correct"] for r in rows) / len(rows) == pytest.approx(reported["metrics"]["accuracy"])


def test_generation_predictions_jsonl(compose, tmp_path):
    from peftbench.run import execute

    record = execute(compose("model=tiny-gpt2", "task=e2e", "method=lora", "train.max_steps=2",
                             "train.max_train_samples=8", "train.batch_size=4", "train.max_eval_samples=4",
                             "task.decode.max_new_tokens=4", "train.save_adapter=false", "train.progress=false"))  # fmt: skip
    rows = [json.loads(line) for line in Path(record["predictions"]).read_text().splitlines()]
    hyps = Path(record["best"]["predictions"].replace(".jsonl", ".txt")).read_text().splitlines()
    assert [r["prediction"] for r in rows] == hyps  # the scorer's input, line for line
    assert len(rows) == 4 and all(r["references"] and r["input"] for r in rows)


@pytest.mark.parametrize("tracker", ["wandb", "mlflow"])
def test_a_tracker_that_is_not_installed_is_refused_before_any_work(tracker, tmp_path, capsys, monkeypatch):
    import importlib.util

    if importlib.util.find_spec(tracker) is not None:
        pytest.skip(f"{tracker} is installed here")
    monkeypatch.setenv("PEFTBENCH_RESULTS_DIR", str(tmp_path))
    assert main(["train", *TINY, f"train.report_to={tracker}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"peftbench: error: train.report_to={tracker} needs the {tracker} package, which is not "
                   f"installed (pip install {tracker}); or train.report_to=none")  # fmt: skip
    assert not list(tmp_path.rglob("*.json"))


def test_bad_tracker_name_names_the_choices(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PEFTBENCH_RESULTS_DIR", str(tmp_path))
    assert main(["train", *TINY, "train.report_to=neptune"]) == 2
    err = capsys.readouterr().err
    assert "train.report_to" in err and "neptune" in err and "tensorboard" in err and "Traceback" not in err


def test_bars_show_only_on_a_terminal_and_when_progress_is_on(monkeypatch):
    monkeypatch.setattr(L, "on_terminal", lambda: True)
    monkeypatch.setitem(L.BARS, "on", True)
    assert not L.bar(range(3)).disable
    monkeypatch.setitem(L.BARS, "on", False)  # train.progress=false
    assert L.bar(range(3)).disable
    monkeypatch.setattr(L, "on_terminal", lambda: False)
    monkeypatch.setitem(L.BARS, "on", True)
    assert L.bar(range(3)).disable
    import datasets
    import transformers

    L.library_bars()  # the libraries' own bars (loading weights, converting GGUF) follow the same rule
    assert not transformers.utils.logging.is_progress_bar_enabled()
    assert not datasets.is_progress_bar_enabled()


def test_flat_config_for_hyperparameter_panels():
    assert L.flat({"train": {"lr": 1e-3, "betas": [0.9, 0.99], "steps": None}, "seed": 1}) == {
        "train.lr": 1e-3, "train.betas": "[0.9, 0.99]", "train.steps": "None", "seed": 1}  # fmt: skip


def test_preset_grid_writes_its_own_log_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PEFTBENCH_RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.setenv("PEFTBENCH_LOG_DIR", str(tmp_path / "logs"))
    monkeypatch.chdir(tmp_path)
    code = main(["train", "experiment=offline_minilm", "only=row=LoRA r=8,seed=1,task=rte", "model=tiny-bert",
                 "train.max_steps=2", "train.max_train_samples=16", "train.max_eval_samples=8",
                 "train.progress=false", "train.save_adapter=false"])  # fmt: skip
    assert code == 0
    (log_file,) = glob.glob(str(tmp_path / "logs" / "experiments" / "offline_minilm" / "*.log"))
    text = Path(log_file).read_text()
    assert "experiment offline_minilm: 1 runs" in text and "best accuracy=" in text
    (record,) = glob.glob(str(tmp_path / "results" / "offline_minilm" / "*.json"))
    assert Path(json.loads(Path(record).read_text())["log"]).resolve() == Path(log_file).resolve()
    os.environ.pop("PEFTBENCH_GRID_FILE", None)


def test_hub_data_source_names_the_revision_that_was_loaded(tmp_path, monkeypatch, compose):
    """A dataset `datasets` loads (here a local folder in the hub's RTE schema, offline) is named in the
    record with the revision of the copy it read: the commit-hash folder of its cache files."""
    from peftbench.tasks import load_task
    from peftbench.tasks.classification import HUB_REVISIONS

    folder = tmp_path / "rte"
    folder.mkdir()
    for split, n in (("train", 12), ("validation", 6)):
        rows = [{"sentence1": f"a b {i}", "sentence2": "c d", "label": i % 2, "idx": i} for i in range(n)]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("PEFTBENCH_DATA_DIR")
    monkeypatch.setattr("datasets.config.HF_DATASETS_CACHE", tmp_path / "cache")
    cfg = compose("task=rte", f"task.hub.path={folder}", "task.hub.name=null", "model=tiny-bert")
    task = load_task(cfg.task, 0)
    rev = HUB_REVISIONS[str(folder)]
    cached = {p.parent.name for p in (tmp_path / "cache").rglob("*.arrow")}
    assert cached == {rev} and len(rev) >= 16
    assert task.sources == {"train": f"hub:{folder}@{rev}", "validation": f"hub:{folder}@{rev}"}
    assert len(task.train) == 12 and len(task.validation) == 6


def test_latex_table_sets_the_best_of_each_score_column_in_bold():
    from peftbench.report import render

    rows = [
        {"method": "a", "RTE acc": "70.00 ± 1.00 (n=3)", "WebNLG TER": "0.40", "peak MiB": "100"},
        {"method": "b", "RTE acc": "72.00 ± 2.00 (n=3) [paper 80.0, Δ -8.0]", "WebNLG TER": "0.35", "peak MiB": "50"},
        {"method": "c", "RTE acc": "72.00", "WebNLG TER": "", "peak MiB": "10"},
        {"method": "d", "RTE acc": "failed", "WebNLG TER": "0.50", "peak MiB": "5"},
    ]  # fmt: skip
    lines = {line.split("&")[0].strip(): [c.strip() for c in line.rstrip(" \\").split("&")[1:]]
             for line in render(rows, "latex").splitlines() if "&" in line}  # fmt: skip
    assert lines["b"] == ["\\textbf{72.00} $\\pm$ 2.00 (n=3) [paper 80.0, $\\Delta$ -8.0]", "\\textbf{0.35}", "50"]
    assert lines["c"] == ["\\textbf{72.00}", "", "10"]  # a tie: both bold
    assert lines["a"] == ["70.00 $\\pm$ 1.00 (n=3)", "0.40", "100"]  # TER: lower is better; MiB: not a score
    assert lines["d"] == ["failed", "0.50", "5"]
