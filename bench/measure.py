"""Measurements in a process of their own: the jobs, and how the runner starts them.

Peak memory on the CPU is read from the process's peak RSS (VmHWM, the counter behind
``ru_maxrss``; tracemalloc cannot see torch tensors), which says nothing about a second problem in
the same process: hence one process per memory figure.

Pinned allocator (``pin_malloc``, every CPU memory figure: the ``memory`` and ``backend_point``
jobs, so ``make bench``'s CPU rows, the CPU largest-N probe, bench_icon.py, distributed_memory.py
and tests/test_memory_bound.py). With glibc's defaults the figure of one fused backend moved by up
to ~50 MiB between fresh runs of the same configuration (cpu InfoNCE at N = 8192: 61-109 MiB, steps
of ~8 MiB), more than the differences the memory bounds ask about. The cause, as far as the
experiments show (pinning it removes the spread), is malloc's *dynamic* mmap threshold: it starts
at 128 KiB, and each free of an mmapped block raises it to that block's size (up to 32 MiB), so
whether later tiles (the cpu backend's 8 MiB Gram tiles, the torch backend's chunks) come from a
heap instead of fresh mappings, and how much of a heap stays resident after their free, depends on
the order in which the threads allocate and free them. The memory jobs therefore call
mallopt(M_MMAP_THRESHOLD, 128 KiB) and mallopt(M_TRIM_THRESHOLD, 128 KiB) first (before the
warm-up): glibc's initial values, made static. Every block of 128 KiB or more is then its own
mapping, resident while it is live and unmapped at its free, so the RSS peak is the peak of the
live large buffers plus the small-block heap: 3 fresh runs agree within ~1 MiB (measured with
thresholds of 128 KiB, 1 MiB and 4 MiB; 128 KiB had the smallest spread on the torch backend's
f-divergence chunks, 0.6 against 5.8 MiB at 1 MiB and 1.3 MiB at 4 MiB). It is done with mallopt
rather than the MALLOC_MMAP_THRESHOLD_ environment variable because glibc reads that variable only
at process start, and the runner's forked children start from a parent that is already running.
MALLOC_ARENA_MAX is left alone: per-thread arenas then hold only blocks under 128 KiB, and limiting
them made no measurable difference to the spread.

The price is time: every large block is mapped afresh and page-faulted in, so a memory run is
slower than a timed one (2-core VM, N = 8192, the memory run over the timed median: the torch
backend 2-3x, the cpu backend 1.0-1.5x); the timing job therefore keeps the allocator's defaults,
as a user's process would, and the runner does not charge a pinned memory run's time to a row's
budget. The alternative counter, torch's CPU allocator events (torch.profiler with
profile_memory=True, summed in time order), was used as a cross-check, not as the figure: it sees
tensors only, and the profiler itself adds ~150 MiB of RSS. For the torch backend the two agree
within 0.5 MiB (InfoNCE 44.4 / 44.6 MiB, t-SNE 60.4 / 60.7); for the cpu backend the tensors (two N
x d gradient buffers and one or two 8 MiB Gram tiles: 16.5 MiB InfoNCE, 24.7 MiB t-SNE) leave ~5
MiB of the RSS figure to memory outside torch's allocator (mappings it does not record, thread
scratch), which only the RSS sees.

Without glibc (no mallopt), or with ``"pin_malloc": false`` in a job's spec (to see the old
behaviour), the figure is the plain RSS increase, and ``memory_counter`` says so.

The jobs (a JSON spec in, one JSON result out):

- ``memory``: one contender, one forward + backward at size N; the increase of the peak RSS over
  the RSS just before the call, with the inputs already allocated, under an address-space limit
  (allocator pinned on CPU).
- ``timing``: every contender of one row (configuration, dtype, N) in the same process, on the
  same inputs, in alternating order with the GEMM floor (and, on CUDA, each contender's peak
  memory).
- ``probe``: a largest-N search for one contender within a memory budget, in-process on CUDA.
  On CPU the runner runs one ``memory`` job per step instead (probe.py).
- ``backend_point``: one backend on tests/test_memory_bound.py's problem (fp32 x, labels
  arange(N)//2, kernel "dot", tau 0.1, y = None): peak memory of the first run (allocator
  pinned), then timed runs and the GEMM floor.

``python bench/measure.py '<json spec>'`` runs one job in a fresh interpreter and prints one JSON
line (``run_spawned``: CUDA jobs, ``--spawn``, the pytest-benchmark suite, the memory-bound test).
On CPU the runner forks instead (``run_forked``): a fresh child of a process that has imported
torch and icon_kernels but never run an operator saves the ~2 s interpreter start per job. A child
that dies without a result is reported as "OOM" (SIGKILL, likely the OOM killer) or "failed".
"""
from __future__ import annotations

