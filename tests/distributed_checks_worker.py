"""One rank of tests/test_distributed_checks.py: the agreement and shard checks of
ik.distributed.icon_loss (issue 13), on gloo, in both modes. Every line of the report starts with
the item it covers and ends with "ok" when the check passed:

* ``item5``: an option that differs across ranks raises a ValueError on every rank that names
  the option and the ranks holding each value (never an abort, a hang or a wrong answer); an
  option the kernel does not use, or a backend that changes no collective, may differ.
* ``item6``: a target part that is wrong on one rank only (Dense p columns, Neighbors indices,
  Labels col_labels, Affinity z_cols) raises a ValueError on every rank.
* ``item3``: a Dense p / Neighbors weights that requires grad gets the gradient of the
  single-process reference on the concatenated batch, or the call raises a ValueError naming it.
* ``item1`` (world 1): N = 1 with y = None leaves the only row out: loss 0, zero gradients.
* ``item15``, ``item9`` (world 1): a +inf logit gives the reference's NaN row; double backward
  raises a NotImplementedError that names the reference.

The process group has a short timeout, so a collective that would hang fails the check instead.
"""
import datetime
import os
import traceback

import torch
import torch.distributed as dist

import icon_kernels as ik
from worker_exit import skip_native_teardown

MODES = ("gather", "ring")
SHARDS = [3, 5, 4]             # uneven rows per rank
TOL = 1e-9


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def expect_error(report, label, call, *wanted):
    """Runs ``call``; "ok" when it raises ValueError / TypeError with every string of ``wanted``."""
    try:
        call()
        report.append(f"{label}: no error raised")
    except (ValueError, TypeError) as exc:
        missing = [w for w in wanted if w not in str(exc)]
        report.append(f"{label}: " + ("ok" if not missing else f"{type(exc).__name__}: {exc} (missing {missing})"))
    except Exception as exc:  # noqa: BLE001 - a transport error (e.g. a timeout) fails the check
        report.append(f"{label}: {type(exc).__name__}: {exc}".replace("\n", " | "))


def expect_value(report, label, call, want):
    """Runs ``call``; "ok" when it returns ``want`` (a float) to TOL."""
    try:
        got = float(call())
        report.append(f"{label}: " + ("ok" if abs(got - want) <= TOL * max(1.0, abs(want)) else f"{got} vs {want}"))
    except Exception as exc:  # noqa: BLE001
        report.append(f"{label}: {type(exc).__name__}: {exc}".replace("\n", " | "))


def _ranks(ranks):
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(str(r) for r in ranks)


