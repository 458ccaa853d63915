"""Benchmark the I-Con loss: every backend against naive PyTorch, eager and compiled, on this machine.

What ``make bench`` runs. Configurations (bench/workloads.py): InfoNCE/SupCon (labels, dot kernel),
t-SNE (Affinity target with a Gaussian kernel, student_t kernel) and CLIP-style (rectangular y).
Contenders (bench/workloads.py): naive PyTorch (backend "reference"), the same under
torch.compile, every usable fused backend of the device, and optional peers
(pytorch-metric-learning's SupConLoss, KeOps) when installed.

Per row (configuration, dtype, N), forward + backward:
- time: the median, min and max over the timed runs after one warm-up. All contenders of a row
  and the GEMM floor are timed in the same process, on the same inputs, in alternating order.
- x naive: the time divided by naive's time in the same row.
- x floor: the time divided by the GEMM floor, four N x M x d matmuls (two more N x M x dz for an
  Affinity target's Gram) timed in the same process.
- peak memory:
  - on CPU, the increase of the peak RSS (VmHWM, the ru_maxrss counter, reset just before the
    call) over the RSS just before one run, in a fresh process per contender, with the inputs
    already allocated and glibc's mmap threshold pinned at 128 KiB (reproducible to ~1 MiB;
    bench/measure.py's docstring says why);
  - on CUDA, max_memory_allocated over one run minus memory_allocated before it.
- max err: the error against the reference, where the reference ran.
Cells say "OOM" or "skipped" instead of crashing. A largest-N probe finds the largest N that naive
and each fused backend can run within a memory budget. Results go to
bench/results/<host>-<timestamp>.{csv,json}, with PNG plots beside them.

    python bench/run_bench.py             # default: under 10 minutes on a 2-core machine
    python bench/run_bench.py --quick     # under 2 minutes
    python bench/run_bench.py --full      # the whole sweep (CPU 2k..32k, GPU 4k..256k, bf16 + fp32)
    python bench/run_bench.py --family    # every family member and divergence, CPU N = 4096, 8192
    python bench/run_bench.py --configs infonce --sizes 4096 8192 --contenders naive cpu
"""
from __future__ import annotations

import os

# torch.cuda.is_available() through NVML: the parent never initialises the CUDA driver, so the
# CPU jobs it forks stay clean (GPU jobs run in fresh interpreters).
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")

import argparse  # noqa: E402
import sys  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from runner import Bench  # noqa: E402
from workloads import CONFIGS, ORDER  # noqa: E402


def _list(values, cast=str):
    out = []
    for v in values or []:
        out += [cast(s) for s in str(v).split(",") if s.strip()]
    return out or None


def parse_args(argv=None):
    """Options of ``argv``; this module's docstring gives the description and the examples."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[-5:]))
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="small sizes: under 2 minutes")
    g.add_argument("--full", action="store_true", help="the whole sweep (long)")
    g.add_argument("--family", action="store_true",
                   help="every member of the I-Con family and the divergences, N = 4096 and 8192 on the CPU "
                        "(naive, compiled, torch, cpu and the floor; about an hour on 2 cores)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: CPU, and CUDA when present")
    p.add_argument("--configs", nargs="+", help=f"subset of {', '.join(CONFIGS)}")
    p.add_argument("--sizes", nargs="+", help="N values for every configuration (overrides the plan)")
    p.add_argument("--dtypes", nargs="+", help="dtypes (overrides the plan), e.g. float32 bfloat16")
    p.add_argument("--contenders", nargs="+",
                   help="subset of " + ", ".join(ORDER) + " (cpu-plain: cpu with ICON_KERNELS_SYMMETRIC=0, on the "
                        "configurations that have a symmetric schedule)")
    p.add_argument("--d", type=int, default=128, help="embedding dimension (default 128)")
    p.add_argument("--repeats", type=int, help="timed runs per contender after the warm-up (at most)")
    p.add_argument("--budget", type=float,
                   help="seconds per contender and row (memory run + warm-up + timed runs)")
    p.add_argument("--deadline", type=float,
                   help="seconds for the whole run, after which cells are skipped (0: none; default: "
                        "110 with --quick, 560 by default, none with --full; on CUDA 110 / 200 / none)")
    p.add_argument("--mem-limit", type=float,
                   help="GiB a CPU run may add to its address space before it counts as OOM "
                        "(default: 80%% of MemAvailable at start)")
    p.add_argument("--no-probe", action="store_true", help="skip the largest-N probe")
    p.add_argument("--probe-mem", type=float, help="GiB, memory budget of the largest-N probe "
                   "(default: 4 on CPU, 1 with --quick; 90%% of device memory on CUDA)")
    p.add_argument("--probe-step-s", type=float, help="no probe step predicted to take longer")
    p.add_argument("--probe-steps", type=int, help="probe runs per contender, at most")
    p.add_argument("--probe-max-n", type=int, help="largest N the probe tries")
    p.add_argument("--results-dir", default=os.path.join(HERE, "results"))
    p.add_argument("--plot-dir", help="where the PNG plots go (default: the results directory)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--readme-plot", metavar="PNG",
                   help="also write one small PNG (infonce on the first device) for the README, "
                        "e.g. bench/plots/cpu-infonce.png")
    p.add_argument("--from-json", metavar="JSON",
                   help="measure nothing: print the table of an earlier run and write its plots "
                        "(with --readme-plot, the README's plot)")
    p.add_argument("--spawn", action="store_true",
                   help="run CPU jobs in fresh interpreters instead of forked children")
    a = p.parse_args(argv)
    a.configs = _list(a.configs)
    a.sizes = _list(a.sizes, int)
    a.dtypes = _list(a.dtypes)
    a.contenders = _list(a.contenders)
    for c in a.configs or []:
        if c not in CONFIGS:
            p.error(f"unknown configuration {c!r}; choose from {', '.join(CONFIGS)}")
    return a


def main(argv=None):
    return Bench(parse_args(argv)).run()


if __name__ == "__main__":
    sys.exit(main())
