"""One rank of tests/test_distributed_f_divergences.py: ring mode computes the f-divergences
(DESIGN.md §1.1: reverse_kl, tv, hellinger, js, chi2). Each case builds the same global float64
problem on every rank, runs ik.distributed.icon_loss(dist_mode="ring") on this rank's shard and
compares the loss and every gradient with the single-process reference on the concatenated batch
(rel 1e-9): x, y, the kernel parameter (a 0-d tensor: the sum over ranks of each rank's share),
Neighbors weights, Dense p, and an Affinity target's z, z_cols and kernel parameter. Every
divergence meets every target type; alpha, beta > 0 and alpha = 0 (an Affinity target's exact
log p) both occur; blocks of the default size and of two rows. Each report line ends with "ok"."""
import os
import traceback

import torch
import torch.distributed as dist

import icon_kernels as ik
from icon_kernels.backends import label_blocks
from worker_exit import skip_native_teardown

DIVERGENCES = ("reverse_kl", "tv", "hellinger", "js", "chi2")
TARGETS = ("labels", "neighbors", "affinity", "dense")
SHARDS = [5, 9, 7]             # uneven rows per rank
TOL = 1e-9
FUSED_CALLS = [0]


def _count_fused(partials):
    def counted(*args, **kwargs):
        FUSED_CALLS[0] += 1
        return partials(*args, **kwargs)
    return counted


