"""Same config, two code versions, the same record: one offline run per input format with the code of a git
revision (default: the commit before the restructure) and with this checkout, then the records compared
field by field (timings, dates and paths left out), with the predictions files and the saved trained tensors.

    python scripts/compare_runs.py                 # before = 2c6aea3 (the last commit before the restructure)
    python scripts/compare_runs.py --before HEAD~3 --only head,span

Each side runs in its own process on the CPU with one torch thread. Exit 0 when every format's record is
identical, 1 otherwise (the differing fields are printed). Needs PEFTBENCH_DATA_DIR for SST-2 and E2E; the
SQuAD-format fixture is written here.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BEFORE = "2c6aea3"  # main before the restructure into setup / loop / evaluate / formats
COMMON = ["train.num_threads=1", "train.device=cpu", "train.progress=false", "train.checkpoint_every=null"]
CASES = {  # one run per format: head, prompt (rank classification), generation, span
    "head": ["method=lora", "model=minilm", "task=sst2", "train.max_train_samples=64", "train.max_steps=6",
             "train.batch_size=16", "train.max_eval_samples=64", "task.max_length=64", "train.lr=2e-3"],
    "prompt": ["method=lora", "model=tiny-gpt2", "task=rte", "task.format=prompt", "train.max_train_samples=32",
               "train.max_steps=4", "train.batch_size=8", "train.max_eval_samples=32", "task.max_length=96"],
    "generation": ["method=lora", "model=tiny-gpt2", "task=e2e", "train.max_train_samples=32", "train.max_steps=4",
                   "train.batch_size=8", "train.max_eval_samples=12", "task.decode.max_new_tokens=8",
                   "task.max_length=96"],
    "span": ["method=lora", "model=tiny-bert", "task=squad", "train.max_steps=6", "train.batch_size=16",
             "task.max_length=64", "task.doc_stride=16", "train.lr=1e-3"],
}  # fmt: skip
VOLATILE = {"started_at", "finished_at", "wall_s", "train_s", "eval_s", "s_per_step", "tokens_per_s",
            "samples_per_s", "flops_per_s", "mfu", "memory", "git_sha", "path", "predictions", "bytes",
            "paths", "seconds"}  # fmt: skip


def squad_fixture(root: Path) -> None:
    """Contexts of filler words around one fact; the question asks for the topic's colour."""
    colours = "red blue green amber violet silver golden crimson".split()
    topics = "tower bridge castle harbor museum garden library station".split()
    filler = "the city council met on monday and a report said new homes would be built near".split()
    rng = random.Random(0)
    for split, n in (("train", 48), ("dev", 12)):
        paras = []
        for i in range(n):
            t = rng.choice(topics)
            fact = f"the {t} is {colours[topics.index(t)]} ."
            words = rng.choices(filler, k=rng.randint(8, 20))
            context = " ".join([*words[: len(words) // 2], fact, *words[len(words) // 2 :]])
            start = context.index(fact) + len(f"the {t} is ")
            answer = {"text": colours[topics.index(t)], "answer_start": start}
            q = {"id": f"{split}{i}", "question": f"what colour is the {t}?", "answers": [answer]}
            paras.append({"context": context, "qas": [q]})
        path = root / "squad" / f"{split}-v1.1.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"version": "1.1", "data": [{"title": "f", "paragraphs": paras}]}))


def checkout(rev: str, into: Path) -> Path:
    """The tree of `rev` (package, configs) extracted into a folder, without touching this checkout."""
    archive = into / "tree.tar"
    subprocess.run(["git", "-C", str(REPO), "archive", "-o", str(archive), rev], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into / "tree", filter="data")
    return into / "tree"


def run_side(tree: Path, case: str, results: Path, env: dict) -> dict:
    code = (
        "import sys, peftbench; assert peftbench.__file__.startswith(sys.argv[1]), peftbench.__file__\n"
        "from peftbench.cli import main; sys.exit(main(['train', *sys.argv[2:]]))"
    )
    env = {**env, "PYTHONPATH": str(tree), "PEFTBENCH_RESULTS_DIR": str(results)}
    args = [*CASES[case], *COMMON, f"hydra.run.dir={results}/hydra"]
    proc = subprocess.run([sys.executable, "-c", code, str(tree), *args], env=env, capture_output=True,
                          text=True, cwd=tree)  # fmt: skip
    if proc.returncode:
        raise SystemExit(f"{case} at {tree}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    (record,) = sorted(results.glob("runs/*.json"))
    return json.loads(record.read_text()) | {"_folder": str(record.with_suffix(""))}


def stable(value):
    if isinstance(value, dict):
        return {k: stable(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [stable(v) for v in value]
    return value


def differences(a, b, where: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                out.append(f"{where}.{k}: only in {'after' if k in b else 'before'}")
            else:
                out += differences(a[k], b[k], f"{where}.{k}")
        return out
    return [] if a == b else [f"{where}: {str(a)[:120]} != {str(b)[:120]}"]


def files(folder: Path) -> dict[str, bytes]:
    """Predictions and trained tensors, byte for byte (the adapter's config names its own folder: skipped)."""
    if not folder.is_dir():
        return {}
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.suffix in (".txt", ".safetensors", ".csv")
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", default=BEFORE, help=f"git revision to compare against (default {BEFORE})")
    p.add_argument("--only", default=",".join(CASES), help=f"formats to run, of {','.join(CASES)}")
    a = p.parse_args()
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        squad_fixture(tmp / "squad_data")
        before = checkout(a.before, tmp)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        for case in a.only.split(","):
            if case == "span":
                env_case = {**env, "PEFTBENCH_DATA_DIR": str(tmp / "squad_data")}
            else:
                env_case = env
            old = run_side(before, case, tmp / case / "before", env_case)
            new = run_side(REPO, case, tmp / case / "after", env_case)
            fa, fb = files(Path(old.pop("_folder"))), files(Path(new.pop("_folder")))
            diff = differences(stable(old), stable(new))
            diff += [f"file {f} differs" for f in sorted(set(fa) | set(fb)) if fa.get(f) != fb.get(f)]
            metric = new["main_metric"]
            print(f"{case:<10} {new['run_id']}  {metric}={new['best']['metrics'][metric]}  "
                  f"{len(fb)} files  {'IDENTICAL' if not diff else 'DIFFERENT'}")  # fmt: skip
            for d in diff[:20]:
                print(f"    {d}")
            failed += bool(diff)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
