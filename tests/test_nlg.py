"""Data-to-text tasks and their metrics: the official-scorer values on small fixed sets, the readers' sizes and
linearisations, `peftbench score` and its one-line errors, metrics reported unavailable without Java."""

import json
import shutil

import pytest
from conftest import require_data

from peftbench import metrics as M
from peftbench.cli import main
from peftbench.config import compose as compose_cfg
from peftbench.errors import UserError
from peftbench.metrics import nlg as N
from peftbench.tasks import load_task
from peftbench.tasks.generation import load_split

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="java is not installed")

# E2E dev inputs (index into its 547 distinct MRs, official order) with hand-written outputs.
E2E_FIXED = [
    (0, "Alimentum is in the city centre. It is not family-friendly."),
    (1, "Alimentum is near Burger King in the city centre and is not family friendly."),
    (2, "Alimentum is a family-friendly place in the city centre."),  # = its first reference
    (3, "Near Burger King in the city centre, Alimentum welcomes families."),
    (4, "Alimentum, by the riverside, is not kid friendly."),
    (5, "Alimentum is a restaurant."),  # short: brevity penalty
    (6, "A kid friendly venue named Alimentum is located on the riverside"),
    (7, "ALIMENTUM IS CHILD FRIENDLY AND NEAR BURGER KING ON THE RIVERSIDE."),  # case
    (8, "Aromi is a family friendly Chinese coffee shop at the riverside rated 1 out of 5."),
    (9, "Aromi coffee shop serves Chinese food; riverside; 3 out of 5; kids welcome!"),
    (
        10,
        "In the city centre, Aromi (a coffee shop) serves Chinese food, is rated 5 out of 5 and isn't for kids.",
    ),
    (11, "Aromi Aromi Aromi coffee coffee shop shop."),  # repetition: clipped counts
    (88, "Cocum is a Chinese coffee shop with a high rating and prices of £20-25; no children."),
    (89, "Cocum, a £20-25 Chinese coffee shop, is family-friendly & highly rated."),
    (
        98,
        "Cocum serves Chinese food for less than £20 and is a low-rated coffee shop that is not family-friendly.",
    ),
    (99, "There is a cheap family friendly coffee shop called Cocum; it has Chinese food and a low rating."),
]
# Computed once with the official scorer: github tuetschek/e2e-metrics @1b9c4d8, `measure_scores.py REFS HYPS`
# (Perl mteval-v13a-sig.pl for BLEU / NIST; its jars from pycocoevalcap 1.2, the same git blobs), on these
# outputs and the entries' references from devset.csv (blank-line separated). Printed to 4 decimals.
E2E_OFFICIAL = {"bleu": 0.4040, "nist": 5.6136, "meteor": 0.3374, "rouge_l": 0.5989, "cider": 1.3830}
# Our METEOR runs the same jar on the same PTB tokens: no difference at the official 4 decimals (README).
METEOR_TOLERANCE = 1e-4

# WebNLG 2017 test inputs (index into the 1,862) with hand-written outputs; 9 seen, 7 unseen.
WEBNLG_FIXED = [
    (0, "Abilene Regional Airport serves Abilene, Texas."),
    (
        1,
        "Adolfo Suárez Madrid–Barajas Airport is in Madrid, Paracuellos de Jarama, San Sebastián de los Reyes and Alcobendas.",
    ),
    (2, "The runway name of Adolfo Suárez Madrid–Barajas Airport is 18L/36R."),
    (3, "The ICAO location identifier of Afonso Pena International Airport is SBCT."),
    (5, "Al-Taqaddum Air Base is in Fallujah."),
    (6, "Al Taqaddum Air Base has a runway that is 3684 metres long."),
    (7, "Alderney Airport."),
    (38, "The 11th Mississippi Infantry Monument was built in 2000."),  # 6 references: the first 3 count
    (42, 'The Baku Turkish Martyrs\' Memorial is called "Türk Şehitleri Anıtı" in its native language.'),
    (971, "Aaron S. Daggett received the Purple Heart."),
    (972, "Aaron S Daggett fought in the Battle of Mine Run."),
    (973, "Ab Klink was born in Stellendam in the Netherlands."),
    (974, "Abdul Rahman Ya'kub was in office while Tuanku Bujang Tuanku Othman was the Vice President."),
    (975, "ABDUL TAIB MAHMUD IS A MEMBER OF PARTI BUMIPUTERA SARAWAK"),
    (977, "Abdulsalami Abubakar stopped being active on 29 May 1999."),  # 1 reference
    (978, "Minna is the birthplace of Abdulsalami Abubakar and Abdulsalami Abubakar was born there."),
]
# Computed once with the official tools as Yale-LILY/dart evaluation/ runs them (its copy of the WebNLG
# challenge's evaluation.py file preparation, then `multi-bleu.perl -lc` with 3 reference files,
# `java -jar meteor-1.5.jar HYP REFS -l en -norm -r 3`, `java -jar tercom.7.25.jar -h HYP -r REFS`), per category.
WEBNLG_OFFICIAL = {
    "all": {"bleu": 64.66, "meteor": 0.48514237199799626, "ter": 0.28640776699029125},
    "seen": {"bleu": 63.12, "meteor": 0.48371843527730024, "ter": 0.28301886792452835},
    "unseen": {"bleu": 65.03, "meteor": 0.488284501226015, "ter": 0.291497975708502},
}

