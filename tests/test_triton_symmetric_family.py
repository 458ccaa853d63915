"""Self mode's triangular schedule on the Triton backend for a two-pass Labels loss: an f-divergence
(reverse_kl, tv, hellinger, js, chi2) and/or beta > 0 (kl and cross_entropy too), y being x and the
column labels the rows' (triton/symmetric_kernels.py, PASS 1 then PASS 2; routed by
triton/launchers.py). The forward sweeps the triangle twice (every row's LSE, then the per-pair
terms of both sides of each tile), the backward once. Under TRITON_INTERPRET=1 without a GPU: fp32
against the float64 reference (test_backends_vs_reference.TRITON_F32) and against the plain kernels
(ICON_KERNELS_SYMMETRIC=0), with upstream gradients != 1 (reduction "none"), and launch counts that
show which kernels ran."""
import pytest
import torch

import icon_kernels as ik
from cases import device_of, relative_error
from test_triton_symmetric_schedule import TRIANGULAR, Launches
from test_triton_symmetric_schedule import _inputs as labels_inputs, _run as labels_run

pytestmark = pytest.mark.skipif("triton" not in ik.available_backends(),
                                reason=ik.available_backends(with_reasons=True).get("triton") or "")
TRITON_F32 = 5e-5
PLAIN = ("_forward_kernel", "_mixture_kernel", "_rows_kernel", "_cols_kernel")
AFFINITY = ("_triangular_affinity_forward_kernel", "_triangular_affinity_merge_kernel",
            "_triangular_affinity_backward_kernel")


def _triangular_counts(n_blocks: int, panels: int = 1) -> dict:
    """The launches of a two-pass triangular forward and backward: per panel of row blocks, the
    forward and merge kernels once in each pass; one backward; no plain kernel."""
    return {"_triangular_forward_kernel": 2 * panels, "_triangular_merge_kernel": 2 * panels,
            "_triangular_backward_kernel": 1, **dict.fromkeys(PLAIN, 0)}


