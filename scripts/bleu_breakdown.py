"""BLEU's parts for the generation runs of a preset: the four n-gram precisions, the brevity penalty and the
output / reference lengths, from each record's committed predictions (sacrebleu's corpus BLEU against every
reference of each input). The official E2E scorer reads 0.6-0.7 BLEU above sacrebleu on the same outputs (its
own tokenisation); the parts say why one decode beats another: beam search raises every precision and shortens
the outputs (a lower brevity penalty).

    python scripts/bleu_breakdown.py offline_e2e_smollm2            # every E2E run of the preset
    python scripts/bleu_breakdown.py offline_e2e_smollm2 --task webnlg
    python scripts/bleu_breakdown.py --files results/X/run/predictions/eval_1.jsonl

A pure function of the committed records: nothing is trained or decoded.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def breakdown(rows: list[dict]) -> dict:
    """sacrebleu's corpus BLEU of predictions against all their references (inputs with fewer references are
    padded with empty ones, which sacrebleu skips)."""
    import sacrebleu

    hyps = [r["prediction"] for r in rows]
    n = max(len(r["references"]) for r in rows)
    refs = [[r["references"][i] if i < len(r["references"]) else "" for r in rows] for i in range(n)]
    b = sacrebleu.corpus_bleu(hyps, refs)
    return {
        "bleu": round(b.score, 2),
        "precisions": [round(p, 1) for p in b.precisions],
        "bp": round(b.bp, 3),
        "sys_len": b.sys_len,
        "ref_len": b.ref_len,
    }


def line(label: str, rows: list[dict]) -> str:
    d = breakdown(rows)
    prec = " / ".join(f"{p:.1f}" for p in d["precisions"])
    return f"| {label} | {d['bleu']:.2f} | {prec} | {d['bp']:.3f} | {d['sys_len']} / {d['ref_len']} |"


def read(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("preset", nargs="?", help="a preset whose records live in results/<preset>/")
    ap.add_argument("--task", default="e2e")
    ap.add_argument("--files", nargs="*", default=[], help="predictions files (jsonl) instead of a preset")
    args = ap.parse_args(argv)
    if not args.preset and not args.files:
        ap.error("give a preset or --files")
    print("| run | sacreBLEU | precisions 1-4 | brevity penalty | output / reference length |")
    print("|---|---:|---|---:|---|")
    for f in args.files:
        print(line(f, read(Path(f))))
    if args.preset:
        folder = REPO / "results" / args.preset
        if not folder.is_dir():
            print(f"bleu_breakdown: no records in {folder}", file=sys.stderr)
            return 2
        runs = []
        for rec in folder.glob("*.json"):
            r = json.loads(rec.read_text(encoding="utf-8"))
            if r.get("status") != "finished" or r.get("task") != args.task:
                continue
            # the final decode (a merged LoRA's), else the last evaluation's
            pred = (r.get("final") or {}).get("predictions") or ((r.get("evals") or [{}])[-1]).get("predictions")
            if pred and (REPO / pred).exists():
                runs.append((str(r.get("row")), int(r.get("seed", 0)), REPO / pred))
        for row, seed, pred in sorted(runs):
            print(line(f"{row} (seed {seed})", read(pred)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