# DART v1.1.1 test inputs (index into the 5,097) with hand-written outputs.
DART_FIXED = [
    (0, "Jeff Daniels appeared in the Hawaii Five-O episode The Flight of the Jewels."),
    (1, "Jeff Daniels played Jed Jenkins in American Playhouse in 1982."),
    (2, "In 1991 Jeff Daniels hosted Saturday Night Live."),
    (5, "Yoshifumi Miyamoto finished ninth in 1:02:38."),
    (7, "The McDonald's WPGA Championship took place on 9 Aug 1998."),
    (9, "The to par was -3 when the winning score was 74-67-71-73=285."),
    (12, "The Australian Open in Melbourne, Australia was held on January 31, 1994."),
    (22, "GTA Motor Competición won the Superleague Formula race at Donington Park on August 31, 2008."),
    (51, "Mandy Patinkin played Joseph Papp in Piñero (2001)."),
    (501, "Aaron S. Daggett fought at the Battle of Mine Run."),
    (505, "SULAIMAN ABDUL RAHMAN TAIB SUCCEEDED ABDUL TAIB MAHMUD."),
    (510, "Abner W. Sibal died in Alexandria."),
    (514, "Adolf Schärf was born in Mikulov, Czech Republic."),
    (515, "Adonis Georgiadis served while Antonis Samaras was Prime Minister."),
]
# Computed once as Yale-LILY/dart evaluation/run_eval_on_dart.sh does: these entries' lines of its
# dart_reference/all-delex-reference{0,1,2}.lex, the outputs lowercased and split as LoRA's gpt2_decode.py
# (--lower --tokenize), prepare_files.py, multi-bleu.perl, METEOR 1.5 `-l en -norm -r 8`, tercom 0.7.25.
DART_OFFICIAL = {"bleu": 51.86, "meteor": 0.4401035893725683, "ter": 0.3447684391080617}


@pytest.fixture(scope="module")
def meteor():
    """One METEOR process for the module: it spends ~10 s loading its paraphrase table."""
    m = N.Meteor()
    yield m
    m.close()


def entries(task: str, split: str) -> list[dict]:
    require_data()
    return load_split(compose_cfg([f"task={task}"]).task, split)[0]


@needs_java
def test_e2e_matches_the_official_scorer(meteor):
    dev = entries("e2e", "validation")
    hyps, refs = [h for _, h in E2E_FIXED], [dev[i]["references"] for i, _ in E2E_FIXED]
    got = N.score("e2e", hyps, refs, meteor).values
    for name in ("bleu", "meteor", "rouge_l"):  # on peftbench's 0-100 scale; the scorer's is 0-1
        got[name] /= 100
    for name in ("bleu", "nist", "rouge_l", "cider"):
        assert got[name] == pytest.approx(E2E_OFFICIAL[name], abs=0.01)
        assert round(got[name], 4) == E2E_OFFICIAL[name]  # in fact equal at the printed precision
    assert got["meteor"] == pytest.approx(E2E_OFFICIAL["meteor"], abs=METEOR_TOLERANCE)


