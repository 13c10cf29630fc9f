#!/usr/bin/env bash
# The GPU benchmark on a fresh CUDA machine, from a checkout:
#   benchmarks/gpu_run.sh [WHEEL_DIR] [-- extra options for `python -m benchmarks gpu`]
# Installs torch's CUDA build (from PyTorch's CUDA index, or from WHEEL_DIR with no network) and the project
# with the pinned versions into a virtual environment, then runs `python -m benchmarks gpu --device cuda` and
# writes benchmarks/results/gpu.json.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS="${1:-}"
[ "$WHEELS" = "--" ] && WHEELS=""
if [ -n "$WHEELS" ]; then shift; fi
[ "${1:-}" = "--" ] && shift
VENV="${RAY_VLM_GPU_VENV:-/tmp/ray-vlm-gpu-venv}"
PY="${PYTHON:-python3}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
"$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q)
if [ -n "$WHEELS" ]; then
  PIP+=(--no-index --find-links "$WHEELS")
  "${PIP[@]}" torch==2.13.0
else
  "${PIP[@]}" torch==2.13.0 --index-url "${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cu128}"
fi
"${PIP[@]}" -c constraints.txt -e '.[bench]'
"$VENV/bin/python" -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA device'; print(torch.__version__, torch.cuda.get_device_name(0))"
"$VENV/bin/python" -m benchmarks gpu --device cuda --out benchmarks/results/gpu.json "$@"
