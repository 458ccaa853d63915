"""Self mode's triangular schedule on the Triton backend for a Labels target with column labels of
its own (ik.Labels(row_labels, col_labels), y omitted: triton/symmetric_kernels.py with TARGET 0 and
both LAB and CLAB, routed by triton/launchers.py `_self_mode_structure`, which takes every Labels
target). Row i over column j: p_ij = [l_i = c_j] / K_i (the row side of a tile, as the plain
kernels form it); row j over column i, the column side of the same tile: p_ji = [l_j = c_i] / K_j
(tile_helpers.column_target_weights: LAB read at the tile's columns, CLAB at its rows), K the row's
positive count over the columns (after exclude_self). The column labels here are a permutation of
the rows' with some values that no row has, and rows without a positive (left out: loss 0, no
gradient). Under TRITON_INTERPRET=1 without a GPU: fp32 against the plain kernels
(ICON_KERNELS_SYMMETRIC=0) within TRITON_F32, and against the float64 reference within TRITON_F32
plus twice the float32 reference's own error (tests/test_triton_symmetric_targets.py's bound), with
upstream gradients != 1, the learned parameter's gradient, and launch counts that show which
kernels ran. (The Triton backend computes float64 inputs in fp32, registry.warn_triton_float64, so
a float64 run of it is no tighter than fp32: the float64 check is the reference's.)"""

import pytest
import torch

import icon_kernels as ik
from cases import device_of, relative_error
from test_triton_symmetric_affinity import ALL
from test_triton_symmetric_schedule import Launches

pytestmark = pytest.mark.skipif("triton" not in ik.available_backends(),
                                reason=ik.available_backends(with_reasons=True).get("triton") or "")
TRITON_F32 = 5e-5
PARAM_NAME = {"dot": "temperature", "cosine": "temperature", "gaussian": "sigma", "student_t": "dof"}
PARAM = {"dot": 0.8, "cosine": 0.3, "gaussian": 1.3, "student_t": 1.3}