@needs_java
def test_webnlg_matches_the_official_scripts_seen_unseen_all(meteor):
    test = entries("webnlg", "test")
    hyps, rows = [h for _, h in WEBNLG_FIXED], [test[i] for i, _ in WEBNLG_FIXED]
    assert [r["category"] for r in rows].count("unseen") == 7
    for cat, official in WEBNLG_OFFICIAL.items():
        idx = [k for k, r in enumerate(rows) if cat == "all" or r["category"] == cat]
        got = N.score("webnlg", [hyps[k] for k in idx], [rows[k]["references"] for k in idx], meteor).values
        assert got["bleu"] == pytest.approx(official["bleu"], abs=0.005)  # multi-bleu prints 2 decimals
        assert got["meteor"] == pytest.approx(official["meteor"], abs=1e-9)
        assert got["ter"] == pytest.approx(official["ter"], abs=1e-9)


@needs_java
def test_dart_matches_the_official_scripts(meteor):
    test = entries("dart", "test")
    hyps, refs = [h for _, h in DART_FIXED], [test[i]["references"] for i, _ in DART_FIXED]
    got = N.score("dart", hyps, refs, meteor)
    assert got.values["bleu"] == pytest.approx(DART_OFFICIAL["bleu"], abs=0.005)
    assert got.values["meteor"] == pytest.approx(DART_OFFICIAL["meteor"], abs=1e-9)
    assert got.values["ter"] == pytest.approx(DART_OFFICIAL["ter"], abs=1e-9)


def test_bleu_nist_by_hand():
    # one sentence equal to its reference: every n-gram matches, no brevity penalty
    bleu, nist = N.mteval_bleu_nist(["the cat sat on the mat ."], [["The cat sat on the mat."]])
    assert bleu == pytest.approx(1.0)
    assert N.multi_bleu(["a b c d"], [["a b c d", ""]], lowercase=False) == pytest.approx(100.0)
    # multi-bleu: no smoothing, so no 4-gram match gives 0; its padding line (length 0) can be the closest
    assert N.multi_bleu(["a b c x"], [["a b c d"]], lowercase=False) == 0.0
    assert N.ter(["a b c"], [["a b c d", "x y"]]) == pytest.approx(1 / 3)  # 1 insertion / mean length 3
    with pytest.raises(UserError, match="2 outputs but 1 reference sets"):
        N.score("e2e", ["a", "b"], [["a"]])


@pytest.mark.parametrize(
    "task,split,n_inputs,n_refs",
    [
        ("e2e", "validation", 547, 4672),
        ("e2e", "test", 630, 4693),
        (
            "webnlg",
            "validation",
            871,
            2258,
        ),  # comment="good" lexicalisations (2,268 in all; 1 input has none)
        ("webnlg", "test", 1862, 4928),
        ("dart", "validation", 2768, 6980),
        ("dart", "test", 5097, 12552),
    ],
)
def test_official_files_give_one_entry_per_input(task, split, n_inputs, n_refs):
    rows = entries(task, split)
    assert (len(rows), sum(len(r["references"]) for r in rows)) == (n_inputs, n_refs)
    assert all(r["target"] == r["references"][0] and r["source"] for r in rows)


def test_linearisations_as_prefix_tuning_and_lora():
    assert (
        entries("e2e", "validation")[0]["source"]
        == "name : Alimentum | area : city centre | family friendly : no"
    )
    web = entries("webnlg", "test")
    assert web[0]["source"] == "Abilene_Regional_Airport : cityServed : Abilene,_Texas"
    assert (web[0]["category"], web[971]["category"]) == ("seen", "unseen")
    assert sum(r["category"] == "unseen" for r in web) == 891
    dart = entries("dart", "validation")[0]
    assert (
        dart["source"]
        == "Mars Hill College : joined : 1973 | Mars Hill College : location : Mars Hill, North Carolina"
    )