def option_checks(rank, world, report):
    """item5: one option differs, rank 1 holding the odd value."""
    odd = rank == 1
    n = 4
    x = torch.randn(n, 3, dtype=torch.float64)
    z = torch.randn(n, 2, dtype=torch.float64)
    lab = ik.Labels(torch.arange(n) % 2)
    where = [_ranks([r for r in range(world) if r != 1]), _ranks([1])]

    def pick(a, b):
        return b if odd else a
    cases = [
        ("reduction", "reduction", lambda: dict(reduction=pick("mean", "sum"))),
        ("kernel", "kernel", lambda: dict(kernel=pick("cosine", "dot"))),
        ("divergence", "divergence", lambda: dict(divergence=pick("kl", "cross_entropy"))),
        ("exclude_self", "exclude_self", lambda: dict(exclude_self=pick(True, False))),
        ("alpha", "alpha", lambda: dict(alpha=pick(0.0, 0.1))),
        ("beta", "beta", lambda: dict(beta=pick(0.0, 0.1))),
        ("temperature", "temperature", lambda: dict(kernel="dot", temperature=pick(0.1, 0.2))),
        ("temperature float vs tensor", "temperature",
         lambda: dict(kernel="dot", temperature=pick(0.1, torch.tensor(0.1, dtype=torch.float64)))),
        ("sigma", "sigma", lambda: dict(kernel="gaussian", sigma=pick(1.0, 2.0))),
        ("dof", "dof", lambda: dict(kernel="student_t", dof=pick(1.0, 3.0))),
        ("exponent", "exponent", lambda: dict(kernel="power", exponent=pick(1.0, 2.0))),
        ("target type", "target type", lambda: dict(target=pick(lab, ik.Affinity(z)))),
        ("weight given", "weight (given", lambda: dict(weight=pick(None, torch.ones(n, dtype=torch.float64)))),
        ("y given", "y (given", lambda: dict(y=pick(None, x.clone()), exclude_self=False)),
        ("affinity kernel", "target.kernel", lambda: dict(target=ik.Affinity(z, kernel=pick("gaussian", "student_t")))),
        ("affinity sigma", "target.sigma", lambda: dict(target=ik.Affinity(z, sigma=pick(1.0, 2.0)))),
        ("affinity temperature", "target.temperature",
         lambda: dict(target=ik.Affinity(z, kernel="dot", temperature=pick(1.0, 0.5)))),
        ("affinity exponent", "target.exponent",
         lambda: dict(target=ik.Affinity(z, kernel="power", exponent=pick(1.0, 2.5)))),
        ("affinity z features", "target.z",
         lambda: dict(target=ik.Affinity(pick(z, torch.randn(n, 3, dtype=torch.float64))))),
        ("affinity z dtype", "target.z", lambda: dict(target=ik.Affinity(pick(z, z.float())))),
        ("requires grad", "which inputs require grad", lambda: dict(x=pick(x, x.clone().requires_grad_()))),
    ]
    for mode in MODES:
        # dist_mode itself: this mode on every rank but rank 1, the other one there
        other = MODES[1 - MODES.index(mode)]
        expect_error(report, f"item5 {mode} dist_mode differs", lambda: ik.distributed.icon_loss(
            x, target=lab, dist_mode=pick(mode, other)), "dist_mode", "differs across ranks", *where)
        for label, name, make in cases:
            def call(make=make):
                kw = dict(x=x, target=lab)
                kw.update(make())
                return ik.distributed.icon_loss(kw.pop("x"), kw.pop("y", None), dist_mode=mode, **kw)
            expect_error(report, f"item5 {mode} {label} differs", call, name, "differs across ranks", *where)
        if "cpu" in ik.available_backends() and mode == "ring":   # fused blocks on one rank only
            expect_error(report, "item5 ring backend differs", lambda: ik.distributed.icon_loss(
                x, target=lab, dist_mode="ring", kernel="dot", backend=pick("cpu", "torch")),
                "backend", "differs across ranks", *where)
        # what may differ: a parameter the kernel does not use, the backend in gather mode, the
        # integer dtype of the labels
        want = ik.distributed.icon_loss(x, target=lab, dist_mode=mode, kernel="dot", temperature=0.5).item()
        expect_value(report, f"item5 {mode} unused sigma may differ", lambda: ik.distributed.icon_loss(
            x, target=lab, dist_mode=mode, kernel="dot", temperature=0.5, sigma=pick(1.0, 2.0)), want)
        expect_value(report, f"item5 {mode} label dtype may differ", lambda: ik.distributed.icon_loss(
            x, target=ik.Labels(lab.row_labels.to(pick(torch.int64, torch.int32))), dist_mode=mode,
            kernel="dot", temperature=0.5), want)
        if mode == "gather":
            expect_value(report, "item5 gather backend may differ", lambda: ik.distributed.icon_loss(
                x, target=lab, dist_mode=mode, kernel="dot", temperature=0.5, backend=pick("torch", "reference")),
                want)


