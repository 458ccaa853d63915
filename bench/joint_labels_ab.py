"""Joint normalisation of a Labels target on the cpu backend (a joint SupCon: 100 classes, dot
kernel, tau 0.1, y = x), the joint family schedule (csrc/cpu_symmetric_joint_family.h) against the
plain joint rows: forward + backward with ICON_KERNELS_SYMMETRIC 1 and 0 in alternating order in
one process; prints each divergence's minimum times and their ratio.

    python bench/joint_labels_ab.py --n 8192 --rounds 3 --divergences kl js
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

import icon_kernels as ik


def timed(x, labels, divergence, symmetric):
    os.environ["ICON_KERNELS_SYMMETRIC"] = "1" if symmetric else "0"
    xx = x.clone().requires_grad_()
    start = time.perf_counter()
    ik.icon_loss(xx, target=ik.Labels(labels), kernel="dot", temperature=0.1, normalization="joint",
                 divergence=divergence, backend="cpu").backward()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--divergences", nargs="+", default=["kl", "js"])
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 100, (args.n,), generator=gen)
    x = F.normalize(torch.randn(args.n, args.d, generator=gen), dim=1)
    print(f"N = {args.n}, d = {args.d}, {torch.get_num_threads()} threads, min over {args.rounds} rounds")
    for divergence in args.divergences:
        times = {True: [], False: []}
        timed(x, labels, divergence, True)     # warm-up
        for r in range(args.rounds):
            for symmetric in ((True, False) if r % 2 == 0 else (False, True)):
                times[symmetric].append(timed(x, labels, divergence, symmetric))
        sym, plain = min(times[True]), min(times[False])
        print(f"{divergence}: symmetric {sym:.3f} s, plain {plain:.3f} s, ratio {sym / plain:.2f}")
    os.environ.pop("ICON_KERNELS_SYMMETRIC")


if __name__ == "__main__":
    main()
