"""The command line of bench/run_bench.py: its options, and comma- or space-separated lists."""
from __future__ import annotations

import argparse
import os

from configs import CONFIGS

HERE = os.path.dirname(os.path.abspath(__file__))


def _list(values, cast=str):
    out = []
    for v in values or []:
        out += [cast(s) for s in str(v).split(",") if s.strip()]
    return out or None


def parse_args(argv, doc):
    """Options of ``argv``; ``doc`` (run_bench.py's docstring) gives the description and the examples."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(doc.splitlines()[-4:]))
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="small sizes: under 2 minutes")
    g.add_argument("--full", action="store_true", help="the whole sweep (long)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: CPU, and CUDA when present")
    p.add_argument("--configs", nargs="+", help=f"subset of {', '.join(CONFIGS)}")
    p.add_argument("--sizes", nargs="+", help="N values for every configuration (overrides the plan)")
    p.add_argument("--dtypes", nargs="+", help="dtypes (overrides the plan), e.g. float32 bfloat16")
    p.add_argument("--contenders", nargs="+",
                   help="subset of naive, compiled, torch, cpu, triton, cuda, pml-supcon, keops")
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
