"""Parameter counts of the real paper models, built on the meta device (no weights), against the papers'
numbers and the methods' formulas."""

import pytest
import torch

from peftbench.methods import apply_method
from peftbench.models import build_meta, count, family


def counts(compose, *overrides):
    cfg = compose(*overrides)
    fam = family(cfg.model)
    model = apply_method(build_meta(cfg.model, cfg.task.kind, len(cfg.task.labels)), cfg.method, fam)
    return count(model, fam.head), model


def lora_formula(layers: int, d: int, r: int, n_weights: int) -> int:
    """LoRA adds A (r x d) and B (d x r) per adapted d x d weight: 2 d r (Hu et al. 2021, Sec. 4)."""
    return layers * n_weights * 2 * d * r


def test_lora_table2_roberta_base_and_large(compose):
    base, _ = counts(compose, "method=lora", "model=roberta-base")
    large, _ = counts(compose, "method=lora", "model=roberta-large")
    assert base["trainable_without_head"] == 294_912 == lora_formula(12, 768, 8, 2)  # Table 2: 0.3M
    assert large["trainable_without_head"] == 786_432 == lora_formula(24, 1024, 8, 2)  # Table 2: 0.8M


def test_lora_deberta_xxl_r16_is_table2s_4_7m(compose):
    c, _ = counts(compose, "method=lora", "model=deberta-v2-xxlarge", "method.r=16")
    assert c["trainable_without_head"] == 4_718_592 == lora_formula(48, 1536, 16, 2)


@pytest.mark.parametrize("r", [1, 2, 4, 64])
@pytest.mark.parametrize("targets,n", [("[q]", 1), ("[q,v]", 2), ("[q,k,v,o]", 4)])
def test_lora_rank_and_targets_follow_formula(compose, r, targets, n):
    c, _ = counts(compose, "method=lora", "model=roberta-base", f"method.r={r}", f"method.targets={targets}")
    assert c["trainable_without_head"] == lora_formula(12, 768, r, n)


def test_bitfit_roberta_base_is_0_1m(compose):
    c, _ = counts(compose, "method=bitfit", "model=roberta-base")
    # every bias of the 12 layers (q,k,v,o, 2 LayerNorms, FFN in/out) + the embedding LayerNorm
    per_layer = 4 * 768 + 768 + 3072 + 768 + 768
    assert c["trainable_without_head"] == 12 * per_layer + 768 == 102_144  # Table 2: 0.1M


def test_full_ft_roberta_base_125m_and_large_355m(compose):
    base, _ = counts(compose, "method=full", "model=roberta-base")
    large, _ = counts(compose, "method=full", "model=roberta-large")
    assert base["trainable"] == base["total"]
    assert round(base["trainable"] / 1e6) == 125  # Table 2: 125.0M
    assert round(large["trainable"] / 1e6) == 355  # Table 2: 355.0M


def test_ft_top2_trains_two_blocks(compose):
    c, _ = counts(compose, "method=ft_top2", "model=roberta-base")
    block = 4 * (768 * 768 + 768) + 2 * 768 + (768 * 3072 + 3072) + (3072 * 768 + 768) + 2 * 768
    assert c["trainable_without_head"] == 2 * block


def test_gpt2_lora_adapts_q_and_v_slices_of_fused_c_attn_only(compose):
    """peft on c_attn would adapt q, k and v together; the paper adapts q and v (Sec. 7.1)."""
    c, model = counts(compose, "method=lora", "model=gpt2-medium", "method.r=4")
    assert c["trainable_without_head"] == lora_formula(24, 1024, 4, 2)
    from peftbench.methods.lora import FusedLoRA

    fused = [m for m in model.modules() if isinstance(m, FusedLoRA)]
    assert len(fused) == 24 and all(m.slices == [0, 2] for m in fused)


def test_fused_lora_update_leaves_k_slice_untouched():
    from transformers.pytorch_utils import Conv1D

    from peftbench.methods.lora import FusedLoRA

    torch.manual_seed(0)
    base = Conv1D(3 * 16, 16)
    layer = FusedLoRA(base, [0, 2], r=2, alpha=4, dropout=0.0)
    for b in layer.lora_B:
        torch.nn.init.normal_(b)
    x = torch.randn(3, 5, 16)
    delta = layer(x) - base(x)
    assert delta[..., 16:32].abs().max() == 0  # k
    assert delta[..., :16].abs().max() > 0 and delta[..., 32:].abs().max() > 0  # q, v
    expected = layer(x)
    merged = layer.merge()
    assert torch.allclose(merged(x), expected, atol=1e-5)


def test_bitfit_not_applicable_to_t5(compose):
    from peftbench.errors import UserError

    with pytest.raises(UserError, match="no bias terms"):
        counts(compose, "method=bitfit", "model=t5-base")


def test_params_cli_prints_the_paper_numbers(capsys):
    from peftbench.cli import main

    assert main(["params", "method=lora", "model=roberta-base", "--format", "csv"]) == 0
    out = capsys.readouterr().out
    assert 'roberta-base,lora,"294,912"' in out


def test_params_cli_prefix_stored_and_training_counts_beside_lora_r4(capsys):
    """Li & Liang's E2E setting on GPT-2 Medium: the prefix keeps 10 x 24 x 2 x 1024 = 491,520 after the
    MLP is dropped but trains 25,750,016 with it; LoRA r=4 on q, v adds 2 x 24 x 2 x 1024 x 4 = 393,216."""
    from peftbench.cli import main

    assert main(["params", "method=prefix_tuning", "model=gpt2-medium", "--format", "csv"]) == 0
    assert 'gpt2-medium,prefix_tuning,"25,750,016","491,520"' in capsys.readouterr().out
    assert main(["params", "method=lora", "method.r=4", "model=gpt2-medium", "--format", "csv"]) == 0
    assert 'gpt2-medium,lora,"393,216","393,216"' in capsys.readouterr().out
