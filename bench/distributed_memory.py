"""Peak memory per rank of ik.distributed.icon_loss against world size, simulated on the CPU.

Every (mode, world size) point spawns ``world`` fresh processes joined by gloo. Each rank makes
its shard of a global fp32 problem (N_global x d, labels = arange // 2, dot kernel, self pairs
excluded), pins glibc's mmap threshold (measure.py's docstring says why), warms up on a tiny
problem, resets its peak RSS (VmHWM) and runs forward + backward once; its figure is the peak RSS
increase over the RSS just before that call. With more than
one rank, each rank gets its share of the cores (at least one thread). The table shows
the largest rank's figure. Gather mode runs the fused backend ("auto": cpu when built); ring mode
its own blockwise math.

    python bench/distributed_memory.py                       # N_global = 16384, d = 128, worlds 1 2 4
    python bench/distributed_memory.py --n 4096 --worlds 1 2
"""
import argparse
import datetime
import json
import os
import socket
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from measure import hwm_mib, pin_malloc, reset_peak  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _rank_main(rank, world, n, d, mode, init_file, out_dir):
    import icon_kernels as ik
    pinned = pin_malloc()     # glibc's mmap threshold made static: a reproducible figure (measure.py)
    if world > 1:      # the ranks share the machine's cores, as torchrun's OMP_NUM_THREADS=1 does
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        sizes = [n // world + (r < n % world) for r in range(world)]
        start = sum(sizes[:rank])
        gen = torch.Generator().manual_seed(0)
        x_global = torch.randn(n, d, generator=gen)
        x = x_global[start:start + sizes[rank]].clone().requires_grad_()
        del x_global
        labels = (torch.arange(n) // 2)[start:start + sizes[rank]]
        loss_kw = dict(kernel="dot", temperature=0.1, dist_mode=mode)
        warm = torch.randn(8, d, requires_grad=True)      # allocator, thread pool, gloo buffers
        ik.distributed.icon_loss(warm, target=ik.Labels(torch.arange(8) // 2), **loss_kw).backward()
        dist.barrier()
        exact = reset_peak()
        base = hwm_mib()
        t0 = time.perf_counter()
        ik.distributed.icon_loss(x, target=ik.Labels(labels), **loss_kw).backward()
        seconds = time.perf_counter() - t0
        result = {"rank": rank, "n_local": sizes[rank], "peak_increase_mib": hwm_mib() - base,
                  "seconds": seconds, "hwm_reset": exact, "malloc_pinned": pinned}
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def measure(world, n, d, mode, timeout):
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.start_processes(_rank_main, args=(world, n, d, mode, os.path.join(tmp, "init"), tmp),
                                 nprocs=world, join=False, start_method="spawn")
        deadline = time.time() + timeout
        while not ctx.join(timeout=2):
            if time.time() > deadline:
                for p in ctx.processes:
                    p.kill()
                return {"error": f"timeout after {timeout} s"}
        ranks = [json.load(open(os.path.join(tmp, f"rank{r}.json"))) for r in range(world)]
    return {"world": world, "mode": mode, "ranks": ranks,
            "max_peak_increase_mib": max(r["peak_increase_mib"] for r in ranks),
            "max_seconds": max(r["seconds"] for r in ranks)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--modes", nargs="+", default=["gather", "ring"])
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args()
    rows = []
    for mode in args.modes:
        for world in args.worlds:
            r = measure(world, args.n, args.d, mode, args.timeout)
            rows.append(r)
            print(f"{mode:>6} world {world}: " + (r["error"] if "error" in r else
                  f"max per-rank peak +{r['max_peak_increase_mib']:.1f} MiB, {r['max_seconds']:.1f} s"), flush=True)
    print(f"\nN_global = {args.n}, d = {args.d}, fp32, labels, fwd+bwd; per-rank peak RSS increase (largest rank)")
    print("| mode | world 1 | " + " | ".join(f"world {w}" for w in args.worlds[1:]) + " | ratio last/first |")
    print("|---|" + "---|" * (len(args.worlds) + 1))
    for mode in args.modes:
        cells = [r for r in rows if r.get("mode") == mode]
        if len(cells) != len(args.worlds):
            continue
        peaks = [c["max_peak_increase_mib"] for c in cells]
        print(f"| {mode} | " + " | ".join(f"{p:.1f} MiB" for p in peaks) + f" | {peaks[-1] / peaks[0]:.0%} |")
    os.makedirs(args.out, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = os.path.join(args.out, f"distributed-{socket.gethostname()}-{stamp}.json")
    with open(path, "w") as f:
        json.dump({"n_global": args.n, "d": args.d, "torch": torch.__version__,
                   "cpu_count": os.cpu_count(), "points": rows}, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
