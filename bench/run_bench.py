"""Benchmark the I-Con loss: every backend against naive PyTorch, eager and compiled, on this machine.

What ``make bench`` runs. Configurations (bench/configs.py): InfoNCE/SupCon (labels, dot kernel),
t-SNE (Affinity target with a Gaussian kernel, student_t kernel) and CLIP-style (rectangular y).
Contenders (bench/contenders.py): naive PyTorch (backend "reference"), the same under
torch.compile, every usable fused backend of the device, and optional peers
(pytorch-metric-learning's SupConLoss, KeOps) when installed.

Per row (configuration, dtype, N), forward + backward:
- time: the median, min and max over the timed runs after one warm-up. All contenders of a row
  and the GEMM floor are timed in the same process, on the same inputs, in alternating order.
- x naive: the time divided by naive's time in the same row.
- x floor: the time divided by the GEMM floor, four N x M x d matmuls timed in the same process.
- peak memory:
  - on CPU, the increase of the peak RSS (VmHWM, the ru_maxrss counter, reset just before the
    call) over the RSS just before one run, in a fresh process per contender, with the inputs
    already allocated;
  - on CUDA, max_memory_allocated over one run minus memory_allocated before it.
- max err: the error against the reference, where the reference ran.
Cells say "OOM" or "skipped" instead of crashing. A largest-N probe finds the largest N that naive
and each fused backend can run within a memory budget. Results go to
bench/results/<host>-<timestamp>.{csv,json}, with PNG plots beside them.

    python bench/run_bench.py             # default: under 10 minutes on a 2-core machine
    python bench/run_bench.py --quick     # under 2 minutes
    python bench/run_bench.py --full      # the whole sweep (CPU 2k..32k, GPU 4k..256k, bf16 + fp32)
    python bench/run_bench.py --configs infonce --sizes 4096 8192 --contenders naive cpu
"""
from __future__ import annotations

import os

# torch.cuda.is_available() through NVML: the parent never initialises the CUDA driver, so the
# CPU jobs it forks stay clean (GPU jobs run in fresh interpreters).
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")

import datetime  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import torch  # noqa: E402

from bench_args import parse_args  # noqa: E402
from bench_output import BenchOutput  # noqa: E402
from configs import MODES  # noqa: E402
from largest_n_probe import LargestNProbe  # noqa: E402
from machine_info import machine_info  # noqa: E402
from row_results import RowResults  # noqa: E402
from sweep_plan import SweepPlan  # noqa: E402
from sweep_row import SweepRow  # noqa: E402
from time_budget import TimeBudget  # noqa: E402


class Bench(SweepPlan, TimeBudget, SweepRow, RowResults, LargestNProbe, BenchOutput):
    """One benchmark run: the sweep of rows, then the largest-N probe, then the output."""

    threads = None
    _gpu_name = None

    def __init__(self, a):
        self.a = a
        self.mode_name = "quick" if a.quick else "full" if a.full else "default"
        self.info = machine_info()
        self.stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        self.t0 = time.time()
        self.records = []
        self.est = {}            # (device, config, dtype, contender) -> (n, m, seconds per run)
        self.oom_at = {}         # (device, config, dtype, contender) -> smallest N that ran out of memory
        self.done_steps, self.cell_costs, self.row_index = 0, [], 0
        self.devices = (["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
                        if a.device == "auto" else [a.device])
        if "cuda" in self.devices and not torch.cuda.is_available():
            sys.exit("--device cuda: torch sees no CUDA device")
        self.deadline = None
        deadlines = [MODES[(d, self.mode_name)].deadline_s for d in self.devices]
        if a.deadline is not None:
            self.deadline = self.t0 + a.deadline if a.deadline > 0 else None
        elif all(deadlines):
            self.deadline = self.t0 + sum(deadlines)
        self.sweep_deadline = self.deadline
        if self.deadline and not a.no_probe:
            self.sweep_deadline = self.deadline - min(90.0, self.probe_estimate)
        avail = self.info.get("mem_available_gib") or 8.0
        self.mem_limit_mib = 1024 * (a.mem_limit if a.mem_limit else 0.8 * avail)
        os.makedirs(a.results_dir, exist_ok=True)
        self.stem = os.path.join(a.results_dir, f"{self.info['host']}-{self.stamp}")
        self.rows = self.plan()
        self.total_steps = sum((len(r["contenders"]) + 1) if r["device"] == "cpu" else 1 for r in self.rows)

    def run(self):
        if self.a.from_json:
            return self.replay(self.a.from_json)
        self.header()
        for self.row_index, row in enumerate(self.rows):
            self.run_row(row)
        self.row_index = len(self.rows)
        if not self.a.no_probe:
            for device in self.devices:
                if self.deadline and time.time() > self.deadline:
                    print(f"\nLargest-N probe on {device}: skipped (deadline)")
                    continue
                self.probe(device)
        return self.finish()


def main(argv=None):
    a = parse_args(argv, __doc__)
    return Bench(a).run()


if __name__ == "__main__":
    sys.exit(main())
