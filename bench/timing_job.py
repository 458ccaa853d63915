"""The ``timing`` job: every contender of one row (configuration, dtype, N) in the same process,
on the same inputs.

Each contender has one warm-up run at N, which also gives the loss and gradients for the error
check. Then come rounds in alternating order: round r times the contenders rotated by r
(A B C F, B C F A, ...), where F is the GEMM floor, until each has its number of timed runs. On
CUDA the job also measures each contender's peak memory in the same process, as
``max_memory_allocated`` over one run after the warm-up minus ``memory_allocated`` before it.
"""
from __future__ import annotations

import gc

import torch

from address_space import limit_address_space
from configs import CONFIGS, floor_operands
from contenders import NAIVE, build
from error_check import errors_against, grads_of, reference_oracle
from failure_status import classify
from fwd_bwd import clear_grads, fwd_bwd
from gemm_floor import gemm_floor

HALF = ("float16", "bfloat16")


def _cuda_healthy():
    try:
        torch.ones(1, device="cuda").add_(1).item()
        torch.cuda.synchronize()
        return True
    except Exception:  # noqa: BLE001
        return False


def timing_job(spec):
    """Time every contender of one row in this process, in alternating order, after a warm-up."""
    cfg, device = CONFIGS[spec["config"]], spec["device"]
    dtype, n, d = getattr(torch, spec["dtype"]), spec["n"], spec["d"]
    k, budget = spec["repeats"], spec["budget_s"]
    spent = spec.get("spent_s", {})           # seconds each contender already used in this row
    t_est = spec.get("run_s", {})             # its memory run's time, when there was one
    inp = cfg.make(n, d, dtype, device, seed=spec.get("seed", 0))
    limit_address_space(spec.get("mem_limit_mib"))
    results, fns, outputs = {}, {}, {}
    for name in spec["contenders"]:
        r = results[name] = {"status": "ok"}
        try:
            fn = build(name, cfg, inp)
            t_warm, loss = fwd_bwd(fn, inp, device)
            r.update(warmup_s=t_warm, loss=float(loss))
            outputs[name] = (loss.float().cpu(), grads_of(cfg, inp))
            est = min(t_warm, t_est.get(name, t_warm))
            if device == "cuda":
                clear_grads(inp)
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                t_mem, _ = fwd_bwd(fn, inp, device)
                r.update(peak_mib=(torch.cuda.max_memory_allocated() - base) / 2**20,
                         memory_counter="cuda max_memory_allocated", run_s=t_mem)
                est = t_mem
            # the warm-up counts as one run: its excess is compilation / autotuning, not this row's cost
            left = budget - spent.get(name, 0.0) - est
            r["repeats"] = min(k, int(left / est)) if est > 0 else k
            if r["repeats"] < 1:
                r.update(status="skipped", message=f"over time budget (one run {est:.1f} s, "
                                                   f"{max(left, 0):.1f} s of {budget:.0f} s left)")
            else:
                fns[name] = fn
        except Exception as exc:  # noqa: BLE001
            results[name].update(zip(("status", "message"), classify(exc, name)))
            outputs.pop(name, None)
            if device == "cuda" and results[name]["status"] != "OOM" and not _cuda_healthy():
                # a kernel fault poisons the CUDA context: report, and let the caller rerun the rest
                return {"ok": False, "status": "failed", "poisoned_by": name,
                        "message": f"{name}: {results[name]['message']}"}
        clear_grads(inp)
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()

    # error against the reference: the naive run itself in fp32/fp64, an fp32 reference for half dtypes
    ref, ref_note = None, None
    if spec["dtype"] in HALF:
        try:
            ref, ref_note = reference_oracle(cfg, inp, device), "fp32 reference on the same inputs"
        except Exception as exc:  # noqa: BLE001
            ref_note = "fp32 reference: " + " ".join(classify(exc))
        clear_grads(inp)
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    elif NAIVE in outputs:
        ref, ref_note = outputs[NAIVE], f"naive ({spec['dtype']})"
    for name, (loss, grads) in outputs.items():
        if ref is not None:
            results[name].update(errors_against(loss, grads, ref))
    outputs.clear()

    # rounds in alternating order, the GEMM floor as one more entry
    x, y = floor_operands(cfg, inp)
    reps = {name: results[name]["repeats"] for name in fns}
    reps["floor"] = max(reps.values(), default=k) if spec.get("floor", True) else 0
    order = [name for name in spec["contenders"] if name in fns] + (["floor"] if reps["floor"] else [])
    times = {name: [] for name in order}
    for rnd in range(max(reps.values(), default=0)):
        shift = rnd % len(order)
        for name in order[shift:] + order[:shift]:
            if rnd >= reps[name]:
                continue
            try:
                if name == "floor":
                    times[name].append(gemm_floor(x, y, device))
                else:
                    times[name].append(fwd_bwd(fns[name], inp, device)[0])
            except Exception as exc:  # noqa: BLE001
                if name == "floor":
                    reps["floor"] = 0
                    results["floor"] = dict(zip(("status", "message"), classify(exc)))
                else:
                    results[name].update(zip(("status", "message"), classify(exc, name)))
                    reps[name] = 0
    for name in fns:
        if results[name]["status"] == "ok":
            results[name]["times_s"] = times[name]
    return {"ok": True, "job": "timing", "results": results, "floor_s": times.get("floor", []),
            "floor_status": results.get("floor"), "oracle": ref_note, "threads": torch.get_num_threads(),
            "device_name": torch.cuda.get_device_name() if device == "cuda" else None}
