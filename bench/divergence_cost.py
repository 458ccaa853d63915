"""What a divergence costs over the ``kl`` variant of the same configuration, on the same backend
(issue 16's "a new divergence costs <= 1.6x the kl variant"), and joint t-SNE over conditional t-SNE.

``run_bench.py`` times one configuration row after another, so on a shared machine a slow minute
lands on one row and not its neighbour. Here every round times each variant once, in an order
that rotates from round to round, in one process on the same inputs; the cost is the median over
rounds of each round's ratio (variant / kl of that round), so a load change between rounds cancels.
Wall time with the process's threads, and the process's CPU time beside it.

    python bench/divergence_cost.py                       # InfoNCE and t-SNE, N = 8192, torch and cpu
    python bench/divergence_cost.py --sizes 2048 --rounds 3 --backends torch
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

import icon_kernels as ik  # noqa: E402

CPU_BACKENDS = ("torch", "cpu")     # CPU tensors, wall time: the GPU backends are run_bench.py's

# configuration -> (the kl variant, the other divergences' variants): workloads.CONFIGS names
VARIANTS = {
    "infonce": ("infonce", {"tv": "infonce-tv", "js": "infonce-js"}),
    "tsne": ("tsne", {"reverse_kl": "tsne-reverse_kl", "tv": "tsne-tv", "js": "tsne-js",
                      "joint": "jointtsne"}),
}


def time_once(config, inp, backend):
    """(wall seconds, CPU seconds of this process) of one forward + backward."""
    fn = workloads.build(backend, config, inp)
    cpu0 = time.process_time()
    wall, _ = workloads.fwd_bwd(fn, inp, "cpu")
    return wall, time.process_time() - cpu0


def measure(base: str, backend: str, n: int, d: int, rounds: int):
    """{variant: (median round ratio of wall time over kl, of CPU time, median wall seconds)}."""
    kl_name, others = VARIANTS[base]
    names = [kl_name] + [name for name in others.values() if backend in runs_on(name)]
    configs = {name: workloads.CONFIGS[name] for name in names}
    inp = configs[kl_name].make(n, d, torch.float32, "cpu")
    for name in names:                                   # warm-up: first-call costs stay out
        time_once(configs[name], inp, backend)
    times = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            times[name].append(time_once(configs[name], inp, backend))
    out = {}
    for name in names:
        wall = [t[0] / k[0] for t, k in zip(times[name], times[kl_name])]
        cpu = [t[1] / k[1] for t, k in zip(times[name], times[kl_name])]
        out[name] = (statistics.median(wall), statistics.median(cpu),
                     statistics.median(t[0] for t in times[name]))
    return out


def runs_on(name: str):
    """The CPU backends that compute a configuration."""
    config = workloads.CONFIGS[name]
    return config.fused_running if config.fused_missing else CPU_BACKENDS


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--backends", nargs="+", default=list(CPU_BACKENDS), choices=CPU_BACKENDS)
    parser.add_argument("--sizes", nargs="+", type=int, default=[8192])
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    info = machine_info()
    print(f"{info['cpu']}, {info['cpu_count']} CPUs; python {info['python']}, torch {info['torch']}, "
          f"icon_kernels {info['icon_kernels']} ({info['git']}), {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"threads {torch.get_num_threads()}, fp32, d = {args.d}, forward + backward, "
          f"{args.rounds} rounds after one warm-up")
    print("| configuration | backend | N | variant | kl median (s) | variant median (s) "
          "| wall / kl | CPU time / kl |")
    print("|---|---|---|---|---|---|---|---|")
    for base in args.configs:
        for backend in args.backends:
            if backend not in ik.available_backends():
                print(f"| {base} | {backend} | | not available | | | | |")
                continue
            for n in args.sizes:
                res = measure(base, backend, n, args.d, args.rounds)
                kl_name = VARIANTS[base][0]
                for name, (wall, cpu, median) in res.items():
                    if name == kl_name:
                        continue
                    print(f"| {base} | {backend} | {n} | {name} | {res[kl_name][2]:.3g} | {median:.3g} "
                          f"| {wall:.2f}x | {cpu:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
