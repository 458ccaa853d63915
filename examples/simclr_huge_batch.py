"""Drop ik.InfoNCE into a plain SimCLR-style training loop and use huge batches.

Synthetic data (no download): points around random class centres, two noisy "augmented" views
per sample, an MLP encoder, AdamW, and ik.InfoNCE(temperature) (NT-Xent) as the criterion. Each
configuration runs in a fresh process, and its peak memory is the rise of the process's peak RSS
(VmHWM, reset just before the measured training step) over the RSS before it: tracemalloc does
not see torch tensors. "naive" is the dense PyTorch formulation (backend="reference": the N x N
logits, softmax and gradients are materialised); "fused" is backend="auto".

    .venv/bin/python examples/simclr_huge_batch.py                 # the memory / time table
    .venv/bin/python examples/simclr_huge_batch.py --train 2048    # just train (one process)

Distributed (every rank scores its rows against the global batch; gradients equal the
single-process ones):

    torchrun --nproc_per_node=2 examples/simclr_huge_batch.py --train 2048 --distributed
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch

import icon_kernels as ik

DIM_IN, DIM_OUT = 64, 128


def encoder():
    return torch.nn.Sequential(torch.nn.Linear(DIM_IN, 256), torch.nn.ReLU(), torch.nn.Linear(256, DIM_OUT))


def batch(n_samples: int, gen: torch.Generator):
    """Two augmented views of n_samples synthetic points (20 classes)."""
    centres = torch.randn(20, DIM_IN, generator=torch.Generator().manual_seed(0)) * 2
    x = centres[torch.randint(0, 20, (n_samples,), generator=gen)] + torch.randn(n_samples, DIM_IN, generator=gen)
    return (x + 0.3 * torch.randn(x.shape, generator=gen), x + 0.3 * torch.randn(x.shape, generator=gen))


def train(n_samples: int, steps: int, backend: str, criterion=None, rank: int = 0, log=print):
    """The drop-in part: a standard loop with ik.InfoNCE as the criterion. Returns step times."""
    torch.manual_seed(0)
    model = encoder()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    criterion = criterion or ik.InfoNCE(temperature=0.1, backend=backend)
    gen = torch.Generator().manual_seed(1 + rank)
    times = []
    for step in range(steps):
        view1, view2 = batch(n_samples, gen)
        t0 = time.perf_counter()
        loss = criterion(model(view1), model(view2))        # NT-Xent over 2 * n_samples views
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
        log(f"step {step}: loss {loss.item():.4f} ({times[-1]:.2f} s)")
    return times


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def measure(n_samples: int, backend: str) -> dict:
    """Worker: one warm-up step, then the peak-RSS rise of one measured step, then 2 timed steps."""
    train(max(n_samples // 8, 64), 1, backend, log=lambda *_: None)        # warm threads / allocator
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                                                       # reset VmHWM to VmRSS
    before = _status_kib("VmRSS")
    first = train(n_samples, 1, backend, log=lambda *_: None)
    peak = _status_kib("VmHWM") - before
    times = first + train(n_samples, 2, backend, log=lambda *_: None)
    return {"n_samples": n_samples, "rows": 2 * n_samples, "backend": backend,
            "peak_rise_mib": peak / 1024, "step_s": sorted(times)[len(times) // 2]}


def table(sizes, naive_max, timeout):
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fused backend for CPU tensors: "
          f"{'cpu' if 'cpu' in ik.available_backends() else 'torch'}; fp32, encoder {DIM_IN}->256->{DIM_OUT}")
    print(f"{'batch (views)':>14} | {'naive peak MiB':>14} | {'fused peak MiB':>14} | {'naive s/step':>12} | {'fused s/step':>12}")
    for n in sizes:
        row = {}
        for name, backend in (("naive", "reference"), ("fused", "auto")):
            if name == "naive" and n > naive_max:
                continue
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", str(n), backend]
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True)
                row[name] = json.loads(out.stdout.strip().splitlines()[-1])
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
                row[name] = {"error": type(exc).__name__}

        def cell(name, key, fmt):
            r = row.get(name)
            if r is None:
                return "not run"
            return "failed" if "error" in r else format(r[key], fmt)
        print(f"{2 * n:>14} | {cell('naive', 'peak_rise_mib', '.0f'):>14} | {cell('fused', 'peak_rise_mib', '.0f'):>14} | "
              f"{cell('naive', 'step_s', '.2f'):>12} | {cell('fused', 'step_s', '.2f'):>12}", flush=True)
    print(f"naive is not run above {2 * naive_max} views: one fp32 N x N matrix at N = {2 * sizes[-1]} is "
          f"{(2 * sizes[-1]) ** 2 * 4 / 2**30:.0f} GiB and it needs several.")
    print("distributed: torchrun --nproc_per_node=2 examples/simclr_huge_batch.py --train 2048 --distributed")


def distributed_train(n_samples: int, steps: int, dist_mode: str):
    import torch.distributed as dist
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    criterion = ik.InfoNCE(temperature=0.1, distributed=True, dist_mode=dist_mode)
    log = print if rank == 0 else (lambda *_: None)
    log(f"{world} ranks x {n_samples} samples: global batch of {2 * n_samples * world} views, dist_mode={dist_mode}")
    train(n_samples, steps, "auto", criterion=criterion, rank=rank, log=log)
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096, 8192, 16384],
                        help="samples per batch (views = 2x) for the table")
    parser.add_argument("--naive-max", type=int, default=8192, help="largest batch run naively")
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds per configuration")
    parser.add_argument("--train", type=int, help="just train with this many samples per batch")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--distributed", action="store_true", help="run under torchrun")
    parser.add_argument("--dist-mode", default="gather", choices=["gather", "ring"])
    parser.add_argument("--worker", nargs=2, metavar=("N", "BACKEND"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(int(args.worker[0]), args.worker[1])))
    elif args.distributed:
        distributed_train(args.train or 2048, args.steps, args.dist_mode)
    elif args.train:
        train(args.train, args.steps, "auto")
    else:
        table(args.sizes, args.naive_max, args.timeout)


if __name__ == "__main__":
    main()
