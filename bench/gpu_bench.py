"""GPU benchmark: naive PyTorch against every usable fused backend on one CUDA device.

Problem: x (N x d) in bf16 or fp32, y = None (self-pairs excluded), labels = arange(N) // 2, kernel
"dot", temperature 0.1, forward + backward. Per point: median of --repeats timed runs after one
warm-up (CUDA events), peak memory = max_memory_allocated over the run minus what was allocated
before it, and throughput counting 8 N^2 d FLOPs (the four GEMM-equivalents of a fused forward +
backward). Cells that run out of memory say "OOM". Prints a table and writes JSON to --out.
"""
import argparse
import json
import os
import statistics
import sys

import torch

import icon_kernels as ik

H200_DENSE_BF16_TFLOPS = 989.0   # NVIDIA's dense (no sparsity) bf16 tensor-core peak for H100/H200 SXM


def run_once(x, labels, backend):
    x.grad = None
    loss = ik.icon_loss(x, target=ik.Labels(labels), kernel="dot", temperature=0.1, backend=backend)
    loss.backward()
    return loss.detach()


def measure(backend, n, d, dtype, repeats):
    torch.cuda.empty_cache()
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(n, d, device="cuda", dtype=dtype, generator=gen).div_(d ** 0.5).requires_grad_()
    labels = torch.arange(n, device="cuda") // 2
    try:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss = run_once(x, labels, backend)          # warm-up (and compile / autotune)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run_once(x, labels, backend)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    except (torch.OutOfMemoryError, RuntimeError) as exc:   # cuBLAS reports OOM as RuntimeError
        text = str(exc)
        if not isinstance(exc, torch.OutOfMemoryError) and "ALLOC" not in text and "out of memory" not in text:
            raise
        return {"backend": backend, "n": n, "dtype": str(dtype), "error": "OOM"}
    median = statistics.median(times)
    tflops = 8 * n * n * d / median / 1e12
    return {"backend": backend, "n": n, "d": d, "dtype": str(dtype).replace("torch.", ""),
            "median_s": median, "min_s": min(times), "max_s": max(times), "peak_mib": peak / 2**20,
            "tflops": tflops, "loss": float(loss)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="8192,32768,65536")
    p.add_argument("--dtypes", default="bfloat16,float32")
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=os.environ.get("OUT"))
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_bench: SKIPPED - no CUDA device")
        return 0
    backends = ["reference"] + [b for b in ik.available_backends() if b not in ("reference", "cpu")]
    props = torch.cuda.get_device_properties(0)
    print(f"device {props.name}, torch {torch.__version__}, backends {backends}")
    rows = []
    for dtype in [getattr(torch, s) for s in a.dtypes.split(",")]:
        for n in [int(s) for s in a.sizes.split(",")]:
            naive = None
            for backend in backends:
                r = measure(backend, n, a.d, dtype, a.repeats)
                naive = r if backend == "reference" else naive
                if "median_s" in r and naive and "median_s" in naive:
                    r["x_naive_time"] = r["median_s"] / naive["median_s"]
                    r["x_naive_mem"] = r["peak_mib"] / naive["peak_mib"]
                if "tflops" in r and dtype == torch.bfloat16:
                    r["pct_of_bf16_peak"] = 100 * r["tflops"] / H200_DENSE_BF16_TFLOPS
                rows.append(r)
                print(json.dumps(r), flush=True)
                if a.out:   # written after every point, so a time-out keeps what was measured
                    os.makedirs(a.out, exist_ok=True)
                    with open(os.path.join(a.out, "gpu_bench.json"), "w") as f:
                        json.dump({"device": props.name, "torch": torch.__version__, "rows": rows}, f, indent=1)
    print(f"\n{'backend':>10} {'dtype':>9} {'N':>6} {'median ms':>10} {'x naive':>8} {'TFLOP/s':>8} {'peak MiB':>10} {'x naive mem':>11}")
    for r in rows:
        if "error" in r:
            print(f"{r['backend']:>10} {r['dtype']:>9} {r['n']:>6} {r['error']:>10}")
            continue
        print(f"{r['backend']:>10} {r['dtype']:>9} {r['n']:>6} {1e3 * r['median_s']:>10.2f} "
              f"{r.get('x_naive_time', float('nan')):>8.3f} {r['tflops']:>8.1f} {r['peak_mib']:>10.1f} "
              f"{r.get('x_naive_mem', float('nan')):>11.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
