"""One rank of tests/test_joint_normalization.py's distributed test: normalization="joint" and
symmetrize=True through ik.distributed.icon_loss (ring mode, and gather mode, which takes the
ring's column stream for them). Each case builds the same global float64 problem on every rank,
runs this rank's shard and compares the loss and every gradient with the single-process
reference on the concatenated batch (rel 1e-9): x, y, the kernel parameter (0-d: each rank's
share, all-reduced), per-row kernel parameters, Neighbors weights, Dense p and an Affinity
target's z, z_cols and parameter (not for symmetrised targets, whose own gradients need the
reference). Each report line ends with "ok"."""
import os
import traceback

import torch
import torch.distributed as dist

import icon_kernels as ik
from worker_exit import skip_native_teardown

SHARDS = [5, 9, 7]             # uneven rows per rank
TOL = 1e-9
# (target, symmetrize, normalization, divergence, alpha, beta, y given, reduction)
CASES = [
    ("labels", False, "joint", "kl", 0.0, 0.0, False, "mean"),
    ("labels", False, "joint", "js", 0.1, 0.2, True, "sum"),
    ("neighbors", False, "joint", "kl", 0.2, 0.0, False, "none"),
    ("neighbors", True, "joint", "kl", 0.0, 0.0, False, "mean"),
    ("neighbors", True, "conditional", "tv", 0.0, 0.1, False, "mean"),
    ("dense", False, "joint", "cross_entropy", 0.0, 0.15, False, "none"),
    ("affinity", False, "joint", "hellinger", 0.0, 0.0, True, "sum"),
    ("affinity", True, "joint", "kl", 0.0, 0.0, False, "mean"),
    ("affinity", True, "conditional", "reverse_kl", 0.0, 0.0, False, "none"),
    ("affinity", True, "joint", "chi2", 0.1, 0.0, False, "sum"),
    ("affinity", True, "joint", "js", 0.0, 0.0, True, "sum"),      # y given: square, z_cols None
]


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def case_parts(target, symmetrize, rect, n, gen):
    x = torch.randn(n, 4, generator=gen, dtype=torch.float64)
    y = torch.randn(n, 4, generator=gen, dtype=torch.float64) if rect else None
    parts = {}
    if target == "labels":
        parts["labels"] = torch.randint(0, 4, (n,), generator=gen)
    elif target == "neighbors":
        idx = torch.randint(-1, n, (n, 4), generator=gen)
        idx[0, 1] = idx[0, 0]                # a repeated column
        parts["indices"], parts["weights"] = idx, torch.rand(n, 4, generator=gen, dtype=torch.float64) + 0.1
    elif target == "affinity":
        parts["z"] = torch.randn(n, 3, generator=gen, dtype=torch.float64)
        parts["z_cols"] = torch.randn(n, 3, generator=gen, dtype=torch.float64) if rect and not symmetrize else None
        # symmetrised: a per-row sigma, so t_ji != t_ij and the columns' parameters must travel
        parts["sigma"] = (torch.rand(n, generator=gen, dtype=torch.float64) + 0.7 if symmetrize
                          else torch.tensor(1.3, dtype=torch.float64))
    else:
        p = torch.rand(n, n, generator=gen, dtype=torch.float64)
        p[p < 0.3] = 0.0
        parts["p"] = p
    return x, y, parts


def build(target, symmetrize, parts, rows, grad):
    take = {k: (v if v is None or v.dim() == 0 else v[rows]) for k, v in parts.items()}
    grads_of = () if symmetrize else ("weights", "p", "z", "z_cols", "sigma")
    leaves = {k: v.clone().requires_grad_() for k, v in take.items() if grad and k in grads_of and v is not None}
    take.update(leaves)
    if target == "labels":
        made = ik.Labels(take["labels"])
    elif target == "neighbors":
        made = ik.Neighbors(take["indices"], take["weights"], symmetrize=symmetrize)
    elif target == "affinity":
        made = ik.Affinity(take["z"], take["z_cols"], kernel="gaussian", sigma=take["sigma"], symmetrize=symmetrize)
    else:
        made = ik.Dense(take["p"])
    return made, leaves


