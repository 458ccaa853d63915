#!/usr/bin/env bash
# The single GPU entry point: install, run the GPU tests, benchmark naive vs torch vs triton.
# Meant for a machine with a CUDA device (an H200 in this project) and no network; stays under
# 8 minutes there. Without a CUDA device it prints a skip and exits 0.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "gpu_check: ERROR - $PY cannot import torch"; exit 1
fi
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: SKIPPED - torch sees no CUDA device (torch.cuda.is_available() is False); nothing to check on this machine."
  exit 0
fi
status=0
"$PY" -m icon_kernels
"$PY" -m pip install -q --no-build-isolation --no-deps -e . || exit 1
timeout 240 "$PY" -m pytest -q -x tests/test_triton_gpu.py tests/test_torch_backend_cuda.py \
  tests/test_triton_vs_reference.py tests/test_ops.py || status=1
timeout 300 "$PY" bench/gpu_bench.py ${OUT:+--out "$OUT"} || status=1
exit $status