def _inputs(n, seed, d=5):
    """x (float64), row labels in 0..3 (row 1: 7, which no column has; row 2: 8, which only column 2
    has, so it has no positive under exclude_self and only itself without), column labels a
    permutation of the row labels with every fifth one 9 (no row has it), and upstream gradients."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    rows = torch.randint(0, 4, (n,), generator=gen)
    cols = rows[torch.randperm(n, generator=gen)]
    cols[::5] = 9
    rows[1], rows[2], cols[2] = 7, 8, 8
    cols[1] = rows[0]                 # column 1 keeps a label that rows have
    upstream = torch.rand(n, generator=gen, dtype=torch.float64) + 0.5
    return x, rows, cols, upstream


def _run(x0, rows, cols, kernel, backend, upstream, dtype, **options):
    """(loss rows, dx, dparam) of icon_loss(x, target=Labels(rows, cols)), y omitted, reduction
    "none" with upstream gradients ``upstream``."""
    device = "cpu" if backend == "reference" else device_of("triton")
    x = x0.detach().to(device, dtype).requires_grad_()
    p = torch.tensor(PARAM[kernel], dtype=dtype, device=device, requires_grad=True)
    target = ik.Labels(rows.to(device), None if cols is None else cols.to(device))
    loss = ik.icon_loss(x, target=target, kernel=kernel, **{PARAM_NAME[kernel]: p}, backend=backend,
                        reduction="none", **options)
    grads = torch.autograd.grad(loss, (x, p), grad_outputs=upstream.to(device, loss.dtype))
    return [t.detach().cpu() for t in (loss, *grads)]


def _sweeps(divergence, beta) -> int:
    return 2 if beta > 0 or divergence not in ("kl", "cross_entropy") else 1


def _check_both_schedules(monkeypatch, x, rows, cols, upstream, kernel, divergence="kl", alpha=0.0, beta=0.0,
                          panels=1, **options):
    """The triangular schedule (its forward and merge kernels once per panel and sweep, its
    backward once, no plain kernel) and the plain one (no triangular kernel) against each other and
    the float64 reference. Returns the worst relative errors (against the plain kernels, against the
    reference) over loss rows, dx and dparam."""
    options = dict(options, divergence=divergence, alpha=alpha, beta=beta)
    monkeypatch.delenv("ICON_KERNELS_SYMMETRIC", raising=False)
    launches = Launches(monkeypatch, ALL)
    got = _run(x, rows, cols, kernel, "triton", upstream, torch.float32, **options)
    sweeps = _sweeps(divergence, beta)
    want_counts = dict.fromkeys(ALL, 0)
    want_counts.update(_triangular_forward_kernel=sweeps * panels, _triangular_merge_kernel=sweeps * panels,
                       _triangular_backward_kernel=1)
    assert launches.count == want_counts, launches.count
    monkeypatch.setenv("ICON_KERNELS_SYMMETRIC", "0")
    launches.reset()
    plain = _run(x, rows, cols, kernel, "triton", upstream, torch.float32, **options)
    assert launches.triangular() == 0, launches.count
    assert launches.count["_forward_kernel"] == launches.count["_cols_kernel"] == 1, launches.count
    assert launches.count["_mixture_kernel"] == int(sweeps == 2), launches.count
    want = _run(x, rows, cols, kernel, "reference", upstream, torch.float64, **options)
    naive = _run(x, rows, cols, kernel, "reference", upstream, torch.float32, **options)
    assert want[1].norm() > 0, "a problem without gradient tests nothing"
    worst_plain = worst_exact = 0.0
    for what, mine, theirs, exact, fp32 in zip(("rows", "dx", "dparam"), got, plain, want, naive):
        assert torch.isfinite(mine).all(), what
        err_plain, err_exact = relative_error(mine, theirs), relative_error(mine, exact)
        assert err_plain <= TRITON_F32, (what, err_plain)
        assert err_exact <= TRITON_F32 + 2 * relative_error(fp32, exact), (what, err_exact)
        worst_plain, worst_exact = max(worst_plain, err_plain), max(worst_exact, err_exact)
    left_out = [1, 2] if options.get("exclude_self") else [1]
    assert torch.all(got[0][left_out] == 0) and torch.all(want[0][left_out] == 0), got[0]
    return worst_plain, worst_exact


# (kernel, divergence, alpha, beta, N, exclude_self): the closed form (kl; cross_entropy with alpha),
# kl at beta > 0 (the second pass's R_i), js with alpha and beta and chi2 with beta (an f-divergence's
# Gamma_i); N ragged over the interpreter's 32-row blocks (37: the second block 5 rows; 45: 13), both
# exclude_self
CASES = [("gaussian", "kl", 0.0, 0.0, 37, True), ("cosine", "cross_entropy", 0.2, 0.0, 45, False),
         ("student_t", "kl", 0.0, 0.2, 37, False), ("dot", "js", 0.1, 0.1, 37, True),
         ("gaussian", "chi2", 0.0, 0.1, 45, True)]


@pytest.mark.parametrize("kernel,divergence,alpha,beta,n,exclude_self", CASES)
def test_other_column_labels_equal_the_reference_and_the_plain_schedule(monkeypatch, kernel, divergence, alpha,
                                                                        beta, n, exclude_self):
    x, rows, cols, upstream = _inputs(n, seed=n + CASES.index((kernel, divergence, alpha, beta, n, exclude_self)))
    assert not torch.equal(rows, cols)
    _check_both_schedules(monkeypatch, x, rows, cols, upstream, kernel, divergence=divergence, alpha=alpha,
                          beta=beta, exclude_self=exclude_self)


def test_several_panels_chunks_and_tiles_per_block(monkeypatch):
    """32-row blocks swept in 32 x 16 tiles, one row block per panel and one column block per
    program: every tile's column side (CLAB at its rows) lands in a partial of its own, read back by
    the merge; two sweeps (cross_entropy at beta > 0, with alpha)."""
    from icon_kernels._triton import launchers, triangular_launches
    monkeypatch.setattr(launchers, "INTERPRETER_SHAPE", (32, 16, 4, 2))
    monkeypatch.setattr(triangular_launches, "PANEL_BYTES", 1)
    monkeypatch.setattr(triangular_launches, "BLOCKS_PER_PROGRAM", 1)
    x, rows, cols, upstream = _inputs(70, seed=4)
    _check_both_schedules(monkeypatch, x, rows, cols, upstream, "gaussian", divergence="cross_entropy", alpha=0.1,
                          beta=0.1, panels=3, exclude_self=True)


@pytest.mark.parametrize("same_tensor", [True, False])
def test_equal_column_labels_as_before(monkeypatch, same_tensor):
    """Column labels equal to the rows' (Labels(rows): one tensor, passed to the kernels as LAB and
    CLAB; or an equal copy, which no longer costs a torch.equal to take the triangular schedule)
    give the loss of Labels(rows) under the reference, in one sweep."""
    x, _, _, upstream = _inputs(37, seed=11)
    rows = torch.randint(0, 4, (37,), generator=torch.Generator().manual_seed(3))     # every row has a positive
    monkeypatch.delenv("ICON_KERNELS_SYMMETRIC", raising=False)
    launches = Launches(monkeypatch, ALL)
    got = _run(x, rows, None if same_tensor else rows.clone(), "student_t", "triton", upstream, torch.float32,
               alpha=0.1, exclude_self=True)
    assert launches.count["_triangular_forward_kernel"] == 1 and launches.count["_triangular_backward_kernel"] == 1
    assert launches.count["_forward_kernel"] == launches.count["_cols_kernel"] == 0, launches.count
    want = _run(x, rows, None, "student_t", "reference", upstream, torch.float64, alpha=0.1, exclude_self=True)
    naive = _run(x, rows, None, "student_t", "reference", upstream, torch.float32, alpha=0.1, exclude_self=True)
    for what, mine, exact, fp32 in zip(("rows", "dx", "dparam"), got, want, naive):
        assert relative_error(mine, exact) <= TRITON_F32 + 2 * relative_error(fp32, exact), what


def test_the_launch_passes_both_label_tensors(monkeypatch):
    """The triangular kernels get LAB (the row labels) and CLAB (the column labels, or the row
    labels' tensor itself for Labels(rows)) as int64, and the structure holds without a host sync."""
    from icon_kernels._triton import triangular_launches
    monkeypatch.delenv("ICON_KERNELS_SYMMETRIC", raising=False)
    seen = []
    arguments = triangular_launches._arguments
    monkeypatch.setattr(triangular_launches, "_arguments",
                        lambda target, tensors, *a: seen.append((tensors["LAB"], tensors["CLAB"])) or
                        arguments(target, tensors, *a))
    equal = torch.equal
    syncs = []
    monkeypatch.setattr(torch, "equal", lambda *a: syncs.append(1) or equal(*a))   # (launchers' torch)
    device = device_of("triton")
    x, rows, cols, _ = _inputs(20, seed=1)
    x = x.float().to(device).requires_grad_()
    for col_labels in (cols.int(), None):
        seen.clear()
        ik.icon_loss(x, target=ik.Labels(rows.int().to(device), None if col_labels is None else col_labels.to(device)),
                     kernel="gaussian", backend="triton").backward()
        assert len(seen) == 2 and not syncs                     # the forward's and the backward's
        for lab, clab in seen:
            assert lab.dtype == clab.dtype == torch.int64
            assert (lab.cpu() == rows).all() and (clab.cpu() == (rows if col_labels is None else cols)).all()
            assert (clab is lab) == (col_labels is None)
