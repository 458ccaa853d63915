"""The ``memory`` job: one contender, one forward + backward at size N, in a fresh process.

Peak memory is the increase of the peak RSS over the RSS just before the call, with the inputs
already allocated. The counter is VmHWM, the one behind ``ru_maxrss``, reset just before the call
through /proc/self/clear_refs. Without /proc it falls back to plain ``ru_maxrss``. A tiny warm-up
of the same contender runs first, so the figure excludes the allocator's and the compiler's
one-off state. An address-space limit (RLIMIT_AS, the RSS before the call plus ``mem_limit_mib``)
turns a run too big for the machine into a clean "OOM" instead of a visit from the kernel's OOM
killer.
"""
from __future__ import annotations

import gc

import torch

from address_space import limit_address_space, unlimit_address_space
from configs import CONFIGS
from contenders import build
from failure_status import classify
from fwd_bwd import fwd_bwd
from measure_worker import hwm_mib, maxrss_mib, reset_peak


def memory_job(spec):
    """Peak memory of one forward + backward of one contender at N (fresh process)."""
    cfg, name, device = CONFIGS[spec["config"]], spec["contender"], spec["device"]
    dtype, n, d = getattr(torch, spec["dtype"]), spec["n"], spec["d"]
    out = {"ok": False, "job": "memory", "contender": name, "n": n}
    try:
        small = cfg.make(spec.get("warm_n", 256), d, dtype, device, seed=1)
        fwd_bwd(build(name, cfg, small), small, device)
        del small
    except Exception as exc:  # noqa: BLE001 - reported as the cell's status
        out["status"], out["message"] = classify(exc, name)
        if out["status"] == "OOM":
            out["status"] = "failed"   # a tiny problem cannot run out of memory: something else broke
        return out
    try:
        inp = cfg.make(n, d, dtype, device, seed=spec.get("seed", 0))
        fn = build(name, cfg, inp)
    except Exception as exc:  # noqa: BLE001
        out["status"], out["message"] = classify(exc, name)
        return out
    gc.collect()
    limited = limit_address_space(spec.get("mem_limit_mib"))
    reset = reset_peak()
    base, base_maxrss = (hwm_mib() if reset else maxrss_mib()), maxrss_mib()
    try:
        t, loss = fwd_bwd(fn, inp, device)
    except Exception as exc:  # noqa: BLE001
        status, msg = classify(exc, name)
        if limited and status == "OOM":
            msg = f"address-space limit of +{spec['mem_limit_mib']:.0f} MiB: {msg}"
        out["status"], out["message"] = status, msg
        return out
    peak = hwm_mib() if reset else maxrss_mib()
    if limited:
        unlimit_address_space()
    out.update(ok=True, status="ok", run_s=t, loss=float(loss), peak_mib=max(0.0, peak - base),
               memory_counter="VmHWM reset before the call" if reset else "ru_maxrss",
               baseline_mib=base, ru_maxrss_before_mib=base_maxrss, ru_maxrss_after_mib=maxrss_mib(),
               threads=torch.get_num_threads())
    return out
