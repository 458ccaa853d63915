"""The largest-N probe: the largest N that naive and each fused backend can run within a memory
budget, after the sweep and seeded by its results.

``probe_search`` is the search itself, whatever runs each step: on CPU the runner starts one
``memory`` job per step (a fresh process: running out of memory there is a clean "OOM"); on CUDA,
where running out of memory is recoverable, one ``probe`` job (measure.py) runs the whole search
in-process. ``LargestNProbe`` is the runner's side: which contenders, which budget, the records.
"""
from __future__ import annotations

import math
import time

from workloads import (ALLOWANCE, CONFIGS, DEFAULT_ALLOWANCE, FUSED, NAIVE, PROBE_CONFIG,
                       contenders_for, label)


def round_n(n: float, multiple: int = 256) -> int:
    return max(multiple, int(math.floor(n / multiple)) * multiple)


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


class LargestNProbe:
    """Part of runner.Bench: the largest-N probe after the sweep."""

    def probe_contenders(self, device):
        cfg = CONFIGS[PROBE_CONFIG]
        names = [n for n in contenders_for(cfg, device, self.a.contenders) if n == NAIVE or n in FUSED]
        return [n for n in names if contenders_for(cfg, device, [n])[n] is None]

    @property
    def probe_estimate(self):
        if self.a.no_probe:
            return 0.0
        total = 0.0
        for device in self.devices:
            step = self.a.probe_step_s or self.mode(device).probe_step_s
            start_up = 10.0 if device == "cuda" else 1.0      # a fresh interpreter per GPU probe
            total += len(self.probe_contenders(device)) * (start_up + 0.8 * step)
        return total

    def probe(self, device):
        mode = self.mode(device)
        dtype = (self.a.dtypes or next((p[1] for p in mode.plan if p[0] == PROBE_CONFIG), ("float32",)))[0]
        mem_gib = self.a.probe_mem if self.a.probe_mem is not None else mode.probe_mem_gib
        budget_mib = mem_gib * 1024
        step_s = self.a.probe_step_s or mode.probe_step_s
        steps = self.a.probe_steps or mode.probe_steps
        budget_text = f"{mem_gib:g} GiB" if budget_mib else "90% of device memory"
        print(f"\nLargest-N probe on {device} ({PROBE_CONFIG}, {dtype}, d={self.a.d}): memory budget "
              f"{budget_text}, no step predicted over {step_s:.0f} s, at most {steps} steps per contender",
              flush=True)
        for name in self.probe_contenders(device):
            known = []
            for r in self.records:
                if (r.get("kind"), r["device"], r["config"], r["dtype"], r["contender"]) != \
                        ("sweep", device, PROBE_CONFIG, dtype, label(name)):
                    continue
                t = r.get("median_s") or r.get("one_run_s")
                if r.get("peak_mib") is not None and budget_mib and t:
                    known.append((r["n"], r["peak_mib"] <= budget_mib, r["peak_mib"], t))
                elif r["status"] == "OOM":
                    known.append((r["n"], False, None, None))
            rec = self.base_record({"device": device, "config": PROBE_CONFIG, "dtype": dtype, "n": 0, "m": 0},
                                   name)
            rec.update(kind="probe", n=None, m=None, budget_mib=budget_mib or None)

            def on_step(n, fits, r, name=name):
                detail = (f"+{r['peak_mib']:.1f} MiB, {r['run_s']:.2f} s" if r["status"] == "ok"
                          else f"{r['status']}: {r.get('message', '')[:80]}")
                el = self.elapsed()
                print(f"  probe {device} {label(name):13s} N={n:<8d} {'fits' if fits else 'does not fit'} "
                      f"({detail}) | {el // 60:.0f}:{el % 60:02.0f} elapsed", flush=True)

            if device == "cuda":
                r = self.run_job({"job": "probe", "config": PROBE_CONFIG, "contender": name, "device": device,
                                  "dtype": dtype, "d": self.a.d, "mem_budget_mib": budget_mib,
                                  "start_n": min(16384, self.a.probe_max_n or 16384), "known": known, "step_s": step_s, "steps": steps,
                                  "max_n": self.a.probe_max_n, "deadline": self.deadline},
                                 timeout=steps * (step_s * 3 + 30) + 120)
                for s in r.get("steps", []):
                    on_step(s["n"], s["fits"], s)
                if not r.get("ok"):
                    rec.update(status=r.get("status", "failed"), note=r.get("message", ""))
                    self.records.append(rec)
                    continue
                budget_mib = budget_mib or r.get("budget_mib")
                rec["budget_mib"] = r.get("budget_mib")
            else:
                hard = max(2 * budget_mib, budget_mib + 1024)

                def step(n, name=name):
                    res = self.run_job({"job": "memory", "config": PROBE_CONFIG, "contender": name, "n": n,
                                        "d": self.a.d, "dtype": dtype, "device": device,
                                        "mem_limit_mib": hard, "warm_n": self.warm_n()},
                                       timeout=3 * step_s + ALLOWANCE.get(name, DEFAULT_ALLOWANCE))
                    return {"status": res.get("status", "failed"), "message": res.get("message", ""),
                            "peak_mib": res.get("peak_mib"), "run_s": res.get("run_s")}

                start = min(2048, self.a.probe_max_n or 2048)
                r = probe_search(step, budget_mib, start, known, step_s, steps,
                                 self.a.probe_max_n, self.deadline, on_step=on_step)
            rec.update(n=r["largest_n"], peak_mib=r["peak_mib"], median_s=r["run_s"],
                       fails_at_n=r["smallest_failing_n"], limited_by=r["limited_by"],
                       status="ok" if r["largest_n"] else "none fits",
                       note=f"{len(r['steps'])} probe runs")
            self.records.append(rec)
            self.save()
