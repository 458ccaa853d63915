"""Benchmark the I-Con loss backends against naive PyTorch (backend "reference") on this machine.

Problem: fp32 x (N x d), y = None (self-pairs excluded), labels = arange(N) // 2 (one positive per
row), kernel "dot", temperature 0.1, forward + backward. Each (backend, N) point runs in a fresh
process (bench/measure_worker.py) so that its peak memory (increase of the peak RSS, i.e.
ru_maxrss / VmHWM, over the RSS just before the first loss call) is its own. Prints a table and writes
bench/results/<hostname>-<timestamp>.json.

    python bench/run_bench.py                 # N = 2048, 4096, 8192, 16384
    python bench/run_bench.py --quick         # N = 1024, 2048
    python bench/run_bench.py --sizes 4096 --backends torch --repeats 3
"""
import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time

import torch

import icon_kernels as ik

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "measure_worker.py")
NAIVE = "reference"


def machine_info(d):
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "dtype": "float32", "d": d, "device": "cpu", "hostname": socket.gethostname()}
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception:  # not installed, or broken: report, never fail
        info["triton"] = None
    return info


def run_worker(backend, n, d, repeats, timeout, floor_repeats=None):
    """Run one measurement in a fresh interpreter; always returns a dict with "ok"."""
    cmd = [sys.executable, WORKER, "--backend", backend, "--n", str(n), "--d", str(d),
           "--repeats", str(repeats)]
    if floor_repeats is not None:
        cmd += ["--floor-repeats", str(floor_repeats)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": "timeout", "message": f"no result after {timeout} s"}
    for line in reversed(proc.stdout.strip().splitlines()):
        try:
            return json.loads(line)
        except ValueError:
            continue
    # No JSON: killed (the kernel's OOM killer sends SIGKILL) or crashed.
    killed = proc.returncode in (-9, 137)
    tail = (proc.stderr.strip().splitlines() or [""])[-1]
    return {"ok": False, "error": "OOM" if killed else "failed",
            "message": f"exit code {proc.returncode}: {tail[:300]}"}


def summarize(r, naive):
    """Derived figures of one result; ratios are against the naive result of the same N."""
    if not r.get("ok"):
        return None
    times = r["times_s"] or [r["first_s"]]
    s = {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
         "floor_s": statistics.median(r["floor_s"]) if r["floor_s"] else None,
         "mem_mib": r["peak_increase_mib"]}
    s["x_floor"] = s["median_s"] / s["floor_s"] if s["floor_s"] else None
    n = s if naive is r else (naive.get("summary") if naive else None)
    s["x_naive_time"] = s["median_s"] / n["median_s"] if n else None
    s["x_naive_mem"] = s["mem_mib"] / n["mem_mib"] if n and n["mem_mib"] > 0 else None
    return s


def fmt(v, spec, missing="-"):
    return missing if v is None else format(v, spec)


COLS = [("backend", 10), ("N", 6), ("fwd+bwd median s", 17), ("[min, max] s", 17),
        ("x naive", 8), ("GEMM floor s", 12), ("x floor", 8), ("peak +MiB", 10), ("x naive mem", 11)]


def row_cells(r):
    s = r.get("summary")
    if s is None:
        err = r.get("error", "failed")
        return [r["backend"], str(r["n"])] + [err] + ["-"] * (len(COLS) - 3)
    return [r["backend"], str(r["n"]), fmt(s["median_s"], ".3f"),
            f"[{s['min_s']:.3f}, {s['max_s']:.3f}]", fmt(s["x_naive_time"], ".2f"),
            fmt(s["floor_s"], ".3f"), fmt(s["x_floor"], ".2f"), fmt(s["mem_mib"], ".1f"),
            fmt(s["x_naive_mem"], ".3f")]


def print_table(results):
    print(" | ".join(name.rjust(w) for name, w in COLS))
    print("-+-".join("-" * w for _, w in COLS))
    for r in results:
        print(" | ".join(c.rjust(w) for c, (_, w) in zip(row_cells(r), COLS)))


# backends fast enough for the single large-N point (the torch backend needs minutes there)
SCALE_BACKENDS = ("cpu", "triton", "cuda")


def scale_runs(a, backends):
    """One forward + backward (after the memory run) per fused backend at a.scale_n."""
    out = []
    for b in backends:
        t0 = time.perf_counter()
        # no GEMM floor here: it would need an N x N matrix itself
        r = run_worker(b, a.scale_n, a.d, 1, a.timeout, floor_repeats=0)
        r.update(backend=b, n=a.scale_n, d=a.d, wall_s=time.perf_counter() - t0)
        r["summary"] = summarize(r, None)
        out.append(r)
        status = (f"{r['summary']['median_s']:.1f} s, +{r['summary']['mem_mib']:.1f} MiB"
                  if r["ok"] else r["error"])
        print(f"[scale] {b:10s} N={a.scale_n:<6d} {status} ({r['wall_s']:.0f} s)", flush=True)
    return out


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="2048,4096,8192,16384", help="comma-separated N")
    p.add_argument("--quick", action="store_true", help="N = 1024, 2048")
    p.add_argument("--backends", default=None,
                   help="comma-separated backends to compare with naive (default: every available "
                        "backend except reference); reference is always measured as the baseline")
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--repeats", type=int, default=None,
                   help="timed runs per point after the warm-up (default: 5, or 3 for N >= 8192)")
    p.add_argument("--timeout", type=float, default=600, help="seconds per measurement")
    p.add_argument("--scale-n", type=int, default=65536,
                   help="one extra point for the fused C++/GPU backends only (0: skip)")
    return p.parse_args(argv)


