"""The largest-N search within a memory budget, whatever runs each step: an in-process CUDA run
(probe_job.py) or a ``memory`` job per step on CPU (the orchestrator's largest_n_probe.py)."""
from __future__ import annotations

import math
import time

from configs import round_n


def probe_search(step, budget_mib, start_n, known, step_s, max_steps, max_n=None, deadline=None,
                 on_step=None):
    """Find the largest N (a multiple of 256) whose run fits in ``budget_mib``.

    ``step(n)`` runs one forward + backward and returns {"status", "peak_mib", "run_s"}. ``known``
    lists earlier results as (n, fits, peak_mib, run_s). The search doubles N until a run fails
    or exceeds the budget, then bisects, guided by the N^2 growth of the last fitting peak; it
    stops at a resolution of max(256, N/16), after ``max_steps`` runs, or when the next run is
    predicted (N^2 scaling of the last run's time) to exceed ``step_s`` or to end past
    ``deadline`` (time.time()). The answer is then a lower bound, and ``limited_by`` says why.
    """
    lo = hi = None
    lo_peak = lo_time = None
    history = []
    for n, fits, peak, t in sorted(known):
        if fits and (lo is None or n > lo):
            lo, lo_peak, lo_time = n, peak, t
        if not fits and (hi is None or n < hi):
            hi = n
    if hi is not None and lo is not None and hi <= lo:
        hi = None
    steps, limited_by = 0, None
    while True:
        if lo is None:
            if hi is not None and hi <= 256:
                limited_by = "nothing fits"
                break
            cand = start_n if hi is None else hi / 2
        elif hi is None:
            cand = 2 * lo
            if lo_peak and lo_peak > 0:
                # just above where N^2 growth of the last peak meets the budget: brackets it quickly
                guess = lo * math.sqrt(budget_mib / lo_peak)
                cand = min(cand, max(lo + max(256, lo // 16), guess * 1.03))
        else:
            res = max(256, lo // 16)
            if hi - lo <= res:
                limited_by = "resolution"
                break
            cand = (lo + hi) / 2
            if lo_peak and lo_peak > 0:
                guess = lo * math.sqrt(budget_mib / lo_peak) * 0.99
                cand = min(max(guess, lo + res), hi - res)
        cand = round_n(cand)
        if lo is not None and cand <= lo:
            cand = lo + 256
        if hi is not None and cand >= hi:
            limited_by = "resolution"
            break
        if max_n and cand > max_n:
            limited_by = "max N"
            break
        if lo_time is not None and lo is not None:
            predicted = lo_time * (cand / lo) ** 2
            if predicted > step_s:
                limited_by = f"time cap (next step N={cand} predicted {predicted:.0f} s > {step_s:.0f} s)"
                break
            if deadline and time.time() + predicted > deadline:
                limited_by = "deadline"
                break
        elif deadline and time.time() > deadline:
            limited_by = "deadline"
            break
        if steps >= max_steps:
            limited_by = "step limit"
            break
        steps += 1
        r = step(cand)
        fits = r["status"] == "ok" and r["peak_mib"] <= budget_mib
        history.append({"n": cand, "fits": fits, **r})
        if on_step:
            on_step(cand, fits, r)
        if fits:
            lo, lo_peak, lo_time = cand, r["peak_mib"], r["run_s"]
        else:
            if r["status"] not in ("ok", "OOM"):
                limited_by = f"{r['status']}: {r.get('message', '')}"
                break
            hi = cand
    return {"largest_n": lo, "peak_mib": lo_peak, "run_s": lo_time, "smallest_failing_n": hi,
            "limited_by": limited_by or "resolution", "steps": history, "budget_mib": budget_mib}
