"""Measure one (backend, N) point of the I-Con loss, forward + backward, in this fresh process.

Run by bench/run_bench.py and tests/test_memory_bound.py, one process per measurement, because
peak memory is read from the process's peak RSS (VmHWM, the counter behind ``ru_maxrss``;
tracemalloc cannot see torch tensors), which tells nothing about a second problem in the same
process. Prints exactly one JSON line on stdout.

Order of work:
1. create the inputs and warm the backend with a tiny call (allocator, thread pool, dispatch);
2. reset the peak RSS, read it (the baseline) and run the loss once: the peak after it minus
   the baseline is the memory figure, and this first run is also the warm-up for timing;
3. time ``--repeats`` more runs, then the GEMM floor: four N x N x d ``torch.mm`` calls.

Problem: fp32 embeddings x (N x d), y = None (self-pairs excluded), labels = arange(N) // 2
(two views per sample: exactly one positive per row), kernel "dot", temperature 0.1.
"""
import argparse
import json
import resource
import sys
import time

import torch

import icon_kernels as ik


def maxrss_mib():
    """Peak RSS in MiB: ru_maxrss (KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def hwm_mib():
    """Peak RSS in MiB from VmHWM, the counter behind ru_maxrss, which (unlike ru_maxrss, that
    keeps the peak latched at any thread's exit) is reset by reset_peak(); None without /proc."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def reset_peak():
    """Reset VmHWM to the current RSS (Linux >= 4.0: write "5" to /proc/self/clear_refs), so that
    a peak left by imports or the warm-up cannot hide part of the run's increase."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return hwm_mib() is not None
    except OSError:
        return False


def make_inputs(n, d, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=dtype)
    labels = torch.arange(n) // 2
    return x, labels


def fwd_bwd(x, labels, backend, kernel, temperature):
    """One forward + backward; returns (seconds, loss value)."""
    x.grad = None
    t0 = time.perf_counter()
    loss = ik.icon_loss(x, target=ik.Labels(labels), kernel=kernel,
                        temperature=temperature, backend=backend)
    loss.backward()
    elapsed = time.perf_counter() - t0
    return elapsed, float(loss.detach())


def gemm_floor(x):
    """Seconds for the four N x N x d GEMMs of one fused forward + backward:
    S = X Yt (forward), S again (recompute in backward), G Y and Gt X (G is N x N)."""
    with torch.no_grad():
        t0 = time.perf_counter()
        s = torch.mm(x, x.t())
        torch.mm(x, x.t(), out=s)
        torch.mm(s, x)
        torch.mm(s.t(), x)
        elapsed = time.perf_counter() - t0
    del s
    return elapsed


def measure(backend, n, d, repeats, floor_repeats, kernel="dot", temperature=0.1,
            dtype=torch.float32):
    # 1. inputs and a tiny warm-up call of the same backend.
    x, labels = make_inputs(n, d, dtype)
    x.requires_grad_()
    xs, ls = make_inputs(64, d, dtype, seed=1)
    fwd_bwd(xs.requires_grad_(), ls, backend, kernel, temperature)
    with torch.no_grad():
        torch.mm(xs, xs.t())
    del xs, ls

    # 2. memory, on the first run at size N.
    reset = reset_peak()
    base, base_maxrss = (hwm_mib() if reset else maxrss_mib()), maxrss_mib()
    first_s, loss = fwd_bwd(x, labels, backend, kernel, temperature)
    peak, peak_maxrss = (hwm_mib() if reset else maxrss_mib()), maxrss_mib()

    # 3. timing runs, then the GEMM floor in the same process.
    times = [fwd_bwd(x, labels, backend, kernel, temperature)[0] for _ in range(repeats)]
    x.grad = None
    xd = x.detach()
    floor = [gemm_floor(xd) for _ in range(floor_repeats)]
    return {
        "ok": True, "backend": backend, "n": n, "d": d, "dtype": str(dtype).replace("torch.", ""),
        "kernel": kernel, "temperature": temperature, "target": "labels arange(N)//2",
        "threads": torch.get_num_threads(),
        "loss": loss, "first_s": first_s, "times_s": times, "floor_s": floor,
        "memory_counter": "VmHWM after reset" if reset else "ru_maxrss",
        "baseline_mib": base, "peak_mib": peak, "peak_increase_mib": peak - base,
        "ru_maxrss_before_mib": base_maxrss, "ru_maxrss_after_mib": peak_maxrss,
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", required=True)
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5, help="timed runs after the first (0: memory only)")
    p.add_argument("--floor-repeats", type=int, default=None, help="GEMM floor runs (default: --repeats)")
    a = p.parse_args(argv)
    floor_repeats = a.repeats if a.floor_repeats is None else a.floor_repeats
    try:
        out = measure(a.backend, a.n, a.d, a.repeats, floor_repeats)
    except (RuntimeError, MemoryError) as e:  # torch reports allocation failure as RuntimeError
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        oom = isinstance(e, MemoryError) or "memory" in msg.lower() or "alloc" in msg.lower()
        out = {"ok": False, "backend": a.backend, "n": a.n, "d": a.d,
               "error": "OOM" if oom else "failed", "message": msg[:300]}
    print(json.dumps(out), flush=True)
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
