"""The run's clock: elapsed time, per-contender time predictions (N x M scaling of the last run),
the ETA of the progress lines, and job timeouts capped by the deadline of the whole run."""
from __future__ import annotations

import os
import statistics
import time

from child_process import run_forked, run_spawned

# extra seconds a job may take beyond its time budget: compiling (inductor, KeOps) and start-up
ALLOWANCE = {"compiled": 240.0, "keops": 300.0}
DEFAULT_ALLOWANCE = 60.0


class TimeBudget:
    """Part of run_bench.Bench: its clock, predictions and jobs."""

    def elapsed(self):
        return time.time() - self.t0

    def run_job(self, spec, timeout):
        if self.deadline:   # a job never runs far past the deadline (gpu_check.sh wraps us in `timeout`)
            timeout = min(timeout, max(10.0, self.deadline + 15 - time.time()))
        if spec["device"] == "cuda" or self.a.spawn or not hasattr(os, "fork"):
            return run_spawned(spec, timeout)
        return run_forked(spec, timeout)

    def predict(self, key, n, m):
        if key not in self.est:
            return None
        n0, m0, t0 = self.est[key]
        return t0 * (n * m) / (n0 * m0)

    def eta(self):
        """Seconds left: predicted cost of the remaining cells, the mean observed cost otherwise."""
        mean = statistics.mean(self.cell_costs) if self.cell_costs else 5.0
        left = 0.0
        for row in self.rows[self.row_index:]:
            for name in row["contenders"]:
                p = self.predict((row["device"], row["config"], row["dtype"], name), row["n"], row["m"])
                cost = mean if p is None else min(self.budget(row["device"]), p * (self.repeats(row["device"]) + 2))
                left += cost
        if not self.a.no_probe:
            left += self.probe_estimate
        if self.deadline:
            left = min(left, max(0.0, self.deadline - time.time()))
        return left

    def progress(self, text, steps=1):
        self.done_steps += steps
        el, eta = self.elapsed(), self.eta()
        print(f"[{self.done_steps:3d}/{self.total_steps}] {text} | {el // 60:.0f}:{el % 60:02.0f} elapsed, "
              f"ETA {eta // 60:.0f}:{eta % 60:02.0f}", flush=True)
