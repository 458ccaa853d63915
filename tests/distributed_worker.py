"""One rank of the distributed tests (run through torch.multiprocessing spawn by
tests/test_distributed.py). Each case builds the same global float64 problem on every rank,
runs ik.distributed.icon_loss on this rank's shard, and compares the loss and the local
gradients with the single-process reference on the concatenated batch. The verdict is written to
a file, since returning tensors through multiprocessing queues fails on this machine."""
import os
import traceback

import torch
import torch.distributed as dist

import icon_kernels as ik
from icon_kernels.backends import label_blocks
from worker_exit import skip_native_teardown

SHARDS = [5, 9, 7, 6]          # uneven rows per rank
HOT = ("labels-cosine", "labels-gaussian-rect")     # ring blocks on the fused CPU kernel
FUSED_CALLS = [0]


def _count_fused(partials):
    def counted(*args, **kwargs):
        FUSED_CALLS[0] += 1
        return partials(*args, **kwargs)
    return counted


label_blocks.partials = _count_fused(label_blocks.partials)
TOL = 1e-9


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def cases(n, m, gen):
    """(name, full-problem builder) pairs; builders return (x, y, target, kwargs, leaves)."""
    def labels(rect):
        def build():
            x = torch.randn(n, 6, generator=gen, dtype=torch.float64)
            y = torch.randn(m, 6, generator=gen, dtype=torch.float64) if rect else None
            rows = torch.randint(0, 4, (n,), generator=gen)
            cols = torch.randint(0, 4, (m,), generator=gen) if rect else None
            kw = dict(kernel="dot", temperature=0.7, alpha=0.1, beta=0.2, reduction="mean")
            return x, y, ik.Labels(rows, cols), kw
        return build

    def neighbors():
        x = torch.randn(n, 6, generator=gen, dtype=torch.float64)
        idx = torch.randint(-1, n, (n, 4), generator=gen)
        return x, None, ik.Neighbors(idx, torch.rand(n, 4, generator=gen, dtype=torch.float64)), dict(kernel="gaussian", reduction="sum", divergence="cross_entropy")

    def affinity():
        x = torch.randn(n, 5, generator=gen, dtype=torch.float64)
        z = torch.randn(n, 3, generator=gen, dtype=torch.float64)
        return x, None, ik.Affinity(z, kernel="gaussian", sigma=1.3), dict(kernel="student_t", dof=1.0, divergence="kl")

    def dense():
        x = torch.randn(n, 6, generator=gen, dtype=torch.float64)
        p = torch.rand(n, n, generator=gen, dtype=torch.float64)
        return x, None, ik.Dense(p), dict(kernel="cosine", temperature=0.5, weight=torch.rand(n, generator=gen, dtype=torch.float64) + 0.5)

    def affinity_mixed():
        x = torch.randn(n, 5, generator=gen, dtype=torch.float64)
        z = torch.randn(n, 3, generator=gen, dtype=torch.float64)
        return x, None, ik.Affinity(z, kernel="student_t", dof=2.0), dict(kernel="gaussian", sigma=0.8, alpha=0.2, beta=0.1)

    def labels_hot(kernel, rect, **kw):          # beta = 0: ring blocks on the fused CPU kernel
        def build():
            x = torch.randn(n, 6, generator=gen, dtype=torch.float64)
            y = torch.randn(m, 6, generator=gen, dtype=torch.float64) if rect else None
            rows = torch.randint(0, 3, (n,), generator=gen)
            cols = torch.randint(0, 3, (m,), generator=gen) if rect else None
            return x, y, ik.Labels(rows, cols), dict(kernel=kernel, **kw)
        return build

    return [("labels", labels(False)), ("labels-rect", labels(True)),
            ("labels-cosine", labels_hot("cosine", False, temperature=0.1, alpha=0.1)),
            ("labels-gaussian-rect", labels_hot("gaussian", True, sigma=1.7, divergence="cross_entropy",
                                                reduction="sum")),
            ("neighbors", neighbors),
            ("affinity", affinity), ("affinity-mixed", affinity_mixed), ("dense", dense)]


def shard_target(target, sl, col_sl):
    if isinstance(target, ik.Labels):
        return ik.Labels(target.row_labels[sl], None if target.col_labels is None else target.col_labels[col_sl])
    if isinstance(target, ik.Neighbors):
        return ik.Neighbors(target.indices[sl], target.weights[sl])
    if isinstance(target, ik.Affinity):
        return ik.Affinity(target.z[sl], kernel=target.kernel, sigma=target.sigma, dof=target.dof)
    return ik.Dense(target.p[sl])


