"""Generation scorers: the E2E, WebNLG 2017 and DART official evaluations, XSum's ROUGE, `score` per suite.

BLEU, NIST, METEOR, ROUGE-L, CIDEr and TER are computed as the official scorers compute them:
- E2E (github tuetschek/e2e-metrics, `measure_scores.py`): BLEU and NIST of mteval-v13a-sig.pl (its
  tokenisation, lowercased, smoothed BLEU, closest reference length); METEOR 1.5, ROUGE-L and CIDEr-D of the
  MS-COCO caption scorer on the Stanford PTB tokenizer's lowercased tokens without punctuation. The jars
  (METEOR 1.5 with its paraphrase table, Stanford CoreNLP 3.4.1) and ROUGE-L / CIDEr-D come from the
  `pycocoevalcap` package: the same files (git blob ids) as in e2e-metrics.
- WebNLG 2017 and DART (the WebNLG challenge's `evaluation.py` and scripts as Yale-LILY/dart `evaluation/`
  ships them, which Prefix-Tuning and LoRA ran): outputs and references split at every non-word character and
  lowercased (WebNLG also transliterated to ASCII with `unidecode`); the first 3 references; multi-bleu.perl
  BLEU (missing references are empty lines; `-lc` for WebNLG), METEOR 1.5 `-l en -norm`, TER of tercom 0.7.25
  (sacrebleu's port). DART's script reads references prepared so (`dart_reference/*.lex`) and outputs as given;
  LoRA's decoder lowercases and splits them the same way (`--lower --tokenize`), and so does peftbench.
Scales follow the papers' tables (LoRA Tables 3 and 4): BLEU, and E2E's METEOR and ROUGE-L, in 0-100; NIST
and CIDEr as they come; WebNLG / DART METEOR and TER in 0-1.

Java is needed for METEOR and the PTB tokenizer; without it those metrics are reported unavailable (None,
with the reason), never 0. Model-based DART metrics (BERTScore, BLEURT, MoverScore) likewise.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from sacrebleu.metrics import TER
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a
from unidecode import unidecode

from peftbench.errors import UserError, choice_error
from peftbench.log import bar, stage
from peftbench.metrics.qa import squad

Refs = Sequence[Sequence[str]]

# What each task's official evaluation reports.
SUITES: dict[str, tuple[str, ...]] = {
    "e2e": ("bleu", "nist", "meteor", "rouge_l", "cider"),
    "webnlg": ("bleu", "meteor", "ter"),
    "dart": ("bleu", "meteor", "ter", "bertscore", "bleurt", "moverscore"),
    "rouge": ("rouge_1", "rouge_2", "rouge_l"),  # summarisation (XSum)
    "squad": ("f1", "em"),  # extractive QA: SQuAD v1.1 / MRQA evaluation script
}


@dataclass
class Scores:
    values: dict[str, float | None]
    unavailable: dict[str, str] = field(default_factory=dict)  # metric -> why it has no value

    def as_dict(self) -> dict:
        return {**self.values, "unavailable": dict(self.unavailable)}


# --- n-gram BLEU / NIST ----------------------------------------------------------------------------------

_MTEVAL = Tokenizer13a()  # sacrebleu's port of mteval-v13a's `tokenization` (punctuation, &quot; ...)
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def mteval_tokens(text: str) -> list[str]:
    """mteval-v13a's tokenisation; it lowercases with `tr/[A-Z]/[a-z]/`, so ASCII letters only."""
    return _MTEVAL(text.translate(_ASCII_LOWER)).split()


def _ngrams(words: Sequence[str], n_max: int) -> Counter:
    return Counter(tuple(words[i : i + n]) for n in range(1, n_max + 1) for i in range(len(words) - n + 1))


def _closest_length(hyp_len: int, ref_lens: Sequence[int]) -> int:
    """The reference length closest to the hypothesis', the shorter on a tie (mteval 'closest', multi-bleu)."""
    return min((abs(hyp_len - r), r) for r in ref_lens)[1] if ref_lens else 0


@dataclass
class _Counts:
    match: list[float]
    total: list[int]
    info: list[float]  # NIST: information weight of the matched n-grams
    ref_len: int = 0  # BLEU: sum of closest reference lengths
    ref_words: int = 0  # NIST: words in all references
    n_refs: int = 0


