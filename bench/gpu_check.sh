#!/usr/bin/env bash
# The single GPU entry point: build (with the CUDA kernels), run the GPU tests, benchmark naive vs
# naive+compile vs torch vs triton vs cuda. Meant for a machine with a CUDA device (an H200 in this
# project) and no network; sized to stay under 8 minutes there. Without a CUDA device it prints a skip and exits 0.
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
[ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ] && export CUDA_HOME=/usr/local/cuda
arch=$("$PY" -c "import torch; p = torch.cuda.get_device_capability(); print(f'{p[0]}.{p[1]}' + ('a' if p[0] == 9 else ''))")
status=0
start=$(date +%s)
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch} MAX_JOBS=${MAX_JOBS:-16} \
  "$PY" -m pip install -q --no-build-isolation --no-deps -e . || exit 1
echo "gpu_check: build took $(( $(date +%s) - start )) s for arch $arch"
"$PY" -m icon_kernels
# Tests: one Triton config (every autotune miss would compile all configs) and a representative
# subset of the interpreter matrix, which CI already runs in full on CPU.
ICON_KERNELS_TRITON_AUTOTUNE=0 timeout 300 "$PY" -m pytest -q -x \
  tests/test_cuda_build.py tests/test_triton_gpu.py tests/test_torch_backend_cuda.py \
  tests/test_cuda_vs_reference.py tests/test_ops.py \
  "tests/test_triton_vs_reference.py::test_every_kernel_target_and_option" -k "not rect" \
  || status=1
# compute-sanitizer on a small cuda-backend run (every target, fp32 + bf16, fwd + bwd)
SAN=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
if [ -x "$SAN" ]; then
  for tool in memcheck racecheck; do
    timeout 150 "$SAN" --tool $tool --error-exitcode 9 "$PY" bench/cuda_sanitizer_case.py \
      && echo "gpu_check: compute-sanitizer $tool clean" || { echo "gpu_check: compute-sanitizer $tool FAILED"; status=1; }
  done
else
  echo "gpu_check: compute-sanitizer not found; sanitizer step not run"
fi
# The GPU part of the benchmark (bench/run_bench.py --device cuda): bf16 + fp32, naive, compiled,
# torch, triton, cuda; table, CSV, JSON (and plots when matplotlib is there) in $OUT.
timeout 240 "$PY" bench/run_bench.py --device cuda --deadline 200 \
  --results-dir "${OUT:-bench/results}" || status=1
exit $status
