"""Experiment presets: every grid point composes and validates; tables come out in the paper's layout;
warm starts point at the right run; plots draw."""

import json

import pytest
from conftest import QUICK, require_data
from omegaconf import ListConfig, OmegaConf

from peftbench import experiment
from peftbench.cli import main
from peftbench.config import compose as cli_compose
from peftbench.experiment import warm_started
from peftbench.metrics import produced
from peftbench.paths import group_options
from peftbench.report import presets
from peftbench.validate import validate

PRESETS = group_options("experiment")


@pytest.mark.parametrize("name", PRESETS)
def test_every_point_of_every_preset_composes_and_its_columns_exist(name, compose):
    preset = experiment.load_preset(name)
    points = experiment.expand(preset)
    assert points, name
    seeds = {(p.row, p.task): set() for p in points}
    for p in points:
        seeds[(p.row, p.task)].add(p.seed)
        assert p.overrides.count(f"seed={p.seed}") == 1
    validated = set()
    for p in points:  # points of one (row, task) differ only in seed=: compose one of each
        if p.seed != min(seeds[(p.row, p.task)]):
            continue
        cfg = compose(*p.overrides)
        assert cfg.name == name and cfg.row == p.row and cfg.task.name == p.task and cfg.seed == p.seed
        shown = preset.columns[p.task]
        assert set(shown if isinstance(shown, ListConfig) else [shown]) <= produced(cfg.task), p.task
        if (p.model, p.method) not in validated:  # the method x model check (meta device) once per pair
            validate(cfg, here=False)  # a preset for any machine (fp16 GPU presets on this CPU)
            validated.add((p.model, p.method))


def test_offline_minilm_grid_size_and_only_slices():
    preset = experiment.load_preset("offline_minilm")
    # 10 methods x (RTE, SST-2) x 3 seeds, FT / BitFit / LoRA also x (MRPC, CB), the LoRA rank sweep (3 more
    # ranks, SST-2 only)
    assert len(experiment.expand(preset)) == 10 * 2 * 3 + 3 * 2 * 3 + 3 * 1 * 3
    some = experiment.expand(preset, only="task=rte|sst2,row=BitFit")
    assert {(p.task, p.row) for p in some} == {("rte", "BitFit"), ("sst2", "BitFit")} and len(some) == 6
    with pytest.raises(Exception, match="keys: row, task, seed, model, method"):
        experiment.expand(preset, only="lr=1")


def fake(row, task, seed, value, metric="accuracy", status="finished", params=294912):
    return {
        "run_id": f"{row}-{task}-{seed}",
        "row": row,
        "task": task,
        "seed": seed,
        "status": status,
        "best": {"metrics": {metric: value}} if status == "finished" else None,
        "params": {"trainable_without_head": params},
    }


def test_lora_glue_table_has_the_papers_layout():
    preset = experiment.load_preset("lora_glue")
    records = [
        fake("LoRA", t, s, 80.0 + s, {"cola": "mcc", "stsb": "pearson"}.get(t, "accuracy"))
        for t in preset.tasks
        for s in range(5)
    ]
    records.append(fake("FT*", "rte", 0, 70.0, status="failed"))
    rows = presets.table(preset, records)
    assert [r["method"] for r in rows] == [
        "FT*",
        "BitFit*",
        "AdptD* (0.3M)",
        "AdptD* (0.9M)",
        "LoRA",
        "FT* (large)",
        "LoRA (large)",
        "AdptP† (3M)",
        "AdptP† (0.8M)",
        "AdptH† (6M)",
        "AdptH† (0.8M)",
        "LoRA† (large)",
        "FT* (XXL)",
        "LoRA (XXL)",
    ]
    assert list(rows[0]) == [
        "model",
        "method",
        "# trainable params",
        "MNLI acc",
        "SST-2 acc",
        "MRPC acc",
        "CoLA MCC",
        "QNLI acc",
        "QQP acc",
        "RTE acc",
        "STS-B P",
        "Avg",
    ]
    lora = rows[4]
    assert lora["# trainable params"] == "0.295M (0.3M)"
    assert lora["MNLI acc"] == "82.0 ± 1.6 (n=5) [paper 87.5, Δ -5.5]"  # median of 80..84
    assert lora["Avg"] == "82.0 [paper 87.2]"
    assert rows[0]["RTE acc"] == "failed [paper 78.7]" and rows[0]["MNLI acc"] == "missing [paper 87.6]"
    assert rows[2]["MNLI acc"].startswith("n/a: AdapterDrop is not implemented")
    assert rows[0]["Avg"] == "missing [paper 86.4]"


