"""The config schema (peftbench/schema.py): every key of every option is declared, and for every declared key
values of the wrong type or out of range, drawn by hypothesis from the key's own declaration, end in exit 2
and one line that names the key: no traceback, no record, no lock."""

from __future__ import annotations

import functools
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peftbench.cli import main
from peftbench.config import compose
from peftbench.paths import group_options
from peftbench.schema import GROUP_FIELDS, TOP, Field, check_values, method_fields


@functools.cache
def keys() -> tuple[tuple[tuple[str, ...], str, Field], ...]:
    """(context overrides, dotted key, field) for every key the schema declares: top-level and train keys on
    the default config, a model / task key with the first option that has it, a method's keys with the first
    option of its module; the declared keys of a mapping (train.loss.lm, task.decode.num_beams) too."""
    out: dict[str, tuple[tuple[str, ...], str, Field]] = {}

    def add(context: tuple[str, ...], where: str, f: Field) -> None:
        out.setdefault(where, (context, where, f))
        for sub, sf in (f.fields or {}).items():  # a key of a mapping no YAML sets is added too
            add(context, f"{where}.{sub}", Field(**{**sf.__dict__, "added": sf.added or f.added}))

    for key, f in TOP.items():
        add((), key, f)
    for group, fields in GROUP_FIELDS.items():
        for key, f in fields.items():
            if group == "train" or f.added:  # every config has it, or none: the override adds it (+key=)
                add((), f"{group}.{key}", f)
        if group == "train":
            continue
        for option in group_options(group):
            node = compose([f"{group}={option}"])[group]
            for key in node.keys():
                add((f"{group}={option}",), f"{group}.{key}", fields[key])
    for option in group_options("method"):
        cfg = compose([f"method={option}"])
        for key, f in method_fields(cfg.method).items():
            add((f"method={option}",), f"method.{key}", f)
    return tuple(out.values())


def test_every_key_of_every_option_is_declared_and_its_value_fits():
    """Every option of every group composes to keys the schema declares, with values that fit it; and every
    declared key is used by some option (no dead declarations)."""
    seen = set()
    for group in ("method", "model", "task"):
        for option in group_options(group):
            seen |= set(check_values(compose([f"{group}={option}"])))
    declared = {k for k, f in TOP.items() if not f.added} | {
        f"{g}.{k}" for g, f in GROUP_FIELDS.items() for k in f if not f[k].added
    }
    declared |= {where for _, where, _ in keys() if where.startswith("method.")}
    assert declared - seen == set(), "declared but in no option"
    # every key, nested ones too, gets values of another type; the ranged ones out-of-range values too
    assert {w for _, w, _, kind in cases() if kind == "type"} == {w for _, w, _ in keys()} >= declared


WORD = st.from_regex(r"[a-z][a-z_]{0,7}", fullmatch=True).filter(
    lambda w: w not in {"true", "false", "null", "nan", "inf", "epoch"}
)
FRACTION = st.floats(min_value=0.01, max_value=1e6, allow_nan=False).filter(lambda x: not x.is_integer())


def render(value) -> str:
    """A value as an override's right-hand side (Hydra's grammar)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ",".join(render(v) for v in value) + "]"
    if value == "":
        return "''"
    return str(value) if not isinstance(value, float) else repr(value)


def wrong_type(f: Field) -> st.SearchStrategy:
    """Values of another type than the field's."""
    others = {
        "int": st.one_of(WORD, FRACTION, st.booleans(), st.just([1])),
        "number": st.one_of(WORD, st.booleans(), st.just([1.0])),
        "bool": st.one_of(WORD, st.integers(-5, 5), FRACTION),
        "text": st.one_of(st.integers(), FRACTION, st.booleans(), st.just([]), st.just("")),
        "string": st.one_of(st.integers(), st.booleans(), st.just([])),
        "choice": st.one_of(WORD.filter(lambda w: w not in f.choices), st.integers(100, 1000)),
        "list": st.one_of(st.integers(), WORD),
        "map": st.one_of(st.integers(), WORD),
        "target": st.one_of(WORD, st.just("no_such_module.apply"), st.integers()),
    }[f.kind]
    if f.kind == "list" and f.item is not None:
        others = st.one_of(others, st.lists(wrong_type(f.item), min_size=1, max_size=3))
    if f.other is not None:  # eval_every: "epoch" or a number of steps
        others = others.filter(lambda v: f.other.problem(v) is not None)
    return others


def out_of_range(f: Field) -> st.SearchStrategy | None:
    """Values of the field's type outside its range (None: it has no range)."""
    parts = []
    if f.kind in ("int", "number"):
        step = 1 if f.kind == "int" else 1e-3
        if f.low is not None:
            top = f.low if f.open_low else f.low - step
            parts.append(
                st.integers(max_value=int(math.floor(top)))
                if f.kind == "int"
                else st.floats(max_value=top, allow_nan=False, allow_infinity=False, min_value=-1e9)
            )
        if f.high is not None:
            bottom = f.high if f.open_high else f.high + step
            parts.append(
                st.integers(min_value=int(math.ceil(bottom)))
                if f.kind == "int"
                else st.floats(min_value=bottom, allow_nan=False, allow_infinity=False, max_value=1e9)
            )
        parts.append(
            st.sampled_from([float("inf"), float("-inf"), float("nan")])
            if f.kind == "number"
            else st.nothing()
        )
    if f.kind == "list" and f.length is not None:
        parts.append(st.integers(0, 5).filter(lambda n: n != f.length).map(lambda n: [0.5] * n))
    if not f.null:
        parts.append(st.none())
    return st.one_of(*parts) if parts else None


def cases() -> list[tuple[tuple[str, ...], str, Field, str]]:
    """Each key with each kind of bad value it can take: of another type, and (where it has one) out of range."""
    return [(c, w, f, kind) for c, w, f in keys() for kind in ("type", "range") if bad(f, kind) is not None]


def bad(f: Field, kind: str) -> st.SearchStrategy | None:
    return wrong_type(f) if kind == "type" else out_of_range(f)


@pytest.mark.parametrize("context,where,field,kind", cases(), ids=[f"{c[1]}-{c[3]}" for c in cases()])
@settings(
    max_examples=2,
    derandomize=True,  # the same values on every machine: a CI failure reproduces
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
@given(data=st.data())
def test_a_bad_value_of_any_key_is_one_line_naming_it(
    tmp_path, monkeypatch, capsys, context, where, field, kind, data
):
    results = tmp_path / "results"
    monkeypatch.setenv("PEFTBENCH_RESULTS_DIR", str(results))
    monkeypatch.setenv("PEFTBENCH_LOG_DIR", str(tmp_path / "logs"))
    value = data.draw(bad(field, kind), label=where)
    plus = "+" if field.added else ""  # a key no YAML sets is added
    code = main(["train", *context, f"{plus}{where}={render(value)}"])
    err = capsys.readouterr().err.strip()
    assert code == 2, (value, err)
    assert where in err and "\n" not in err and "Traceback" not in err, err
    assert not results.exists() or not any(results.rglob("*")), "a record or lock was written"
