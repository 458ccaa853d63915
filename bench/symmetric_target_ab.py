"""The symmetric Affinity schedules against the plain one on the cpu backend for a target kernel
that is not linear in its Gram term (issue 18: every target kernel): t-SNE's learned kernel
(student_t, dof 1) on an Affinity target with ``--target-kernel`` (dof / exponent 1), forward +
backward, ICON_KERNELS_SYMMETRIC 1 against 0 in alternating order in one process; prints each
divergence's minimum times and their ratio.

    python bench/symmetric_target_ab.py --n 4096 --rounds 6
"""
from __future__ import annotations

import argparse
import os
import time

import torch

import icon_kernels as ik

PARAM = {"student_t": "dof", "power": "exponent"}


def timed(x, z, target_kernel, divergence, symmetric):
    os.environ["ICON_KERNELS_SYMMETRIC"] = "1" if symmetric else "0"
    xx = x.clone().requires_grad_()
    target = ik.Affinity(z, kernel=target_kernel, **{PARAM[target_kernel]: 1.0})
    start = time.perf_counter()
    ik.icon_loss(xx, target=target, kernel="student_t", dof=1.0, divergence=divergence, backend="cpu").backward()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--target-kernel", default="student_t", choices=sorted(PARAM))
    parser.add_argument("--divergences", nargs="+", default=["kl", "js"])
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    x, z = torch.randn(args.n, args.d, generator=gen), torch.randn(args.n, args.d, generator=gen)
    print(f"N = {args.n}, d = {args.d}, target {args.target_kernel}, {torch.get_num_threads()} threads, "
          f"min over {args.rounds} rounds")
    for divergence in args.divergences:
        times = {True: [], False: []}
        timed(x, z, args.target_kernel, divergence, True)     # warm-up
        for r in range(args.rounds):
            for symmetric in ((True, False) if r % 2 == 0 else (False, True)):
                times[symmetric].append(timed(x, z, args.target_kernel, divergence, symmetric))
        sym, plain = min(times[True]), min(times[False])
        print(f"{divergence}: symmetric {sym:.3f} s, plain {plain:.3f} s, ratio {sym / plain:.2f}")
    os.environ.pop("ICON_KERNELS_SYMMETRIC")


if __name__ == "__main__":
    main()