label_blocks.partials = _count_fused(label_blocks.partials)


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def case(divergence: str, target: str, k: int, n: int, gen):
    """The global problem of one case: (x, y or None, target parts, kernel options, loss options).
    ``k`` (the case's number) varies what the math depends on: debiasing, y given, reduction."""
    mixed = k % 3 == 1                       # alpha, beta > 0
    rect = (k + k // 4) % 2 == 1             # y given (self pairs kept), else y = None
    alpha = 0.2 if mixed else (0.1 if divergence == "reverse_kl" and target != "affinity" else 0.0)
    opts = dict(divergence=divergence, alpha=alpha, beta=0.15 if mixed else 0.0,
                reduction=("mean", "sum")[(k // 2) % 2])
    x = torch.randn(n, 4, generator=gen, dtype=torch.float64)
    y = torch.randn(n, 4, generator=gen, dtype=torch.float64) if rect else None
    parts = {}
    if target == "labels":               # dot: the fused CPU label blocks would apply to kl
        parts["row_labels"] = torch.randint(0, 4, (n,), generator=gen)
        parts["col_labels"] = torch.randint(0, 3, (n,), generator=gen) if rect else None   # label 3: left out
        kernel = dict(kernel="dot", temperature=torch.tensor(0.6, dtype=torch.float64))
    elif target == "neighbors":
        # six neighbours and a narrow kernel, so that q > p~ at some of them: tv's f' is then not
        # the same at every neighbour, and the weights' gradient is not zero
        idx = torch.randint(-1, n, (n, 6), generator=gen)
        idx[0, 1] = idx[0, 0]                # a repeated column
        idx[2] = -1                          # a row without neighbours: left out
        parts["indices"], parts["weights"] = idx, torch.rand(n, 6, generator=gen, dtype=torch.float64) + 0.1
        kernel = dict(kernel="gaussian", sigma=torch.tensor(0.6, dtype=torch.float64))
    elif target == "affinity":
        parts["z"] = torch.randn(n, 3, generator=gen, dtype=torch.float64)
        parts["z_cols"] = torch.randn(n, 3, generator=gen, dtype=torch.float64) if rect else None
        parts["sigma"] = torch.tensor(1.3, dtype=torch.float64)
        kernel = dict(kernel="student_t", dof=torch.tensor(1.5, dtype=torch.float64))
    else:
        p = torch.rand(n, n, generator=gen, dtype=torch.float64)
        if divergence != "reverse_kl" or alpha > 0:
            p[p < 0.3] = 0.0                 # structural zeros (+inf for reverse_kl with alpha = 0)
        parts["p"] = p
        kernel = dict(kernel="cosine", temperature=torch.tensor(0.5, dtype=torch.float64))
    return x, y, parts, kernel, opts


def build(target: str, parts: dict, rows: slice, grad: bool):
    """(the target on ``rows`` of the global parts, its leaves that require grad)."""
    take = {k: (v if v is None or v.dim() == 0 else v[rows]) for k, v in parts.items()}
    leaves = {k: v.clone().requires_grad_() for k, v in take.items()
              if grad and k in ("weights", "p", "z", "z_cols", "sigma") and v is not None}
    take.update(leaves)
    if target == "labels":
        made = ik.Labels(take["row_labels"], take["col_labels"])
    elif target == "neighbors":
        made = ik.Neighbors(take["indices"], take["weights"])
    elif target == "affinity":
        made = ik.Affinity(take["z"], take["z_cols"], kernel="gaussian", sigma=take["sigma"])
    else:
        made = ik.Dense(take["p"])
    return made, leaves


def run_case(divergence, target, k, rank, world, block_rows):
    sizes = SHARDS[:world]
    n = sum(sizes)
    off = sum(sizes[:rank])
    sl = slice(off, off + sizes[rank])
    x, y, parts, kernel, opts = case(divergence, target, k, n, torch.Generator().manual_seed(100 + k))
    (pname, param), = [(key, v) for key, v in kernel.items() if key != "kernel"]

    def leaves_of(rows, rows_slice):
        lx = x[rows_slice].clone().requires_grad_()
        ly = None if y is None else y[rows_slice].clone().requires_grad_()
        lp = param.clone().requires_grad_()
        t, t_leaves = build(target, parts, rows, grad=True)
        named = {"x": lx, "param": lp, **({"y": ly} if ly is not None else {}), **t_leaves}
        return lx, ly, lp, t, named
    # single-process reference on the whole batch
    fx, fy, fp, ft, f_named = leaves_of(slice(None), slice(None))
    want = ik.icon_loss(fx, fy, target=ft, backend="reference", kernel=kernel["kernel"], **{pname: fp}, **opts)
    want_grads = dict(zip(f_named, torch.autograd.grad(want, list(f_named.values()))))
    # this rank's shard: the columns of y, col_labels and z_cols are sharded like the rows;
    # Neighbors indices and Dense p address the global columns
    lx, ly, lp, lt, l_named = leaves_of(sl, sl)
    fused_before = FUSED_CALLS[0]
    got = ik.distributed.icon_loss(lx, ly, target=lt, dist_mode="ring", ring_block_rows=block_rows,
                                   kernel=kernel["kernel"], **{pname: lp}, **opts)
    got_grads = dict(zip(l_named, torch.autograd.grad(got, list(l_named.values()), allow_unused=True)))
    errors = []
    if FUSED_CALLS[0] != fused_before:
        errors.append("the fused label blocks ran (they compute kl and cross_entropy only)")
    if not torch.isfinite(got) or rel(got.detach(), want.detach()) > TOL:
        errors.append(f"loss {got.item()} vs {want.item()}")
    for name, g in got_grads.items():
        w = want_grads[name]
        if g is None:
            errors.append(f"grad {name} dropped")
            continue
        if w.dim() == 0 or name == "sigma":         # a shared 0-d parameter: each rank's share
            g = g.clone()
            dist.all_reduce(g)
        else:
            w = w[sl]
        if not bool(torch.isfinite(g).all()) or rel(g, w) > TOL:
            errors.append(f"grad {name}: rel err {rel(g, w):.3e}")
    # a gradient that is zero up to rounding (e.g. tv's f' the same at every neighbour) checks nothing
    flat = [name for name, w in want_grads.items() if not w.abs().max() > 1e-6 * want.abs().clamp_min(1.0)]
    if flat:
        errors.append(f"the reference gradient of {', '.join(flat)} is zero (a case that checks nothing)")
    return errors


def run(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    report = []
    try:
        k = 0
        for divergence in DIVERGENCES:
            for target in TARGETS:
                block_rows = (None, 2)[k % 2 if world == 3 else (k // 2) % 2]
                label = f"ring {divergence} {target} case{k} block_rows={block_rows}"
                errors = run_case(divergence, target, k, rank, world, block_rows)
                report.append(f"{label}: " + ("ok" if not errors else "; ".join(errors)))
                k += 1
    except Exception:  # noqa: BLE001 - the parent reads the traceback from the file
        report.append("EXCEPTION " + traceback.format_exc().replace("\n", " | "))
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write("\n".join(report))
        dist.barrier()
        dist.destroy_process_group()
    skip_native_teardown()