def _count(hyps: list[list[str]], refs: list[list[list[str]]], n_max: int, info: dict | None) -> _Counts:
    """Clipped n-gram matches. An empty reference (multi-bleu's padding line) takes part in the closest
    length; mteval-v13a-sig skips empty references, so its callers leave them out."""
    c = _Counts([0] * (n_max + 1), [0] * (n_max + 1), [0.0] * (n_max + 1))
    for h, rs in zip(hyps, refs):
        best: Counter = Counter()
        for r in rs:
            best |= _ngrams(r, n_max)  # per n-gram, its largest count in any one reference
        for g, k in _ngrams(h, n_max).items():
            m = min(k, best[g])
            c.match[len(g)] += m
            c.info[len(g)] += (info or {}).get(g, 0.0) * m
        for n in range(1, n_max + 1):
            c.total[n] += max(len(h) - n + 1, 0)
        c.ref_len += _closest_length(len(h), [len(r) for r in rs])
        c.ref_words += sum(len(r) for r in rs)
        c.n_refs += sum(1 for r in rs if r)
    return c


def _nist_info(refs: list[list[list[str]]]) -> dict:
    """mteval's `compute_ngram_info`: -log2 P(last word | the n-1 before it) over all reference n-grams."""
    counts: Counter = Counter()
    for rs in refs:
        for r in rs:
            counts.update(_ngrams(r, 5))
    words = sum(len(r) for rs in refs for r in rs)
    return {g: -math.log2(k / (counts[g[:-1]] if len(g) > 1 else words)) for g, k in counts.items()}


def mteval_bleu_nist(hyps: Sequence[str], refs: Refs) -> tuple[float, float]:
    """BLEU (0-1) and NIST of mteval-v13a-sig.pl as E2E's measure_scores.py runs it: one document, the
    default smoothing (a zero n-gram count counts 1/2^k), closest reference length."""
    h = [mteval_tokens(x) for x in hyps]
    r = [[mteval_tokens(x) for x in rs] for rs in refs]
    c = _count(h, r, 5, _nist_info(r))
    bleu, smooth = 0.0, 1
    for n in range(1, 5):
        if c.total[n] == 0:
            continue
        if c.match[n] == 0:
            smooth *= 2
            bleu += math.log(1 / (smooth * c.total[n]))
        else:
            bleu += math.log(c.match[n] / c.total[n])
    bp = math.exp(min(0.0, 1 - c.ref_len / c.total[1])) if c.total[1] else 0.0
    bleu = math.exp(bleu / 4) * bp
    # NIST brevity: hypothesis words over the mean reference length (mteval's `nist_length_penalty`)
    ratio = c.total[1] / (c.ref_words / (c.n_refs / len(h))) if c.ref_words else 0.0
    beta = -math.log(0.5) / math.log(1.5) ** 2
    penalty = 1.0 if ratio >= 1 else 0.0 if ratio <= 0 else math.exp(-beta * math.log(ratio) ** 2)
    nist = sum(c.info[n] / max(c.total[n], 1) for n in range(1, 6)) * penalty
    return bleu, nist


def multi_bleu(hyps: Sequence[str], refs: Refs, lowercase: bool) -> float:
    """BLEU (0-100) of Moses' multi-bleu.perl: whitespace tokens, no smoothing, closest reference length."""
    norm = (lambda s: s.lower().split()) if lowercase else (lambda s: s.split())
    c = _count([norm(x) for x in hyps], [[norm(x) for x in rs] for rs in refs], 4, None)
    if c.total[1] == 0 or 0 in c.match[1:]:
        return 0.0
    bp = math.exp(1 - c.ref_len / c.total[1]) if c.total[1] < c.ref_len else 1.0
    return 100 * bp * math.exp(sum(math.log(c.match[n] / c.total[n]) for n in range(1, 5)) / 4)


def ter(hyps: Sequence[str], refs: Refs) -> float:
    """TER (0-1) as tercom 0.7.25 with its defaults (case-insensitive): all segments' fewest edits to any
    reference over the sum of their mean reference lengths."""
    stats = [_ter_segment(h, tuple(rs)) for h, rs in zip(hyps, refs)]
    edits, length = sum(e for e, _ in stats), sum(n for _, n in stats)
    return edits / length if length > 0 else float(edits > 0)


@lru_cache(maxsize=50_000)
def _ter_segment(hyp: str, refs: tuple[str, ...]) -> tuple[float, float]:
    """(edits, mean reference length) of one segment; cached, as the seen / unseen scores reuse them (TER's
    shift search is slow in Python)."""
    s = TER().corpus_score([hyp], [[r] for r in refs])
    return s.num_edits, s.ref_length


# --- the Java scorers: Stanford PTB tokenizer, METEOR 1.5 ---------------------------------------------


def java_missing() -> str | None:
    """Why the Java scorers cannot run, or None when they can."""
    return (
        None if shutil.which("java") else "java not found on PATH (METEOR 1.5 and the PTB tokenizer are Java)"
    )


def _pycoco_dir() -> Path:
    import pycocoevalcap.meteor.meteor as m  # the package ships the jars beside its wrappers

    return Path(m.__file__).resolve().parent.parent


