"""Which rows (device, configuration, dtype, N) the sweep runs, and each device's repeats, time
budget and compile warm-up size: the mode's plan (configs.MODES) with the command line's overrides."""
from __future__ import annotations

from configs import CONFIGS, MODES
from contenders import contenders_for


class SweepPlan:
    """Part of run_bench.Bench: its rows and per-device settings."""

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
