"""Records, under the Triton interpreter, the compile keys of the launches whose GPU resources
tests/test_triton_resources.py checks ahead of time for sm_90:

- ``benchmark``: the GPU benchmark's configurations (bench/workloads.py: infonce in bf16 and fp32,
  tsne and clip in bf16), as bench/gpu_check.sh runs them, and clip-both in bf16 (both CLIP
  directions: the backward kernels' BIDIR variant);
- ``worst``: the heaviest variants: fp32, d = dz = 256, an Affinity target with target gradients
  and alpha, beta > 0 (both forward passes), and the bf16 t-SNE of the benchmark.

    python tests/resource_variants.py BENCHMARK.json WORST.json
"""
import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "..", "bench")]

import torch                                           # noqa: E402

import icon_kernels as ik                              # noqa: E402
from compile_keys import _NATIVE, Recorder             # noqa: E402
from workloads import CONFIGS                          # noqa: E402

N, D = 64, 128          # keys depend on d, the dtypes and N, M mod 16, not on N (clip: M = N / 2)


def _fits_on_a_gpu(tensors, flags):
    """launchers._triangular_fits as a GPU decides it (under the interpreter, which has no shared
    memory, it always holds), with the GPU's UPCAST flags: the heavy Affinity variant (self mode, an
    fp32 target at d = dz = 256) runs the plain kernels there, the bf16 t-SNE the triangular ones."""
    from icon_kernels._triton import launchers
    gpu = dict(flags, UPCAST=tensors["X"].dtype not in _NATIVE, UPCAST_Z=tensors["Z"].dtype not in _NATIVE)
    return launchers.triangular_fits(launchers._triangular_launch_args(tensors, gpu))


def record(calls):
    from icon_kernels._triton import launchers
    recorder = Recorder().install()
    interpreter_fits, launchers._triangular_fits = launchers._triangular_fits, _fits_on_a_gpu
    try:
        for call in calls:
            call().backward()
    finally:
        launchers._triangular_fits = interpreter_fits
        recorder.uninstall()
    return recorder.distinct()


def benchmark_call(name, dtype):
    config = CONFIGS[name]
    return lambda: config.loss(config.make(N, D, dtype, "cpu", 0), "triton")


def heavy_affinity_call():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 256, generator=g).requires_grad_()
    z = torch.randn(N, 256, generator=g).requires_grad_()
    sigma = torch.tensor(2.0, requires_grad=True)
    target = ik.Affinity(z, kernel="gaussian", sigma=sigma)
    return lambda: ik.icon_loss(x, target=target, kernel="student_t", dof=1.0, alpha=0.1, beta=0.1,
                                backend="triton")


def main(benchmark_out, worst_out):
    bench = [benchmark_call("infonce", torch.bfloat16), benchmark_call("infonce", torch.float32),
             benchmark_call("tsne", torch.bfloat16), benchmark_call("clip", torch.bfloat16),
             benchmark_call("clip-both", torch.bfloat16)]
    worst = [heavy_affinity_call(), benchmark_call("tsne", torch.bfloat16)]
    for path, calls in ((benchmark_out, bench), (worst_out, worst)):
        keys = record(calls)
        with open(path, "w") as f:
            json.dump({"keys": keys}, f, indent=1)
        print(f"{path}: {len(keys)} keys")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