# the COCO caption scorer's PTBTokenizer drops these tokens after tokenising
_PUNCTUATION = set("'' ' `` ` -LRB- -RRB- -LCB- -RCB- . ? ! , : - -- ... ;".split())
_PTB = ["edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase"]


def ptb_tokenize(texts: Sequence[str]) -> list[str]:
    """The MS-COCO caption scorer's tokenisation (as E2E uses it): Stanford CoreNLP 3.4.1's PTBTokenizer,
    one line per text, lowercased, punctuation tokens removed."""
    jar = _pycoco_dir() / "tokenizer" / "stanford-corenlp-3.4.1.jar"
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", suffix=".txt", delete=False) as f:
        f.write("\n".join(t.replace("\n", " ") for t in texts))
    try:
        out = subprocess.run(
            ["java", "-cp", str(jar), *_PTB, f.name], capture_output=True, encoding="utf-8", check=True
        ).stdout.split("\n")
    finally:
        os.unlink(f.name)
    return [
        " ".join(w for w in line.rstrip().split(" ") if w not in _PUNCTUATION) for line in out[: len(texts)]
    ]


class Meteor:
    """One METEOR 1.5 process (`-l en -norm`, as both E2E and WebNLG run it); it loads its paraphrase table
    once (~10 s), so score many corpora with one instance."""

    def __init__(self) -> None:
        from pycocoevalcap.meteor.meteor import Meteor as _CocoMeteor

        self._m = _CocoMeteor()

    def __call__(self, hyps: Sequence[str], refs: Refs) -> float:
        """Corpus METEOR (0-1): the jar's aggregate over all segments' statistics."""
        score, _ = self._m.compute_score(
            {i: list(rs) for i, rs in enumerate(refs)}, {i: [h] for i, h in enumerate(hyps)}
        )
        return float(score)

    def close(self) -> None:
        self._m.__del__()  # ends the Java process (safe to repeat at garbage collection)


_SHARED: Meteor | None = None


def shared_meteor() -> Meteor | None:
    """One METEOR process for this Python process (training evaluates many times; the jar loads its
    paraphrase table once), closed at exit; None without Java."""
    global _SHARED
    if _SHARED is None and java_missing() is None:
        import atexit

        _SHARED = Meteor()
        atexit.register(_SHARED.close)
    return _SHARED


# --- one call per task -----------------------------------------------------------------------------------


def score(suite: str, hyps: Sequence[str], refs: Refs, meteor: Meteor | None = None) -> Scores:
    """All metrics of a task's official evaluation on one corpus (hypothesis i against references i)."""
    if suite not in SUITES:
        raise choice_error("scorer", suite, SUITES)
    if len(hyps) != len(refs):
        raise UserError(f"{len(hyps)} outputs but {len(refs)} reference sets: expected one output per input")
    hyps, refs = list(hyps), [list(rs) for rs in refs]
    out = Scores({name: None for name in SUITES[suite]})
    if suite in ("rouge", "squad"):  # no Java scorer
        out.values.update(rouge(hyps, refs) if suite == "rouge" else squad(hyps, refs))
        return out
    no_java = java_missing()
    own = meteor is None and no_java is None
    if own:
        meteor = Meteor()
    stages = bar(total=len(SUITES[suite]), desc=f"score {suite} ({len(hyps)} outputs)", unit="metric")
    try:
        if suite == "e2e":
            _score_e2e(hyps, refs, meteor, out, stages)
        else:
            _score_triples(suite, hyps, refs, meteor, out, stages)
    finally:
        stages.close()
        if own:
            meteor.close()
    if no_java:
        for name in ("meteor", "rouge_l", "cider") if suite == "e2e" else ("meteor",):
            out.unavailable[name] = no_java
    if suite == "dart":
        _model_based(hyps, refs, out)
    return out


def rouge(hyps: list[str], refs: list[list[str]]) -> dict[str, float]:
    """ROUGE-1 / 2 / L F1 x 100 with Porter stemming (Google's rouge-score, as the BART and Prefix-Tuning
    summarisation evaluations call it), averaged over the documents; several references: the best one."""
    from rouge_score import rouge_scorer

    keys = {"rouge_1": "rouge1", "rouge_2": "rouge2", "rouge_l": "rougeL"}
    scorer = rouge_scorer.RougeScorer(list(keys.values()), use_stemmer=True)
    totals = dict.fromkeys(keys, 0.0)
    for hyp, rs in zip(hyps, refs):
        per_ref = [scorer.score(r, hyp) for r in rs]
        for ours, theirs in keys.items():
            totals[ours] += max(s[theirs].fmeasure for s in per_ref)
    return {k: 100.0 * v / max(len(hyps), 1) for k, v in totals.items()}


