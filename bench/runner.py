"""One benchmark run: the sweep of rows (configuration, dtype, N) on each device, then the largest-N
probe (probe.py), then the output (report.py). run_bench.py is its command line.

Which rows: the mode's plan (workloads.MODES) with the command line's overrides. A row on CPU is a
``memory`` job per contender, each in a fresh process, then one ``timing`` job for every contender
of the row and the GEMM floor (on CUDA only the timing job, which also measures memory); the jobs
are in measure.py. The run's clock predicts each contender's time from its last run (N x M
scaling), skips cells that would not fit their budget or the deadline of the whole run, caps job
timeouts by that deadline and prints the ETA of the progress lines.
"""
from __future__ import annotations

import datetime
import os
import statistics
import sys
import time

import torch

from measure import run_forked, run_spawned
from probe import LargestNProbe
from report import RunOutput, fmt_s, machine_info
from workloads import (ALLOWANCE, CONFIGS, DEFAULT_ALLOWANCE, FLOOR, MODES, NAIVE, contenders_for,
                       label)


class Bench(LargestNProbe, RunOutput):
    """One benchmark run: the sweep of rows, then the largest-N probe, then the output."""

    threads = None
    _gpu_name = None

    def __init__(self, a):
        self.a = a
        self.mode_name = ("quick" if a.quick else "full" if a.full else
                          "family" if getattr(a, "family", False) else "default")
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

    # --- the plan: rows and per-device settings --------------------------------------------------

    def mode(self, device):
        return MODES[(device, self.mode_name)]

    def plan(self):
        rows = []
        for device in self.devices:
            mode = self.mode(device)
            for cname, dtypes, sizes, skip in mode.plan:
                if self.a.configs and cname not in self.a.configs:
                    continue
                cfg = CONFIGS[cname]
                conts = contenders_for(cfg, device, self.a.contenders, () if self.a.contenders else skip)
                for dtype in (self.a.dtypes or dtypes):
                    for n in (self.a.sizes or sizes):
                        if any((r["device"], r["config"], r["dtype"], r["n"]) == (device, cname, dtype, n)
                               for r in rows):
                            continue       # a --dtypes override can repeat a plan entry
                        rows.append({"device": device, "config": cname, "dtype": dtype, "n": n,
                                     "m": cfg.m_of_n(n), "contenders": conts})
        # configurations requested but absent from the mode's plan (e.g. --configs tsne on quick CUDA)
        for device in self.devices:
            for cname in self.a.configs or []:
                if not any(r["config"] == cname and r["device"] == device for r in rows):
                    cfg = CONFIGS[cname]
                    conts = contenders_for(cfg, device, self.a.contenders)
                    dtypes = self.a.dtypes or (["float32"] if device == "cpu" else ["bfloat16"])
                    for dtype in dtypes:
                        for n in self.a.sizes or ([2048] if device == "cpu" else [16384]):
                            rows.append({"device": device, "config": cname, "dtype": dtype, "n": n,
                                         "m": cfg.m_of_n(n), "contenders": conts})
        return rows

    def repeats(self, device):
        return self.a.repeats or self.mode(device).repeats

    def budget(self, device):
        return self.a.budget or self.mode(device).budget_s

    def warm_n(self):
        # tiny warm-up size for compile: no size equal to d (duck sizing would specialise on it)
        return 320 if self.a.d not in (320, 160) else 448

    # --- the clock: elapsed time, predictions, ETA, job timeouts capped by the deadline ----------

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

    # --- one row of the sweep --------------------------------------------------------------------

    def base_record(self, row, name):
        cfg = CONFIGS[row["config"]]
        return {"kind": "sweep", "host": self.info["host"], "timestamp": self.stamp,
                "device": row["device"], "device_name": self.device_name(row["device"]),
                "cpu": self.info["cpu"], "threads": self.threads, "python": self.info["python"],
                "torch": self.info["torch"], "triton": self.info["triton"],
                "icon_kernels": self.info["icon_kernels"], "git": self.info["git"],
                "dtype": row["dtype"], "config": row["config"], "target": cfg.target, "kernel": cfg.kernel,
                "n": row["n"], "m": row["m"], "d": self.a.d, "contender": label(name), "status": "ok"}

    def device_name(self, device):
        return self.info["cpu"] if device == "cpu" else self._gpu_name

    def run_row(self, row):
        device, n, m = row["device"], row["n"], row["m"]
        budget, k = self.budget(device), self.repeats(device)
        where = f"{row['config']} {row['dtype']} N={n}" + (f" M={m}" if m != n else "")
        recs, to_time, spent, run_s = {}, [], {}, {}
        for name, why in row["contenders"].items():
            rec = recs[name] = self.base_record(row, name)
            key = (device, row["config"], row["dtype"], name)
            pred = self.predict(key, n, m)
            if why:
                rec.update(status="n/a", note=why)
            elif key in self.oom_at and n >= self.oom_at[key]:
                rec.update(status="OOM", note=f"OOM: ran out of memory at N={self.oom_at[key]}")
            elif pred is not None and pred * 3 > budget:
                rec.update(status="skipped", note=f"skipped: over time budget (one run ~{pred:.1f} s "
                                                  f"predicted, budget {budget:.0f} s per contender and row)")
            elif self.sweep_deadline and time.time() > self.sweep_deadline:
                rec.update(status="skipped", note="skipped: over time budget (deadline of the whole run)")
            elif device == "cuda":
                to_time.append(name)
                continue
            else:
                t_cell = time.time()
                timeout = max(budget, 3 * (pred or 0)) + ALLOWANCE.get(name, DEFAULT_ALLOWANCE)
                r = self.run_job({"job": "memory", "config": row["config"], "contender": name, "n": n,
                                  "d": self.a.d, "dtype": row["dtype"], "device": device,
                                  "mem_limit_mib": self.mem_limit_mib, "warm_n": self.warm_n()}, timeout)
                self.threads = self.threads or r.get("threads")
                if r.get("ok"):
                    rec.update(peak_mib=r["peak_mib"], memory_counter=r["memory_counter"], one_run_s=r["run_s"])
                    # under a pinned malloc (measure.pin_malloc) every large buffer is mapped and
                    # unmapped, which slows a run of many tile temporaries (the torch backend) by
                    # up to ~15x: that run's time is not the contender's, so neither the budget
                    # nor the timing job's estimate takes it (the timing job's warm-up does)
                    pinned = "pinned" in r["memory_counter"]
                    if not pinned:
                        run_s[name] = spent[name] = r["run_s"]
                        self.est[key] = (n, m, r["run_s"])
                    if not pinned and r["run_s"] * 3 > budget:
                        rec.update(status="skipped", note=f"skipped: over time budget (one run took "
                                                          f"{r['run_s']:.1f} s, budget {budget:.0f} s)")
                        msg = f"memory +{r['peak_mib']:.1f} MiB, one run {r['run_s']:.2f} s; not timed (budget)"
                    else:
                        to_time.append(name)
                        msg = f"memory +{r['peak_mib']:.1f} MiB, one run {r['run_s']:.2f} s"
                else:
                    self._fail(rec, r, key, n)
                    msg = rec["note"]
                self.cell_costs.append(time.time() - t_cell)
                self.progress(f"{where} {label(name):13s} {msg}")
                continue
            if device == "cpu":
                self.progress(f"{where} {label(name):13s} {rec['note']}")

        floor = self.base_record(row, FLOOR)
        floor.update(contender=FLOOR, status="skipped", note="nothing timed")
        if to_time and not (self.sweep_deadline and time.time() > self.sweep_deadline):
            t_job = time.time()
            timeout = (len(to_time) * budget + sum(ALLOWANCE.get(c, DEFAULT_ALLOWANCE) for c in to_time)
                       + 60 + (120 if device == "cuda" else 0))
            spec = {"job": "timing", "config": row["config"], "contenders": to_time, "n": n,
                    "d": self.a.d, "dtype": row["dtype"], "device": device, "repeats": k,
                    "budget_s": budget, "spent_s": spent, "run_s": run_s,
                    "mem_limit_mib": self.mem_limit_mib if device == "cpu" else None}
            r = self.run_job(spec, timeout)
            while r.get("poisoned_by") in to_time:
                # a fault in one contender broke the CUDA context: record it, rerun the others
                bad = r["poisoned_by"]
                self._fail(recs[bad], r, (device, row["config"], row["dtype"], bad), n)
                print(f"  {label(bad)} broke the CUDA context ({r.get('message', '')[:120]}); "
                      "rerunning the row without it", flush=True)
                to_time = [c for c in to_time if c != bad]
                spec["contenders"] = to_time
                r = self.run_job(spec, timeout) if to_time else {"ok": True, "results": {}}
            self.threads = self.threads or r.get("threads")
            self._gpu_name = self._gpu_name or r.get("device_name")
            if r.get("ok"):
                self._take_timing(row, recs, floor, r, to_time)
            else:
                for name in to_time:
                    self._fail(recs[name], r, (device, row["config"], row["dtype"], name), n,
                               prefix="timing job: ")
            self.cell_costs.append((time.time() - t_job) / max(1, len(to_time)))
            summary = ", ".join(f"{label(c)} {fmt_s(recs[c].get('median_s'))} s"
                                if recs[c]["status"] == "ok" else f"{label(c)} {recs[c]['status']}"
                                for c in to_time)
            self.progress(f"{where} timed: {summary}, floor {fmt_s(floor.get('median_s'))} s")
        elif to_time:
            for name in to_time:
                recs[name].update(status="skipped", note="skipped: over time budget (deadline of the whole run)")
            self.progress(f"{where} not timed: deadline")
        elif device == "cpu":
            self.progress(f"{where} nothing to time")
        self._ratios(recs, floor)
        for rec in list(recs.values()) + [floor]:
            rec.update(threads=self.threads, device_name=self.device_name(device))
        self.records += [recs[c] for c in row["contenders"]] + [floor]
        self.save()

    # --- a row's records from its jobs' results: failures, timings, ratios -----------------------

    def _fail(self, rec, r, key, n, prefix=""):
        status = r.get("status", "failed")
        msg = r.get("message", "")
        if status == "OOM":
            rec.update(status="OOM", note=f"OOM: {msg}")
            self.oom_at[key] = min(n, self.oom_at.get(key, n))
        elif status == "timeout":
            rec.update(status="skipped", note=f"skipped: over time budget ({prefix}{msg})")
        elif status == "compile failed":
            rec.update(status="compile failed", note=f"compile failed: {msg}")
        else:
            rec.update(status="failed", note=f"failed: {prefix}{msg}")

    def _take_timing(self, row, recs, floor, r, to_time):
        device = row["device"]
        for name in to_time:
            rec, res = recs[name], r["results"].get(name, {"status": "failed", "message": "no result"})
            key = (device, row["config"], row["dtype"], name)
            for f in ("loss", "err_loss_rel", "err_grad_rel", "max_err"):
                if f in res:
                    rec[f] = res[f]
            if "peak_mib" in res:
                rec.update(peak_mib=res["peak_mib"], memory_counter=res["memory_counter"])
            if res.get("err_loss_rel") is not None:
                rec["oracle"] = r.get("oracle")
            status = res.get("status")
            if status == "ok" and res.get("times_s"):
                t = res["times_s"]
                rec.update(median_s=statistics.median(t), min_s=min(t), max_s=max(t), runs=len(t), times_s=t)
                self.est[key] = (row["n"], row["m"], rec["median_s"])
            elif status == "skipped":
                rec.update(status="skipped", note="skipped: " + res.get("message", "over time budget"))
                if res.get("run_s"):
                    self.est[key] = (row["n"], row["m"], res["run_s"])
            else:
                self._fail(rec, res, key, row["n"])
        if r.get("floor_s"):
            t = r["floor_s"]
            floor.update(status="ok", note="", median_s=statistics.median(t), min_s=min(t), max_s=max(t),
                         runs=len(t), times_s=t)
        elif r.get("floor_status"):
            self._fail(floor, r["floor_status"], None, row["n"])

    def _ratios(self, recs, floor):
        naive = recs.get(NAIVE)
        fl = floor.get("median_s")
        for rec in list(recs.values()) + [floor]:
            med = rec.get("median_s")
            if med:
                rec["floor_s"] = fl
                rec["x_floor"] = med / fl if fl else None
                rec["tflops"] = 8 * rec["n"] * rec["m"] * rec["d"] / med / 1e12
                if naive and naive.get("median_s"):
                    rec["x_naive"] = med / naive["median_s"]
            # below 1 MiB the naive figure is page-granular noise: no ratio
            if rec.get("peak_mib") is not None and naive and (naive.get("peak_mib") or 0) >= 1.0:
                rec["x_naive_mem"] = rec["peak_mib"] / naive["peak_mib"]
