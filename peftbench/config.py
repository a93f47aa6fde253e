"""Composing configs (Hydra's compose API, the same config tree as `peftbench train`) and checking a sweep's
points; the only module that knows where the config tree is and how overrides read."""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Iterator

from omegaconf import DictConfig, OmegaConf

from peftbench.errors import UserError, choice_error
from peftbench.paths import config_dir, group_options

GROUPS = ("method", "model", "task", "train", "experiment")


def default_jobs() -> int:
    """Parallel runs on one machine (hydra/launcher=parallel): $PEFTBENCH_JOBS, else one per visible GPU,
    else half the CPU cores."""
    if os.environ.get("PEFTBENCH_JOBS"):
        return int(os.environ["PEFTBENCH_JOBS"])
    import torch

    if torch.cuda.is_available():
        return torch.cuda.device_count()
    return max(1, (os.cpu_count() or 2) // 2)


OmegaConf.register_new_resolver("peftbench_jobs", default_jobs, replace=True)

_composing_from = None


def compose(overrides: list[str]) -> DictConfig:
    """The run config of `peftbench train OVERRIDES`, composed outside Hydra's app (validation, params,
    presets, scripts, tests); a bad override is one line."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    global _composing_from
    check_groups(overrides)
    if not GlobalHydra.instance().is_initialized() or _composing_from != config_dir():
        GlobalHydra.instance().clear()
        initialize_config_dir(config_dir=str(config_dir()), version_base="1.3")  # stays set: compose is fast
        _composing_from = config_dir()
    try:
        return hydra_compose("config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        first = str(e).splitlines()[0]
        hint = close_key(overrides, first)
        raise UserError(
            f"bad override in {' '.join(overrides)!r}: {first.rstrip('.') if hint else first}{hint}"
        ) from None


def close_key(overrides: list[str], message: str) -> str:
    """`train.epoch=3` -> " (did you mean train.epochs?)": the keys beside the unknown one, closest first."""
    import difflib

    from hydra import compose as hydra_compose

    m = re.match(r"Could not override '([\w.]+)'", message)
    if not m:
        return ""
    parent, _, name = m.group(1).rpartition(".")
    others = [o for o in overrides if o.partition("=")[0].lstrip("+~") != m.group(1)]
    try:
        node = OmegaConf.select(hydra_compose("config", overrides=others), parent) if parent else None
    except Exception:  # another override is bad too: no hint
        return ""
    keys = list(node.keys()) if isinstance(node, DictConfig) else []
    if name in keys:  # the key exists: the value does not fit it (a mapping with keys it does not have)
        return ""
    close = difflib.get_close_matches(name, keys, n=3, cutoff=0.6)
    if close:
        return f" (did you mean {' or '.join(f'{parent}.{k}' for k in close)}?)"
    return f"; {parent} has: {', '.join(sorted(keys))}" if keys else ""


def check_groups(overrides: list[str]) -> None:
    """`method=lorra` -> unknown method 'lorra' (did you mean 'lora'?); choose from: ..."""
    for o in overrides:
        key, sep, value = o.partition("=")
        key = key.lstrip("+~")
        if sep and key in GROUPS and value not in ("null", ""):
            options = group_options(key)
            if value not in options:
                raise choice_error(key, value, options)


def sweep_points(args: list[str]) -> Iterator[list[str]]:
    """Every point of the sweep, as Hydra's basic sweeper makes them (the product of the swept values), each
    with the fixed overrides: every combination is checked, not only every value."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import Glob, IntervalSweep

    plain = [a for a in args if not a.startswith("-") and not a.startswith("hydra")]
    try:
        parsed = OverridesParser.create().parse_overrides(plain)
    except Exception as e:  # Hydra's grammar errors are already one readable sentence
        raise UserError(f"cannot parse overrides {' '.join(plain)!r}: {str(e).splitlines()[0]}") from None
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    axes = []
    for o in (o for o in parsed if o.is_sweep_override()):
        key = o.get_key_element()
        if isinstance(o.value(), Glob):  # task=glob(raft_*): the group's options that match
            values = o.value().filter(group_options(key.lstrip("+~")))
        elif isinstance(o.value(), IntervalSweep):  # a sweeper's range (Optuna): both its ends are checked
            values = [o.value().start, o.value().end]
        else:
            values = list(o.sweep_string_iterator())
        axes.append([f"{key}={value}" for value in values])
    for point in itertools.product(*axes):
        yield [*fixed, *point]


def load_option(group: str, name: str) -> DictConfig:
    """One option's YAML as written (not composed): its description, its `_target_`."""
    return OmegaConf.load(config_dir() / group / f"{name}.yaml")