def test_lora_glue_warm_starts_mrpc_rte_stsb_from_the_same_seeds_mnli_adapter():
    preset = experiment.load_preset("lora_glue")
    points = experiment.expand(preset, only="row=LoRA,seed=3,task=rte|sst2")
    cfgs = warm_started(preset, points, [cli_compose(list(p.overrides)) for p in points], [])
    by_task = {p.task: c for p, c in zip(points, cfgs)}
    mnli = cli_compose(list(experiment.expand(preset, only="row=LoRA,seed=3,task=mnli")[0].overrides))
    from peftbench.record import run_id

    assert by_task["rte"].method.init_from.endswith(f"lora_glue/{run_id(mnli)}/adapter")
    assert by_task["sst2"].method.init_from is None


def test_lora_init_from_starts_from_the_other_runs_weights(compose):
    require_data()
    import torch
    from safetensors.torch import load_file

    from peftbench.run import execute
    from peftbench.setup import prepare

    first = execute(compose("task=rte", "model=tiny-bert", "method=lora", "train.lr=0.01", *QUICK[:-1]))
    folder = first["adapter"]["path"]
    cfg = compose("task=cb", "model=tiny-bert", "method=lora", f"method.init_from={folder}", *QUICK)
    model = prepare(cfg, {}).model
    saved = load_file(f"{folder}/adapter_model.safetensors")
    b = next(k for k in saved if "lora_B" in k)
    assert saved[b].abs().sum() > 0
    live = dict(model.named_parameters())
    name = next(n for n in live if n.replace(".default", "") == b)
    assert torch.equal(live[name].detach(), saved[b])


def test_experiment_table_check_and_plot(tmp_path, capsys):
    folder = tmp_path / "offline_minilm"
    folder.mkdir()
    for r in (1, 4, 8, 16):
        label = f"LoRA r={r}"
        for seed in (1, 2, 3):
            rec = {**fake(label, "sst2", seed, 80 + r / 4 + seed), "method": "lora", "model": "minilm"}
            rec["config"] = {"method": {"r": r}}
            (folder / f"{r}-{seed}.json").write_text(json.dumps(rec))
    assert (
        main(
            [
                "table",
                "offline_minilm",
                "--results",
                str(tmp_path),
                "--out",
                str(tmp_path / "offline_minilm.md"),
            ]
        )
        == 0
    )
    assert main(["table", "--check", "--results", str(tmp_path)]) == 0
    (folder / "16-3.json").write_text(
        json.dumps(
            {
                **fake("LoRA r=16", "sst2", 3, 10.0),
                "method": "lora",
                "model": "minilm",
                "config": {"method": {"r": 16}},
            }
        )
    )
    capsys.readouterr()
    assert main(["table", "--check", "--results", str(tmp_path)]) == 2
    assert "offline_minilm.md differ from their records" in capsys.readouterr().err
    assert main(["plot", "offline_minilm", "--results", str(tmp_path)]) == 0
    png = folder / "lora_rank_sst2.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    series = presets.plot_series(
        experiment.load_preset("offline_minilm"),
        OmegaConf.create(experiment.load_preset("offline_minilm").plots[0]),
        [json.loads(p.read_text()) for p in folder.glob("*.json")],
        "mean",
    )
    assert [x for x, *_ in series["lora"]] == [1, 4, 8, 16]


def test_multi_metric_columns_and_superglue_average():
    """A task column can list metrics (CB acc + F1, MultiRC EM + F1a); Avg is the mean over tasks of each
    task's mean metric: P-tuning's BERT-base CLS-FT row gives its printed Avg 66.2 from its own cells."""
    preset = OmegaConf.create(
        {
            "protocol": {"stat": "mean"},
            "tasks": ["boolq", "cb", "wic", "rte", "multirc", "wsc", "copa"],
            "columns": {
                "boolq": "accuracy",
                "cb": ["accuracy", "macro_f1"],
                "wic": "accuracy",
                "rte": "accuracy",
                "multirc": ["em", "f1a"],
                "wsc": "accuracy",
                "copa": "accuracy",
            },
            "avg": True,
            "rows": [{"label": "CLS-FT", "model": "bert-base", "method": "full", "paper": {"avg": 66.2}}],
        }
    )
    cells = {
        ("boolq", "accuracy"): 72.9,
        ("cb", "accuracy"): 85.1,
        ("cb", "macro_f1"): 73.9,
        ("wic", "accuracy"): 71.1,
        ("rte", "accuracy"): 68.4,
        ("multirc", "em"): 16.2,
        ("multirc", "f1a"): 66.3,
        ("wsc", "accuracy"): 63.5,
        ("copa", "accuracy"): 67.0,
    }
    records = []
    for task in preset.tasks:
        metrics = {m: v for (t, m), v in cells.items() if t == task}
        rec = fake("CLS-FT", task, 0, 0.0)
        rec["best"]["metrics"] = metrics
        records.append(rec)
    (row,) = presets.table(preset, records)
    assert (
        row["cb acc"] == "85.1 (n=1)" and row["cb mF1"] == "73.9 (n=1)" and row["multirc em"] == "16.2 (n=1)"
    )
    assert row["Avg"] == "66.2 [paper 66.2]"