def main(argv=None):
    a = parse_args(argv)
    sizes = [1024, 2048] if a.quick else [int(s) for s in a.sizes.split(",") if s.strip()]
    available = ik.available_backends()
    if a.backends:
        others = [b.strip() for b in a.backends.split(",") if b.strip()]
    else:
        others = [b for b in available if b != NAIVE]
    others = [b for b in others if b != NAIVE]
    backends = [NAIVE] + others

    info = machine_info(a.d)
    print("I-Con loss benchmark: labels target (arange(N)//2), kernel=dot, temperature=0.1, "
          "y=None (self-pairs excluded), forward+backward")
    for k, v in info.items():
        print(f"  {k:14s} {v}")
    print(f"  {'available':14s} {available}")
    print(f"  {'sizes':14s} {sizes}")
    print("  time: median of the timed runs after one warm-up run; GEMM floor: four N x N x d "
          "torch.mm, same process")
    print("  memory: peak RSS (VmHWM = ru_maxrss, reset just before) increase over the first run, "
          "fresh process per point\n")

    results, t_start = [], time.perf_counter()
    for n in sizes:
        repeats = a.repeats if a.repeats is not None else (3 if n >= 8192 else 5)
        naive = None
        for b in backends:
            t0 = time.perf_counter()
            r = run_worker(b, n, a.d, repeats, a.timeout)
            r.update(backend=b, n=n, d=a.d, wall_s=time.perf_counter() - t0)
            naive = r if b == NAIVE else naive
            r["summary"] = summarize(r, naive)
            if r["ok"] and naive and naive.get("ok") and b != NAIVE:
                r["loss_rel_diff_vs_naive"] = abs(r["loss"] - naive["loss"]) / max(abs(naive["loss"]), 1e-12)
            results.append(r)
            status = (f"median {r['summary']['median_s']:.3f} s, +{r['summary']['mem_mib']:.1f} MiB, "
                      f"loss {r['loss']:.6f}") if r["ok"] else f"{r['error']}: {r.get('message', '')}"
            print(f"[{len(results)}/{len(sizes) * len(backends)}] {b:10s} N={n:<6d} {status} "
                  f"({r['wall_s']:.0f} s)", flush=True)
            if r.get("loss_rel_diff_vs_naive", 0) > 1e-3:
                print(f"  WARNING: loss differs from naive by {r['loss_rel_diff_vs_naive']:.2e} (relative)")

    if a.scale_n and not a.quick:
        results += scale_runs(a, [b for b in backends if b in SCALE_BACKENDS])

    total = time.perf_counter() - t_start
    print()
    print_table(results)
    if a.scale_n and not a.quick:
        print(f"\nN={a.scale_n}: naive PyTorch is not run there: one fp32 N x N matrix alone is "
              f"{a.scale_n ** 2 * 4 / 2 ** 30:.0f} GiB, and DESIGN.md §4 measured it running out of "
              "memory at about N = 30k on this 24 GB machine.")
    print(f"\ntotal wall time {total:.0f} s")

    out_dir = os.path.join(HERE, "results")
    os.makedirs(out_dir, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = os.path.join(out_dir, f"{info['hostname']}-{stamp}.json")
    with open(path, "w") as f:
        json.dump({"machine": info, "sizes": sizes, "backends": backends,
                   "total_wall_s": total, "results": results}, f, indent=1)
    print(f"results written to {os.path.relpath(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
