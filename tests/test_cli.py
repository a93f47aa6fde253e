"""The CLI as a user meets it: sweeps that write one record per point and resume, tables, and one-line
errors (no traceback) for every bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import QUICK, require_data

from peftbench.cli import main


def run_cli(*args, env=None, cwd=None):
    e = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "peftbench.cli", *args],
        capture_output=True,
        text=True,
        env=e,
        cwd=cwd,
        timeout=600,
    )


@pytest.mark.parametrize(
    "args,expected",
    [
        (
            ["method=lorra"],
            "unknown method 'lorra' (did you mean 'lora' or 'dora' or 'adalora'?); choose from: adalora, "
            "adapter_houlsby, adapter_pfeiffer, bitfit, dora, ft_top2, full, ia3, icl, intrinsic, lora, loraplus, "
            "p_tuning, pissa, prefix_tuning, prompt_tuning, vera",
        ),
        (["model=roberta-bas"], "unknown model 'roberta-bas' (did you mean 'roberta-base'"),
        (["task=sst3"], "unknown task 'sst3' (did you mean 'sst2'"),
        (["method.r=0"], "method.r=0: must be a positive integer"),
        (["train.lr=-1e-3"], "train.lr=-0.001: must be a positive number"),
        (["train.batch_sise=8"], "bad override"),
        (
            ["method=ft_top2", "method.k=9", "model=tiny-bert"],
            "method.k=9 but bert.encoder.layer has only 2 blocks",
        ),
        (
            ["method=bitfit", "model=tiny-t5"],
            "method bitfit does not apply to this model: it has no bias terms",
        ),
        (["-m", "method.r=4,0"], "method.r=0: must be a positive integer"),
    ],
)
def test_bad_input_is_one_line_before_anything_loads(args, expected, capsys):
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and "\n" not in err and "Traceback" not in err


def test_missing_data_and_unreachable_hub_are_one_line(tmp_path):
    r = run_cli(
        "train",
        "task=rte",
        "model=tiny-bert",
        *QUICK,
        env={"PEFTBENCH_DATA_DIR": str(tmp_path / "none"), "PEFTBENCH_RESULTS_DIR": str(tmp_path)},
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert "PEFTBENCH_DATA_DIR=" in last and "does not exist" in last
    r = run_cli(
        "train", "model=roberta-base", "task=rte", *QUICK, env={"PEFTBENCH_RESULTS_DIR": str(tmp_path)}
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert (
        "cannot load 'FacebookAI/roberta-base' from the hub (HF_HUB_OFFLINE=1)" in last
        and "model.path=" in last
    )


def test_sweep_writes_four_records_table_shows_them_and_rerun_skips(tmp_path):
    require_data()
    env = {"PEFTBENCH_RESULTS_DIR": str(tmp_path / "results"), "PEFTBENCH_LOG_DIR": str(tmp_path / "logs")}
    args = ["train", "-m", "method=lora", "method.r=1,2,4,8", "task=rte", "model=tiny-bert", *QUICK]
    first = run_cli(*args, env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    records = sorted((tmp_path / "results" / "runs").glob("*.json"))
    assert len(records) == 4
    assert sorted(json.loads(p.read_text())["config"]["method"]["r"] for p in records) == [1, 2, 4, 8]
    assert all(json.loads(p.read_text())["status"] == "finished" for p in records)
    mtimes = [p.stat().st_mtime_ns for p in records]
    again = run_cli(*args, env=env)
    assert again.returncode == 0 and again.stdout.count("skip") == 4
    assert [p.stat().st_mtime_ns for p in records] == mtimes
    table = run_cli("table", "runs", "--results", str(tmp_path / "results"))
    assert table.returncode == 0
    lines = [line for line in table.stdout.splitlines() if "lora r=" in line]
    assert len(lines) == 4 and "rte acc" in table.stdout


def make_record(rid, method, task, seed, value, status="finished", r=8):
    return {
        "run_id": rid,
        "status": status,
        "method": method,
        "model": "m",
        "task": task,
        "seed": seed,
        "main_metric": "accuracy",
        "config": {
            "method": {"name": method, "r": r},
            "train": {"lr": 1e-3},
            "task": {"metrics": ["accuracy"]},
        },
        "best": {"metrics": {"accuracy": value}} if status == "finished" else None,
        "params": {"trainable_without_head": 294912},
    }


def test_table_mean_std_median_and_failed_cells(tmp_path, capsys):
    folder = tmp_path / "exp"
    folder.mkdir()
    recs = [make_record(f"a{s}", "lora", "rte", s, v) for s, v in [(1, 70.0), (2, 72.0), (3, 80.0)]]
    recs += [
        make_record("b1", "lora", "sst2", 1, 90.0),
        make_record("c1", "bitfit", "rte", 1, 0, status="failed"),
    ]
    for r in recs:
        (folder / f"{r['run_id']}.json").write_text(json.dumps(r))
    assert main(["table", "exp", "--results", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "74.00 ± 5.29 (n=3)" in out and "0.295M" in out and "failed" in out
    assert "82.00" in out  # Avg of the lora row: (74 + 90) / 2
    assert (
        main(
            [
                "table",
                "exp",
                "--results",
                str(tmp_path),
                "--stat",
                "median",
                "--format",
                "csv",
                "--out",
                str(tmp_path / "t.csv"),
            ]
        )
        == 0
    )
    import csv

    rows = list(csv.DictReader((tmp_path / "t.csv").read_text().splitlines()))
    (lora,) = [r for r in rows if r["method"] == "lora"]  # numeric columns: value, std, n, note
    col = next(k[: -len(" std")] for k in lora if k.endswith(" std") and lora[k])
    assert (lora[col], lora[f"{col} std"], lora[f"{col} n"]) == ("72.00", "5.29", "3")
    assert "failed" in {v for r in rows for v in r.values()}
    capsys.readouterr()
    assert main(["table", "exp", "--results", str(tmp_path), "--format", "latex"]) == 0
    out = capsys.readouterr().out
    assert "\\toprule" in out and "\\bottomrule" in out and "72.00 $\\pm$ 5.29" not in out
    assert "74.00 $\\pm$ 5.29 (n=3)" in out and "±" not in out


def test_list_names_every_group_with_descriptions(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for needle in ("method:", "lora", "model:", "minilm", "task:", "multirc", "train:", "experiment:"):
        assert needle in out
    assert "_classification" not in out


def test_list_pairs_gives_each_method_x_family_and_the_reason_when_it_does_not_apply(capsys):
    assert main(["list", "pairs"]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    from peftbench.paths import group_options
    from peftbench.validate import pair_families

    methods = len(group_options("method"))  # every method YAML, with no count to edit
    assert len(lines) == methods * len(pair_families()) * 2  # x families x (classification head, LM head)
    na = {tuple(line.split()[:3]): line for line in lines if "n/a:" in line}
    assert (
        "no bias terms" in na[("bitfit", "t5", "head")] and "no bias terms" in na[("bitfit", "t5", "prompt")]
    )
    assert "no bias terms" in na[("bitfit", "llama", "head")]
    assert "disentangled attention" in na[("prefix_tuning", "deberta", "head")]
    assert all("add task.format=prompt" in na[("icl", f, "head")] for f in ("bert", "gpt2", "t5", "bart"))
    # everything else applies (prompt tuning and prefix tuning on T5 / BART too); fused-slice refusals aside
    expected = {("bitfit", "t5"), ("bitfit", "llama"), ("prefix_tuning", "deberta")}
    others = [(m, f, x) for m, f, x in na if f != "albert"]  # ALBERT shares one layer: its n/a are its own
    assert all((m, f) in expected or (m, x) == ("icl", "head") for m, f, x in others), sorted(others)
    assert "applies" in next(line for line in lines if line.split()[:3] == ["prefix_tuning", "t5", "prompt"])


def test_unknown_verb(capsys):
    assert main(["trian"]) == 2
    assert "did you mean 'train'" in capsys.readouterr().err


def test_results_dir_not_writable(tmp_path, capsys, monkeypatch):
    require_data()
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if os.access(ro, os.W_OK):  # root ignores permission bits: use a path under a regular file instead
        ro = Path(tmp_path / "file")
        ro.write_text("")
        ro = ro / "sub"
    monkeypatch.setenv("PEFTBENCH_RESULTS_DIR", str(ro))
    assert main(["train", "model=tiny-bert", "task=rte", *QUICK]) == 2
    err = capsys.readouterr().err
    assert "is not writable" in err and "paths.results" in err


def test_sweep_check_expands_a_glob_over_the_groups_options():
    from peftbench.config import sweep_points

    points = list(sweep_points(["-m", "task=glob(raft_*,exclude=raft_t*)", "seed=1"]))
    tasks = [p[-1] for p in points]
    assert len(tasks) == 7 and tasks[0] == "task=raft_ade_corpus_v2" and all(p[0] == "seed=1" for p in points)
    assert not any(t.startswith("task=raft_t") for t in tasks)


@pytest.mark.parametrize("verb", ["train", "list", "params", "table", "plot", "score", "raft-submit"])
def test_every_verb_prints_its_help(verb, capsys):
    from peftbench.cli import main

    try:  # argparse verbs exit 0 after the help; train and score print theirs and return 0
        rc = main([verb, "--help"])
    except SystemExit as e:
        rc = e.code
    assert rc == 0 and "usage: peftbench" in capsys.readouterr().out


def test_an_unreachable_hub_without_hf_hub_offline_is_one_line_at_once(tmp_path):
    """No HF_HUB_OFFLINE and a hub that refuses connections: one probe, then the local cache only (no
    retries): a note and the one error line, nothing else on stderr."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env.update(
        HF_ENDPOINT="http://127.0.0.1:9", PEFTBENCH_RESULTS_DIR=str(tmp_path), HF_HOME=str(tmp_path / "hf")
    )
    r = subprocess.run(
        [sys.executable, "-m", "peftbench.cli", "train", "model=roberta-base", "task=rte", *QUICK],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert r.returncode == 2 and "the hub is unreachable: loading from the local cache only" in r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot load 'FacebookAI/roberta-base'" in lines[0], r.stderr


@pytest.mark.parametrize(
    "flags,expected",
    [
        (["--cfg", "job"], "method:\n  _target_: peftbench.methods.lora.apply"),
        (["-c", "job", "model=tiny-bert"], "name: tiny-bert"),
        (["--info"], "Hydra 1.3.8"),
        (["-sc", "install=bash"], "hydra_bash_completion()"),
    ],
)
def test_hydras_own_flags_behave_as_in_a_plain_hydra_app(tmp_path, flags, expected):
    r = run_cli(
        "train", *flags, env={"PEFTBENCH_RESULTS_DIR": str(tmp_path), "PEFTBENCH_LOG_DIR": str(tmp_path)}
    )
    assert r.returncode == 0 and expected in r.stdout, r.stderr[-2000:]
    assert not list(tmp_path.rglob("*.json"))  # they print; nothing runs


@pytest.mark.parametrize("how", ["--config-dir", "hydra.searchpath"])
def test_a_users_own_model_yaml_through_hydras_search_path(tmp_path, how):
    require_data()
    mine = tmp_path / "conf" / "model"
    mine.mkdir(parents=True)
    tiny = (Path(__file__).resolve().parent.parent / "configs" / "model" / "tiny-bert.yaml").read_text()
    (mine / "mine.yaml").write_text(tiny.replace("name: tiny-bert", "name: mine"))
    where = (
        ["--config-dir", str(tmp_path / "conf")]
        if how == "--config-dir"
        else [f"hydra.searchpath=[file://{tmp_path / 'conf'}]"]
    )
    env = {"PEFTBENCH_RESULTS_DIR": str(tmp_path / "results"), "PEFTBENCH_LOG_DIR": str(tmp_path / "logs")}
    r = run_cli("train", *where, "model=mine", "task=rte", *QUICK, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    (record,) = (tmp_path / "results" / "runs").glob("rte__mine__lora__*.json")
    assert json.loads(record.read_text())["status"] == "finished"
    bad = run_cli("train", *where, "model=mine", "task=rte", "train.lr=abc", env=env)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].endswith(
        "train.lr='abc': must be a positive number"
    )


def test_train_help_lists_every_config_group_and_its_options(capsys):
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    for group in ("method", "model", "task", "train", "experiment"):
        assert f"\n  {group} " in out
    assert "lora_glue" in out and "adapter_houlsby" in out and "--cfg job" in out


def test_optuna_sweeps_the_runs_main_metric(tmp_path):
    """The task function returns the run's best main metric: Hydra's Optuna sweeper (2 trials over LoRA's lr and
    r on a tiny model) reports the best of the records as its best value. A range's two ends are checked
    before any trial (a negative lr end is one line)."""
    require_data()
    env = {"PEFTBENCH_RESULTS_DIR": str(tmp_path / "results"), "PEFTBENCH_LOG_DIR": str(tmp_path / "logs")}
    sweep = ["-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=2", "hydra.sweeper.direction=maximize"]
    sweep += ["hydra.sweeper.sampler.seed=0", "method.r=choice(2,8)", "model=tiny-bert", "task=rte"]
    r = run_cli("train", *sweep, "train.lr=interval(1e-4,1e-2)", *QUICK, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    import yaml

    (result,) = (tmp_path / "logs").rglob("optimization_results.yaml")
    best = yaml.safe_load(result.read_text())["best_value"]
    records = [json.loads(p.read_text()) for p in (tmp_path / "results" / "runs").glob("*.json")]
    assert len(records) == 2 and best == max(rec["best"]["metrics"]["accuracy"] for rec in records)
    bad = run_cli("train", *sweep, "train.lr=interval(-1,1e-2)", *QUICK, env=env)
    assert bad.returncode == 2 and "train.lr=-1.0: must be a positive number" in bad.stderr


def test_a_wheel_carries_the_configs_and_runs_outside_the_checkout(tmp_path):
    """`pip install .` / a wheel (not -e) gives a working peftbench: the config tree is package data. The wheel
    is built from this checkout and installed (without its dependencies, which this environment has) into a
    folder that comes first on the path; the commands run from a folder outside the checkout."""
    require_data()
    import shutil

    repo, src = Path(__file__).resolve().parent.parent, tmp_path / "src"  # built from a copy: no build/ here
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(repo / name, src / name)
    for name in ("configs", "peftbench"):  # peftbench/configs stays a link to ../configs
        shutil.copytree(repo / name, src / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path / "w"),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = (tmp_path / "w").glob("peftbench-*.whl")
    site = tmp_path / "site"
    inst = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert inst.returncode == 0, inst.stderr[-2000:]
    env = {
        "PYTHONPATH": str(site),
        "PEFTBENCH_RESULTS_DIR": str(tmp_path / "r"),
        "PEFTBENCH_LOG_DIR": str(tmp_path / "l"),
        "PEFTBENCH_CONFIG_DIR": "",  # unset: the installed package's own configs
    }

    def run(*args):
        return run_cli(*args, env=env, cwd=tmp_path)

    where = subprocess.run(
        [sys.executable, "-c", "import peftbench.paths as p; print(p.__file__, p.config_dir())"],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        cwd=tmp_path,
    )
    assert where.stdout.split() == [
        str(site / "peftbench" / "paths.py"),
        str(site / "peftbench" / "configs"),
    ], where
    listed = run("list", "experiment")
    assert listed.returncode == 0 and "lora_glue" in listed.stdout, listed.stderr[-2000:]
    trained = run(
        "train",
        "model=tiny-bert",
        "task=rte",
        "train.max_steps=2",
        "train.max_eval_samples=8",
        "train.progress=false",
    )
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert len(list((tmp_path / "r" / "runs").glob("*.json"))) == 1
