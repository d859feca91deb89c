#!/usr/bin/env bash
# Create .venv-trl: a separate venv holding TRL, for benchmarks/trl_sdft.py's TRL side.
#
# Run from the repository root, after the project's .venv exists:
#
#     bash benchmarks/setup_trl_venv.sh
#
# The project's own .venv is not touched. torch is pinned to the CPU build first, so pip never
# swaps in a CUDA torch; transformers is pinned to the project's version so both sides of the
# benchmark run the same model code.
set -euo pipefail
cd "$(dirname "$0")/.."

# the project's exact torch build (2.13.0+cpu here: /opt/wheels or, elsewhere, the CPU index
# given as PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu)
TORCH=$(.venv/bin/python -c "import torch; print(torch.__version__)")
TRL=${TRL_VERSION:-1.16.0}
TRANSFORMERS=$(.venv/bin/python -c "import transformers; print(transformers.__version__)")

.venv/bin/python -m venv .venv-trl
echo "*" > .venv-trl/.gitignore  # as Python >= 3.13's venv does: git ignores the whole venv
.venv-trl/bin/pip install --quiet --upgrade pip
.venv-trl/bin/pip install --quiet "torch==$TORCH"
.venv-trl/bin/pip install --quiet "torch==$TORCH" "transformers==$TRANSFORMERS" "trl==$TRL" \
    accelerate datasets
# TRL's extras can pull torchvision/torchaudio builds that break `import transformers`.
.venv-trl/bin/pip uninstall --quiet --yes torchvision torchaudio 2>/dev/null || true
.venv-trl/bin/python -c "import torch, transformers, trl; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'trl', trl.__version__)"
