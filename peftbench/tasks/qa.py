"""Reading-comprehension QA: SQuAD v1.1 (official JSON) and the MRQA 2019 shared task's sets (official
jsonl.gz), from PEFTBENCH_DATA_DIR or the hub (`rajpurkar/squad`, `mrqa-workshop/mrqa`).

One row per question: `{idx, id, question, context, references: [gold answers], answer_starts: [character
offsets of them in the context, -1 where unknown], source, target}`. `source` / `target` are the
text-to-text form T5 reads (Raffel et al. 2020's SQuAD format, used by Lester et al. 2021 for MRQA):
`question: Q context: C` -> the first gold answer; an encoder (BERT / RoBERTa) instead predicts the
answer's span in the context (peftbench/formats/span.py). Both are scored with the SQuAD / MRQA evaluation script's
F1 and exact match (peftbench.metrics.qa.squad): normalised answers, the best gold answer per question.

`task.transfer` names MRQA out-of-domain sets (`task.mrqa_sets`) evaluated zero-shot with the trained
model's best weights after training (Lester et al.'s domain transfer: train on SQuAD, test on TextbookQA,
BioASQ, RACE, RE, DuoRC, DROP); their scores go into the record as `f1_<set>`, `em_<set>`.
"""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig

from peftbench.errors import UserError, choice_error
from peftbench.paths import data_dir
from peftbench.tasks import TaskData
from peftbench.tasks.classification import _read_jsonl, hub_load, hub_source, select_train


def load(cfg: DictConfig, seed: int, max_train: int | None = None) -> TaskData:
    train, train_src = load_split(cfg, cfg.get("train_split") or "train")
    validation, val_src = load_split(cfg, cfg.get("eval_split") or "validation")
    sources = {"train": train_src, "validation": val_src}
    data = TaskData(
        cfg.name, "generation", [], select_train(train, cfg, seed, max_train), validation, sources
    )
    for name in cfg.get("transfer") or []:
        data.transfer[name], sources[f"transfer_{name}"] = load_mrqa_set(cfg, name)
    return data


def load_split(cfg: DictConfig, split: str) -> tuple[list[dict], str]:
    if split not in cfg.local.files:
        raise choice_error(f"split of task {cfg.name}", split, list(cfg.local.files))
    hub = dict(cfg.hub, split=cfg.hub.get("splits", {}).get(split, split), download=cfg.local.download)
    return _load(cfg, Path(cfg.local.dir) / cfg.local.files[split], hub)


def load_mrqa_set(cfg: DictConfig, name: str) -> tuple[list[dict], str]:
    """An MRQA out-of-domain set: `$PEFTBENCH_DATA_DIR/mrqa/<file>` or the hub's rows of that subset."""
    sets = cfg.get("mrqa_sets") or {}
    if name not in sets:
        raise choice_error("task.transfer set", name, list(sets))
    spec, mrqa = sets[name], cfg.mrqa
    hub = {"path": mrqa.hub, "split": mrqa.hub_split, "subset": spec.subset, "download": mrqa.download}
    return _load(cfg, Path(mrqa.dir) / spec.file, hub)


def _load(cfg: DictConfig, rel: Path, hub: dict) -> tuple[list[dict], str]:
    """Rows of the local file `$PEFTBENCH_DATA_DIR/<rel>`, else of the hub split (one subset of it)."""
    root = data_dir()
    if root is not None:
        path = root / rel
        if path.exists():
            return _finish(read_file(path)), str(path)
        missing = f"no local file {path}"
    else:
        missing = "PEFTBENCH_DATA_DIR is not set"
    ds, reason = hub_load(hub["path"], hub.get("name"), hub["split"])
    if ds is None:
        raise UserError(
            f"task {cfg.name}: {missing}, and the hub dataset {hub['path']} ({hub['split']}) could not be "
            f"loaded ({reason}); {hub['download']}"
        )
    subset = hub.get("subset")
    rows = [dict(r) for r in ds if not subset or r.get("subset") == subset]
    return _finish([_from_hub(r) for r in rows]), hub_source(hub["path"], hub.get("name")) + (f" ({subset})" if subset else "")


def _finish(rows: list[dict]) -> list[dict]:
    """Number the rows, build the text-to-text form; a question with no gold answer (SQuAD 2.0's
    unanswerable ones) can be neither trained on nor scored with F1, so it is left out."""
    out = [r for r in rows if r["references"]]
    for i, r in enumerate(out):
        r["idx"] = i
        r["source"] = f"question: {r['question']} context: {r['context']}"
        r["target"] = r["references"][0]
    return out


def read_file(path: Path) -> list[dict]:
    if path.suffix == ".json":
        return read_squad(path)
    if path.name.endswith((".jsonl.gz", ".jsonl")):
        return read_mrqa(path)
    raise UserError(f"{path}: expected SQuAD JSON (.json) or MRQA JSON lines (.jsonl.gz / .jsonl)")


def read_squad(path: Path) -> list[dict]:
    """SQuAD's official JSON: data[].paragraphs[].{context, qas[].{id, question, answers[].{text,
    answer_start}}}."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        articles = data["data"]
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
    except (KeyError, TypeError):
        raise UserError(f"{path}: not SQuAD JSON (no top-level 'data' list of articles)") from None
    out = []
    for article in articles:
        for para in article["paragraphs"]:
            for qa in para["qas"]:
                answers = qa.get("answers") or []
                out.append(
                    {
                        "id": qa["id"],
                        "question": qa["question"].strip(),
                        "context": para["context"],
                        "references": [a["text"] for a in answers],
                        "answer_starts": [int(a["answer_start"]) for a in answers],
                    }
                )
    return out


def read_mrqa(path: Path) -> list[dict]:
    """MRQA's JSON lines (gzipped): a header line, then one context per line with its questions; each
    question's `answers` are the gold strings, `detected_answers` their character spans in the context."""
    out = []
    for n, item in _read_jsonl(None, path, flatten=False):
        if "header" in item:
            continue
        if "context" not in item or "qas" not in item:
            raise UserError(f"{path}:{n}: an MRQA line needs 'context' and 'qas'")
        for qa in item["qas"]:
            out.append(_mrqa_row(item["context"], qa["qid"], qa["question"], qa["answers"], qa))
    return out


def _mrqa_row(context: str, qid: str, question: str, answers: list[str], qa: dict) -> dict:
    starts = []
    for a in answers:  # the first detected span of this answer, else its first occurrence (-1: none)
        start = next(
            (
                s
                for d in qa.get("detected_answers") or []
                for s, _ in d.get("char_spans", [])
                if d["text"] == a
            ),
            None,
        )
        starts.append(int(start) if start is not None else context.find(a))
    return {
        "id": qid,
        "question": question.strip(),
        "context": context,
        "references": list(answers),
        "answer_starts": starts,
    }


def _from_hub(r: dict) -> dict:
    """A row of the hub's `squad` (answers: {text, answer_start}) or `mrqa` (answers: [...],
    detected_answers: {text, char_spans: [{start, end}]})."""
    if isinstance(r.get("answers"), dict):
        return {
            "id": r["id"],
            "question": r["question"].strip(),
            "context": r["context"],
            "references": list(r["answers"]["text"]),
            "answer_starts": [int(s) for s in r["answers"]["answer_start"]],
        }
    detected = r.get("detected_answers") or {}
    spans = [
        {"text": t, "char_spans": list(zip(c.get("start", []), c.get("end", [])))}
        for t, c in zip(detected.get("text", []), detected.get("char_spans", []))
    ]
    return _mrqa_row(r["context"], r["qid"], r["question"], r["answers"], {"detected_answers": spans})
