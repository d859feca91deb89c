#!/usr/bin/env bash
# GPU check: a short sharded SFT + SDFT run of SmolLM2-135M on this machine's NVIDIA GPUs,
# vLLM rollouts, vLLM's NCCL (or, on one GPU, CUDA IPC) weight transfer; prints timings.
# Needs the project installed with CUDA builds of torch and vLLM and the smollm2 extra
# (`PYTHON=/path/to/python` to pick the interpreter). See benchmarks/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
PYTHONPATH=platform${PYTHONPATH:+:$PYTHONPATH} exec "$PYTHON" benchmarks/gpu_check.py "$@"