def run_case(k, spec, rank, world, dist_mode, block_rows):
    target, symmetrize, normalization, divergence, alpha, beta, rect, reduction = spec
    sizes = SHARDS[:world]
    n = sum(sizes)
    off = sum(sizes[:rank])
    sl = slice(off, off + sizes[rank])
    gen = torch.Generator().manual_seed(300 + k)
    x, y, parts = case_parts(target, symmetrize, rect, n, gen)
    per_row = k % 2 == 1                     # a per-row dof: no row constant cancels in its chain
    dof = (torch.rand(n, generator=gen, dtype=torch.float64) + 0.8) if per_row else torch.tensor(1.4, dtype=torch.float64)
    upstream = torch.randn(n, generator=gen, dtype=torch.float64)
    opts = dict(kernel="student_t", divergence=divergence, alpha=alpha, beta=beta, normalization=normalization,
                reduction=reduction)

    def leaves_of(rows):
        lx = x[rows].clone().requires_grad_()
        ly = None if y is None else y[rows].clone().requires_grad_()
        ld = (dof[rows] if per_row else dof).clone().requires_grad_()
        t, t_leaves = build(target, symmetrize, parts, rows, grad=True)
        named = {"x": lx, "dof": ld, **({"y": ly} if ly is not None else {}), **t_leaves}
        return lx, ly, ld, t, named
    fx, fy, fd, ft, f_named = leaves_of(slice(None))
    want = ik.icon_loss(fx, fy, target=ft, backend="reference", dof=fd, **opts)
    want_up = (want * upstream).sum() if reduction == "none" else want
    want_grads = dict(zip(f_named, torch.autograd.grad(want_up, list(f_named.values()))))
    lx, ly, ld, lt, l_named = leaves_of(sl)
    got = ik.distributed.icon_loss(lx, ly, target=lt, dist_mode=dist_mode, ring_block_rows=block_rows, dof=ld,
                                   **opts)
    errors = []
    if reduction == "none":
        if rel(got.detach(), want.detach()[sl]) > TOL:
            errors.append(f"rows: rel err {rel(got.detach(), want.detach()[sl]):.3e}")
        got_up = (got * upstream[sl]).sum()
    else:
        if not torch.isfinite(got) or rel(got.detach(), want.detach()) > TOL:
            errors.append(f"loss {got.item()} vs {want.item()}")
        got_up = got
    got_grads = dict(zip(l_named, torch.autograd.grad(got_up, list(l_named.values()), allow_unused=True)))
    for name, g in got_grads.items():
        w = want_grads[name]
        if g is None:
            errors.append(f"grad {name} dropped")
            continue
        if w.dim() == 0:                     # a shared 0-d parameter: each rank's share
            g = g.clone()
            dist.all_reduce(g)
        else:
            w = w[sl]
        if not bool(torch.isfinite(g).all()) or rel(g, w) > TOL:
            errors.append(f"grad {name}: rel err {rel(g, w):.3e}")
    return errors


def run(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    report = []
    try:
        for k, spec in enumerate(CASES):
            for dist_mode in ("ring", "gather"):
                block_rows = (None, 2)[k % 2] if dist_mode == "ring" else None
                label = f"{dist_mode} {' '.join(map(str, spec))} block_rows={block_rows}"
                errors = run_case(k, spec, rank, world, dist_mode, block_rows)
                report.append(f"{label}: " + ("ok" if not errors else "; ".join(errors)))
    except Exception:  # noqa: BLE001 - the parent reads the traceback from the file
        report.append("EXCEPTION " + traceback.format_exc().replace("\n", " | "))
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write("\n".join(report))
        dist.barrier()
        dist.destroy_process_group()
    skip_native_teardown()
