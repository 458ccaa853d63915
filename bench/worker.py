"""Measurement jobs of the benchmark, each run in a process of its own (see ``run_job``).

- ``memory``: one contender, one forward + backward at size N, in a fresh process. Peak memory is
  the increase of the peak RSS over the RSS just before the call, with the inputs already
  allocated. The counter is VmHWM, the one behind ``ru_maxrss``, reset just before the call
  through /proc/self/clear_refs. Without /proc it falls back to plain ``ru_maxrss``. A tiny
  warm-up of the same contender runs first, so the figure excludes the allocator's and the
  compiler's one-off state. An address-space limit (RLIMIT_AS, the RSS before the call plus
  ``mem_limit_mib``) turns a run too big for the machine into a clean "OOM" instead of a visit
  from the kernel's OOM killer.
- ``timing``: every contender of one row (configuration, dtype, N) in the same process, on the
  same inputs. Each contender has one warm-up run at N, which also gives the loss and gradients
  for the error check. Then come rounds in alternating order: round r times the contenders
  rotated by r (A B C F, B C F A, ...), where F is the GEMM floor, until each has its number of
  timed runs. On CUDA the job also measures each contender's peak memory in the same process,
  as ``max_memory_allocated`` over one run after the warm-up minus ``memory_allocated`` before it.
- ``probe``: a largest-N search for one contender within a memory budget. It runs in-process on
  CUDA, where running out of memory is recoverable. On CPU the orchestrator runs one ``memory``
  job per step instead (see run_bench.py).

``python bench/worker.py '<json spec>'`` runs one job and prints one JSON line. The CPU
orchestrator forks instead (``run_forked``): a fresh child of a process that has imported torch
and icon_kernels but never run an operator, which saves the ~2 s interpreter start per job.
"""
from __future__ import annotations

import gc
import json
import math
import os
import resource
import select
import signal
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import torch  # noqa: E402

from configs import CONFIGS, floor_operands, round_n  # noqa: E402
from contenders import NAIVE, build  # noqa: E402
from measure_worker import hwm_mib, maxrss_mib, reset_peak  # noqa: E402

HALF = ("float16", "bfloat16")


# --- small helpers -----------------------------------------------------------------------------------

def vmsize_bytes():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def limit_address_space(extra_mib):
    """Soft RLIMIT_AS = current address space + extra_mib (no-op when unknown or extra_mib falsy)."""
    if not extra_mib:
        return False
    vm = vmsize_bytes()
    if vm is None:
        return False
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    soft = vm + int(extra_mib * 2**20)
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    return True


def unlimit_address_space():
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (hard, hard))


def classify(exc, name=None):
    """(status, message) for an exception raised by a run."""
    msg = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    text = str(exc)
    oom = (isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"
           or "can't allocate memory" in text or "out of memory" in text.lower()
           or "ALLOC_FAILED" in text or "std::bad_alloc" in text or "Cannot allocate memory" in text)
    if oom:
        return "OOM", msg
    mod = type(exc).__module__ or ""
    if name == "compiled" and ("_dynamo" in mod or "_inductor" in mod or "Compil" in type(exc).__name__
                               or "Unsupported" in type(exc).__name__):
        return "compile failed", f"{type(exc).__name__}: {msg}"
    return "failed", f"{type(exc).__name__}: {msg}"


def _dtype(name):
    return getattr(torch, name)


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _clear(inp):
    for v in inp.values():
        if isinstance(v, torch.Tensor) and v.grad is not None:
            v.grad = None


def fwd_bwd(fn, inp, device):
    """Seconds for one forward + backward (synchronised on CUDA), and the loss."""
    _clear(inp)
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        loss = fn()
        loss.backward()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3, loss.detach()
    t0 = time.perf_counter()
    loss = fn()
    loss.backward()
    return time.perf_counter() - t0, loss.detach()


