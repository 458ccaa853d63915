#!/usr/bin/env bash
# The single GPU entry point, sized for one 600 s command on the GPU machine (an H200 with 16
# cores, no network; only $OUT and the output's last 12,000 characters come back):
#   build (the CUDA kernels' extension only; none if that fails) -> the GPU test selection in
#   parallel, while the CPU kernels' extension builds in the background for its timings only ->
#   compute-sanitizer on this project's CUDA kernels -> the GPU benchmark.
# Every step runs under its own `timeout -k`; the limits add up to BUDGET_S (540 s), and no step
# may run past HARD_DEADLINE_S (575 s after the start, whatever happened before: a fallback build,
# kill grace periods). Everything is teed to $OUT/gpu_check.log from the first line; pytest writes
# $OUT/pytest.xml, the background build $OUT/cpu_ext_build.log, and the benchmark its CSV/JSON
# after every row (5 files in all, 8 come back).
#
#   bash bench/gpu_check.sh --plan   # no GPU needed: the steps, their limits, the number of GPU
#                                    # tests and of the Triton compiles they trigger (~2.5 min:
#                                    # it runs the selection under the interpreter)
#   bash bench/gpu_check.sh --plan KEYS.json   # the same from keys recorded elsewhere (a path
#                                    # from the repository root): tests/test_gpu_check.py passes
#                                    # those its session recorded while running the selection
#   bash bench/gpu_check.sh          # on a machine without CUDA: prints a skip and exits 0
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -n "${OUT:-}" ] && [ "${1:-}" != "--plan" ]; then
  mkdir -p "$OUT"
  exec > >(tee -a "$OUT/gpu_check.log") 2>&1
fi
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
BUDGET_S=540
HARD_DEADLINE_S=575
export PYTHONUNBUFFERED=1                    # a killed step still shows what it printed
# name:limit in seconds. The build is the CUDA extension alone (setup.py: ICON_KERNELS_NO_CPU_EXT=1):
# one nvcc unit, 98 s for two architectures on the 2-core VM. On 2026-12-04 the GPU machine's
# build of both extensions was still compiling the CPU kernels after 150 s and again after 220 s
# (cpu_loss.cpp, one unit of 422 s on the 2-core VM). The tests' Triton compiles are
# counted by --plan (tests/gpu_selection.py holds their budget; 122 s on 8 workers on 2026-12-04);
# the benchmark also gets whatever the earlier steps left unused.
STEPS="build:180 tests:200 memcheck:40 racecheck:40 bench:80"
FALLBACK_BUILD_S=45                          # only if the build fails; taken from the bench
PYTEST_WORKERS=8
export ICON_KERNELS_GPU_SELECTION=1          # tests/conftest.py keeps tests/gpu_selection.py's tests
export ICON_KERNELS_TRITON_AUTOTUNE=0        # one shape per variant, launched without the autotuner

TEST_FILES=$("$PY" tests/gpu_selection.py --files)

limit_of() { local s; for s in $STEPS; do [ "${s%%:*}" = "$1" ] && echo "${s##*:}"; done; }

