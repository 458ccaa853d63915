"""Turning job results into a row's records: the status of a failed cell, the timings and errors of
the timing job, and the ratios to naive and to the GEMM floor."""
from __future__ import annotations

import statistics

from contenders import NAIVE


class RowResults:
    """Part of run_bench.Bench: a row's records from its jobs' results."""

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
