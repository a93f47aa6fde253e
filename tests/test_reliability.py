"""Reliability: a killed run resumes to exactly the record of an uninterrupted one; checkpoints and records are
atomic; one process per run id (locks, stale-lock take-over); every bad input is one line, no traceback."""

import errno
import json
import math
import os
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from conftest import QUICK, require_data
from safetensors.torch import load_file

from peftbench import checkpoint
from peftbench.cli import main
from peftbench.errors import UserError
from peftbench.record import run_id
from peftbench.run import execute

# 64 RTE pairs, batch 8: 8 steps per epoch, 2 epochs, a checkpoint every 2 steps. One torch thread: on a
# shared 2-core machine it is several times faster than two, and it fixes the reduction order.
SMALL = [
    "model=tiny-bert",
    "task=rte",
    "task.max_length=64",
    "train.max_train_samples=64",
    "train.batch_size=8",
    "train.max_eval_samples=16",
    "train.epochs=2",
    "train.checkpoint_every=2",
    "train.lr=1e-2",
    "train.progress=false",
    "train.num_threads=1",
]


@pytest.fixture(autouse=True)
def _restore_threads(tmp_path, monkeypatch):
    """train.num_threads sets torch's threads for the whole process; give other tests theirs back."""
    monkeypatch.setenv("PEFTBENCH_LOG_DIR", str(tmp_path / "logs"))  # Hydra's logs out of the repo
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def run_cli(*args, env=None, **kw):
    return subprocess.run(
        [sys.executable, "-m", "peftbench.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=300,
        **kw,
    )


def comparable(rec: dict) -> dict:
    """What must not change across an interruption: everything computed; not timings, paths, counters of
    this process."""
    train = {k: rec["train"][k] for k in ("steps", "epochs", "samples", "tokens", "loss_first", "loss_last")}

    def no_path(ev):
        return {k: v for k, v in ev.items() if k != "predictions"} if ev else ev

    return {
        "status": rec["status"],
        "evals": [no_path(e) for e in rec["evals"]],
        "best": no_path(rec["best"]),
        "final": no_path(rec.get("final")),
        "loss_curve": rec["train"]["loss_curve"],
        "train": train,
        "params": rec["params"],
    }


def adapter_tensors(rec: dict) -> dict:
    folder = Path(rec["adapter"]["path"])
    return {f.name: load_file(str(f)) for f in sorted(folder.glob("*.safetensors"))}


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
        for x, y in zip(a.values(), b.values())
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run (in-process: no start-up cost), shared by the fault tests."""
    require_data()
    from peftbench.config import compose

    threads = torch.get_num_threads()
    results = tmp_path_factory.mktemp("reference")
    rec = execute(compose([*SMALL, f"paths.results={results}"]))
    torch.set_num_threads(threads)
    return rec


# --- fault tests: SIGKILL, rerun, same record -------------------------------------------------------------


@pytest.mark.parametrize(
    "kill_at,resume_step",
    [
        ("step:11", 10),  # mid-epoch 2, after epoch 1's evaluation: replays 2 batches of epoch 2
        ("checkpoint:6", 4),  # inside the write of step 6's checkpoint: step 4's must survive
    ],
)
def test_killed_run_resumes_to_the_uninterrupted_record(tmp_path, reference, kill_at, resume_step):
    env = {"PEFTBENCH_RESULTS_DIR": str(tmp_path / "results"), "PEFTBENCH_LOG_DIR": str(tmp_path / "logs")}
    killed = run_cli("train", *SMALL, env={**env, "PEFTBENCH_TEST_KILL_AT": kill_at})
    assert killed.returncode == -9, killed.stderr[-2000:]
    folder = tmp_path / "results" / "runs"
    rid = reference["run_id"]
    assert json.loads((folder / f"{rid}.json").read_text())["status"] == "running"
    saved = json.loads((folder / rid / "checkpoint" / "progress.json").read_text())
    assert saved["progress"]["step"] == resume_step
    if kill_at.startswith("checkpoint"):  # the half-written one is a temp folder, never `checkpoint/`
        (tmp,) = (folder / rid).glob(".checkpoint.tmp-*")
        assert (tmp / "trainable.safetensors").exists() and not (tmp / "progress.json").exists()

    rerun = run_cli("train", *SMALL, env=env)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"resume from step {resume_step}" in rerun.stdout and "took over stale lock" in rerun.stdout
    rec = json.loads((folder / f"{rid}.json").read_text())
    assert comparable(rec) == comparable(reference)
    assert same_tensors(adapter_tensors(rec), adapter_tensors(reference))  # the best state survived
    assert rec["checkpoint"]["resumed_from_step"] == resume_step
    assert not (folder / rid / "checkpoint").exists() and not list((folder / rid).glob(".checkpoint*"))
    assert not (folder / f"{rid}.lock").exists()


def interrupt_at(monkeypatch, step: int) -> None:
    """In-process stand-in for SIGKILL: Ctrl-C at a step (the record then says `interrupted`)."""

    def hook(where, at):
        if where == "step" and at == step:
            raise KeyboardInterrupt

    monkeypatch.setattr("peftbench.loop.kill_point", hook)


@pytest.mark.parametrize(
    "extra,stop",
    [
        (["train.group_by_length=false", "train.checkpoint_every=3"], 5),  # shuffled DataLoader, mid-epoch
        (["train.grad_accum=2", "train.checkpoint_every=epoch", "train.epochs=3"], 6),  # epoch boundary
    ],
)
def test_interrupted_run_resumes_in_process(compose, monkeypatch, extra, stop):
    require_data()
    args = [*SMALL, *extra]
    ref = execute(compose(*args, "name=ref"))
    interrupt_at(monkeypatch, stop)
    cfg = compose(*args)
    with pytest.raises(KeyboardInterrupt):
        execute(cfg)
    path = Path(cfg.paths.results) / "runs" / f"{run_id(cfg)}.json"
    assert json.loads(path.read_text())["status"] == "interrupted"
    monkeypatch.setattr("peftbench.loop.kill_point", lambda where, at: None)
    rec = execute(cfg)
    assert rec["checkpoint"]["resumed_from_step"] > 0
    assert comparable(rec) == comparable(ref)
    assert same_tensors(adapter_tensors(rec), adapter_tensors(ref))


def test_force_ignores_old_checkpoint(compose, monkeypatch, capsys):
    require_data()
    interrupt_at(monkeypatch, 5)
    cfg = compose(*SMALL)
    with pytest.raises(KeyboardInterrupt):
        execute(cfg)
    monkeypatch.setattr("peftbench.loop.kill_point", lambda where, at: None)
    rec = execute(compose(*SMALL, "train.force=true"))
    assert "resume" not in capsys.readouterr().out and "resumed_from_step" not in rec["checkpoint"]


def test_checkpoint_swap_falls_back_to_the_previous_one(tmp_path, monkeypatch):
    """A crash between the two renames leaves only `checkpoint.old/`: load finds it."""
    folder = tmp_path / "checkpoint"
    p = checkpoint.Progress(step=2)
    state = {"data": torch.Generator().get_state()}
    checkpoint.save(folder, p, {"w": torch.ones(2)}, None, state, {"run_id": "r"})
    calls = []
    real = os.replace

    def crash_on_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(errno.EIO, "simulated crash")
        real(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", crash_on_second)
    with pytest.raises(OSError):
        checkpoint.save(
            folder, checkpoint.Progress(step=4), {"w": torch.zeros(2)}, None, state, {"run_id": "r"}
        )
    monkeypatch.setattr(checkpoint.os, "replace", real)
    assert not folder.exists() and (tmp_path / "checkpoint.old").is_dir()
    resume = checkpoint.load(folder, {"run_id": "r"})
    assert resume.progress.step == 2 and torch.equal(resume.trainable["w"], torch.ones(2))
    with pytest.raises(UserError, match="run_id='r' but this run has 'other'"):
        checkpoint.load(folder, {"run_id": "other"})


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(compose, monkeypatch, capsys):
    require_data()
    import peftbench.checkpoint as ck

    real = ck.save_file
    calls = []

    def full_on_third(tensors, path):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(tensors, path)

    monkeypatch.setattr(ck, "save_file", full_on_third)
    cfg = compose(*SMALL)
    assert main(["train", *SMALL, f"paths.results={cfg.paths.results}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "disk full while writing the checkpoint of step" in err and "free space" in err
    assert "\n" not in err and "Traceback" not in err
    rid = run_id(cfg)
    folder = Path(cfg.paths.results) / "runs"
    saved = json.loads((folder / rid / "checkpoint" / "progress.json").read_text())["progress"]
    assert saved["step"] == 4  # the last complete one: the write of step 6 failed
    assert not list((folder / rid).glob(".checkpoint.tmp-*"))
    rec = json.loads((folder / f"{rid}.json").read_text())
    assert rec["status"] == "failed" and "disk full" in rec["error"]


# --- determinism ------------------------------------------------------------------------------------------


def test_two_identical_cpu_runs_are_bit_identical(compose):
    require_data()
    a = execute(compose(*SMALL, "train.force=true"))
    b = execute(compose(*SMALL, "train.force=true"))
    assert comparable(a) == comparable(b) and same_tensors(adapter_tensors(a), adapter_tensors(b))
    d = a["determinism"]
    assert d["bit_identical"] is True and "CUBLAS_WORKSPACE_CONFIG=:4096:8" in d["gpu"]


# --- locks ------------------------------------------------------------------------------------------------


def test_two_concurrent_trains_write_one_record(tmp_path):
    require_data()
    env = {"PEFTBENCH_RESULTS_DIR": str(tmp_path / "results"), "PEFTBENCH_LOG_DIR": str(tmp_path / "logs")}
    args = [sys.executable, "-m", "peftbench.cli", "train", *SMALL]
    procs = [
        subprocess.Popen(
            args, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for _, e in outs]
    trained = [o for o, _ in outs if "best accuracy=" in o]
    skipped = [o for o, _ in outs if "skip" in o]
    assert len(trained) == 1 and len(skipped) == 1, outs
    # Usually the lock decides ("running in pid ..."); if one finished before the other started, the record.
    assert "running in pid" in skipped[0] or "finished record" in skipped[0]
    folder = tmp_path / "results" / "runs"
    assert len(list(folder.glob("*.json"))) == 1 and not list(folder.glob("*.lock"))


def write_lock(path: Path, pid: int, host: str | None = None, age_s: float = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    info = {"pid": pid, "host": host or socket.gethostname(), "started": "then", "token": "x"}
    path.write_text(json.dumps(info))
    if age_s:
        os.utime(path, (time.time() - age_s, time.time() - age_s))


def lock_path(cfg) -> Path:
    return Path(cfg.paths.results) / "runs" / f"{run_id(cfg)}.lock"


def test_held_lock_skips_or_waits(compose, capsys):
    require_data()
    cfg = compose(*QUICK, "model=tiny-bert", "task=rte", "train.lock_wait_s=1")
    write_lock(lock_path(cfg), os.getpid())  # a live process: this one
    t0 = time.monotonic()
    rec = execute(cfg)
    assert time.monotonic() - t0 >= 1  # waited train.lock_wait_s, then gave up
    assert rec["status"] == "running" and f"running in pid {os.getpid()}" in capsys.readouterr().out
    assert not (lock_path(cfg).with_suffix(".json")).exists() and lock_path(cfg).exists()


@pytest.mark.parametrize(
    "host,age_s,why", [(None, 0, "is not running"), ("elsewhere", 7200, "no heartbeat for")]
)
def test_stale_lock_is_taken_over(compose, capsys, host, age_s, why):
    require_data()
    cfg = compose(*QUICK, "model=tiny-bert", "task=rte", "train.lock_stale_s=3600")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # reaped: its pid is free
    write_lock(lock_path(cfg), dead.pid if host is None else os.getpid(), host, age_s)
    rec = execute(cfg)
    assert rec["status"] == "finished" and why in capsys.readouterr().out
    assert not lock_path(cfg).exists()


def test_fresh_lock_on_another_host_is_respected(compose, capsys):
    require_data()
    cfg = compose(*QUICK, "model=tiny-bert", "task=rte")
    write_lock(lock_path(cfg), 1, "elsewhere")
    assert execute(cfg)["status"] == "running" and "on elsewhere" in capsys.readouterr().out


# --- bad input: one line naming the value, non-zero exit, no traceback -----------------------------------


def fake_data(root: Path, train: str | None, dev: bool = True) -> Path:
    """A data folder with RTE only: `train` as the train file's rows after the header."""
    rte = root / "glue" / "RTE"
    rte.mkdir(parents=True)
    header = "index\tsentence1\tsentence2\tlabel\n"
    good = "".join(f"{i}\tA cat sat.\tA cat is here.\tentailment\n" for i in range(8))
    if train is not None:
        (rte / "train.tsv").write_text(header + good + train)
    if dev:
        (rte / "dev.tsv").write_text(header + good)
    return root


def raw_data(root: Path, task: str, files: dict[str, bytes]) -> Path:
    """A data folder with one task's files, byte for byte (RTE: a good dev file unless given)."""
    folder = root / task
    folder.mkdir(parents=True)
    if task == "glue/RTE" and "dev.tsv" not in files:
        files = {**files, "dev.tsv": b"index\tsentence1\tsentence2\tlabel\n0\tA.\tB.\tentailment\n"}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return root


E2E_ROW = b'"name[Aromi], eatType[pub]",Aromi is a pub.\r\n'
E2E_FILES = {"devset.csv": b"mr,ref\r\n" + E2E_ROW * 4}


def not_writable(tmp_path: Path) -> Path:
    f = tmp_path / "a_file"
    f.write_text("")
    return f / "results"  # a folder under a regular file: not writable, even for root


def full_disk(monkeypatch) -> None:
    def save_file(tensors, path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("peftbench.checkpoint.save_file", save_file)


def full_disk_safetensors(monkeypatch) -> None:
    """What safetensors' own writer raises on a full disk (measured on a 64 KiB tmpfs), not an OSError."""
    from safetensors import SafetensorError

    def save_file(tensors, path):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("peftbench.checkpoint.save_file", save_file)


def full_disk_at_the_lock(monkeypatch) -> None:
    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("peftbench.lock.os.fsync", fsync)


def out_of_memory(monkeypatch) -> None:
    def loss(self, model, batch):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr("peftbench.formats.head.HeadFormat.loss", loss)


RTE = ["model=tiny-bert", "task=rte", *QUICK]
# (case id, train args, set-up: fn(tmp_path, monkeypatch) -> env to set, text the one line must hold)
BAD_INPUTS = [
    ("unknown method", ["method=lorra"], None, "unknown method 'lorra' (did you mean 'lora'"),
    ("unknown task", ["task=sst3"], None, "unknown task 'sst3' (did you mean 'sst2'"),
    ("unknown model", ["model=roberta-bas"], None, "'roberta-bas' (did you mean 'roberta-base'"),
    ("unknown key", ["train.batch_sise=8"], None, "batch_sise"),
    ("rank 0", ["method.r=0"], None, "method.r=0: must be a positive integer"),
    ("lr 0", ["train.lr=0"], None, "train.lr=0: must be a positive number"),
    ("lr not a number", ["train.lr=abc"], None, "train.lr='abc': must be a positive number"),
    ("fractional epochs", ["train.epochs=1.5"], None, "train.epochs=1.5: must be a positive integer"),
    ("seed not an int", ["seed=x"], None, "seed='x': must be an integer"),
    ("batch size 0", ["train.batch_size=0"], None, "train.batch_size=0"),
    (
        "warmup out of range",
        ["train.warmup_ratio=1.5"],
        None,
        "train.warmup_ratio=1.5: must be a number in [0, 1)",
    ),
    ("max_length too small", ["task.max_length=4"], None, "task.max_length=4: must be an integer >= 8"),
    ("dropout out of range", ["method.dropout=1.5"], None, "method.dropout=1.5"),
    ("checkpoint_every", ["train.checkpoint_every=sometimes"], None, "train.checkpoint_every='sometimes'"),
    ("lock_wait_s", ["train.lock_wait_s=-1"], None, "train.lock_wait_s=-1"),
    (
        "negative max_grad_norm",
        ["train.max_grad_norm=-1"],
        None,
        "train.max_grad_norm=-1: must be a positive",
    ),
    ("max_grad_norm 0", ["train.max_grad_norm=0"], None, "train.max_grad_norm=0: must be a positive"),
    (
        "unknown key, a close one",
        ["train.epoch=3"],
        None,
        "override 'train.epoch' (did you mean train.epochs?)",
    ),
    ("unknown key, none close", ["method.rank=4"], None, "'method.rank'; method has: _target_, alpha,"),
    ("mixed precision", ["train.mixed_precision=fp32"], None, "unknown train.mixed_precision 'fp32'"),
    ("device", ["train.device=tpu"], None, "unknown train.device 'tpu'"),
    (
        "optimizer",
        ["train.optimizer=sgd"],
        None,
        "unknown train.optimizer 'sgd'; choose from: adafactor, adamw",
    ),
    ("shot file seed", [*RTE, "task.shots_from=tfew", "seed=7"], None, "no published tfew split at"),
    ("unknown metric", ["task.metrics=[acc]"], None, "unknown metric 'acc'"),
    ("bitfit on t5", ["method=bitfit", "model=tiny-t5"], None, "method bitfit does not apply"),
    (
        "a sweep's bad combination",  # each value is fine alone; bitfit x t5 is not: refused before any run
        ["-m", "method=lora,bitfit", "model=tiny-bert,tiny-t5"],
        None,
        "sweep point method=bitfit model=tiny-t5 (of 4 points): method bitfit does not apply",
    ),
    (
        "LoRA rank above the width",
        ["model=tiny-bert", "method.r=33"],
        None,
        "method.r=33: above the smallest",
    ),
    (
        "AdaLoRA rank above the width",
        ["model=tiny-bert", "method=adalora", "method.init_r=40", "method.target_r=8"],
        None,
        "method.init_r=40: above the smallest adapted weight's dimension; use method.init_r<=32",
    ),
    (
        "soft prompt past the positions",
        ["model=tiny-roberta", "method=prompt_tuning", "task.max_length=500"],
        None,
        "task.max_length=500 + method.length=20 is more than model tiny-roberta's 512 positions",
    ),
    (
        "max_length past the positions",
        ["model=tiny-bert", "task.max_length=513"],
        None,
        "tiny-bert's 512 positions",
    ),
    (
        "batch not divisible by the processes",
        ["train.batch_size=6"],
        lambda tmp, mp: {"WORLD_SIZE": "4"},
        "train.batch_size=6 with 4 processes",
    ),
    (
        "seed out of range",
        ["seed=4294967296"],
        None,
        "seed=4294967296: must be an integer in [0, 4294967295]",
    ),
    ("adam betas", ["train.adam_betas=[0.9,1.0]"], None, "train.adam_betas=[0.9, 1.0]: must be a list of 2"),
    ("num_threads 0", ["train.num_threads=0"], None, "train.num_threads=0: must be a positive integer"),
    ("lr a string", ["train.lr='1e-3'"], None, "train.lr='1e-3': must be a positive number"),
    ("an unknown added key", ["+method.rank=4"], None, "unknown key method.rank; method has:"),
    (
        "TSV without a needed column",
        RTE,
        lambda tmp, mp: {
            "PEFTBENCH_DATA_DIR": str(
                raw_data(
                    tmp, "glue/RTE", {"train.tsv": b"index\tsent1\tsent2\tlabel\n0\tA.\tB.\tentailment\n"}
                )
            )
        },
        "RTE/train.tsv:1: header has no column 'sentence1' (found: index, sent1, sent2, label)",
    ),
    (
        "E2E CSV with other columns",
        ["model=tiny-gpt2", "task=e2e", *QUICK],
        lambda tmp, mp: {
            "PEFTBENCH_DATA_DIR": str(
                raw_data(tmp, "e2e", {"trainset.csv": b'meaning,ref\n"name[A]",A.\n', **E2E_FILES})
            )
        },
        "e2e/trainset.csv:1: expected the columns mr,ref (found: meaning,ref)",
    ),
    (
        "an unknown nested key",
        ["+train.loss.lmm=1"],
        None,
        "unknown key train.loss.lmm (did you mean train.loss.lm?)",
    ),
    ("ft_top2 k", ["method=ft_top2", "method.k=9", "model=tiny-bert"], None, "method.k=9 but"),
    ("n_shot too large", [*RTE, "task.n_shot=100000"], None, "task.n_shot=100000 but rte has only"),
    ("model.path missing", [*RTE, "model.path=/no/such/ckpt"], None, "model.path='/no/such/ckpt'"),
    (
        "hub unreachable",
        [*QUICK, "model=roberta-base", "task=rte"],
        None,
        "cannot load 'FacebookAI/roberta-base'",
    ),
    (
        "data dir missing",
        RTE,
        lambda tmp, mp: {"PEFTBENCH_DATA_DIR": str(tmp / "nowhere")},
        "nowhere does not exist",
    ),
    (
        "split file missing",
        RTE,
        lambda tmp, mp: {"PEFTBENCH_DATA_DIR": str(fake_data(tmp / "d", "", dev=False))},
        "RTE/dev.tsv",
    ),
    (
        "malformed row",
        RTE,
        lambda tmp, mp: {"PEFTBENCH_DATA_DIR": str(fake_data(tmp / "d", "8\tonly two fields\n"))},
        "RTE/train.tsv:10: malformed row",
    ),
    (
        "unknown label",
        RTE,
        lambda tmp, mp: {"PEFTBENCH_DATA_DIR": str(fake_data(tmp / "d", "8\tA.\tB.\tmaybe\n"))},
        "unknown label 'maybe'",
    ),
    (
        "train file header only",
        RTE,
        lambda tmp, mp: {
            "PEFTBENCH_DATA_DIR": str(
                raw_data(tmp, "glue/RTE", {"train.tsv": b"index\tsentence1\tsentence2\tlabel\n"})
            )
        },
        "task rte: the train split has no rows",
    ),
    (
        "train file empty",
        RTE,
        lambda tmp, mp: {"PEFTBENCH_DATA_DIR": str(raw_data(tmp, "glue/RTE", {"train.tsv": b""}))},
        "RTE/train.tsv: empty file",
    ),
    (
        "train file not UTF-8",
        RTE,
        lambda tmp, mp: {
            "PEFTBENCH_DATA_DIR": str(
                raw_data(
                    tmp,
                    "glue/RTE",
                    {"train.tsv": b"index\tsentence1\tsentence2\tlabel\n0\tA \xff.\tB.\tentailment\n"},
                )
            )
        },
        "RTE/train.tsv: not UTF-8 text (byte 0xff",
    ),
    (
        "E2E unclosed quote",
        ["task=e2e", "model=tiny-gpt2", *QUICK],
        lambda tmp, mp: {
            "PEFTBENCH_DATA_DIR": str(
                raw_data(
                    tmp,
                    "e2e",
                    {**E2E_FILES, "trainset.csv": b"mr,ref\r\n" + E2E_ROW + b'"name[X],x\r\n' + E2E_ROW * 3},
                )
            )
        },
        "e2e/trainset.csv:4: malformed row (an unclosed quote",
    ),
    (
        "results not writable",
        RTE,
        lambda tmp, mp: {"PEFTBENCH_RESULTS_DIR": str(not_writable(tmp))},
        "a_file/results/runs' is not writable",
    ),
    (
        "disk full",
        [*SMALL, "train.max_steps=3"],
        lambda tmp, mp: full_disk(mp),
        "disk full while writing the checkpoint of step 2",
    ),
    (
        "disk full, safetensors' error",
        [*SMALL, "train.max_steps=3"],
        lambda tmp, mp: full_disk_safetensors(mp),
        "disk full while writing the checkpoint of step 2",
    ),
    (
        "disk full at the lock",
        RTE,
        lambda tmp, mp: full_disk_at_the_lock(mp),
        "disk full while writing the lock",
    ),
    ("out of memory", RTE, lambda tmp, mp: out_of_memory(mp), "out of memory at train.batch_size=8"),
]


@pytest.mark.parametrize("args,setup,expected", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_one_line(tmp_path, monkeypatch, capsys, args, setup, expected):
    monkeypatch.setenv("PEFTBENCH_RESULTS_DIR", str(tmp_path / "results"))
    for key, value in ((setup(tmp_path, monkeypatch) if setup else None) or {}).items():
        monkeypatch.setenv(key, value)
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and "\n" not in err and "Traceback" not in err, err


def test_unknown_verb_and_debug_flag(capsys):
    assert main(["trian"]) == 2 and "unknown verb 'trian'" in capsys.readouterr().err
    for argv in (["--debug", "train", "train.lr=0"], ["train", "--debug", "train.lr=0"]):
        with pytest.raises(UserError, match="train.lr=0"):
            main(argv)
    assert "PEFTBENCH_DEBUG" not in os.environ  # the flag does not leak into later calls


def test_debug_shows_the_traceback_in_a_real_process(tmp_path):
    r = run_cli("--debug", "train", "seed=x", env={"PEFTBENCH_LOG_DIR": str(tmp_path)})
    assert r.returncode != 0 and "Traceback" in r.stderr and "seed='x'" in r.stderr


# --- nothing finished is lost; divergence is a status -----------------------------------------------------


def test_a_diverging_run_ends_as_diverged_and_is_not_rerun(compose, capsys):
    require_data()
    cfg = compose(*SMALL, "train.lr=1e9", "train.max_steps=6")
    rec = execute(cfg)
    assert rec["status"] == "diverged" and "train.lr=1000000000.0" in rec["error"], rec["error"]
    steps = rec["train"]["steps"]  # it stopped at the first non-finite loss; the record has the finite ones
    assert steps < 6 and f"at step {steps} " in rec["error"] and len(rec["train"]["loss_curve"]) == steps - 1
    assert all(math.isfinite(x) for x in rec["train"]["loss_curve"])
    path = Path(cfg.paths.results) / "runs" / f"{rec['run_id']}.json"
    assert json.loads(path.read_text())["status"] == "diverged"
    assert "diverged" in capsys.readouterr().out
    again = execute(cfg)  # the same config diverges the same way: skipped, as a finished run is
    assert "skip" in capsys.readouterr().out and again["finished_at"] == rec["finished_at"]


def test_no_clipping_with_max_grad_norm_null(compose):
    require_data()
    rec = execute(compose(*SMALL, "train.max_grad_norm=null", "train.max_steps=2"))
    assert rec["status"] == "finished"


def test_a_killed_forced_rerun_leaves_the_finished_record_and_its_files(compose, monkeypatch):
    require_data()
    args = [*SMALL, "train.max_steps=6"]
    cfg = compose(*args)
    first = execute(cfg)
    folder = Path(cfg.paths.results) / "runs"
    path, files = folder / f"{first['run_id']}.json", folder / first["run_id"]
    before = {f: f.read_bytes() for f in sorted(files.rglob("*")) if f.is_file()}
    assert before and first["status"] == "finished"
    interrupt_at(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        execute(compose(*args, "train.force=true"))
    assert json.loads(path.read_text()) == first  # the finished record, untouched
    assert {f: f.read_bytes() for f in sorted(files.rglob("*")) if f.is_file()} == before
    side = json.loads(path.with_name(path.name + ".rerun").read_text())
    assert side["status"] == "interrupted"
    monkeypatch.setattr("peftbench.loop.kill_point", lambda where, at: None)
    again = execute(compose(*args, "train.force=true"))  # finishes: replaces the record and its files
    assert again["status"] == "finished" and json.loads(path.read_text()) == again
    assert again["started_at"] >= first["started_at"] and again["adapter"]["path"] == first["adapter"]["path"]
    assert Path(again["adapter"]["path"]).is_dir() and not list(folder.glob("*.rerun*"))
    assert not list(folder.glob("*.old-*"))


def test_records_have_the_umask_mode(tmp_path):
    from peftbench.record import UMASK, write_record

    write_record(tmp_path / "r.json", {"a": 1})
    assert stat.S_IMODE((tmp_path / "r.json").stat().st_mode) == 0o666 & ~UMASK


def test_an_empty_lock_is_stale_once_it_is_older_than_a_moment(tmp_path):
    from peftbench.lock import UNWRITTEN_S, try_lock

    lock = tmp_path / "run.lock"
    lock.write_text("")  # what a full disk leaves: the file, not its content
    assert try_lock(lock, stale_after_s=600) is None  # just made: its writer may be filling it
    old = time.time() - UNWRITTEN_S - 1
    os.utime(lock, (old, old))
    taken = try_lock(lock, stale_after_s=600)
    assert taken is not None and json.loads(lock.read_text())["pid"] == os.getpid()
    taken.release()


def test_two_records_of_one_run_count_once(tmp_path, capsys):
    from peftbench.record import load_records, write_record

    done = {"run_id": "r1", "status": "finished", "finished_at": "2026-01-01T00:00:00"}
    write_record(tmp_path / "r1 copy.json", {**done, "status": "failed"})
    write_record(tmp_path / "r1.json", done)
    write_record(tmp_path / "r2.json", {"run_id": "r2", "status": "finished"})
    assert [(r["run_id"], r["status"]) for r in load_records(tmp_path)] == [
        ("r1", "finished"),
        ("r2", "finished"),
    ]
    err = capsys.readouterr().err
    assert "r1 copy.json is another record of run r1; counting" in err and err.count("\n") == 1


def test_a_lock_the_full_disk_did_not_let_us_write_is_removed(tmp_path, monkeypatch):
    from peftbench.lock import try_lock

    full_disk_at_the_lock(monkeypatch)
    with pytest.raises(UserError, match="disk full while writing the lock"):
        try_lock(tmp_path / "run.lock", stale_after_s=600)
    assert not (tmp_path / "run.lock").exists()  # no empty lock left to hold the run


# --- identity: a run is its config and the data it read --------------------------------------------------


def test_a_run_on_other_data_is_not_taken_for_the_finished_one(compose, tmp_path, monkeypatch, capsys):
    """A run on a 40-row cut of RTE, then the same command on the full RTE: the cut's record is not taken as
    the full run (its data's content hash differs): it runs again beside it and replaces it when it
    finishes; the same data again is skipped."""
    require_data()
    full = os.environ["PEFTBENCH_DATA_DIR"]
    rows = (Path(full) / "glue/RTE/train.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    cut = raw_data(tmp_path / "cut", "glue/RTE", {"train.tsv": "".join(rows[:41]).encode()})
    (cut / "glue/RTE/dev.tsv").write_bytes((Path(full) / "glue/RTE/dev.tsv").read_bytes())
    args = [*SMALL, "train.max_steps=2"]
    monkeypatch.setenv("PEFTBENCH_DATA_DIR", str(cut))
    small = execute(compose(*args))
    assert small["status"] == "finished" and small["data"]["n_train"] == 40
    assert small["data_identity"]["glue/RTE"].startswith("2 files, ")
    monkeypatch.setenv("PEFTBENCH_DATA_DIR", full)
    capsys.readouterr()
    again = execute(compose(*args))
    out = capsys.readouterr().out
    assert "rerun" in out and "its data changed" in out and "glue/RTE: 2 files" in out, out
    assert again["run_id"] == small["run_id"] and again["data"]["n_train"] == 64
    assert again["data_identity"] != small["data_identity"]
    path = Path(compose(*args).paths.results) / "runs" / f"{again['run_id']}.json"
    assert json.loads(path.read_text())["data_identity"] == again["data_identity"]
    assert not list(path.parent.glob("*.rerun*"))
    execute(compose(*args))  # the same data: skipped
    assert "skip" in capsys.readouterr().out


def test_a_checkpoint_of_other_data_does_not_resume(compose, tmp_path, monkeypatch):
    require_data()
    full = os.environ["PEFTBENCH_DATA_DIR"]
    rows = (Path(full) / "glue/RTE/train.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    cut = raw_data(tmp_path / "cut", "glue/RTE", {"train.tsv": "".join(rows[:65]).encode()})
    (cut / "glue/RTE/dev.tsv").write_bytes((Path(full) / "glue/RTE/dev.tsv").read_bytes())
    args = [*SMALL, "train.max_steps=6"]
    monkeypatch.setenv("PEFTBENCH_DATA_DIR", str(cut))
    interrupt_at(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        execute(compose(*args))
    monkeypatch.setattr("peftbench.loop.kill_point", lambda where, at: None)
    monkeypatch.setenv("PEFTBENCH_DATA_DIR", full)
    with pytest.raises(UserError, match="has data_identity=.* but this run has"):
        execute(compose(*args))


# --- write paths: checked before any work --------------------------------------------------------------

REPO_RESULTS = Path(__file__).resolve().parent.parent / "results"


def _in_the_way(tmp: Path) -> Path:
    (tmp / "a_file").write_text("")
    return tmp / "a_file"


WRITE_PATHS = [
    # (case, argv given tmp, the one line's text); the score cases would score for minutes if not refused
    ("table --out a folder", lambda t: ["table", "offline_minilm", "--out", str(t)], "--out="),
    (
        "table --out under a file",
        lambda t: ["table", "offline_minilm", "--out", str(_in_the_way(t) / "x.md")],
        "cannot write there",
    ),
    (
        "score out= a folder",
        lambda t: ["score", "task=dart", f"predictions={_in_the_way(t)}", f"out={t}"],
        "is a folder; give a file path",
    ),
    (
        "score out= under a file",
        lambda t: ["score", "task=dart", f"predictions={_in_the_way(t)}", f"out={t / 'a_file' / 's.json'}"],
        "cannot write there",
    ),
    (
        "raft-submit --out under a file",
        lambda t: ["raft-submit", "--results", str(REPO_RESULTS), "--out", str(_in_the_way(t) / "sub")],
        "submission folder",
    ),
]


@pytest.mark.parametrize("argv,expected", [c[1:] for c in WRITE_PATHS], ids=[c[0] for c in WRITE_PATHS])
def test_a_bad_write_path_is_one_line_before_any_work(tmp_path, capsys, argv, expected):
    assert main(argv(tmp_path)) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and "\n" not in err and "Traceback" not in err, err


def test_plot_into_a_read_only_results_folder_is_one_line_before_drawing(tmp_path, monkeypatch, capsys):
    """The records can be read, the folder not written: as EACCES from the kernel (a real chmod when not
    root; root ignores permission bits, so there the probe file's creation raises what the kernel raises)."""
    import shutil

    folder = tmp_path / "results" / "offline_minilm"
    shutil.copytree(REPO_RESULTS / "offline_minilm", folder)
    if os.geteuid() != 0:
        folder.chmod(0o555)
    else:
        real = tempfile.NamedTemporaryFile

        def refuse(*a, dir=None, **kw):
            if dir is not None and Path(dir) == folder:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(folder))
            return real(*a, dir=dir, **kw)

        monkeypatch.setattr("peftbench.record.tempfile.NamedTemporaryFile", refuse)
    before = {p: p.read_bytes() for p in folder.glob("*.png")}
    drawn = []
    monkeypatch.setattr("peftbench.report.plot.draw", lambda *a, **k: drawn.append(a))
    try:
        assert main(["plot", "offline_minilm", "--results", str(tmp_path / "results")]) == 2
    finally:
        folder.chmod(0o755)
    err = capsys.readouterr().err.strip()
    assert "results folder" in err and "is not writable (Permission denied)" in err and "\n" not in err, err
    assert not drawn and {p: p.read_bytes() for p in folder.glob("*.png")} == before


def test_a_sigkilled_forced_rerun_leaves_the_finished_record_and_its_files(compose, tmp_path):
    """`train.force=true` on a finished run, killed with SIGKILL after its third step (a real process, no
    handler runs): the finished record and its files are as they were; the rerun's state is beside them."""
    require_data()
    env = {"PEFTBENCH_RESULTS_DIR": str(tmp_path / "results"), "PEFTBENCH_LOG_DIR": str(tmp_path / "logs")}
    args = [*SMALL, "train.max_steps=6"]
    first = run_cli("train", *args, env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    folder = tmp_path / "results" / "runs"
    (path,) = folder.glob("*.json")
    record, files = path.read_bytes(), tree(path.with_suffix(""))
    assert json.loads(record)["status"] == "finished" and files
    killed = run_cli("train", *args, "train.force=true", env={**env, "PEFTBENCH_TEST_KILL_AT": "step:3"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert path.read_bytes() == record
    assert tree(path.with_suffix("")) == files
    assert json.loads(path.with_name(path.name + ".rerun").read_text())["status"] == "running"


def tree(folder: Path) -> dict[Path, bytes]:
    return {f: f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


@pytest.fixture(params=["tmpfs", "fake"])
def small_fs(tmp_path, request):
    """A 2 MiB tmpfs where the machine lets a test mount one (root with CAP_SYS_ADMIN, as here), so a full
    disk raises what the real writers raise; None for the `fake` case, and where no tmpfs can be mounted
    (the test then raises the writers' real exceptions from a fake)."""
    if request.param == "fake":
        yield None
        return
    mnt = tmp_path / "fs"
    mnt.mkdir()
    try:
        ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True)
    except FileNotFoundError:  # no mount command
        ok = None
    if ok is None or ok.returncode != 0:
        yield None
        return
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(folder: Path) -> Path:
    """Write a filler file until the file system is full (ENOSPC); return it (delete it to free the space)."""
    filler = folder / "filler"
    with filler.open("wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC
    return filler


def test_a_full_disk_at_a_checkpoint_loses_nothing_finished_and_the_rerun_resumes(
    compose, small_fs, monkeypatch, capsys
):
    """The disk fills up just before step 6's checkpoint: safetensors / torch raise their own errors on a
    real full file system; the run stops with one line, step 4's checkpoint is intact, and once space is
    freed the same command resumes from step 4 and finishes."""
    require_data()
    from safetensors import SafetensorError

    def raise_what_safetensors_raises(tensors, path):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    real, calls = checkpoint.save, []

    def fill_then_save(folder, *a, **k):
        calls.append(folder)
        if len(calls) == 3 and small_fs is not None:
            fill(small_fs)
        elif len(calls) == 3:  # no tmpfs: the writer's real exception, from a fake
            monkeypatch.setattr("peftbench.checkpoint.save_file", raise_what_safetensors_raises)
        return real(folder, *a, **k)

    monkeypatch.setattr("peftbench.checkpoint.save", fill_then_save)
    results = small_fs / "results" if small_fs is not None else None
    extra = [f"paths.results={results}"] if results else []
    cfg = compose(*SMALL, *extra)
    where = str(cfg.paths.results)  # resolved now: monkeypatch.undo() below restores the environment
    assert main(["train", *SMALL, f"paths.results={where}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "disk full while writing the checkpoint of step 6" in err and "\n" not in err, err
    folder = Path(where) / "runs" / run_id(cfg)
    assert json.loads((folder / "checkpoint" / "progress.json").read_text())["progress"]["step"] == 4
    assert not list(folder.glob(".checkpoint.tmp-*"))
    if small_fs is not None:
        (small_fs / "filler").unlink()
    monkeypatch.undo()
    rec = execute(compose(*SMALL, f"paths.results={where}"))
    assert rec["status"] == "finished" and rec["checkpoint"].get("resumed_from_step") == 4, rec["checkpoint"]
    assert "resume from step 4" in capsys.readouterr().out


def test_a_full_disk_at_the_lock_is_one_line_and_leaves_no_lock(compose, small_fs, monkeypatch, capsys):
    require_data()
    if small_fs is None:
        full_disk_at_the_lock(monkeypatch)
        results = None
    else:
        results = small_fs / "results"
        (results / "runs").mkdir(parents=True)
        fill(small_fs)
    cfg = compose(*SMALL, *([f"paths.results={results}"] if results else []))
    assert main(["train", *SMALL, f"paths.results={cfg.paths.results}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "disk full while writing the lock" in err and "nothing ran" in err and "\n" not in err, err
    assert not list((Path(cfg.paths.results) / "runs").glob("*.lock"))
