"""Without a GPU, the sm_90 resources of the Triton kernels that bench/gpu_check.sh launches:
compiled ahead of time by Triton's real compiler (tests/triton_aot_compile.py) from the launch keys
recorded under the interpreter (tests/resource_variants.py).

- The heaviest variants (fp32, d = dz = 256, Affinity with target gradients; the bf16 t-SNE, which
  runs the triangular kernels of self mode) fit in shared memory with every autotune config that
  launchers' pruning keeps (the triangular kernels: their one launch shape).
- No variant the GPU benchmark runs (autotune off) spills more than 1 KB per thread.
- launchers' shared-memory estimate, which prunes before compiling, is above every cubin's need.
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED_LIMIT = 232448          # bytes of shared memory per block on sm_90
MAX_STACK = 1024               # bytes per thread: register spills land in the stack frame

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def _run(args, interpret):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "ICON_KERNELS_TRITON_AUTOTUNE")}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=900, env=env, cwd=HERE)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


def _compiled(keys, configs):
    out = _run(["triton_aot_compile.py", "--keys", str(keys), "--configs", configs, "--workers", "2"], False)
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def _label(r):
    k, c = r["key"], r["key"]["constexprs"]
    return (f"{k['kernel']} {k['tensors'].get('X', ['-'])[0]} target={c.get('TARGET')} d={c.get('BLOCK_D')} "
            f"dz={c.get('BLOCK_DZ')} "
            f"grad={c.get('TARGET_GRAD')} bidir={c.get('BIDIR')} {tuple(r['config'])}: shared {r['shared']} (est {r['estimated_shared']}) "
            f"regs {r['regs']} stack {r['stack']} B, {r['seconds']} s")


def test_gpu_resources_of_the_benchmark_and_the_heaviest_variants(tmp_path):
    bench, worst = tmp_path / "benchmark.json", tmp_path / "worst.json"
    _run(["resource_variants.py", str(bench), str(worst)], True)
    bench_rows, worst_rows = _compiled(bench, "default"), _compiled(worst, "all")
    print("\n".join(["benchmark (autotune off):"] + [_label(r) for r in bench_rows]
                    + ["heaviest (every config kept by the pruning):"] + [_label(r) for r in worst_rows]))
    assert len(bench_rows) >= 10 and len(worst_rows) >= 7
    kernels = {r["key"]["kernel"] for r in worst_rows}
    # the heavy Affinity variant (alpha, beta > 0, target gradients) runs the plain kernels, the
    # bf16 t-SNE (self mode) the Affinity target's triangular ones
    assert kernels == {"icon_forward_kernel", "icon_mixture_kernel", "icon_backward_rows_kernel",
                       "icon_backward_cols_kernel", "icon_symmetric_affinity_forward_kernel",
                       "icon_symmetric_affinity_merge_kernel", "icon_symmetric_affinity_backward_kernel"}
    for r in bench_rows + worst_rows:
        assert r["shared"] <= SHARED_LIMIT, _label(r)
        assert r["estimated_shared"] >= r["shared"], "the pruning estimate is too low: " + _label(r)
    for r in bench_rows:
        assert r["stack"] <= MAX_STACK, "spills: " + _label(r)
