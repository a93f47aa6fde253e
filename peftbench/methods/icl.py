"""In-context learning (Brown et al. 2020, "Language Models are Few-Shot Learners"): nothing trains; the
frozen model reads `method.shots` solved training rows before each input and ranks the answer choices with
its LM head (the prompt format, formats/prompt.py). The demonstrations are drawn here with the run seed and
put in order with `method.order_seed`; contextual calibration (Zhao et al. 2021, "Calibrate Before Use")
divides the choice probabilities by those the same prompt gives a content-free input.
"""

from __future__ import annotations

import random

import torch
from omegaconf import DictConfig
from torch import nn

from peftbench.errors import UserError
from peftbench.formats.prompt_text import encode_prompted
from peftbench.methods import Capabilities, freeze, remember
from peftbench.models import Family
from peftbench.schema import SEED, Bool, Int, ListOf, String

CAN = Capabilities(trains=False, in_params_table=False)
FIELDS = {
    "needs_prompt_format": Bool(),
    "shots": Int(0, doc="k demonstrations"),
    "order_seed": SEED,
    "calibrate": Bool(),
    "content_free": ListOf(String(), doc="content-free inputs of contextual calibration"),
}


def apply(model: nn.Module, cfg: DictConfig, fam: Family) -> nn.Module:
    freeze(model)
    return remember(model, cfg)


def check(cfg: DictConfig, fam: Family, fmt: str) -> None:
    if fmt == "generation":
        raise UserError(
            "method=icl cannot generate: in-context learning ranks answer choices here; it has no generation path"
        )


def format_options(cfg: DictConfig, task, record: dict) -> dict:
    """k solved training rows in front of every input; the train split is then not trained on."""
    demos = demonstrations(task.train, cfg.method, int(cfg.seed))
    task.train = []
    record["demonstrations"] = [d["idx"] for d in demos]
    return {"demos": demos}


def before_evaluate_only(model: nn.Module, fmt, cfg: DictConfig, task, device, record: dict) -> None:
    """Contextual calibration, if asked: p_cf from content-free inputs shaped like the first dev row."""
    if not cfg.method.get("calibrate"):
        return
    prior = content_free_prior(model, fmt, cfg.task, cfg.method, fmt.demos, task.validation[0], device)
    fmt.prior = prior
    record["calibration"] = {"p_cf": [round(float(x), 5) for x in prior]}


def demonstrations(train: list[dict], method_cfg: DictConfig, seed: int) -> list[dict]:
    """k training rows drawn with the run seed, put in the order drawn with method.order_seed (Zhao et al.
    2021 Sec. 3: the same k examples in another order can swing accuracy from near chance to near SOTA)."""
    k = method_cfg.shots
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= len(train):
        raise UserError(f"method.shots={k!r}: choose 0..{len(train)} (the train rows available)")
    picked = random.Random(seed).sample(train, k)
    random.Random(int(method_cfg.order_seed)).shuffle(picked)
    return picked


@torch.no_grad()
def content_free_prior(
    model: torch.nn.Module,
    batcher,
    task_cfg: DictConfig,
    method_cfg: DictConfig,
    demos: list[dict],
    like: dict,
    device: torch.device,
) -> torch.Tensor:
    """p_cf (Zhao et al. 2021 Sec. 5): the choice distribution the prompt gives content-free inputs ("N/A",
    "[MASK]", ""), each put in every text field of a row, averaged over those inputs."""
    prompt = task_cfg.prompt
    if any("{" in c for c in prompt.choices):
        raise UserError(
            f"method.calibrate=true needs fixed answer choices; task {task_cfg.name} builds them per row"
        )
    text_fields = [k for k, v in like.items() if isinstance(v, str)]
    rows = [{**like, **{k: cf for k in text_fields}, "label": 0} for cf in method_cfg.content_free]
    features = encode_prompted(rows, task_cfg, batcher.tokenizer, batcher.kind, demos)
    batch = {k: v.to(device) for k, v in batcher(features).items()}
    was, batcher.prior = batcher.prior, None
    model.eval()
    probs = batcher.logits(model, batch).softmax(-1).mean(0)
    batcher.prior = was
    return probs
