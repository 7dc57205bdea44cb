#!/usr/bin/env bash
# One-layer timing of the whole 7B path on a GPU (see docs/7b-path.md). Run from anywhere:
#   bash bench/gpu_check.sh                       # Mistral-sized layer, bf16, CUDA (≈ 1-3 min on an H200)
#   bash bench/gpu_check.sh --tiny --device cpu   # toy sizes on CPU (a smoke test of the script, < 1 min)
#   GPU_CHECK_VARIANTS=device bash bench/gpu_check.sh   # only the first configuration
# Extra arguments go to bench/gpu_check.py (e.g. --layers 2, --json, --heal-tokens 16384).
# 1. model on the GPU: calibrate, decompose (whitened keep 0.8), heal, evaluate; one table with the
#    measured and the extrapolated 32-layer seconds and the peak memory of every phase;
# 2. (GPU_CHECK_VARIANTS=both, the default, and only on CUDA) the model in CPU memory with one layer at a
#    time on the GPU, as for a 7B teacher on a 24 GB card: compression only (heal and eval compute the same
#    thing as in 1 once the model is on the GPU).
# GPU_CHECK_VARIANTS: both (default) | device | offload.
set -euo pipefail
cd "$(dirname "$0")/.."
variants="${GPU_CHECK_VARIANTS:-both}"
case "$variants" in both|device|offload) ;; *) echo "GPU_CHECK_VARIANTS must be both, device or offload" >&2; exit 2;; esac
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
fi
cuda=$(python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available(), file=__import__('sys').stderr); print(int(torch.cuda.is_available()))")
on_cpu=0
prev=""
for a in "$@"; do
  if { [ "$prev" = "--device" ] && [ "$a" = "cpu" ]; } || [ "$a" = "--device=cpu" ]; then on_cpu=1; fi
  prev="$a"
done
[ "$cuda" = "1" ] || on_cpu=1
if [ "$variants" != "offload" ]; then
  echo "== model on the compute device: calibrate, decompose, heal, evaluate =="
  python bench/gpu_check.py --layers 1 "$@"
fi
if [ "$variants" != "device" ]; then
  if [ "$on_cpu" = "1" ]; then
    echo "== model in CPU memory, one layer at a time on the compute device: skipped (the compute device is the CPU) =="
  else
    echo "== model in CPU memory, one layer at a time on the compute device (compression only) =="
    python bench/gpu_check.py --layers 1 --teacher-on cpu --phases compress "$@"
  fi
fi
