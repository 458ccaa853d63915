"""A backend's forward + backward over its GEMM floor (DESIGN.md §5), configuration by configuration,
in alternating rounds: the quick check of issue 17's "cpu <= 1.5x its floor" while a row path is
being worked on (``run_bench.py --family`` is the whole sweep, an hour on 2 cores).

Every round times the backend once and the floor once per configuration, the configurations in an
order that rotates from round to round, in one process on the same inputs; the figure is the
median over rounds of each round's ratio, so a load change between rounds mostly cancels.

    python bench/floor_ratio.py                              # the family sweep's configurations, N = 8192, cpu
    python bench/floor_ratio.py --configs tsne knn-graph --sizes 4096 --rounds 3
    python bench/floor_ratio.py --backend cpu-plain --configs tsne-js   # the plain schedule
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import workloads  # noqa: E402
from report import machine_info  # noqa: E402


def measure(names, backend, n, d, rounds):
    """{config: (median round ratio backend / floor, median backend seconds, median floor seconds)}."""
    inputs = {name: workloads.CONFIGS[name].make(n, d, torch.float32, "cpu") for name in names}
    fns = {name: workloads.build(backend, workloads.CONFIGS[name], inputs[name]) for name in names}
    ops = {name: workloads.floor_operands(workloads.CONFIGS[name], inputs[name]) for name in names}
    for name in names:                                   # warm-up: first-call costs stay out
        workloads.fwd_bwd(fns[name], inputs[name], "cpu")
        workloads.config_floor(ops[name], "cpu")
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            wall, _ = workloads.fwd_bwd(fns[name], inputs[name], "cpu")
            times[name].append((wall, workloads.config_floor(ops[name], "cpu")))
    return {name: (statistics.median(t / f for t, f in ts), statistics.median(t for t, _ in ts),
                   statistics.median(f for _, f in ts)) for name, ts in times.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(workloads.FAMILY), choices=list(workloads.CONFIGS))
    # cpu-plain: the cpu backend with ICON_KERNELS_SYMMETRIC=0 (its plain schedule; workloads.build)
    parser.add_argument("--backend", default="cpu", choices=("torch", "cpu", "cpu-plain"))
    parser.add_argument("--sizes", nargs="+", type=int, default=[8192])
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    info = machine_info()
    print(f"{info['cpu']}, {info['cpu_count']} CPUs; python {info['python']}, torch {info['torch']}, "
          f"icon_kernels {info['icon_kernels']} ({info['git']}), {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"threads {torch.get_num_threads()}, fp32, d = {args.d}, forward + backward, "
          f"{args.rounds} rounds after one warm-up")
    print(f"| configuration | N | {args.backend} median (s) | floor median (s) | {args.backend} / floor |")
    print("|---|---|---|---|---|")
    for n in args.sizes:
        for name, (ratio, t, f) in measure(args.configs, args.backend, n, args.d, args.rounds).items():
            print(f"| {name} | {n} | {t:.3g} | {f:.3g} | {ratio:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
