"""Why merged LoRA and IA3 add no inference latency (LoRA paper, Hu et al. 2021, Sec. 4.1): after `finish()`
the model that runs inference is the base architecture itself, module for module and shape for shape, while
bottleneck adapters add layers to it (Sec. 3, Table 1). Structure only: no timing is asserted here."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_latency.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_latency", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def layout(model: torch.nn.Module) -> tuple[list, list]:
    """Every module's name and type, every parameter's name and shape."""
    modules = [(n, type(m).__name__) for n, m in model.named_modules()]
    params = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    return modules, params


def variant(bench, label: str):
    return next(v for v in bench.VARIANTS if v.label == label)


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-roberta", "tiny-t5"])  # our fused modules; peft's
def test_merged_lora_and_ia3_are_the_base_architecture_adapters_are_not(bench, model):
    base = bench.build_base(model)
    n_base = sum(p.numel() for p in base.parameters())
    for label in ("lora merged", "ia3 merged"):
        merged = bench.build_variant(base, variant(bench, label), model)
        assert layout(merged) == layout(base), label
        assert sum(p.numel() for p in merged.parameters()) == n_base, label
    for label, per_block in (("adapter_houlsby m=64", 2), ("adapter_pfeiffer m=48", 1)):
        adapted = bench.build_variant(base, variant(bench, label), model)
        wrapped = [m for m in adapted.modules() if type(m).__name__ == "WithAdapter"]
        blocks = base.config.get_text_config().num_hidden_layers * (
            2 if base.config.is_encoder_decoder else 1
        )
        assert len(wrapped) == per_block * blocks, label
        assert sum(p.numel() for p in adapted.parameters()) > n_base, label
    unmerged = bench.build_variant(base, variant(bench, "lora unmerged"), model)
    assert layout(unmerged) != layout(base)


def test_latency_script_prints_every_variant(bench, capsys):
    threads = torch.get_num_threads()
    try:  # one thread: two wait on each other on a busy 2-core machine (~100 ms per tiny forward)
        bench.main(
            [
                "--model",
                "tiny-gpt2",
                "--threads",
                "1",
                "--repeats",
                "2",
                "--batch-sizes",
                "1,2",
                "--seq-len",
                "8",
            ]
        )
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    for v in bench.VARIANTS:
        assert f"| {v.label} |" in out
    assert "| base | 0 | 0 |" in out and "b=2 L=8 ms" in out