import gc
import json
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

import icon_kernels as ik  # noqa: E402
from probe import probe_search  # noqa: E402
from workloads import (CONFIGS, NAIVE, build, clear_grads, cuda_peak_mib, errors_against,  # noqa: E402
                       config_floor, floor_operands, fwd_bwd, gemm_floor, grads_of, reference_oracle)

HALF = ("float16", "bfloat16")


# --- the peak-RSS counter and the address-space limit ---------------------------------------------

def maxrss_mib():
    """Peak RSS in MiB: ru_maxrss (KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _proc_status_kib(field):
    """The value of a "<field>: <n> kB" line of /proc/self/status; None without /proc."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def hwm_mib():
    """Peak RSS in MiB from VmHWM, the counter behind ru_maxrss, which (unlike ru_maxrss, that
    keeps the peak latched at any thread's exit) is reset by reset_peak(); None without /proc."""
    kib = _proc_status_kib("VmHWM")
    return None if kib is None else kib / 1024.0


def reset_peak():
    """Reset VmHWM to the current RSS (Linux >= 4.0: write "5" to /proc/self/clear_refs), so that
    a peak left by imports or the warm-up cannot hide part of the run's increase."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return hwm_mib() is not None
    except OSError:
        return False


# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 128 * 1024     # glibc's initial threshold, made static (module docstring)


def pin_malloc(threshold=MMAP_THRESHOLD):
    """Make glibc's mmap and trim thresholds static at ``threshold`` bytes (see the module
    docstring: blocks of that size or more are mapped at malloc and unmapped at free, so the peak
    RSS follows the live buffers instead of the allocator's history). True when it took effect;
    False without glibc (the figure is then the allocator's default behaviour)."""
    import ctypes
    import platform
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(threshold))
                    and libc.mallopt(_M_TRIM_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):
        return False


def memory_counter(reset, pinned):
    """What the ``memory_counter`` field of a CPU figure says."""
    text = "VmHWM reset before the call" if reset else "ru_maxrss"
    return text + (f", malloc mmap threshold pinned at {MMAP_THRESHOLD // 1024} KiB" if pinned
                   else ", default malloc thresholds")


def vmsize_bytes():
    kib = _proc_status_kib("VmSize")
    return None if kib is None else kib * 1024


def limit_address_space(extra_mib):
    """Soft RLIMIT_AS = current address space (VmSize) + extra_mib, so that a run too big for the
    machine is a clean "OOM" (MemoryError / failed allocation) instead of a visit from the kernel's
    OOM killer (no-op when unknown or extra_mib falsy)."""
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
    """(status, message) for an exception raised by a run: "OOM", "compile failed" (torch.compile
    of naive) or "failed", with a one-line message; what a cell says instead of crashing."""
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


# --- the jobs --------------------------------------------------------------------------------------

def memory_job(spec):
    """Peak memory of one forward + backward of one contender at N (fresh process). A tiny warm-up
    of the same contender runs first, so the figure excludes the allocator's and the compiler's
    one-off state; without /proc the counter falls back to plain ``ru_maxrss``."""
    cfg, name, device = CONFIGS[spec["config"]], spec["contender"], spec["device"]
    dtype, n, d = getattr(torch, spec["dtype"]), spec["n"], spec["d"]
    out = {"ok": False, "job": "memory", "contender": name, "n": n}
    pinned = device == "cpu" and spec.get("pin_malloc", True) and pin_malloc()
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
               memory_counter=(memory_counter(reset, pinned) if device == "cpu"
                               else "VmHWM reset before the call" if reset else "ru_maxrss"),
               baseline_mib=base, ru_maxrss_before_mib=base_maxrss, ru_maxrss_after_mib=maxrss_mib(),
               threads=torch.get_num_threads())
    return out


def _cuda_healthy():
    try:
        torch.ones(1, device="cuda").add_(1).item()
        torch.cuda.synchronize()
        return True
    except Exception:  # noqa: BLE001
        return False