def test_e2e_trains_on_one_row_per_reference(compose):
    require_data()
    data = load_task(compose("task=e2e").task, seed=0)
    assert (data.kind, len(data.train), len(data.validation)) == ("generation", 42061, 547)
    assert len({r["source"] for r in data.train}) == 4862  # distinct MRs
    assert data.train[0]["target"] == data.train[0]["references"][0]
    assert data.train[1]["source"] == data.train[0]["source"] != data.train[1]["target"]


def test_missing_dart_train_is_one_line_naming_the_file_and_the_hub(compose):
    require_data()
    with pytest.raises(UserError) as e:
        load_task(compose("task=dart").task, seed=0)
    msg = str(e.value)
    assert "\n" not in msg and "dart-v1.1.1-full-train.json" in msg and "hub dataset Yale-LILY/dart" in msg


def test_score_verb_without_java_reports_meteor_unavailable(tmp_path, capsys, monkeypatch):
    require_data()
    monkeypatch.setattr(N, "java_missing", lambda: "java not found on PATH")
    dev = entries("e2e", "validation")
    preds = tmp_path / "out.txt"
    preds.write_text("".join(r["references"][0] + "\n" for r in dev))
    out = tmp_path / "scores.json"
    assert main(["score", "task=e2e", f"predictions={preds}", "split=validation", f"out={out}"]) == 0
    assert "meteor unavailable: java not found" in capsys.readouterr().out
    scores = json.loads(out.read_text())["scores"]["all"]
    assert scores["meteor"] is None and scores["unavailable"]["meteor"] == "java not found on PATH"
    assert scores["bleu"] == pytest.approx(100.0) and scores["nist"] > 10


def test_dart_model_metrics_are_unavailable_with_a_reason_never_zero(monkeypatch):
    monkeypatch.setattr(N, "java_missing", lambda: "java not found on PATH")
    s = N.score("dart", ["a b c"], [["a b c"]])
    assert s.values["bleurt"] is None and s.values["moverscore"] is None and s.values["bertscore"] is None
    assert set(s.unavailable) >= {"bertscore", "bleurt", "moverscore", "meteor"}
    assert s.values["bleu"] == pytest.approx(0.0)  # 3 words: no 4-gram at all, multi-bleu gives 0


@pytest.mark.parametrize(
    "args,expected",
    [
        (
            ["task=e2x", "predictions=x"],
            "unknown task 'e2x' (did you mean 'e2e'?); choose from: dart, e2e, squad, webnlg, xsum",
        ),
        (
            ["task=rte", "predictions=x"],
            "task rte is not a generation task; choose from: dart, e2e, squad, webnlg, xsum",
        ),
        (["task=e2e"], "missing predictions=..."),
        (["task=e2e", "preds=x"], "bad argument 'preds=x'"),
    ],
)
def test_score_bad_input_is_one_line(args, expected, capsys):
    assert main(["score", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and expected in err


def test_score_names_a_predictions_file_that_is_not_utf8(tmp_path, capsys):
    preds = tmp_path / "out.txt"
    preds.write_bytes(b"caf\xe9 in latin-1\n")
    assert main(["score", "task=e2e", f"predictions={preds}"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{preds}: not UTF-8 text (byte 0xe9" in err and "\n" not in err


def test_score_says_expected_and_got_line_counts(tmp_path, capsys):
    require_data()
    preds = tmp_path / "out.txt"
    preds.write_text("one line\ntwo lines\n")
    assert main(["score", "task=e2e", f"predictions={preds}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "has 2 lines but e2e test has 630 distinct inputs: expected 630" in err


def test_generation_metrics_are_in_the_registry(monkeypatch):
    monkeypatch.setattr(N, "java_missing", lambda: "java not found on PATH")
    assert not M.higher_is_better("ter") and M.higher_is_better("bleu")
    # per-category and per-transfer-set copies keep their metric's direction
    assert not M.higher_is_better("ter_unseen") and M.higher_is_better("bleu_seen")
    assert M.higher_is_better("f1_bioasq") and M.higher_is_better("em_re") and M.higher_is_better("rouge_l")
    with pytest.raises(UserError, match="unknown metric 'blue_seen'"):
        M.higher_is_better("blue_seen")
    got = M.compute(["bleu", "nist"], ["the cat sat on the mat"], [["the cat sat on the mat"]], scorer="e2e")
    assert got["bleu"] == pytest.approx(100.0)