def shard_checks(rank, world, report):
    """item6: one rank's target part is wrong for the global columns."""
    odd = rank == 1
    n = 4
    m = n * world
    x = torch.randn(n, 3, dtype=torch.float64)
    z = torch.randn(n, 2, dtype=torch.float64)
    elsewhere = "the inputs of rank 1 of the process group are invalid"
    for mode in MODES:
        def bad(reason, make, everywhere=False):
            def call():
                y, target = make()
                return ik.distributed.icon_loss(x, y, target=target, dist_mode=mode)
            return call, (reason if odd or everywhere else elsewhere)
        cases = [
            ("dense p too few columns", *bad("target.p", lambda: (None, ik.Dense(torch.rand(n, m - 1 if odd else m,
                                                                                        dtype=torch.float64))), True)),
            ("dense p too many columns", *bad("target.p", lambda: (None, ik.Dense(torch.rand(n, m + 2 if odd else m,
                                                                                         dtype=torch.float64))), True)),
            ("dense p not 2-D", *bad("target.p", lambda: (None, ik.Dense(torch.rand(m, dtype=torch.float64) if odd
                                                                         else torch.rand(n, m, dtype=torch.float64))))),
            ("neighbors index out of range", *bad("indices", lambda: (None, ik.Neighbors(
                torch.full((n, 2), m if odd else 0))))),
            ("neighbors index below -1", *bad("indices", lambda: (None, ik.Neighbors(
                torch.full((n, 2), -2 if odd else 0))))),
            ("neighbors float indices", *bad("indices", lambda: (None, ik.Neighbors(
                torch.zeros(n, 2, dtype=torch.float64 if odd else torch.int64))))),
            ("neighbors unsigned indices", *bad("indices", lambda: (None, ik.Neighbors(
                torch.zeros(n, 2, dtype=torch.uint32 if odd else torch.int64))))),
            ("neighbors wrong rows", *bad("indices", lambda: (None, ik.Neighbors(
                torch.zeros(n - 1 if odd else n, 2, dtype=torch.int64))))),
            ("labels col_labels length", *bad("col_labels", lambda: (x.clone(), ik.Labels(
                torch.arange(n) % 2, torch.arange(n - 1 if odd else n) % 2)))),
            ("labels float", *bad("labels", lambda: (None, ik.Labels(
                torch.zeros(n, dtype=torch.float64) if odd else torch.zeros(n, dtype=torch.int64))))),
            ("affinity z_cols rows", *bad("z_cols", lambda: (x.clone(), ik.Affinity(
                z, torch.randn(n + 1 if odd else n, 2, dtype=torch.float64))))),
            ("affinity z_cols features", *bad("z_cols", lambda: (x.clone(), ik.Affinity(
                z, torch.randn(n, 3 if odd else 2, dtype=torch.float64))))),
        ]
        for label, call, reason in cases:
            expect_error(report, f"item6 {mode} {label} on rank 1", call, reason)