def _check_both_schedules(monkeypatch, x, labels, upstream, kernel, n_blocks=None, panels=1, param=0.6,
                          dtype=torch.float32, tolerance=TRITON_F32, **options):
    """The triangular schedule (exactly _triangular_counts' launches) and the plain one
    (ICON_KERNELS_SYMMETRIC=0: the forward, mixture and both backward kernels, no triangular
    kernel) against each other and, in fp32, against the float64 reference: loss rows, dx, dparam,
    each within TRITON_F32 plus twice the float32 reference's own error (DESIGN §5: where the
    gradient cancels, e.g. N = 2 with the self pair, PyTorch's fp32 is that far off too). Returns
    the worst relative error against the reference (None in half precision)."""
    monkeypatch.delenv("ICON_KERNELS_SYMMETRIC", raising=False)
    device = device_of("triton")
    launches = Launches(monkeypatch, TRIANGULAR + PLAIN)
    got = labels_run(x.to(dtype), labels, kernel, "triton", upstream, param, device, **options)
    if n_blocks is None:
        from icon_kernels._triton import launchers
        n_blocks = -(-x.shape[0] // launchers.INTERPRETER_SHAPE[0])
    assert launches.count == _triangular_counts(n_blocks, panels), launches.count
    monkeypatch.setenv("ICON_KERNELS_SYMMETRIC", "0")
    launches.reset()
    plain = labels_run(x.to(dtype), labels, kernel, "triton", upstream, param, device, **options)
    assert launches.triangular() == 0, launches.count
    assert all(launches.count[name] == 1 for name in PLAIN), launches.count
    for what, mine, theirs in zip(("rows", "dx", "dparam"), got, plain):
        assert torch.isfinite(mine).all(), what
        assert relative_error(mine, theirs) <= tolerance, (what, relative_error(mine, theirs))
    if dtype != torch.float32:
        return None
    want = labels_run(x, labels, kernel, "reference", upstream, param, "cpu", **options)
    naive = labels_run(x.float(), labels, kernel, "reference", upstream, param, "cpu", **options)
    assert want[1].norm() > 0, "a problem without gradient tests nothing"
    errors = [relative_error(mine, exact) for mine, exact in zip(got, want)]
    for what, error, theirs, exact in zip(("rows", "dx", "dparam"), errors, naive, want):
        assert error <= tolerance + 2 * relative_error(theirs, exact), (what, error)
    return max(errors)


@pytest.mark.parametrize("divergence,beta,alpha,n,kernel,exclude_self", [
    ("reverse_kl", 0.0, 0.2, 45, "gaussian", True),
    ("tv", 0.0, 0.0, 37, "dot", True),
    ("hellinger", 0.1, 0.0, 45, "student_t", False),
    ("js", 0.2, 0.1, 37, "cosine", True),
    ("chi2", 0.0, 0.3, 45, "power", True),
    ("chi2", 0.2, 0.0, 37, "gaussian", False),
    ("kl", 0.3, 0.0, 37, "gaussian", True),
    ("cross_entropy", 0.2, 0.1, 45, "dot", False),
    ("tv", 0.1, 0.2, 2, "gaussian", False),         # N = 2 with the self pair: the diagonal block only
    ("kl", 0.2, 0.0, 2, "dot", False),
])
def test_equals_the_reference_and_the_plain_schedule(monkeypatch, divergence, beta, alpha, n, kernel, exclude_self):
    """Ragged N (two row blocks of the interpreter's 32 rows, the second partly empty) and N = 2."""
    x, labels, upstream = labels_inputs(n, seed=n + len(divergence))
    _check_both_schedules(monkeypatch, x, labels, upstream, kernel, divergence=divergence, beta=beta, alpha=alpha,
                          exclude_self=exclude_self)


@pytest.mark.parametrize("divergence,beta,alpha", [("js", 0.1, 0.2), ("kl", 0.2, 0.1)])
def test_several_panels_chunks_and_tiles_per_block(monkeypatch, divergence, beta, alpha):
    """32-row blocks swept in 32 x 16 tiles, one row block per panel (every panel's partials merged
    into the running statistics of the blocks after it, in both passes: the second's sums start
    from zero again) and one column block per program."""
    from icon_kernels._triton import launchers, triangular_launches
    monkeypatch.setattr(launchers, "INTERPRETER_SHAPE", (32, 16, 4, 2))
    monkeypatch.setattr(triangular_launches, "PANEL_BYTES", 1)
    monkeypatch.setattr(triangular_launches, "BLOCKS_PER_PROGRAM", 1)
    n = 100
    x, labels, upstream = labels_inputs(n, seed=2)
    n_blocks = -(-n // 32)
    _check_both_schedules(monkeypatch, x, labels, upstream, "gaussian", n_blocks=n_blocks, panels=n_blocks,
                          divergence=divergence, beta=beta, alpha=alpha, exclude_self=True)


def test_feature_dim_in_chunks(monkeypatch):
    """d beyond the register budget (shrunk here: d = 50 in 4 ragged chunks of 16): both passes'
    Grams loop over the chunks, the backward has one program per chunk of dX (each recomputing the
    tile's per-pair gradients of both sides)."""
    from icon_kernels._triton import launchers
    monkeypatch.setattr(launchers, "MAX_BLOCK_D", 32)
    monkeypatch.setattr(launchers, "D_CHUNK", 16)
    x, labels, upstream = labels_inputs(45, seed=11, d=50)
    _check_both_schedules(monkeypatch, x, labels, upstream, "gaussian", divergence="hellinger", beta=0.1, alpha=0.1,
                          exclude_self=True)


def test_half_inputs_as_the_plain_schedule(monkeypatch):
    """fp16 features (native under the interpreter: the gradient dots upcast): the two schedules
    differ by rounding only (fp32 accumulation both)."""
    x, labels, upstream = labels_inputs(45, seed=5)
    _check_both_schedules(monkeypatch, x, labels, upstream, "gaussian", param=1.5, dtype=torch.float16,
                          tolerance=1e-2, divergence="js", beta=0.1, alpha=0.1)


def _forward_op(x, y, labels, divergence, alpha, beta):
    from icon_kernels.backends.ops import forward_op
    code = ik.families.DIVERGENCES[divergence].code
    return forward_op("triton")(x, y, torch.tensor(0.5, device=x.device), "dot", "labels", labels, labels, None,
                                None, None, None, None, "dot", None, alpha, beta, True, code, "conditional", False)


@pytest.mark.parametrize("divergence,beta", [("tv", 0.0), ("js", 0.2), ("kl", 0.1)])
def test_the_stats_are_the_plain_forwards(monkeypatch, divergence, beta):
    """The forward op with x and y one tensor runs the triangular forward and writes the plain
    forward's stats rows (0 LSE, 1 Gamma_i or R_i, 2 the positive counts), which the plain backward
    reads too, and its BLOCK_M in row 3 (launchers.TRIANGULAR_RECORD_ROW); the plain forward (y a
    copy of x) leaves row 3 zero, where the plain second pass writes H_i for Affinity targets only,
    so that no plain forward reads as a triangular one."""
    from icon_kernels._triton import launchers
    monkeypatch.delenv("ICON_KERNELS_SYMMETRIC", raising=False)
    device = device_of("triton")
    x, labels, _ = labels_inputs(40, seed=7, dtype=torch.float32)
    x, labels = x.to(device), labels.to(device)
    launches = Launches(monkeypatch, TRIANGULAR + PLAIN)
    same = _forward_op(x, x, labels, divergence, 0.1, beta)
    assert launches.count["_triangular_forward_kernel"] == 2 and launches.count["_mixture_kernel"] == 0
    launches.reset()
    copy = _forward_op(x, x.clone(), labels, divergence, 0.1, beta)
    assert launches.count["_triangular_forward_kernel"] == 0 and launches.count["_mixture_kernel"] == 1
    assert launchers.TRIANGULAR_RECORD_ROW == 3
    assert torch.all(same[2][3] == launchers.INTERPRETER_SHAPE[0])
    assert torch.all(copy[2][3] == 0)
    assert relative_error(same[0], copy[0]) <= TRITON_F32
    assert torch.equal(same[1], copy[1])
    for row in (0, 1, 2):
        assert relative_error(same[2][row], copy[2][row]) <= TRITON_F32, row
    assert not torch.all(copy[2][1] == 1.0)       # Gamma_i or R_i, not the closed form's 1


@pytest.mark.parametrize("case", ["switch_off_at_backward", "other_tile_at_backward", "plain_forward"])
def test_the_backward_after_either_forward(monkeypatch, case):
    """The backward follows its forward's record: the switch turned off between a triangular
    forward and its backward still runs the triangular backward; a record that does not match the
    backward's tile (forced here by another interpreter tile at backward time) runs the plain
    backward kernels on the triangular forward's stats; a plain forward (switch off) followed by a
    backward with the switch on runs the plain backward. Each equals the float64 reference."""
    import os
    from icon_kernels._triton import launchers
    monkeypatch.setenv("ICON_KERNELS_SYMMETRIC", "0" if case == "plain_forward" else "1")
    device = device_of("triton")
    x0, labels, upstream = labels_inputs(45, seed=3)
    options = dict(kernel="gaussian", sigma=0.7, divergence="js", beta=0.2, alpha=0.1, reduction="none")
    launches = Launches(monkeypatch, TRIANGULAR + PLAIN)
    x = x0.float().to(device).requires_grad_()
    rows = ik.icon_loss(x, target=ik.Labels(labels.to(device)), backend="triton", **options)
    forward = dict(launches.count)
    if case == "switch_off_at_backward":
        os.environ["ICON_KERNELS_SYMMETRIC"] = "0"
    elif case == "other_tile_at_backward":
        monkeypatch.setattr(launchers, "INTERPRETER_SHAPE", (64, 32, 4, 2))
    else:
        os.environ["ICON_KERNELS_SYMMETRIC"] = "1"
    (dx,) = torch.autograd.grad(rows, (x,), grad_outputs=upstream.float().to(device))
    backward = {name: launches.count[name] - forward[name] for name in launches.count}
    triangular_backward = case == "switch_off_at_backward"
    assert forward["_triangular_forward_kernel"] == (0 if case == "plain_forward" else 2), forward
    assert backward["_triangular_backward_kernel"] == int(triangular_backward), backward
    assert backward["_rows_kernel"] == backward["_cols_kernel"] == int(not triangular_backward), backward
    xr = x0.clone().requires_grad_()
    want = ik.icon_loss(xr, target=ik.Labels(labels), backend="reference", **options)
    (want_dx,) = torch.autograd.grad(want, (xr,), grad_outputs=upstream)
    assert relative_error(rows.detach().cpu(), want.detach()) <= TRITON_F32
    assert relative_error(dx.cpu(), want_dx) <= TRITON_F32


def test_plain_where_the_symmetry_breaks(monkeypatch):
    """A two-pass loss runs the plain kernels where the triangle does not apply: y another tensor,
    a per-row temperature, other column labels. (An Affinity target with an f-divergence or beta > 0
    runs its own triangular kernels: tests/test_triton_symmetric_affinity_family.py.)"""
    monkeypatch.delenv("ICON_KERNELS_SYMMETRIC", raising=False)
    device = device_of("triton")
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(20, 4, generator=gen).to(device)
    labels = (torch.arange(20) // 2).to(device)
    launches = Launches(monkeypatch, TRIANGULAR + AFFINITY + PLAIN)

    def launched(y=None, **kw):
        launches.reset()
        xx = x.clone().requires_grad_()
        options = {"target": ik.Labels(labels), "backend": "triton", "divergence": "tv", "alpha": 0.1, **kw}
        ik.icon_loss(xx, xx if isinstance(y, str) else y, **options).backward()
        return (sum(launches.count[name] for name in TRIANGULAR + AFFINITY), launches.count["_mixture_kernel"],
                launches.count["_cols_kernel"])

    assert launched() == (5, 0, 0)
    assert launched(y="same", divergence="kl", beta=0.1) == (5, 0, 0)
    assert launched(y=x.clone()) == (0, 1, 1)
    assert launched(temperature=torch.full((20,), 0.5, device=device)) == (0, 1, 1)
    assert launched(target=ik.Labels(labels, labels.flip(0)), beta=0.2) == (5, 0, 0)   # any column labels
    z = torch.randn(20, 3, generator=gen).to(device)
    assert launched(target=ik.Affinity(z, sigma=1.0)) == (5, 0, 0)
    assert launched(target=ik.Affinity(z, sigma=1.0), divergence="kl", alpha=0.0, beta=0.1) == (5, 0, 0)
    assert launched(target=ik.Affinity(z, z.flip(0), sigma=1.0)) == (0, 1, 1)