def leaves(x, y, target):
    out = [x] + ([y] if y is not None else [])
    if isinstance(target, ik.Affinity):
        out.append(target.z)
    return out


def run_case(build, backend, mode, rank, world, block_rows=None):
    sizes = SHARDS[:world]
    n = sum(sizes)
    off = sum(sizes[:rank])
    sl = slice(off, off + sizes[rank])
    x, y, target, kw = build()
    weight = kw.pop("weight", None)
    # single process reference on the whole batch
    fx = x.clone().requires_grad_()
    fy = None if y is None else y.clone().requires_grad_()
    ftarget = target
    if isinstance(target, ik.Affinity):
        ftarget = ik.Affinity(target.z.clone().requires_grad_(), kernel=target.kernel, sigma=target.sigma,
                              dof=target.dof)
    want = ik.icon_loss(fx, fy, target=ftarget, weight=weight, backend="reference", **kw)
    want_grads = torch.autograd.grad(want, leaves(fx, fy, ftarget))
    # this rank's shard (columns of y are sharded like the rows)
    lx = x[sl].clone().requires_grad_()
    ly = None if y is None else y[sl].clone().requires_grad_()
    ltarget = shard_target(target, sl, sl)
    if isinstance(ltarget, ik.Affinity):
        ltarget = ik.Affinity(ltarget.z.clone().requires_grad_(), kernel=ltarget.kernel, sigma=ltarget.sigma,
                              dof=ltarget.dof)
    ring = dict(ring_block_rows=block_rows) if block_rows else {}
    got = ik.distributed.icon_loss(lx, ly, target=ltarget, backend=backend, dist_mode=mode, **ring,
                                   weight=None if weight is None else weight[sl], **kw)
    got_grads = torch.autograd.grad(got, leaves(lx, ly, ltarget))
    errors = []
    if rel(got.detach(), want.detach()) > TOL:
        errors.append(f"loss {got.item()} vs {want.item()}")
    for k, (g, w) in enumerate(zip(got_grads, want_grads)):
        if rel(g, w[sl]) > TOL:
            errors.append(f"grad {k}: rel err {rel(g, w[sl]):.3e}")
    return errors