def gemm_floor(x, y, device, block_elems=None):
    """Seconds for the four N x M x d GEMMs of one fused forward + backward: S = X Y^T (forward),
    S again (the backward recomputes it), G Y and G^T X with an N x M G. Done in row blocks of at
    most ``block_elems`` entries of S (2^26 on CPU, 2^28 on GPU): the same FLOPs, O(block) memory,
    and exactly four whole GEMMs whenever N x M fits in one block."""
    n, m = x.shape[0], y.shape[0]
    block_elems = block_elems or (2**28 if device == "cuda" else 2**26)
    rows = max(1, min(n, block_elems // max(m, 1)))
    with torch.no_grad():
        s = torch.empty(rows, m, dtype=x.dtype, device=x.device)
        gy = torch.empty(rows, x.shape[1], dtype=x.dtype, device=x.device)
        gtx = torch.zeros(m, x.shape[1], dtype=x.dtype, device=x.device)
        yt = y.t()
        _sync(device)
        t0 = time.perf_counter()
        for i in range(0, n, rows):
            xb = x[i:i + rows]
            sb, gyb = s[:xb.shape[0]], gy[:xb.shape[0]]
            torch.mm(xb, yt, out=sb)
            torch.mm(xb, yt, out=sb)
            torch.mm(sb, y, out=gyb)
            gtx.addmm_(sb.t(), xb)
        _sync(device)
        return time.perf_counter() - t0


def _grads(cfg, inp):
    return [inp[k].grad.detach().float().clone() if inp[k].grad is not None else None for k in cfg.leaves]


def _errors(loss, grads, ref):
    """Relative loss error and max gradient error relative to max |reference gradient|."""
    ref_loss, ref_grads = ref
    out = {"err_loss_rel": abs(float(loss) - float(ref_loss)) / max(abs(float(ref_loss)), 1e-30)}
    g_err = 0.0
    for g, r in zip(grads, ref_grads):
        if g is None or r is None:
            continue
        scale = float(r.abs().max()) or 1.0
        g_err = max(g_err, float((g - r).abs().max()) / scale)
    out["err_grad_rel"] = g_err
    out["max_err"] = max(out["err_loss_rel"], g_err)
    return out


# --- jobs -------------------------------------------------------------------------------------------

def memory_job(spec):
    """Peak memory of one forward + backward of one contender at N (fresh process)."""
    cfg, name, device = CONFIGS[spec["config"]], spec["contender"], spec["device"]
    dtype, n, d = _dtype(spec["dtype"]), spec["n"], spec["d"]
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


def _reference_oracle(cfg, inp, device):
    """fp32 reference loss and gradients on the upcast inputs (for half-precision rows)."""
    up = {k: (v.detach().float().requires_grad_(v.requires_grad) if v.is_floating_point() else v)
          for k, v in inp.items()}
    _, loss = fwd_bwd(build(NAIVE, cfg, up), up, device)
    return loss, _grads(cfg, up)


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
    dtype, n, d = _dtype(spec["dtype"]), spec["n"], spec["d"]
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
            outputs[name] = (loss.float().cpu(), _grads(cfg, inp))
            est = min(t_warm, t_est.get(name, t_warm))
            if device == "cuda":
                _clear(inp)
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
        _clear(inp)
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()

    # error against the reference: the naive run itself in fp32/fp64, an fp32 reference for half dtypes
    ref, ref_note = None, None
    if spec["dtype"] in HALF:
        try:
            ref, ref_note = _reference_oracle(cfg, inp, device), "fp32 reference on the same inputs"
        except Exception as exc:  # noqa: BLE001
            ref_note = "fp32 reference: " + " ".join(classify(exc))
        _clear(inp)
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    elif NAIVE in outputs:
        ref, ref_note = outputs[NAIVE], f"naive ({spec['dtype']})"
    for name, (loss, grads) in outputs.items():
        if ref is not None:
            results[name].update(_errors(loss, grads, ref))
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


def probe_job(spec):
    """Largest N within a memory budget for one contender, in-process (CUDA)."""
    cfg, name, device = CONFIGS[spec["config"]], spec["contender"], spec["device"]
    dtype, d = _dtype(spec["dtype"]), spec["d"]
    budget_mib = spec["mem_budget_mib"] or 0.9 * torch.cuda.get_device_properties(0).total_memory / 2**20

    def step(n):
        torch.cuda.empty_cache()
        try:
            inp = cfg.make(n, d, dtype, device)
            fn = build(name, cfg, inp)
            fwd_bwd(fn, inp, device)          # warm-up (compile, autotune)
            _clear(inp)
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


JOBS = {"memory": memory_job, "timing": timing_job, "probe": probe_job}


def run_job(spec):
    try:
        return JOBS[spec["job"]](spec)
    except Exception as exc:  # noqa: BLE001 - the parent reports it
        status, msg = classify(exc, spec.get("contender"))
        return {"ok": False, "status": status, "message": msg, "traceback": traceback.format_exc()[-2000:]}


# --- running a job in a process of its own ----------------------------------------------------------

def _dead(code_or_signal, tail):
    """Result for a child that printed no result: the OOM killer's SIGKILL, or a crash."""
    if code_or_signal in (-signal.SIGKILL, 137):
        return {"ok": False, "status": "OOM", "message": "killed (SIGKILL, likely the OOM killer)"}
    return {"ok": False, "status": "failed", "message": f"exit {code_or_signal}: {tail[-300:]}"}


def run_forked(spec, timeout):
    """Run ``spec`` in a forked child (CPU only: the parent must never have run a torch operator)."""
    sys.stdout.flush()
    sys.stderr.flush()
    r, w = os.pipe()
    log = tempfile.TemporaryFile()
    pid = os.fork()
    if pid == 0:      # child
        code = 0
        try:
            os.close(r)
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            data = json.dumps(run_job(spec)).encode()
            while data:
                data = data[os.write(w, data):]
        except BaseException:  # noqa: BLE001
            code = 3
        finally:
            os._exit(code)
    os.close(w)
    chunks, end, timed_out = [], time.time() + timeout, False
    try:
        while True:
            left = end - time.time()
            if left <= 0:
                timed_out = True
                break
            ready, _, _ = select.select([r], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(r, 1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
    except BaseException:       # Ctrl-C: leave no orphan behind
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise
    if timed_out:
        os.kill(pid, signal.SIGKILL)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    if timed_out:
        log.close()
        return {"ok": False, "status": "timeout", "message": f"no result after {timeout:.0f} s"}
    try:
        return json.loads(b"".join(chunks))
    except ValueError:
        log.seek(0)
        tail = log.read().decode(errors="replace").strip()
        log.close()
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        return _dead(code, tail)


def run_spawned(spec, timeout):
    """Run ``spec`` in a fresh interpreter (``python worker.py <spec>``)."""
    cmd = [sys.executable, os.path.abspath(__file__), json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "status": "timeout", "message": f"no result after {timeout:.0f} s"}
    for line in reversed(proc.stdout.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return _dead(proc.returncode, proc.stderr.strip())


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    out = run_job(json.loads(argv[0]))
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