plan() {
  local total=0 s
  echo "gpu_check plan (budget ${BUDGET_S} s of wall time on the GPU machine):"
  for s in $STEPS; do
    printf "  step %-10s limit %4d s\n" "${s%%:*}" "${s##*:}"
    total=$((total + ${s##*:}))
  done
  echo "  total            ${total} s (budget ${BUDGET_S} s; no step runs past ${HARD_DEADLINE_S} s)"
  echo "  fallback build   ${FALLBACK_BUILD_S} s, only if the build fails, taken from the bench"
  [ "$total" -le "$BUDGET_S" ] || { echo "gpu_check plan: ERROR - the step limits exceed the budget"; return 1; }
  local collected
  # shellcheck disable=SC2086
  collected=$("$PY" -m pytest --collect-only -q -p no:cacheprovider $TEST_FILES 2>/dev/null | grep -c "::")
  echo "  GPU tests        ${collected} collected here (a GPU adds the cuda-backend cases of test_ops.py)"
  if [ -n "${1:-}" ]; then                   # keys recorded elsewhere
    "$PY" tests/gpu_selection.py --budget-line "$1" "$PYTEST_WORKERS"
    return $?
  fi
  local keys; keys=$(mktemp)
  # shellcheck disable=SC2086
  TRITON_INTERPRET=1 "$PY" tests/compile_keys.py "$keys" -q -p no:cacheprovider $TEST_FILES >/dev/null 2>&1
  "$PY" tests/gpu_selection.py --budget-line "$keys" "$PYTEST_WORKERS"
  local rc=$?
  rm -f "$keys"
  return $rc
}

if [ "${1:-}" = "--plan" ]; then
  plan "${2:-}"
  exit $?
fi
if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "gpu_check: ERROR - $PY cannot import torch"; exit 1
fi
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: SKIPPED - torch sees no CUDA device (torch.cuda.is_available() is False); nothing to check on this machine."
  exit 0
fi
OUT=${OUT:-bench/results/gpu-check-$(date +%Y%m%d-%H%M%S)}
if [ ! -f "$OUT/gpu_check.log" ]; then       # not teed yet ($OUT was not set by the caller)
  mkdir -p "$OUT"
  exec > >(tee -a "$OUT/gpu_check.log") 2>&1
fi
[ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ] && export CUDA_HOME=/usr/local/cuda
SUMMARY=()
elapsed() { echo "$SECONDS"; }               # bash counts from the script's start

# step NAME LIMIT CMD...: runs CMD under `timeout -k 10 LIMIT` (signal $STEP_SIGNAL, TERM unless
# set), never past HARD_DEADLINE_S; prints and records the outcome.
step() {
  local name=$1 limit=$2 t0 rc
  shift 2
  local left=$(( HARD_DEADLINE_S - SECONDS - 12 ))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 15 ]; then
    SUMMARY+=("$(printf '%-10s %s' "$name" "NOT RUN: no time left before the ${HARD_DEADLINE_S} s deadline")")
    echo "gpu_check: step ${name} not run: no time left"
    return 124
  fi
  echo
  echo "=== gpu_check step ${name}: limit ${limit} s, $(elapsed) s elapsed, $(date -u +%H:%M:%S) UTC ==="
  t0=$(date +%s)
  timeout -s "${STEP_SIGNAL:-TERM}" -k 10 "$limit" "$@"
  rc=$?
  local took=$(( $(date +%s) - t0 )) verdict=ok
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then verdict="TIMED OUT"; elif [ $rc -ne 0 ]; then verdict="FAILED (rc $rc)"; fi
  echo "=== gpu_check step ${name}: ${verdict} in ${took} s ==="
  SUMMARY+=("$(printf '%-10s %-16s %4d s (limit %d s)' "$name" "$verdict" "$took" "$limit")")
  return $rc
}
note() { SUMMARY+=("$(printf '%-10s %s' "$1" "$2")"); echo "gpu_check: $1: $2"; }

echo "gpu_check: $(date -u) on $(hostname); budget ${BUDGET_S} s; output in $OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true
"$PY" -c "import sys, torch, triton, numpy; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '| triton', triton.__version__, '| numpy', numpy.__version__)"
arch=$("$PY" -c "import torch; p = torch.cuda.get_device_capability(); print(f'{p[0]}.{p[1]}' + ('a' if p[0] == 9 else ''))")
status=0

# 1. build: the CUDA extension for this GPU only (the CPU kernels are checked on the CPU machines);
# none if that fails, so that the Triton tests and the benchmark still run.
g++ --version | head -n 1
if ! step build "$(limit_of build)" env TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$arch}" \
    ICON_KERNELS_NO_CPU_EXT=1 MAX_JOBS="${MAX_JOBS:-16}" "$PY" -m pip install -q --no-build-isolation --no-deps -e .; then
  status=1
  step build-noext "$FALLBACK_BUILD_S" env ICON_KERNELS_NO_EXT=1 "$PY" -m pip install -q --no-build-isolation --no-deps -e . \
    || { note build "no package could be installed; stopping"; printf '%s\n' "${SUMMARY[@]}"; exit 1; }
  note build "extension build failed: continuing without it (ICON_KERNELS_NO_EXT=1)"
  export ICON_KERNELS_NO_EXT=1               # the tests then skip what needs the extension
fi
"$PY" -m icon_kernels

# the CPU extension, built in the background while the tests run (niced, so the tests come first),
# outside the package (it is not used here): only how long each unit takes on this machine, from
# ninja's log and, for the units still compiling when the tests end, their elapsed time. For the
# next build plan.
cpu_build_pid=
if command -v setsid > /dev/null && command -v pkill > /dev/null; then
  cpu_build_dir=$(mktemp -d)
  # setsid: a session of its own, so that one pkill -s stops the compilers too (timeout puts them
  # in a process group of their own); the trap lets the shell go on to write what ninja logged
  setsid nice -n 19 bash -c 'trap "echo stopped by gpu_check" TERM; t0=$(date +%s); timeout -k 5 "$1" \
      env ICON_KERNELS_NO_CUDA=1 MAX_JOBS=4 "$2" setup.py -q build_ext --build-lib "$3/lib" --build-temp "$3/tmp"
    echo "rc $? after $(( $(date +%s) - t0 )) s"; g++ --version | head -n 1
    echo "ninja log (start ms, end ms, mtime, output, hash):"; cat "$3"/tmp/*/.ninja_log' cpu-build \
    "$(( $(limit_of tests) + 10 ))" "$PY" "$cpu_build_dir" > "$OUT/cpu_ext_build.log" 2>&1 &
  cpu_build_pid=$!
fi

# 2. the GPU test selection (tests/gpu_selection.py), in parallel when pytest-xdist is there
PYTEST_ARGS=(-q -p no:cacheprovider --maxfail 30 -rfEs --tb=short --continue-on-collection-errors
             --junitxml="$OUT/pytest.xml")
if "$PY" -c "import xdist" 2>/dev/null; then PYTEST_ARGS+=(-n "$PYTEST_WORKERS");
else echo "gpu_check: pytest-xdist missing: the tests run in one process"; fi
if "$PY" -c "import pytest_timeout" 2>/dev/null; then PYTEST_ARGS+=(--timeout 120);
else echo "gpu_check: pytest-timeout missing: no per-test limit"; fi
# SIGINT on timeout: pytest then still prints its summary and writes the JUnit XML
pytest_log=$(mktemp)
# shellcheck disable=SC2086
STEP_SIGNAL=INT step tests "$(limit_of tests)" "$PY" -m pytest "${PYTEST_ARGS[@]}" $TEST_FILES \
  > >(tee "$pytest_log") 2>&1 || status=1
sleep 1                                      # let tee finish writing the log
note pytest "$(grep -E "[0-9]+ (passed|failed|error)" "$pytest_log" | tail -n 1)"
rm -f "$pytest_log"
if [ -n "$cpu_build_pid" ]; then
  running=$(ps -s "$cpu_build_pid" -o etimes=,args= 2>/dev/null | grep cc1plus | grep -oE '^ *[0-9]+|csrc/[a-z_0-9]+\.cpp' | paste -sd' ')
  pkill -TERM -s "$cpu_build_pid" 2>/dev/null; wait "$cpu_build_pid" 2>/dev/null
  pkill -KILL -s "$cpu_build_pid" 2>/dev/null  # (a compiler that started during the first pkill)
  echo "still compiling when stopped (elapsed s, unit): ${running:-none}" >> "$OUT/cpu_ext_build.log"
  note cpu-ext "background build: $(grep -m 1 '^rc ' "$OUT/cpu_ext_build.log"); still compiling: ${running:-none}"
else
  note cpu-ext "NOT RUN: setsid or pkill missing"
fi

# 3. compute-sanitizer on a small cuda-backend run, only this project's kernels (icon_cuda_*), the
# caching allocator off so that an overrun leaves its allocation
SAN=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
if [ ! -x "$SAN" ]; then
  note sanitizer "NOT RUN: compute-sanitizer not found"
elif ! "$PY" -c "import sys, icon_kernels as ik; sys.exit('cuda' not in ik.available_backends())"; then
  note sanitizer "NOT RUN: the cuda backend is unavailable"
else
  "$SAN" --version | tail -n 2
  "$SAN" --help 2>&1 | grep -A 3 -- "--kernel-name " | head -n 8
  for tool in memcheck racecheck; do
    log=$(mktemp)
    step "$tool" "$(limit_of "$tool")" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool "$tool" \
      --kernel-name kns=icon_cuda_ --error-exitcode 9 "$PY" bench/cuda_sanitizer_case.py > "$log" 2>&1
    rc=$?
    tail -n 40 "$log"
    # memcheck ends with "ERROR SUMMARY: 0 errors", racecheck with "RACECHECK SUMMARY: 0 hazards"
    case $tool in memcheck) clean="ERROR SUMMARY: 0 errors" ;; *) clean="RACECHECK SUMMARY: 0 hazards" ;; esac
    if grep -qiE "device not supported|not supported on this device|error 999" "$log"; then
      note "$tool" "NOT RUN: the sanitizer does not support this device (not a pass)"
    elif [ $rc -ne 0 ]; then
      status=1
    elif ! grep -q "$clean" "$log"; then
      note "$tool" "FAILED: no '$clean' line"
      status=1
    fi
    rm -f "$log"
  done
fi

# 4. the GPU benchmark: autotune off, no probe, no plots; gets the time the other steps left
left=$(( HARD_DEADLINE_S - SECONDS - 15 ))
if [ "$left" -ge 40 ]; then
  step bench "$left" "$PY" bench/run_bench.py --device cuda --deadline $(( left - 25 )) --no-probe \
    --no-plots --results-dir "$OUT" || status=1
else
  note bench "NOT RUN: ${left} s left"
  status=1
fi

echo
echo "=== gpu_check summary: $(elapsed) s in all (budget ${BUDGET_S} s), status $status ==="
printf '  %s\n' "${SUMMARY[@]}"
exec 1>&- 2>&-                               # close the pipe to tee and let it finish
wait
exit $status
