"""Every GLUE / SuperGLUE task reads the official local files with the right sizes and labels; tasks whose
files are missing fail with one clear sentence; malformed files name the file and line."""

import pytest
from conftest import require_data

from peftbench.errors import UserError
from peftbench.tasks import load_task
from peftbench.tasks.classification import format_pairs

# (task, train rows, validation rows, number of labels) as counted in the official releases
LOCAL = [
    ("cola", 8551, 1043, 2),
    ("sst2", 67349, 872, 2),
    (
        "mrpc",
        3667,
        408,
        2,
    ),  # this copy of train.tsv has 3,667 rows (GLUE builds 3,668 from msr_paraphrase_train)
    ("stsb", 5749, 1500, 0),
    ("rte", 2490, 277, 2),
    ("cb", 250, 56, 3),
    ("copa", 400, 100, 2),
    ("superglue_rte", 2490, 277, 2),
    ("wic", 5428, 638, 2),
    ("wsc", 554, 104, 2),
    ("multirc", 27243, 4848, 2),  # answer options; 5,131 / 953 questions
]


@pytest.mark.parametrize("name,n_train,n_val,n_labels", LOCAL)
def test_local_official_files(compose, name, n_train, n_val, n_labels):
    require_data()
    cfg = compose(f"task={name}")
    data = load_task(cfg.task, seed=0)
    assert (len(data.train), len(data.validation)) == (n_train, n_val)
    assert len(data.label_names) == n_labels
    labels = {r["label"] for r in data.train}
    if n_labels:
        assert labels == set(range(n_labels))  # every class present, all mapped to indices
    else:
        assert min(labels) == 0.0 and max(labels) == 5.0
    pairs = format_pairs(cfg.task, data.validation[0])
    assert all(isinstance(a, str) and a for a, _ in pairs)
    assert data.sources["train"].endswith((".tsv", ".jsonl"))


def test_label_mapping_matches_the_hub_order(compose):
    require_data()
    rte = load_task(compose("task=rte").task, seed=0)
    # dev.tsv row 0 is "not_entailment"; the hub's nyu-mll/glue rte gives it label 1
    assert rte.validation[0]["label"] == 1
    cb = load_task(compose("task=cb").task, seed=0)
    assert cb.validation[0]["label"] == 1  # "contradiction" is 1 in aps/super_glue cb


def test_copa_pairs_use_the_connective(compose):
    require_data()
    cfg = compose("task=copa")
    row = load_task(cfg.task, seed=0).validation[0]
    pairs = format_pairs(cfg.task, row)
    assert len(pairs) == 2
    assert pairs[0][0] == "The man turned on the faucet. so"
    assert pairs[1][1] == "Water flowed from the spout."


def test_multirc_groups_by_question(compose):
    require_data()
    cfg = compose("task=multirc")
    rows = load_task(cfg.task, seed=0).validation
    from peftbench.tasks.classification import group_of

    assert len({group_of(cfg.task, r) for r in rows}) == 953


def test_wsc_flattens_target_spans(compose):
    require_data()
    cfg = compose("task=wsc")
    row = load_task(cfg.task, seed=0).validation[0]
    assert format_pairs(cfg.task, row)[0][1] == "him refers to anyone"


@pytest.mark.parametrize(
    "name,missing",
    [
        ("mnli", "glue/MNLI/train.tsv"),
        ("qqp", "glue/QQP/train.tsv"),
        ("qnli", "glue/QNLI/train.tsv"),
        ("boolq", "superglue/BoolQ/train.jsonl"),
    ],
)
def test_missing_split_says_which_file_and_the_hub(compose, name, missing):
    require_data()
    with pytest.raises(UserError) as e:
        load_task(compose(f"task={name}").task, seed=0)
    msg = str(e.value)
    assert missing in msg and "hub" in msg and "HF_HUB_OFFLINE=1" in msg and "\n" not in msg


def test_k_shot_is_seeded_and_balanced(compose):
    require_data()
    cfg = compose("task=rte", "task.n_shot=8", "task.balanced=true")
    a = load_task(cfg.task, seed=1)
    b = load_task(cfg.task, seed=1)
    c = load_task(cfg.task, seed=2)
    assert [r["idx"] for r in a.train] == [r["idx"] for r in b.train] != [r["idx"] for r in c.train]
    assert sorted(r["label"] for r in a.train) == [0] * 8 + [1] * 8
    with pytest.raises(UserError, match="n_shot=5000"):
        load_task(compose("task=rte", "task.n_shot=5000").task, seed=1)