def _global_problem(world, gen):
    m = sum(SHARDS[:world])
    x = torch.randn(m, 4, generator=gen, dtype=torch.float64)
    p = torch.rand(m, m, generator=gen, dtype=torch.float64)
    p[p < 0.3] = 0.0                                         # structural zeros
    idx = torch.randint(-1, m, (m, 3), generator=gen)
    idx[0, 1] = idx[0, 0]                                    # a repeated column
    w = torch.rand(m, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(m, 4, generator=gen, dtype=torch.float64)      # columns sharded like the rows
    return x, y, ik.Dense(p), ik.Neighbors(idx, w)


def target_grad_checks(rank, world, report):
    """item3: the gradient of Dense p / Neighbors weights equals the single-process reference's."""
    gen = torch.Generator().manual_seed(3)
    x, y, dense, nbrs = _global_problem(world, gen)
    off = sum(SHARDS[:rank])
    sl = slice(off, off + SHARDS[rank])
    backends = ["torch"] + [b for b in ("cpu",) if b in ik.available_backends()]
    settings = [dict(kernel="dot", temperature=0.5), dict(kernel="gaussian", alpha=0.2, beta=0.1,
                                                          divergence="cross_entropy", reduction="sum"),
                dict(kernel="cosine", alpha=0.1, rect=True)]           # y given, self pairs kept
    for target, name in ((dense, "p"), (nbrs, "weights")):
        leaf = target.p if name == "p" else target.weights
        for kw in settings:
            kw = dict(kw)
            rect = kw.pop("rect", False)
            full = leaf.clone().requires_grad_()
            fx = x.clone().requires_grad_()
            ftarget = ik.Dense(full) if name == "p" else ik.Neighbors(target.indices, full)
            want = ik.icon_loss(fx, y if rect else None, target=ftarget, backend="reference", **kw)
            want_grads = torch.autograd.grad(want, [fx, full])
            for mode, backend in [("gather", b) for b in backends] + [("ring", "auto"), ("ring", "torch")]:
                label = f"item3 {mode} {backend} {type(target).__name__} {name} {kw.get('kernel')}" \
                    + (" y given" if rect else "")
                local = leaf[sl].clone().requires_grad_()
                lx = x[sl].clone().requires_grad_()
                ltarget = ik.Dense(local) if name == "p" else ik.Neighbors(target.indices[sl], local)
                try:
                    got = ik.distributed.icon_loss(lx, y[sl] if rect else None, target=ltarget, dist_mode=mode,
                                                   backend=backend, **kw)
                    got_grads = torch.autograd.grad(got, [lx, local], allow_unused=True)
                except Exception as exc:  # noqa: BLE001 - both modes compute it: a refusal fails
                    report.append(f"{label}: {type(exc).__name__}: {exc}".replace("\n", " | "))
                    continue
                errors = []
                if rel(got.detach(), want.detach()) > TOL:
                    errors.append(f"loss {got.item()} vs {want.item()}")
                for what, g, w in zip(("x", name), got_grads, want_grads):
                    if g is None:
                        errors.append(f"grad {what} dropped")
                    elif rel(g, w[sl]) > TOL:
                        errors.append(f"grad {what}: rel err {rel(g, w[sl]):.3e}")
                report.append(f"{label}: " + ("ok" if not errors else "; ".join(errors)))


def row_weight_checks(rank, world, report):
    """item3 (row weights): reduction="mean" with a per-row weight that requires grad: its gradient
    (through the mean's denominator too) equals the single-process reference's in both modes."""
    gen = torch.Generator().manual_seed(4)
    x, _, dense, _ = _global_problem(world, gen)
    weight = torch.rand(x.shape[0], generator=gen, dtype=torch.float64) + 0.5
    off = sum(SHARDS[:rank])
    sl = slice(off, off + SHARDS[rank])
    fw = weight.clone().requires_grad_()
    want = ik.icon_loss(x, target=dense, kernel="gaussian", weight=fw, backend="reference")
    (want_grad,) = torch.autograd.grad(want, [fw])
    for mode, backend in (("gather", "torch"), ("gather", "auto"), ("ring", "auto")):
        label = f"item3 {mode} {backend} row weight mean"
        try:
            lw = weight[sl].clone().requires_grad_()
            got = ik.distributed.icon_loss(x[sl], target=ik.Dense(dense.p[sl]), kernel="gaussian", weight=lw,
                                           dist_mode=mode, backend=backend)
            (got_grad,) = torch.autograd.grad(got, [lw])
            err = rel(got_grad, want_grad[sl])
            report.append(f"{label}: " + ("ok" if err <= TOL and rel(got.detach(), want.detach()) <= TOL
                                          else f"grad rel err {err:.3e}"))
        except Exception as exc:  # noqa: BLE001
            report.append(f"{label}: {type(exc).__name__}: {exc}".replace("\n", " | "))


def left_out_checks(report):
    """item1 (world 1): N = 1, y = None: the row has no valid column; loss 0, zero gradients (of
    x and of every target tensor that requires grad)."""
    x0 = torch.randn(1, 3, dtype=torch.float64)
    z0 = torch.randn(1, 2, dtype=torch.float64)
    targets = {
        "labels": lambda: ik.Labels(torch.zeros(1, dtype=torch.long)),
        "neighbors": lambda: ik.Neighbors(torch.zeros(1, 2, dtype=torch.long),
                                          torch.ones(1, 2, dtype=torch.float64, requires_grad=True)),
        "affinity": lambda: ik.Affinity(z0.clone().requires_grad_()),
        "dense": lambda: ik.Dense(torch.ones(1, 1, dtype=torch.float64, requires_grad=True)),
    }
    target_leaf = {"labels": lambda t: [], "neighbors": lambda t: [t.weights], "affinity": lambda t: [t.z],
                   "dense": lambda t: [t.p]}
    mixes = [dict(alpha=0.2), dict(beta=0.3), dict(alpha=0.1, beta=0.4, divergence="cross_entropy")]
    runs = [("gather", "torch"), ("gather", "auto"), ("ring", "auto"), ("ring", "torch")]
    for mode, backend in runs:
        for tname, make in targets.items():
            for kernel in ("dot", "gaussian"):
                for mix in mixes:
                    for reduction in ("mean", "sum"):
                        label = f"item1 {mode} {backend} {tname} {kernel} {mix} {reduction}"
                        try:
                            x = x0.clone().requires_grad_()
                            target = make()
                            loss = ik.distributed.icon_loss(x, target=target, dist_mode=mode, backend=backend,
                                                            kernel=kernel, reduction=reduction, **mix)
                            leaves = [x] + target_leaf[tname](target)
                            grads = torch.autograd.grad(loss, leaves)
                            errors = [] if loss.item() == 0 else [f"loss {loss.item()}"]
                            errors += [f"grad {k} {g.tolist()}" for k, g in enumerate(grads)
                                       if not bool((g == 0).all())]
                            report.append(f"{label}: " + ("ok" if not errors else "; ".join(errors)))
                        except Exception as exc:  # noqa: BLE001
                            report.append(f"{label}: {type(exc).__name__}: {exc}".replace("\n", " | "))


def world_one_checks(report):
    """item15 (world 1): a +inf logit makes its row NaN in both modes, as the single-process
    reference gives (ring mode's blockwise LSE was +inf); item9: double backward raises a
    NotImplementedError naming the single-process reference in both modes (ring mode's gradient
    had no graph, so a gradient penalty was silently a constant)."""
    x = torch.tensor([[1.0, 0.5, 0.2], [-0.3, 0.9, 0.0]], dtype=torch.float64)
    y = torch.randn(5, 3, dtype=torch.float64)
    y[2, 0] = -float("inf")
    target = ik.Neighbors(torch.tensor([[0, 1], [0, 1]]))
    want = ik.icon_loss(x, y, target=target, kernel="dot", reduction="none", backend="reference")
    for mode in MODES:
        for backend in ("torch", "auto"):
            label = f"item15 {mode} {backend}"
            try:
                rows = ik.distributed.icon_loss(x, y, target=target, kernel="dot", reduction="none",
                                                dist_mode=mode, backend=backend)
                same = torch.equal(torch.isnan(rows), torch.isnan(want)) and torch.allclose(
                    torch.nan_to_num(rows), torch.nan_to_num(want), rtol=TOL, atol=0)
                report.append(f"{label}: " + ("ok" if same and torch.isnan(rows[1]) else f"{rows} vs {want}"))
            except Exception as exc:  # noqa: BLE001
                report.append(f"{label}: {type(exc).__name__}: {exc}".replace("\n", " | "))
            label = f"item9 {mode} {backend}"
            try:
                xg = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
                loss = ik.distributed.icon_loss(xg, target=ik.Labels(torch.arange(6) // 2), kernel="gaussian",
                                                dist_mode=mode, backend=backend)
                (grad,) = torch.autograd.grad(loss, xg, create_graph=True)
                (grad.square().sum() + xg.sum()).backward()
                report.append(f"{label}: the second backward ran")
            except NotImplementedError as exc:
                report.append(f"{label}: " + ("ok" if "backend='reference'" in str(exc) else str(exc)))
            except Exception as exc:  # noqa: BLE001
                report.append(f"{label}: {type(exc).__name__}: {exc}".replace("\n", " | "))


class Report(list):
    """The report lines, each also written to the rank's file at once, so the lines before an
    abort (e.g. gloo's SIGABRT on a collective mismatch) survive it."""

    def __init__(self, path):
        super().__init__()
        self.file = open(path, "w", buffering=1)

    def append(self, line):
        super().append(line)
        self.file.write(("\n" if len(self) > 1 else "") + line)
        self.file.flush()


def run(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    torch.manual_seed(rank)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=int(os.environ.get("CHECKS_GLOO_TIMEOUT", "40"))))
    report = Report(os.path.join(out_dir, f"rank{rank}.txt"))
    try:
        if world == 1:
            left_out_checks(report)
            world_one_checks(report)
        else:
            # least disruptive first: on code without these checks, a mismatch aborts or hangs
            # the group, and every later check of the run would fail for that reason alone
            target_grad_checks(rank, world, report)
            row_weight_checks(rank, world, report)
            shard_checks(rank, world, report)
            option_checks(rank, world, report)
    except Exception:  # noqa: BLE001 - the parent reads the traceback from the file
        report.append("EXCEPTION " + traceback.format_exc().replace("\n", " | "))
    finally:
        report.file.close()
        try:
            dist.barrier()
            dist.destroy_process_group()
        finally:
            skip_native_teardown()