def test_prefix_table_layout_and_efficiency_columns():
    preset = experiment.load_preset("prefix_tuning_table1")
    rec = fake("PREFIX(0.1%)", "e2e", 0, 0.0)
    rec["best"]["metrics"] = {"bleu": 69.0, "nist": 8.5, "meteor": 46.0, "rouge_l": 71.0, "cider": 2.4}
    rec.update(
        params={"trainable_without_head": 491520, "trainable_percent": 0.138},
        memory={"peak_mib": 2048.4},
        train={"train_s": 120.2, "tokens_per_s": 3500.0},
        cost={"disk_bytes": 1966080},
    )
    rows = presets.table(preset, [rec], with_efficiency=True)
    prefix = next(r for r in rows if r["method"] == "PREFIX(0.1%)")
    assert prefix["E2E BLEU"] == "69.0 (n=1) [paper 69.7, Δ -0.7]"
    assert prefix["E2E NIST"] == "8.50 (n=1) [paper 8.81, Δ -0.31]"
    assert prefix["WebNLG BLEU-S"] == "missing [paper 62.9]" and prefix["DART TER"] == "missing [paper 0.46]"
    assert list(prefix)[-5:] == ["% trainable", "peak MiB", "train s", "tokens/s", "stored / task"]
    assert (prefix["% trainable"], prefix["peak MiB"], prefix["stored / task"]) == ("0.138", "2048", "2.0 MB")
    sota = next(r for r in rows if r["method"] == "SOTA")
    assert sota["WebNLG TER"] == "n/a: prior work" and sota["E2E CIDEr"] == "n/a: prior work [paper 2.37]"


def test_a_record_outside_the_presets_grid_is_left_out_with_a_warning(tmp_path, capsys):
    """A seed run by hand under a row's label (here seed 999) is not a run of the preset: its table is the
    committed one, and stderr names the stray record."""
    import shutil
    from pathlib import Path

    from peftbench.report.make import make_table

    repo = Path(__file__).resolve().parent.parent / "results"
    shutil.copytree(repo / "offline_minilm", tmp_path / "offline_minilm")
    first = sorted((tmp_path / "offline_minilm").glob("*.json"))[0]
    stray = json.loads(first.read_text())
    stray.update(seed=999, run_id=stray["run_id"].replace(f"__s{stray['seed']}__", "__s999__"))
    stray["best"]["metrics"] = {k: 0.0 for k in stray["best"]["metrics"]}
    (tmp_path / "offline_minilm" / f"{stray['run_id']}.json").write_text(json.dumps(stray))
    assert make_table(tmp_path, "offline_minilm") + "\n" == (repo / "offline_minilm.md").read_text()
    err = capsys.readouterr().err
    assert f"{stray['run_id']} (row" in err and "seed 999) is not a run of preset offline_minilm" in err


