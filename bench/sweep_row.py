"""One row of the sweep (configuration, dtype, N): on CPU a ``memory`` job per contender in a fresh
process, then one ``timing`` job for every contender of the row and the GEMM floor; the records of
the row, with a status and a note where a cell did not run."""
from __future__ import annotations

import time

import report
from configs import CONFIGS
from contenders import label
from report import FLOOR
from time_budget import ALLOWANCE, DEFAULT_ALLOWANCE


class SweepRow:
    """Part of run_bench.Bench: running one row of the sweep."""

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
                    run_s[name] = spent[name] = r["run_s"]
                    self.est[key] = (n, m, r["run_s"])
                    if r["run_s"] * 3 > budget:
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
            summary = ", ".join(f"{label(c)} {report.fmt_s(recs[c].get('median_s'))} s"
                                if recs[c]["status"] == "ok" else f"{label(c)} {recs[c]['status']}"
                                for c in to_time)
            self.progress(f"{where} timed: {summary}, floor {report.fmt_s(floor.get('median_s'))} s")
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