def run(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    trace = open(os.path.join(out_dir, f"trace{rank}.txt"), "w", buffering=1)
    trace.write("start\n")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    trace.write("initialised\n")
    report = []
    try:
        # gather mode through each fused CPU backend; ring mode with the default blocks (a quarter
        # of the largest shard) and with one-row blocks, so that smaller shards have empty pieces
        # ("auto": the fused CPU label blocks where they apply), and on the torch tile math only
        modes = [("gather", b, None) for b in ("torch", "cpu") if b in ik.available_backends()] \
            + [("ring", "auto", None), ("ring", "auto", 1), ("ring", "torch", None)]
        n = sum(SHARDS[:world])
        for mode, backend, block_rows in modes:
            for name, build in cases(n, n, torch.Generator().manual_seed(0)):
                torch.manual_seed(0)
                label = f"{mode} {backend}" + (f" block_rows={block_rows}" if block_rows else "")
                trace.write(f"{label} {name}\n")
                fused_before = FUSED_CALLS[0]
                errors = run_case(build, backend, mode, rank, world, block_rows)
                fused = FUSED_CALLS[0] > fused_before
                want_fused = mode == "ring" and backend == "auto" and name in HOT and "cpu" in ik.available_backends()
                if fused != want_fused:
                    errors.append(f"fused label blocks used: {fused}, expected {want_fused}")
                report.append(f"{label} {name}: " + ("ok" if not errors else "; ".join(errors)))
        # a bad process group raises on every rank
        try:
            ik.distributed.icon_loss(torch.randn(3, 4, dtype=torch.float64), target=ik.Labels(torch.arange(3)),
                                     dist_mode="spiral")
            report.append("dist_mode check: no error raised")
        except ValueError as exc:
            report.append("dist_mode check: ok" if "dist_mode" in str(exc) else f"dist_mode check: {exc}")
        # d or dtype differs across ranks: every rank raises instead of hanging, in both modes
        for mode in ("gather", "ring"):
            for what, x_bad in (("d", torch.randn(3, 4 + rank, dtype=torch.float64)),
                                ("dtype", torch.randn(3, 4, dtype=torch.float64 if rank else torch.float32))):
                try:
                    ik.distributed.icon_loss(x_bad, target=ik.Labels(torch.arange(3)), dist_mode=mode)
                    report.append(f"{mode} {what} mismatch check: no error raised")
                except ValueError as exc:
                    ok = "differs across ranks" in str(exc)
                    report.append(f"{mode} {what} mismatch check: " + ("ok" if ok else str(exc)))
        # ring_block_rows differs across ranks, or is given to gather mode
        try:
            ik.distributed.icon_loss(torch.randn(3, 4, dtype=torch.float64), target=ik.Labels(torch.arange(3)),
                                     dist_mode="ring", ring_block_rows=2 + rank)
            report.append("ring_block_rows mismatch check: no error raised")
        except ValueError as exc:
            ok = "ring_block_rows differs across ranks" in str(exc)
            report.append("ring_block_rows mismatch check: " + ("ok" if ok else str(exc)))
        for bad in (0, 2.5, True):
            try:
                ik.distributed.icon_loss(torch.randn(3, 4, dtype=torch.float64), target=ik.Labels(torch.arange(3)),
                                         dist_mode="ring", ring_block_rows=bad)
                report.append(f"ring_block_rows={bad!r} check: no error raised")
            except ValueError as exc:
                report.append(f"ring_block_rows={bad!r} check: " + ("ok" if "positive int" in str(exc) else str(exc)))
        try:
            ik.distributed.icon_loss(torch.randn(3, 4, dtype=torch.float64), target=ik.Labels(torch.arange(3)),
                                     dist_mode="gather", ring_block_rows=2)
            report.append("ring_block_rows with gather check: no error raised")
        except ValueError as exc:
            report.append("ring_block_rows with gather check: " + ("ok" if "ring_block_rows" in str(exc) else str(exc)))
        # invalid inputs on one rank only: that rank raises its reason, every other rank names it
        # (a loss option that is invalid on one rank differs across ranks: every rank says so)
        x3 = torch.randn(3, 4, dtype=torch.float64)
        lab3 = ik.Labels(torch.arange(3))
        elsewhere = "the inputs of rank 1 of the process group are invalid"
        for mode in ("gather", "ring"):
            one_rank_cases = [
                ("bad ring_block_rows on rank 1", "ring_block_rows must be a positive int", elsewhere,
                 lambda: ik.distributed.icon_loss(x3, target=lab3, dist_mode="ring",
                                                  ring_block_rows=0 if rank == 1 else 2)),
                ("wrong label count on rank 1", "target.row_labels must have shape (3,), got (2,)", elsewhere,
                 lambda: ik.distributed.icon_loss(x3, target=ik.Labels(torch.arange(2 if rank == 1 else 3)),
                                                  dist_mode=mode)),
                ("negative temperature on rank 1", "temperature differs across ranks (0.5 on ",
                 "temperature differs across ranks (0.5 on ",
                 lambda: ik.distributed.icon_loss(x3, target=lab3, dist_mode=mode, kernel="dot",
                                                  temperature=-1.0 if rank == 1 else 0.5)),
            ]
            if mode == "gather":
                one_rank_cases = one_rank_cases[1:]
            for what, reason, reason_elsewhere, call in one_rank_cases:
                try:
                    call()
                    report.append(f"{mode} {what} check: no error raised")
                except (ValueError, TypeError) as exc:
                    want = reason if rank == 1 else reason_elsewhere
                    report.append(f"{mode} {what} check: " + ("ok" if want in str(exc) else str(exc)))
            everywhere = [
                ("empty shard on rank 0", "shard is empty",
                 lambda: ik.distributed.icon_loss(x3[:0] if rank == 0 else x3, target=ik.Labels(
                     torch.arange(0 if rank == 0 else 3)), dist_mode=mode)),
                ("target type differs", "target type differs across ranks",
                 lambda: ik.distributed.icon_loss(x3, target=lab3 if rank else ik.Dense(torch.rand(3, 3 * world)),
                                                  dist_mode=mode)),
            ]
            for what, reason, call in everywhere:
                try:
                    call()
                    report.append(f"{mode} {what} check: no error raised")
                except (ValueError, TypeError) as exc:
                    report.append(f"{mode} {what} check: " + ("ok" if reason in str(exc) else str(exc)))
        # a process group this rank is not part of
        others = dist.new_group([r for r in range(world) if r != 0])
        try:
            ik.distributed.icon_loss(torch.randn(3, 4, dtype=torch.float64), target=ik.Labels(torch.arange(3)),
                                     process_group=others)
            report.append("foreign group check: " + ("ok" if rank != 0 else "no error raised on rank 0"))
        except ValueError as exc:
            report.append("foreign group check: " + ("ok" if rank == 0 and "process_group" in str(exc) else str(exc)))
    except Exception:  # noqa: BLE001 - the parent reads the traceback from the file
        report.append("EXCEPTION " + traceback.format_exc())
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write("\n".join(report))
        dist.barrier()
        dist.destroy_process_group()
        trace.write("destroyed\n")
        trace.close()
    skip_native_teardown()