def test_a_seed_run_twice_counts_once_in_its_table(tmp_path, capsys):
    """The same point run again under another run id (another thread count, say) is one seed, not two: the
    table takes the later finished record and stderr names both."""
    import shutil
    from pathlib import Path

    from peftbench.report.make import in_preset, make_table

    repo = Path(__file__).resolve().parent.parent / "results"
    shutil.copytree(repo / "offline_minilm", tmp_path / "offline_minilm")
    first = sorted((tmp_path / "offline_minilm").glob("*.json"))[0]
    again = json.loads(first.read_text())
    metric = next(iter(again["best"]["metrics"]))
    again.update(run_id=again["run_id"][:-10] + "0123456789", finished_at="2999-01-01T00:00:00")
    again["best"]["metrics"] = {k: 1.5 for k in again["best"]["metrics"]}
    (tmp_path / "offline_minilm" / f"{again['run_id']}.json").write_text(json.dumps(again))
    preset = experiment.load_preset("offline_minilm")
    from peftbench.record import load_records

    kept = in_preset(preset, load_records(tmp_path / "offline_minilm"))
    same = [
        r for r in kept if (r["row"], r["task"], r["seed"]) == (again["row"], again["task"], again["seed"])
    ]
    assert [r["run_id"] for r in same] == [again["run_id"]] and same[0]["best"]["metrics"][metric] == 1.5
    assert len(kept) == len(list((repo / "offline_minilm").glob("*.json")))
    assert make_table(tmp_path, "offline_minilm") + "\n" != (repo / "offline_minilm.md").read_text()
    err = capsys.readouterr().err
    assert f"the table takes {again['run_id']}, the later finished" in err


def test_a_stand_in_models_table_shows_the_papers_numbers_under_their_model_without_a_difference():
    """offline_e2e_smollm2 runs SmolLM2-135M where the paper ran GPT-2 Medium: the paper's number is shown
    under that model's name, with no Δ (not the same experiment); its plot's x is a record field."""
    preset = experiment.load_preset("offline_e2e_smollm2")
    recs = []
    for seed, bleu in ((0, 64.0), (1, 66.0)):
        rec = fake("PREFIX (n=10)", "e2e", seed, 0.0)
        rec["best"]["metrics"] = {"bleu": bleu, "nist": 8.0, "meteor": 40.0, "rouge_l": 65.0, "cider": 2.0}
        rec["params"] = {"trainable_without_head": 115200}
        recs.append(rec)
    rows = presets.table(preset, recs)
    prefix = next(r for r in rows if r["method"] == "PREFIX (n=10)")
    assert prefix["E2E BLEU"] == "65.0 ± 1.4 (n=2) [paper, GPT-2 Medium: 69.7]"
    assert prefix["WebNLG BLEU-S"] == "missing [paper, GPT-2 Medium: 62.9]"
    lora = next(r for r in rows if r["method"] == "LoRA (r=8)")
    assert lora["E2E BLEU"] == "missing"  # no GPT-2 Medium LoRA number in Li & Liang's table
    from peftbench.report import numeric_rows

    (csv_row,) = [r for r in numeric_rows(rows) if r["method"] == "PREFIX (n=10)"]
    assert (csv_row["E2E BLEU"], csv_row["E2E BLEU paper"], csv_row["E2E BLEU delta"]) == ("65.0", "69.7", "")
    (spec,) = preset.plots
    for rec in recs:
        rec["status"], rec["config"] = "finished", {}
    assert presets.plot_series(preset, spec, recs, "mean") == {"PREFIX (n=10)": [(115200, 65.0, 2.0**0.5, 2)]}


def test_a_plot_by_row_keeps_rows_of_one_method_apart():
    """`series: row`: two LoRA rows at the same parameter count (another lr, another decode) are two points,
    not one mean with a spread that mixes settings; the default pools them by method."""
    from omegaconf import OmegaConf

    from peftbench.report.plot import short

    preset = experiment.load_preset("offline_e2e_smollm2")
    recs = []
    for row, bleu in (("LoRA (r=8) lr 2e-3", 63.0), ("LoRA (r=8) lr 2e-3 beam 10", 63.5)):
        rec = fake(row, "e2e", 0, 0.0)
        rec["best"]["metrics"] = {"bleu": bleu}
        rec["params"] = {"trainable_without_head": 460800}
        rec["status"], rec["config"] = "finished", {}
        recs.append(rec)
    spec = OmegaConf.create({"rows": [r["row"] for r in recs], "task": "e2e", "metric": "bleu",
                             "x": "record.params.trainable_without_head"})
    pooled = presets.plot_series(preset, spec, recs, "mean")
    assert list(pooled) == ["lora"] and pooled["lora"][0][:2] == (460800, 63.25) and pooled["lora"][0][3] == 2
    spec.series = "row"
    assert presets.plot_series(preset, spec, recs, "mean") == {
        "LoRA (r=8) lr 2e-3": [(460800, 63.0, 0.0, 1)],
        "LoRA (r=8) lr 2e-3 beam 10": [(460800, 63.5, 0.0, 1)],
    }
    assert [short(x) for x in (64, 460800, 2442240, 134515008, 3.2e9)] == ["64", "461k", "2.44M", "135M", "3.2B"]
