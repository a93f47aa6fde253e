"""Run in a fresh process by tests/test_methods.py: rebuild each base model from its model config (same random
init: load_model seeds torch with model.init_seed), load the saved adapter with peft alone
(`PeftModel.from_pretrained`), and save the logits on the saved batch.

    echo '[{"model": "cfg.yaml", "adapter": "dir", "batch": "b.pt", "out": "logits.pt"}]' | \\
        python tests/peft_reload.py THREADS
"""

import json
import sys

import torch
from omegaconf import OmegaConf
from peft import PeftModel

from peftbench.models import load_model


def reload_logits(job: dict) -> torch.Tensor:
    base, _ = load_model(OmegaConf.load(job["model"]), "classification", 2)
    model = PeftModel.from_pretrained(base, job["adapter"]).eval()
    batch = torch.load(job["batch"])
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def main(threads: str) -> None:
    torch.set_num_threads(int(threads))  # the saving process's thread count: the same reduction order
    for job in json.loads(sys.stdin.read()):  # read after the imports: the caller writes when it is ready
        torch.save(reload_logits(job), job["out"])


if __name__ == "__main__":
    main(*sys.argv[1:])
