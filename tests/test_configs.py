"""Every option of every config group composes and passes validation (as lightning-hydra-template tests its
configs): a new YAML in configs/<group>/ is tested here with no test edit. An option is checked with the
defaults of the other groups, or else with the first partner that fits it (a decoder for a generation task,
the prompt format for in-context learning); its description is one line."""

import pytest

from peftbench.config import compose, load_option
from peftbench.errors import UserError
from peftbench.paths import group_options
from peftbench.validate import validate

PARTNERS = (
    [],
    ["model=tiny-gpt2"],
    ["model=tiny-t5"],
    ["task.format=prompt"],
    ["task.format=prompt", "model=tiny-t5"],
    ["method=full"],
    ["method=full", "model=tiny-gpt2"],
)
OPTIONS = [(g, o) for g in ("method", "model", "task", "train") for o in group_options(g)]


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_and_validates(group, option):
    errors = []
    for partner in PARTNERS:
        if any(p.startswith(f"{group}=") for p in partner):
            continue
        try:
            cfg = compose([f"{group}={option}", *partner])
            validate(cfg)
        except UserError as e:
            assert "\n" not in str(e)  # a refusal is one line
            errors.append(f"{partner}: {e}")
            continue
        assert cfg[group].get("name", option) in (option, cfg[group].get("name"))
        break
    else:
        pytest.fail(f"{group}={option} validates with no partner: " + " | ".join(errors))
    description = load_option(group, option).get("description")
    assert group == "train" or (description and "\n" not in description)
