"""The largest-N probe: the largest N that naive and each fused backend can run within a memory
budget (probe_search.py), seeded by the sweep's results; on CPU one ``memory`` job per step, on
CUDA one in-process ``probe`` job per contender."""
from __future__ import annotations

from configs import CONFIGS, PROBE_CONFIG
from contenders import FUSED, NAIVE, contenders_for, label
from probe_search import probe_search
from time_budget import ALLOWANCE, DEFAULT_ALLOWANCE


class LargestNProbe:
    """Part of run_bench.Bench: the largest-N probe after the sweep."""

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
