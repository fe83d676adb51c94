#!/usr/bin/env bash
# The GPU checks of issue #17 as one command, for a machine with a CUDA device (budget: under 8 minutes on an
# H200). Never run on a CPU-only machine: it stops at once there.
#
#   bench/gpu_check.sh            # PYTHON=... to choose the interpreter (default: python)
#
# 1. tests/test_triton.py on the GPU (the interpreter tests of CI, now on CUDA tensors, plus the gpu-marked
#    long-prompt / head-64 checks) and every other gpu-marked test in tests/;
# 2. bench/gpu.py: prefill T=4096 and decode B=1/64/256 for random 0.1B, 1.5B and 7.2B shapes in fp16, each
#    next to its weight-read bound, through the triton and chunked WKV backends, and the WKV kernels alone
#    (with flash-linear-attention's chunk_rwkv7 as a column when fla is installed).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
"$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "bench/gpu_check.sh: no CUDA device")'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
status=0
echo "== tests (GPU)"
timeout 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_triton.py || status=1
rc=0; timeout 90 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests --ignore=tests/test_triton.py || rc=$?
[ "$rc" = 0 ] || [ "$rc" = 5 ] || status=1           # 5: no other gpu-marked test exists yet
echo "== benchmark"
timeout 300 "$PY" -m bench.gpu --shapes 0.1b,1.5b,7.2b --dtype fp16 --prefill 4096 --batches 1,64,256 \
    --backends triton,chunked || status=1
exit $status