def _score_e2e(hyps: list[str], refs: list[list[str]], meteor: Meteor | None, out: Scores, stages) -> None:
    with stage(stages, "bleu, nist", 2):
        bleu, nist = mteval_bleu_nist(hyps, refs)
        out.values.update(bleu=100 * bleu, nist=nist)
    if meteor is None:
        return
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    flat = ptb_tokenize(hyps + [r for rs in refs for r in rs])
    tok_h, rest = flat[: len(hyps)], iter(flat[len(hyps) :])
    tok_r = [[next(rest) for _ in rs] for rs in refs]
    gts = {i: rs for i, rs in enumerate(tok_r)}
    res = {i: [h] for i, h in enumerate(tok_h)}
    with stage(stages, "meteor"):
        out.values["meteor"] = 100 * meteor(tok_h, tok_r)
    with stage(stages, "rouge_l"):
        out.values["rouge_l"] = 100 * float(Rouge().compute_score(gts, res)[0])
    with stage(stages, "cider"):
        out.values["cider"] = float(Cider().compute_score(gts, res)[0])


def _score_triples(
    suite: str, hyps: list[str], refs: list[list[str]], meteor: Meteor | None, out: Scores, stages
) -> None:
    prepare_hyp, prepare_ref = (webnlg_hyp, webnlg_ref) if suite == "webnlg" else (dart_hyp, dart_ref)
    h = [prepare_hyp(x) for x in hyps]
    r = [[prepare_ref(x) for x in rs[:3]] for rs in refs]
    with stage(stages, "bleu"):
        out.values["bleu"] = multi_bleu(
            h, [rs + [""] * (3 - len(rs)) for rs in r], lowercase=suite == "webnlg"
        )
    with stage(stages, "ter"):
        out.values["ter"] = ter(h, r)
    if meteor is not None:
        with stage(stages, "meteor"):
            out.values["meteor"] = meteor(h, r)


def _split_words(text: str) -> str:
    """`' '.join(re.split('(\\W)', text))` with single spaces: the scripts' (and LoRA's) tokenisation."""
    return " ".join(" ".join(re.split(r"(\W)", text)).split())


def dart_hyp(text: str) -> str:
    """An output as LoRA's `gpt2_decode.py --lower --tokenize` prepares it for DART's script."""
    return _split_words(text.lower())


def dart_ref(text: str) -> str:
    """A reference as in Yale-LILY/dart `evaluation/dart_reference/*.lex` (equal on all 5,097 x 3 test lines)."""
    return _split_words(text).lower()


def webnlg_hyp(text: str) -> str:
    """The WebNLG 2017 script's preparation of an output: lowercase, ASCII, split at non-word characters."""
    return _split_words(unidecode(text.lower()))


def webnlg_ref(text: str) -> str:
    """... and of a reference: split first, then lowercase and ASCII (the order differs from the output's)."""
    return unidecode(_split_words(text).lower())


def _model_based(hyps: list[str], refs: list[list[str]], out: Scores) -> None:
    """BERTScore F1 (roberta-large, as DART's script) when the package and the model are at hand; BLEURT and
    MoverScore need TensorFlow checkpoints / extra packages that peftbench does not install."""
    try:
        import bert_score

        _, _, f1 = bert_score.score(hyps, refs, lang="en", verbose=False)
        out.values["bertscore"] = float(f1.mean())
    except ImportError:
        out.unavailable["bertscore"] = "package bert-score not installed (pip install bert-score)"
    except Exception as e:  # no network and no cached roberta-large, most often
        out.unavailable["bertscore"] = f"model roberta-large not reachable offline ({type(e).__name__})"
    out.unavailable["bleurt"] = "needs the bleurt package and a BLEURT checkpoint (not installed)"
    out.unavailable["moverscore"] = "needs the moverscore package and its BERT model (not installed)"


def score_by_category(
    suite: str, hyps: Sequence[str], entries: Sequence[dict], meteor: Meteor | None = None
) -> dict[str, Scores]:
    """Scores on all entries and, where entries carry WebNLG's seen / unseen category, on each of those
    (one METEOR process for all of them: the caller's, which stays open, or one of its own)."""
    groups = {"all": list(range(len(entries)))}
    if suite == "webnlg":
        for cat in ("seen", "unseen"):
            groups[cat] = [i for i, e in enumerate(entries) if e.get("category") == cat]
    own = meteor is None and java_missing() is None
    if own:
        meteor = Meteor()
    try:
        return {
            name: score(suite, [hyps[i] for i in idx], [entries[i]["references"] for i in idx], meteor)
            for name, idx in groups.items()
            if idx
        }
    finally:
        if own:
            meteor.close()
