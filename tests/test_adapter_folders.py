"""The adapter folder a run writes (export.save_adapter) never loads with peft to other logits: GPT-2's fused
q|k|v modules (FusedLoRA on the q, v slices of c_attn, FusedIA3 on its k, v) are written as their exact peft
equivalent on the whole c_attn, which PeftModel.from_pretrained loads to our logits; a model peft can only load
in part gets no adapter_config.json, and peftbench's own loader rebuilds it."""

import json

import pytest
import torch
from conftest import perturb, require_data

from peftbench.export import save_adapter
from peftbench.methods import load_trainable
from peftbench.models import family, load_model

SMALL = ["task=rte", "task.max_length=48", "train.max_train_samples=16", "train.max_eval_samples=8"]


def perturbed(compose, *overrides):
    """A prepared run whose trainable tensors moved away from their init (as after training), and a batch."""
    from peftbench.setup import prepare

    cfg = compose(*SMALL, "train.batch_size=8", *overrides)
    setup = prepare(cfg, {})
    perturb(setup.model)
    return cfg, setup, next(iter(setup.eval_loader))


def logits(setup, model, batch):
    with torch.no_grad():
        return setup.fmt.logits(model, batch)


@pytest.mark.parametrize(
    "overrides",
    [
        ["method=lora"],  # the paper's q, v slices of c_attn (FusedLoRA only, no peft layer)
        ["method=lora", "method.targets=[q,v,ffn_out]"],  # FusedLoRA beside peft's LoRA on mlp.c_proj
        ["method=loraplus"],  # LoRA's FusedLoRA under another method module
        ["method=ia3"],  # FusedIA3 on c_attn's k, v beside peft's IA3 on mlp.c_proj
    ],
    ids=["lora-qv", "lora-qv-ffn", "loraplus-qv", "ia3"],
)
def test_gpt2_fused_adapter_loads_with_peft_to_the_same_logits(compose, tmp_path, overrides):
    require_data()
    from peft import PeftModel

    cfg, setup, batch = perturbed(compose, "model=tiny-gpt2", *overrides)
    expected = logits(setup, setup.model, batch)
    folder = tmp_path / "adapter"
    assert save_adapter(setup.model, folder)["format"] == "peft+safetensors"
    config = json.loads((folder / "adapter_config.json").read_text())
    assert "c_attn" in config["target_modules"] and config["modules_to_save"] == ["score"]

    base, _ = load_model(cfg.model, "classification", 2)
    loaded = PeftModel.from_pretrained(base, folder).eval()
    torch.testing.assert_close(logits(setup, loaded, batch), expected, atol=1e-5, rtol=0)
    # the peft equivalent adapts what the paper adapts: LoRA's B is zero on k's rows, IA3 scales q by 1
    d = base.config.n_embd
    for name, p in loaded.named_parameters():
        if "c_attn.lora_B" in name:
            assert (
                p.shape == (3 * d, 2 * cfg.method.r)
                and not p[d : 2 * d].any()
                and p[:d].any()
                and p[2 * d :].any()
            )
        if "c_attn.ia3_l" in name:
            assert p.shape == (3 * d, 1) and torch.equal(p[:d], torch.ones_like(p[:d])) and (p[d:] != 1).all()

    # peftbench's own format beside it rebuilds our modules exactly
    base, _ = load_model(cfg.model, "classification", 2)
    ours = load_trainable(base, folder, family(cfg.model)).eval()
    assert torch.equal(logits(setup, ours, batch), expected)


def test_peft_adapter_folder_is_unchanged(compose, tmp_path):
    """LoRA on separate q / v projections (RoBERTa): peft's folder, nothing of ours beside it."""
    require_data()
    from peft import PeftModel

    cfg, setup, batch = perturbed(compose, "model=tiny-roberta", "method=lora")
    assert save_adapter(setup.model, tmp_path / "adapter")["format"] == "peft"
    assert not (tmp_path / "adapter" / "trainable.safetensors").exists()
    base, _ = load_model(cfg.model, "classification", 2)
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    assert torch.equal(logits(setup, loaded, batch), logits(setup, setup.model, batch))


def test_a_model_peft_would_load_in_part_gets_no_peft_config(compose, tmp_path):
    """peft's LoRA plus a tensor peft knows nothing of (a LayerNorm trained beside it): peft would load the
    folder without it, silently to other logits, so the folder has no adapter_config.json, a README.md says
    how to load it, and that way gives the saved model's logits."""
    require_data()
    cfg, setup, batch = perturbed(compose, "model=tiny-roberta", "method=lora")
    norm = setup.model.get_submodule("base_model.model.roberta.encoder.layer.0.output.LayerNorm")
    with torch.no_grad():
        norm.weight.add_(0.5).requires_grad_(True)
    folder = tmp_path / "adapter"
    assert save_adapter(setup.model, folder)["format"] == "safetensors"
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "method.json", "trainable.safetensors"]
    assert "load_trainable" in (folder / "README.md").read_text()
    base, _ = load_model(cfg.model, "classification", 2)
    loaded = load_trainable(base, folder, family(cfg.model)).eval()
    assert torch.equal(logits(setup, loaded, batch), logits(setup, setup.model, batch))
