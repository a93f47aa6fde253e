#!/usr/bin/env bash
# The GPU check (scripts/gpu_check.py): CUDA path end to end in bf16, LoRA / full fine-tuning step time, peak
# memory and MFU at RoBERTa-large and GPT-2-medium dims, decoding throughput, 2-GPU DDP, determinism settings.
# One table, and JSON in results/gpu_check/ (--out DIR). Without CUDA: the dry path, saying what needs a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python scripts/gpu_check.py "$@"
