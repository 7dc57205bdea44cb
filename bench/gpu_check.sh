#!/usr/bin/env bash
# One-layer timing of the 7B path on a GPU (see docs/7b-path.md). Run from anywhere:
#   bash bench/gpu_check.sh            # Mistral-sized layers, bf16, CUDA
#   bash bench/gpu_check.sh --tiny --device cpu   # toy sizes on CPU (a smoke test of the script)
# Prints per-layer seconds, peak GPU memory and the extrapolated 32-layer job, twice: the model on the
# GPU, then the model in CPU memory with one layer at a time moved to the GPU (a 7B teacher on 24 GB).
set -euo pipefail
cd "$(dirname "$0")/.."
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
fi
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
echo "== model on the compute device =="
python bench/gpu_check.py --layers 2 "$@"
echo "== model in CPU memory, one layer at a time on the compute device =="
python bench/gpu_check.py --layers 2 --teacher-on cpu "$@"
