"""The ``probe`` job: a largest-N search for one contender within a memory budget, in-process on
CUDA, where running out of memory is recoverable. On CPU the orchestrator runs one ``memory`` job
per step instead (largest_n_probe.py)."""
from __future__ import annotations

import gc

import torch

from configs import CONFIGS
from contenders import build
from failure_status import classify
from fwd_bwd import clear_grads, fwd_bwd
from probe_search import probe_search


def probe_job(spec):
    """Largest N within a memory budget for one contender, in-process (CUDA)."""
    cfg, name, device = CONFIGS[spec["config"]], spec["contender"], spec["device"]
    dtype, d = getattr(torch, spec["dtype"]), spec["d"]
    budget_mib = spec["mem_budget_mib"] or 0.9 * torch.cuda.get_device_properties(0).total_memory / 2**20

    def step(n):
        torch.cuda.empty_cache()
        try:
            inp = cfg.make(n, d, dtype, device)
            fn = build(name, cfg, inp)
            fwd_bwd(fn, inp, device)          # warm-up (compile, autotune)
            clear_grads(inp)
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            t, _ = fwd_bwd(fn, inp, device)
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
            return {"status": "ok", "run_s": t, "peak_mib": peak}
        except Exception as exc:  # noqa: BLE001
            status, msg = classify(exc, name)
            return {"status": status, "message": msg}
        finally:
            gc.collect()
            torch.cuda.empty_cache()

    return dict(probe_search(step, budget_mib, spec["start_n"], spec.get("known", []),
                             spec["step_s"], spec["steps"], spec.get("max_n"), spec.get("deadline")),
                ok=True, job="probe")
