"""The cpu backend's two schedules side by side, forward and backward apart: in each round every
configuration runs its forward + backward once under the symmetric schedule ("cpu") and once
under the plain one ("cpu-plain", ICON_KERNELS_SYMMETRIC=0), then the GEMM floor (DESIGN.md §5),
in one process on the same inputs (bench/workloads.py's); the figures are the minima over rounds
(what the machine can do: on a shared 2-core VM the medians move by 20%). ``run_bench.py`` and
``floor_ratio.py`` time forward + backward together; this splits them, to see where a schedule
saves.

    python bench/schedule_ab.py --configs tsne-reverse_kl tsne-tv tsne-js --rounds 3
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import workloads  # noqa: E402
from report import machine_info  # noqa: E402

SCHEDULES = ("cpu", "cpu-plain")
# the configurations with both schedules (clip-both's plain one is two calls: run_bench.py times it)
CONFIGS = [c for c in workloads.SYMMETRIC_CPU if c != "clip-both"]


def forward_backward(fn, inp):
    """(forward seconds, backward seconds) of one call, gradients reset first."""
    workloads.clear_grads(inp)
    t0 = time.perf_counter()
    loss = fn()
    t1 = time.perf_counter()
    loss.backward()
    return t1 - t0, time.perf_counter() - t1


def measure(name, n, d, rounds):
    """{schedule: (min forward, min backward, min total)} and the minimum floor, in seconds."""
    config = workloads.CONFIGS[name]
    inp = config.make(n, d, torch.float32, "cpu")
    fns = {s: workloads.build(s, config, inp) for s in SCHEDULES}
    ops = workloads.floor_operands(config, inp)
    for s in SCHEDULES:                                  # warm-up
        forward_backward(fns[s], inp)
    workloads.config_floor(ops, "cpu")
    times = {s: [] for s in SCHEDULES}
    floors = []
    for r in range(rounds):
        for s in (SCHEDULES if r % 2 == 0 else SCHEDULES[::-1]):
            times[s].append(forward_backward(fns[s], inp))
        floors.append(workloads.config_floor(ops, "cpu"))
    os.environ.pop(workloads.SCHEDULE_SWITCH, None)
    return ({s: (min(f for f, _ in ts), min(b for _, b in ts), min(f + b for f, b in ts)) for s, ts in times.items()},
            min(floors))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=CONFIGS, choices=CONFIGS)
    parser.add_argument("--sizes", nargs="+", type=int, default=[8192])
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    info = machine_info()
    print(f"{info['cpu']}, {info['cpu_count']} CPUs; python {info['python']}, torch {info['torch']}, "
          f"icon_kernels {info['icon_kernels']} ({info['git']}), {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"threads {torch.get_num_threads()}, fp32, d = {args.d}, minima over {args.rounds} rounds after a warm-up")
    print("| configuration | N | schedule | forward (s) | backward (s) | total (s) | total / floor |")
    print("|---|---|---|---|---|---|---|")
    for n in args.sizes:
        for name in args.configs:
            mins, floor = measure(name, n, args.d, args.rounds)
            for s, (f, b, t) in mins.items():
                print(f"| {name} | {n} | {s} | {f:.3g} | {b:.3g} | {t:.3g} | {t / floor:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