# (task, source, shot seed, file under the data folder): the published few-shot train sets
PUBLISHED = [
    ("rte", "tfew", 42, "t_few_few_shot/rte/32_shot/42_seed.jsonl"),
    ("superglue_rte", "tfew", 1024, "t_few_few_shot/rte/32_shot/1024_seed.jsonl"),
    ("cb", "tfew", 0, "t_few_few_shot/cb/32_shot/0_seed.jsonl"),
    ("sst2", "tfew", 32, "t_few_few_shot/sst2/16_shot/32_seed.jsonl"),
    ("boolq", "fewglue", 0, "superglue/BoolQ/fewglue_32dev/train.jsonl"),  # BoolQ's full train is not here
    ("wic", "fewglue", 5, "superglue/WiC/fewglue_32dev/train.jsonl"),
]


@pytest.mark.parametrize("name,source,seed,rel", PUBLISHED)
def test_published_few_shot_files_give_their_exact_rows(compose, name, source, seed, rel):
    """Row for row the published file (ids, labels, order), whatever the run seed for FewGLUE's one set."""
    import json

    rows = [json.loads(line) for line in require_data(rel).read_text().splitlines() if line.strip()]
    cfg = compose(f"task={name}", f"task.shots_from={source}")
    data = load_task(cfg.task, seed=seed)
    assert len(data.train) == len(rows) == 32
    assert [r["idx"] for r in data.train] == [r["idx"] for r in rows]
    labels = [str(x) for x in cfg.task.labels]
    want = [
        r["label"] if isinstance(r["label"], int) else labels.index(str(r["label"]).lower()) for r in rows
    ]
    assert [r["label"] for r in data.train] == want
    assert data.sources["train"].endswith(rel)


def test_fewglue_dev32_replaces_the_validation_set(compose):
    import json

    rows = [
        json.loads(x) for x in require_data("superglue/CB/fewglue_32dev/dev32.jsonl").read_text().splitlines()
    ]
    data = load_task(compose("task=cb", "task.shots_from=fewglue", "task.shots_dev=true").task, seed=0)
    assert [r["idx"] for r in data.validation] == [r["idx"] for r in rows] and len(rows) == 32
    with pytest.raises(UserError, match="the tfew release of task rte has no dev set"):
        load_task(compose("task=rte", "task.shots_from=tfew", "task.shots_dev=true").task, seed=0)


def test_published_split_errors_name_the_file_and_the_choices(compose):
    require_data()
    with pytest.raises(
        UserError, match=r"7_seed.jsonl \(there: 0_seed.jsonl, .*42_seed.jsonl; set task.shot_seed"
    ):
        load_task(compose("task=rte", "task.shots_from=tfew").task, seed=7)
    with pytest.raises(
        UserError, match="unknown task.shots_from for task rte 'fewglue'.*; choose from: tfew$"
    ):
        load_task(compose("task=rte", "task.shots_from=fewglue").task, seed=0)


def test_max_train_samples_is_a_seeded_subset(compose):
    require_data()
    cfg = compose("task=sst2")
    a = load_task(cfg.task, seed=3, max_train=100)
    assert len(a.train) == 100
    assert [r["idx"] for r in a.train] == [r["idx"] for r in load_task(cfg.task, seed=3, max_train=100).train]


def write(tmp_path, rel, text):
    path = tmp_path / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_malformed_tsv_row_names_file_and_line(compose, tmp_path, monkeypatch):
    write(
        tmp_path,
        "glue/RTE/train.tsv",
        "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\tonly two\n",
    )
    write(tmp_path, "glue/RTE/dev.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n")
    monkeypatch.setenv("PEFTBENCH_DATA_DIR", str(tmp_path))
    with pytest.raises(UserError, match=r"train\.tsv:3: malformed row"):
        load_task(compose("task=rte").task, seed=0)


def test_unknown_label_names_file_line_and_choices(compose, tmp_path, monkeypatch):
    write(
        tmp_path,
        "superglue/CB/train.jsonl",
        '{"premise": "p", "hypothesis": "h", "label": "maybe", "idx": 0}\n',
    )
    write(
        tmp_path,
        "superglue/CB/val.jsonl",
        '{"premise": "p", "hypothesis": "h", "label": "neutral", "idx": 0}\n',
    )
    monkeypatch.setenv("PEFTBENCH_DATA_DIR", str(tmp_path))
    with pytest.raises(UserError, match=r"train\.jsonl:1: unknown label 'maybe'.*entailment"):
        load_task(compose("task=cb").task, seed=0)


def test_missing_data_dir_is_one_clear_line(compose, tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTBENCH_DATA_DIR", str(tmp_path / "nope"))
    with pytest.raises(UserError, match="PEFTBENCH_DATA_DIR=.*nope does not exist"):
        load_task(compose("task=rte").task, seed=0)