def timing_job(spec):
    """Time every contender of one row in this process, in alternating order, after a warm-up.

    Each contender's warm-up run at N also gives the loss and gradients for the error check. Then
    round r times the contenders rotated by r (A B C F, B C F A, ..., F the GEMM floor), until each
    has its number of timed runs, so that a machine getting busier hurts every contender alike."""
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
                peak, t_mem = cuda_peak_mib(fn, inp)
                r.update(peak_mib=peak, memory_counter="cuda max_memory_allocated", run_s=t_mem)
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
    floor_ops = floor_operands(cfg, inp)
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
                    times[name].append(config_floor(floor_ops, device))
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
    dtype, d = getattr(torch, spec["dtype"]), spec["d"]
    budget_mib = spec["mem_budget_mib"] or 0.9 * torch.cuda.get_device_properties(0).total_memory / 2**20

    def step(n):
        torch.cuda.empty_cache()
        try:
            inp = cfg.make(n, d, dtype, device)
            fn = build(name, cfg, inp)
            fwd_bwd(fn, inp, device)          # warm-up (compile, autotune)
            peak, t = cuda_peak_mib(fn, inp)
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


def _labels_inputs(n, d, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(n, d, generator=gen, dtype=dtype).requires_grad_(),
            "labels": torch.arange(n) // 2}


def _labels_loss(inp, backend, kernel, temperature):
    return lambda: ik.icon_loss(inp["x"], target=ik.Labels(inp["labels"]), kernel=kernel,
                                temperature=temperature, backend=backend)


def backend_point_job(spec):
    """One backend at one N: inputs and a tiny warm-up of the same backend (allocator, thread pool,
    dispatch); the peak RSS increase of the first run at N, which is also the timing warm-up;
    ``repeats`` timed runs; ``floor_repeats`` (default: ``repeats``) GEMM floors. The allocator is
    pinned for the whole job (pin_malloc cannot be undone), so its times include mapping every
    block of 128 KiB or more afresh."""
    backend, n, d = spec["backend"], spec["n"], spec.get("d", 128)
    repeats = spec.get("repeats", 5)
    floor_repeats = repeats if spec.get("floor_repeats") is None else spec["floor_repeats"]
    kernel, temperature = spec.get("kernel", "dot"), spec.get("temperature", 0.1)
    dtype = getattr(torch, spec.get("dtype", "float32"))
    pinned = spec.get("pin_malloc", True) and pin_malloc()
    try:
        inp = _labels_inputs(n, d, dtype)
        small = _labels_inputs(64, d, dtype, seed=1)
        fwd_bwd(_labels_loss(small, backend, kernel, temperature), small, "cpu")
        gemm_floor(small["x"].detach(), small["x"].detach(), "cpu")
        del small

        reset = reset_peak()
        base, base_maxrss = (hwm_mib() if reset else maxrss_mib()), maxrss_mib()
        run = _labels_loss(inp, backend, kernel, temperature)
        first_s, loss = fwd_bwd(run, inp, "cpu")
        peak, peak_maxrss = (hwm_mib() if reset else maxrss_mib()), maxrss_mib()

        times = [fwd_bwd(run, inp, "cpu")[0] for _ in range(repeats)]
        clear_grads(inp)
        xd = inp["x"].detach()
        floor = [gemm_floor(xd, xd, "cpu") for _ in range(floor_repeats)]
    except (RuntimeError, MemoryError) as e:  # torch reports allocation failure as RuntimeError
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        oom = isinstance(e, MemoryError) or "memory" in msg.lower() or "alloc" in msg.lower()
        return {"ok": False, "backend": backend, "n": n, "d": d,
                "error": "OOM" if oom else "failed", "message": msg[:300]}
    return {
        "ok": True, "backend": backend, "n": n, "d": d, "dtype": str(dtype).replace("torch.", ""),
        "kernel": kernel, "temperature": temperature, "target": "labels arange(N)//2",
        "threads": torch.get_num_threads(),
        "loss": float(loss), "first_s": first_s, "times_s": times, "floor_s": floor,
        "memory_counter": memory_counter(reset, pinned),
        "baseline_mib": base, "peak_mib": peak, "peak_increase_mib": peak - base,
        "ru_maxrss_before_mib": base_maxrss, "ru_maxrss_after_mib": peak_maxrss,
    }


JOBS = {"memory": memory_job, "timing": timing_job, "probe": probe_job, "backend_point": backend_point_job}


def run_job(spec):
    try:
        return JOBS[spec["job"]](spec)
    except Exception as exc:  # noqa: BLE001 - the parent reports it
        status, msg = classify(exc, spec.get("contender"))
        return {"ok": False, "status": status, "message": msg, "traceback": traceback.format_exc()[-2000:]}


# --- running a job in a process of its own, with a timeout ----------------------------------------

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
    """Run ``spec`` in a fresh interpreter (``python measure.py <spec>``)."""
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
