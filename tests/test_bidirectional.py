"""ik.icon_loss_bidirectional (DESIGN.md §1.3): 1/2 [L(x->y) + L(y->x)] with the reverse direction's
target transposed. One pass over the strips of S = x y^T on cpu (csrc/cpu_bidirectional_labels.cpp)
and torch (backends/bidirectional_torch.py), one backward for both directions on triton
(triton/backward_kernels.py, BIDIR; under TRITON_INTERPRET=1 without a GPU) for Labels targets;
two calls elsewhere.

Every path must equal two ik.icon_loss calls of the dense reference (1e-12 in float64, ragged
strips forced), keep fp32 and half precision within twice naive PyTorch's own error, pass
gradcheck and opcheck, and run where it applies: _C.cpu_symmetric_counts() counts the cpu ops'
calls."""
import itertools

import pytest
import torch

import icon_kernels as ik
from cases import relative_error
from cases import device_of
from icon_kernels.backends import bidirectional_ops, bidirectional_torch
from icon_kernels.backends import blockwise as torch_backend

F64, F32 = torch.float64, torch.float32
HAS_CPU = "cpu" in ik.available_backends()
needs_cpu = pytest.mark.skipif(not HAS_CPU, reason="the cpu backend is not built")
needs_triton = pytest.mark.skipif("triton" not in ik.available_backends(),
                                  reason=ik.available_backends(with_reasons=True).get("triton") or "")
TRITON_F32 = 5e-5       # float32 against the float64 reference (test_backends_vs_reference.TRITON_F32)
# ICON_KERNELS_CPU_TILE_ELEMENTS: "8" gives strips of one row (M > 8), "100" ragged strips of a
# few rows, "" the default
TILES = ("8", "100", "")
PARAM_NAME = {"dot": "temperature", "cosine": "temperature", "gaussian": "sigma", "student_t": "dof",
              "power": "exponent"}


def _cpu_calls():
    from icon_kernels import _C
    counts = _C.cpu_symmetric_counts()
    return counts["bidirectional_forward"], counts["bidirectional_backward"]


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.delenv("ICON_KERNELS_SYMMETRIC", raising=False)
    monkeypatch.delenv("ICON_KERNELS_CPU_TILE_ELEMENTS", raising=False)
    if HAS_CPU:
        _cpu_calls()
    yield


class TorchCalls:
    """Counts the torch backend's one-pass calls."""

    def __init__(self, monkeypatch):
        self.calls = 0
        apply = bidirectional_torch.BidirectionalLabels.apply

        def counted(*args):
            self.calls += 1
            return apply(*args)
        monkeypatch.setattr(bidirectional_torch.BidirectionalLabels, "apply", counted)


class OpCalls:
    """Counts the one-pass bidirectional op calls of each backend."""

    def __init__(self, monkeypatch):
        self.calls = {}
        forward_op = bidirectional_ops.forward_op

        def counted(name):
            self.calls[name] = self.calls.get(name, 0) + 1
            return forward_op(name)
        monkeypatch.setattr(bidirectional_ops, "forward_op", counted)


def _inputs(n, m, d=5, dtype=F64, seed=0, classes=3):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=F64).to(dtype)
    y = torch.randn(m, d, generator=gen, dtype=F64).to(dtype)
    rl = torch.randint(0, classes, (n,), generator=gen)
    cl = torch.randint(0, classes, (m,), generator=gen)
    return x, y, rl, cl


def _grads(loss_fn, x0, y0, param, upstream=1.7):
    """(loss, dx, dy, dparam) of upstream * loss (the pair's halves summed for reduction='none')."""
    x, y = x0.detach().clone().requires_grad_(), y0.detach().clone().requires_grad_()
    p = torch.tensor(param, dtype=F64 if x0.dtype == F64 else F32, device=x0.device, requires_grad=True)
    loss = loss_fn(x, y, p)
    if isinstance(loss, tuple):
        loss = loss[0].sum() + loss[1].sum()
    return [loss.detach(), *torch.autograd.grad(loss * upstream, (x, y, p))]


def _two_calls(target, reverse, kernel, backend="reference", **options):
    """The definition: two ik.icon_loss calls, halved."""
    def f(x, y, p):
        kw = {**options, PARAM_NAME[kernel]: p}
        return (ik.icon_loss(x, y, target=target, kernel=kernel, backend=backend, **kw)
                + ik.icon_loss(y, x, target=reverse, kernel=kernel, backend=backend, **kw)) / 2
    return f


def _both(target, kernel, backend, **options):
    def f(x, y, p):
        return ik.icon_loss_bidirectional(x, y, target=target, kernel=kernel, backend=backend,
                                          **{**options, PARAM_NAME[kernel]: p})
    return f


def _close(got, want, tol):
    for g, w in zip(got, want):
        assert relative_error(g, w) <= tol, (relative_error(g, w), tol)


SHAPES = [(37, 23, False), (23, 37, False), (16, 16, True), (1, 1, False), (1, 6, False), (6, 1, False)]
CASES = list(itertools.product(SHAPES, (0.0, 0.3), ("kl", "cross_entropy")))


@needs_cpu
@pytest.mark.parametrize("kernel", ["dot", "cosine", "gaussian"])
@pytest.mark.parametrize("shape,alpha,divergence", CASES)
def test_cpu_one_pass_equals_two_reference_calls(monkeypatch, kernel, shape, alpha, divergence):
    n, m, exclude_self = shape
    x, y, rl, cl = _inputs(n, m, classes=2 if n * m > 1 else 1)
    options = dict(alpha=alpha, divergence=divergence, exclude_self=exclude_self)
    want = _grads(_two_calls(ik.Labels(rl, cl), ik.Labels(cl, rl), kernel, **options), x, y, 0.6)
    for tile in TILES:
        monkeypatch.setenv("ICON_KERNELS_CPU_TILE_ELEMENTS", tile)
        got = _grads(_both(ik.Labels(rl, cl), kernel, "cpu", **options), x, y, 0.6)
        assert _cpu_calls() == (1, 1), tile
        _close(got, want, 1e-12)


@needs_cpu
@pytest.mark.parametrize("divergence", ["kl", "cross_entropy"])
def test_cpu_self_columns_beyond_the_first_chunk_and_sum_block(monkeypatch, divergence):
    """exclude_self at N = M = 600: the self column of a row falls in every column chunk (256 wide)
    and in the second sum block (512 wide) of the row statistics, where the element loops split
    the row around it, and outside the chunk for most rows."""
    x, y, rl, cl = _inputs(600, 600, classes=4, seed=3)
    options = dict(alpha=0.3, divergence=divergence, exclude_self=True)
    want = _grads(_two_calls(ik.Labels(rl, cl), ik.Labels(cl, rl), "dot", **options), x, y, 0.6)
    for tile in ("100", ""):
        monkeypatch.setenv("ICON_KERNELS_CPU_TILE_ELEMENTS", tile)
        got = _grads(_both(ik.Labels(rl, cl), "dot", "cpu", **options), x, y, 0.6)
        assert _cpu_calls() == (1, 1), tile
        _close(got, want, 1e-12)


@needs_cpu
@pytest.mark.parametrize("offset", [0, 2**32, -2**40])
def test_cpu_labels_beyond_int32_stay_distinct(offset):
    """The cpu op compares int32 codes of the labels: labels that agree in their low 32 bits
    (0 and 2**32) must stay different classes, and labels out of int32's range still work."""
    x, y, rl, cl = _inputs(19, 23, classes=3)
    # class 2 becomes 2**32 (+ offset): equal to class 0 modulo 2**32 when offset is a multiple of it
    rl, cl = (torch.where(lab == 2, 2**32, lab) + offset for lab in (rl, cl))
    options = dict(alpha=0.2, divergence="kl")
    want = _grads(_two_calls(ik.Labels(rl, cl), ik.Labels(cl, rl), "dot", **options), x, y, 0.6)
    got = _grads(_both(ik.Labels(rl, cl), "dot", "cpu", **options), x, y, 0.6)
    assert _cpu_calls() == (1, 1)
    _close(got, want, 1e-12)


@pytest.mark.parametrize("kernel", ["dot", "cosine", "gaussian", "student_t", "power"])
@pytest.mark.parametrize("shape,alpha,divergence", CASES[::3] + CASES[1::6])
def test_torch_one_pass_equals_two_reference_calls(monkeypatch, kernel, shape, alpha, divergence):
    n, m, exclude_self = shape
    x, y, rl, cl = _inputs(n, m, classes=2 if n * m > 1 else 1)
    options = dict(alpha=alpha, divergence=divergence, exclude_self=exclude_self)
    want = _grads(_two_calls(ik.Labels(rl, cl), ik.Labels(cl, rl), kernel, **options), x, y, 0.6)
    calls = TorchCalls(monkeypatch)
    for elements in (5, 100, 1 << 20):        # strips of 1 row, a few rows, everything
        monkeypatch.setattr(torch_backend, "CHUNK_ELEMENTS", elements)
        got = _grads(_both(ik.Labels(rl, cl), kernel, "torch", **options), x, y, 0.6)
        _close(got, want, 1e-12)
    assert calls.calls == 3


@pytest.mark.parametrize("backend", ["cpu", "torch", "reference"])
def test_the_other_targets_take_two_calls_with_the_reverse_target(monkeypatch, backend):
    """Dense(p) reverses to Dense(p.T), Affinity(z, z_cols) to Affinity(z_cols, z), Neighbors to the
    lists of the rows that list each column (= Dense of its scattered weights, transposed); and
    log_dot, one pass on torch (a symmetric kernel), two calls on cpu (not its ops' kernel)."""
    if backend == "cpu" and not HAS_CPU:
        pytest.skip("the cpu backend is not built")
    calls, torch_calls = OpCalls(monkeypatch), TorchCalls(monkeypatch)
    gen = torch.Generator().manual_seed(4)
    n, m = 9, 6
    x, y, _, _ = _inputs(n, m)
    p = torch.rand(n, m, generator=gen, dtype=F64)
    z, zc = torch.randn(n, 3, generator=gen, dtype=F64), torch.randn(m, 3, generator=gen, dtype=F64)
    idx = torch.randint(-1, m, (n, 4), generator=gen)
    w = torch.rand(n, 4, generator=gen, dtype=F64)
    scattered = torch.zeros(n, m, dtype=F64)
    keep = idx >= 0
    scattered.index_put_((torch.arange(n)[:, None].expand(n, 4)[keep], idx[keep]), w[keep], accumulate=True)
    for target, reverse in [(ik.Dense(p), ik.Dense(p.T)),
                            (ik.Affinity(z, zc, sigma=0.8), ik.Affinity(zc, z, sigma=0.8)),
                            (ik.Neighbors(idx, w), ik.Dense(scattered.T))]:
        want = _grads(_two_calls(target, reverse, "dot", alpha=0.1), x, y, 0.6)
        got = _grads(_both(target, "dot", backend, alpha=0.1), x, y, 0.6)
        _close(got, want, 1e-12)
    rl, cl = torch.randint(0, 2, (n,), generator=gen), torch.randint(0, 2, (m,), generator=gen)
    xs, ys = x.abs() + 0.1, y.abs() + 0.1            # log_dot: positive dot products
    assert calls.calls == {} and torch_calls.calls == 0          # the other targets: two calls
    got = ik.icon_loss_bidirectional(xs, ys, target=ik.Labels(rl, cl), kernel="log_dot", backend=backend)
    want = (ik.icon_loss(xs, ys, target=ik.Labels(rl, cl), kernel="log_dot", backend="reference")
            + ik.icon_loss(ys, xs, target=ik.Labels(cl, rl), kernel="log_dot", backend="reference")) / 2
    assert relative_error(got, want) <= 1e-12
    assert calls.calls == {} and torch_calls.calls == (backend == "torch")


def test_neighbor_weights_get_their_gradient_through_the_reverse_lists():
    gen = torch.Generator().manual_seed(6)
    n, m = 7, 5
    x, y, _, _ = _inputs(n, m)
    idx = torch.tensor([[0, 1, -1], [1, 1, 2], [4, -1, -1], [0, 3, 2], [2, 2, 2], [-1, -1, -1], [4, 0, 1]])
    w0 = torch.rand(n, 3, generator=gen, dtype=F64) + 0.1

    def value(backend, dense):
        w = w0.clone().requires_grad_()
        if dense:
            keep = idx >= 0
            rows = torch.arange(n)[:, None].expand(n, 3)[keep]
            p = torch.zeros(n, m, dtype=F64).index_put((rows, idx[keep]), w[keep], accumulate=True)
            target = ik.Dense(p)
        else:
            target = ik.Neighbors(idx, w)
        loss = ik.icon_loss_bidirectional(x, y, target=target, kernel="dot", temperature=0.7, backend=backend)
        return loss.detach(), torch.autograd.grad(loss, w)[0]

    want = value("reference", dense=True)
    for backend in ["reference", "torch"] + (["cpu"] if HAS_CPU else []):
        _close(value(backend, dense=False), want, 1e-12)


@pytest.mark.parametrize("backend", ["torch", "reference"] + (["cpu"] if HAS_CPU else []))
def test_reductions(backend):
    x, y, rl, cl = _inputs(12, 12, classes=4)
    target = ik.Labels(rl, cl)
    kw = dict(kernel="cosine", temperature=0.2, backend=backend)
    rows_x = ik.icon_loss(x, y, target=target, reduction="none", backend="reference", kernel="cosine",
                          temperature=0.2)
    rows_y = ik.icon_loss(y, x, target=ik.Labels(cl, rl), reduction="none", backend="reference", kernel="cosine",
                          temperature=0.2)
    half_x, half_y = ik.icon_loss_bidirectional(x, y, target=target, reduction="none", **kw)
    assert half_x.shape == (12,) and half_y.shape == (12,)
    _close([half_x, half_y], [rows_x / 2, rows_y / 2], 1e-12)
    total = ik.icon_loss_bidirectional(x, y, target=target, reduction="sum", **kw)
    assert relative_error(total, (rows_x.sum() + rows_y.sum()) / 2) <= 1e-12
    mean = ik.icon_loss_bidirectional(x, y, target=target, **kw)
    want = (ik.icon_loss(x, y, target=target, backend="reference", kernel="cosine", temperature=0.2)
            + ik.icon_loss(y, x, target=ik.Labels(cl, rl), backend="reference", kernel="cosine", temperature=0.2)) / 2
    assert relative_error(mean, want) <= 1e-12


@pytest.mark.parametrize("backend", ["torch"] + (["cpu"] if HAS_CPU else []))
def test_rows_left_out_and_an_all_left_out_batch(backend):
    x, y, _, _ = _inputs(6, 4)
    rl = torch.tensor([0, 0, 1, 1, 5, 5])
    cl = torch.tensor([0, 1, 7, 7])                 # y's rows 2, 3 and x's rows 4, 5 have no positive
    want = _grads(_two_calls(ik.Labels(rl, cl), ik.Labels(cl, rl), "dot"), x, y, 0.5)
    _close(_grads(_both(ik.Labels(rl, cl), "dot", backend), x, y, 0.5), want, 1e-12)
    none = _grads(_both(ik.Labels(torch.zeros(6, dtype=torch.long), torch.ones(4, dtype=torch.long)), "dot",
                        backend), x, y, 0.5)
    assert all(float(t.abs().max()) == 0 for t in none)


@needs_cpu
@pytest.mark.parametrize("temperature,scale", [(0.01, 1.0), (0.01, 30.0), (0.05, 30.0)])
def test_float32_huge_logits_within_twice_pytorchs_own_error(monkeypatch, temperature, scale):
    """Logits up to 1e6 in both directions: the backward's q and q' must sum to 1 without a
    renormalising pass, from the forward's very logits and the LSEs' rounding (stats row 2).
    Strips of 12 rows (ragged: 12, 12, 12, 4) and the default. Strips of one row, or of 7, are
    tested in float64 only: the GEMM itself rounds the Gram otherwise at those shapes (MKL's GEMV
    or another micro-kernel), and at tau = 0.01 that alone moves dL/dx to 5.4e-6 where naive
    PyTorch's own error is 1.4e-6 (the GEMV's fp32 logits put through the exact float64 softmax
    give the 5.4e-6 too)."""
    gen = torch.Generator().manual_seed(5)
    n, m = 40, 30
    x = (scale * torch.randn(n, 16, generator=gen, dtype=F64)).float().double()
    y = (scale * torch.randn(m, 16, generator=gen, dtype=F64)).float().double()
    rl, cl = torch.arange(n) % m, torch.arange(m)
    exact = _grads(_two_calls(ik.Labels(rl, cl), ik.Labels(cl, rl), "dot"), x, y, temperature)
    naive = _grads(_two_calls(ik.Labels(rl, cl), ik.Labels(cl, rl), "dot"), x.float(), y.float(), temperature)
    for backend, tile in (("cpu", "360"), ("cpu", ""), ("torch", "")):
        monkeypatch.setenv("ICON_KERNELS_CPU_TILE_ELEMENTS", tile)
        got = _grads(_both(ik.Labels(rl, cl), "dot", backend), x.float(), y.float(), temperature)
        assert _cpu_calls() == ((1, 1) if backend == "cpu" else (0, 0))
        for mine, theirs, want in zip(got, naive, exact):
            assert relative_error(mine, want) <= 2 * relative_error(theirs, want) + 2.4e-7


@pytest.mark.parametrize("backend", ["torch"] + (["cpu"] if HAS_CPU else []))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_within_twice_pytorchs_own_error(backend, dtype):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(48, 32, generator=gen, dtype=F64).to(dtype)
    y = torch.randn(40, 32, generator=gen, dtype=F64).to(dtype)
    rl, cl = torch.arange(48) % 40, torch.arange(40)
    exact = _grads(_two_calls(ik.Labels(rl, cl), ik.Labels(cl, rl), "cosine"), x.double(), y.double(), 0.1)
    naive = _grads(_two_calls(ik.Labels(rl, cl), ik.Labels(cl, rl), "cosine"), x, y, 0.1)
    got = _grads(_both(ik.Labels(rl, cl), "cosine", backend), x, y, 0.1)
    assert got[1].dtype == dtype and got[2].dtype == dtype
    for mine, theirs, want in zip(got, naive, exact):
        assert relative_error(mine, want) <= 2 * relative_error(theirs, want) + 1e-4


@pytest.mark.parametrize("backend", ["torch"] + (["cpu"] if HAS_CPU else []))
def test_gradcheck(monkeypatch, backend):
    monkeypatch.setenv("ICON_KERNELS_CPU_TILE_ELEMENTS", "10")   # strips of 2 rows (M = 5)
    monkeypatch.setattr(torch_backend, "CHUNK_ELEMENTS", 10)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(7, 3, generator=gen, dtype=F64, requires_grad=True)
    y = torch.randn(5, 3, generator=gen, dtype=F64, requires_grad=True)
    t = torch.tensor(0.7, dtype=F64, requires_grad=True)
    rl, cl = torch.tensor([0, 0, 1, 1, 1, 2, 2]), torch.tensor([0, 1, 1, 2, 0])
    for kernel in ("dot", "gaussian"):
        def f(x, y, t):
            return ik.icon_loss_bidirectional(x, y, target=ik.Labels(rl, cl), kernel=kernel, backend=backend,
                                              alpha=0.1, reduction="none", **{PARAM_NAME[kernel]: t})
        assert torch.autograd.gradcheck(f, (x, y, t))


@needs_cpu
def test_opcheck_of_the_bidirectional_ops():
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(9, 4, generator=gen, dtype=F64), torch.randn(6, 4, generator=gen, dtype=F64)
    rl, cl = torch.arange(9) // 3, torch.arange(6) // 2
    args = (x, y, torch.tensor(0.5, dtype=F64), "dot", rl, cl, 0.1, False, 0)
    op = torch.ops.icon_kernels
    torch.library.opcheck(op.cpu_bidirectional_forward.default, args)
    out = op.cpu_bidirectional_forward(*args)
    gx, gy = torch.linspace(-1, 1, 9, dtype=F64), torch.linspace(0.5, 1, 6, dtype=F64)
    for need_x, need_y in ((True, True), (False, True), (True, False)):
        torch.library.opcheck(op.cpu_bidirectional_backward.default,
                              (gx, gy, *args, out[1], out[2], out[4], out[5], True, need_x, need_y))


@needs_cpu
def test_the_ops_check_every_size_they_index():
    x, y = torch.randn(5, 3), torch.randn(4, 3)
    rl, cl = torch.arange(5), torch.arange(4)
    p = torch.tensor(0.5)
    op = torch.ops.icon_kernels
    empty, none = torch.randn(0, 3), torch.zeros(0, dtype=torch.long)
    bad = [((x, empty, p, "dot", rl, none, 0.0, False, 0), "at least one row"),
           ((empty, y, p, "dot", none, cl, 0.0, False, 0), "at least one row"),
           ((x, y, p, "dot", rl.double(), cl, 0.0, False, 0), "row_labels must be an integer"),
           ((x, y, p, "dot", rl, cl.to(torch.complex64), 0.0, False, 0), "col_labels must be an integer"),
           ((x, y, p, "dot", rl[:4], cl, 0.0, False, 0), "row_labels"),
           ((x, y, p, "dot", rl, torch.arange(5), 0.0, False, 0), "col_labels"),
           ((x, torch.randn(4, 2), p, "dot", rl, cl, 0.0, False, 0), "y must have shape"),
           ((x, y, torch.ones(5), "dot", rl, cl, 0.0, False, 0), "param"),
           ((x, y, p, "student_t", rl, cl, 0.0, False, 0), "kernel"),
           ((x, y, p, "dot", rl, cl, 0.0, True, 0), "exclude_self"),
           ((x, y, p, "dot", rl, cl, 0.0, False, 3), "divergence")]
    for args, name in bad:
        with pytest.raises(RuntimeError, match=name):
            op.cpu_bidirectional_forward(*args)
    args = (x, y, p, "dot", rl, cl, 0.0, False, 0)
    out = op.cpu_bidirectional_forward(*args)
    g5, g4 = torch.ones(5), torch.ones(4)
    with pytest.raises(RuntimeError, match="grad_y_rows"):
        op.cpu_bidirectional_backward(g5, g5, *args, out[1], out[2], out[4], out[5], False, True, True)
    with pytest.raises(RuntimeError, match="stats_y"):
        op.cpu_bidirectional_backward(g5, g4, *args, out[1], out[2], out[4], out[2], False, True, True)
    with pytest.raises(RuntimeError, match="one icon_kernels::cpu_bidirectional_forward"):
        op.cpu_bidirectional_backward(g5, g4, *args, out[1], torch.zeros(4, 5), out[4], out[5], False, True, True)


def test_bad_arguments_name_themselves():
    x, y, rl, cl = _inputs(6, 6)
    with pytest.raises(TypeError, match="y must be a torch.Tensor"):
        ik.icon_loss_bidirectional(x, None, target=ik.Labels(rl))
    with pytest.raises(ValueError, match="temperature must be one value"):
        ik.icon_loss_bidirectional(x, y, target=ik.Labels(rl, cl), temperature=torch.full((6,), 0.5, dtype=F64))
    with pytest.raises(ValueError, match="normalization"):
        ik.icon_loss_bidirectional(x, y, target=ik.Labels(rl, cl), normalization="joint")
    with pytest.raises(ValueError, match="exclude_self"):
        ik.icon_loss_bidirectional(x, y[:4], target=ik.Labels(rl, cl[:4]), exclude_self=True)
    with pytest.raises(ValueError, match="sigma has one value per row"):
        ik.icon_loss_bidirectional(x, y, target=ik.Affinity(x, y, sigma=torch.ones(6, dtype=F64)))
    with pytest.raises(ValueError, match="ICON_KERNELS_SYMMETRIC"):
        import os
        os.environ["ICON_KERNELS_SYMMETRIC"] = "2"
        try:
            ik.icon_loss_bidirectional(x, y, target=ik.Labels(rl, cl), backend="cpu")
        finally:
            del os.environ["ICON_KERNELS_SYMMETRIC"]


@needs_cpu
def test_the_switch_and_auto(monkeypatch):
    x, y, rl, cl = _inputs(8, 5)
    want = _grads(_both(ik.Labels(rl, cl), "dot", "reference"), x, y, 0.5)
    got = _grads(_both(ik.Labels(rl, cl), "dot", "auto"), x, y, 0.5)
    assert _cpu_calls() == (1, 1)                      # "auto" on the CPU: the cpu ops
    _close(got, want, 1e-12)
    monkeypatch.setenv("ICON_KERNELS_SYMMETRIC", "0")
    got = _grads(_both(ik.Labels(rl, cl), "dot", "cpu"), x, y, 0.5)
    assert _cpu_calls() == (0, 0)                      # two calls of the cpu backend
    _close(got, want, 1e-12)


@pytest.mark.parametrize("backend", ["torch"] + (["cpu"] if HAS_CPU else []))
def test_y_is_x(backend):
    x, _, rl, _ = _inputs(9, 1)

    def grad(f):
        xx = x.clone().requires_grad_()
        loss = f(xx, xx, torch.tensor(0.5, dtype=F64))
        return [loss.detach(), *torch.autograd.grad(loss, xx)]
    _close(grad(_both(ik.Labels(rl, rl), "dot", backend, exclude_self=True)),
           grad(_two_calls(ik.Labels(rl, rl), ik.Labels(rl, rl), "dot", exclude_self=True)), 1e-12)


@pytest.mark.parametrize("backend", ["torch"] + (["cpu"] if HAS_CPU else []))
def test_double_backward_raises(backend):
    x, y, rl, cl = _inputs(5, 4)
    x.requires_grad_()
    loss = ik.icon_loss_bidirectional(x, y, target=ik.Labels(rl, cl), kernel="dot", backend=backend)
    (g,) = torch.autograd.grad(loss, x, create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        g.sum().backward()


@pytest.mark.parametrize("backend", ["torch", "reference"] + (["cpu"] if HAS_CPU else []))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_clip_loss_is_both_directions_in_one_pass(backend, reduction):
    gen = torch.Generator().manual_seed(8)
    img, txt = torch.randn(10, 6, generator=gen, dtype=F64), torch.randn(10, 6, generator=gen, dtype=F64)

    def run(crit, two_calls):
        a, b = img.clone().requires_grad_(), txt.clone().requires_grad_()
        if two_calls:
            scale = crit.logit_scale.exp().clamp(max=crit.max_logit_scale)
            ids = torch.arange(10)
            kw = dict(kernel="cosine", temperature=scale.reciprocal(), exclude_self=False, backend="reference",
                      reduction=reduction)
            loss = (ik.icon_loss(a, b, target=ik.Labels(ids, ids), **kw)
                    + ik.icon_loss(b, a, target=ik.Labels(ids, ids), **kw)) / 2
        else:
            loss = crit(a, b)
        return [loss.detach(), *torch.autograd.grad(loss.sum(), (a, b, crit.logit_scale))]

    crit = ik.CLIPLoss(backend=backend, reduction=reduction).double()
    got = run(crit, two_calls=False)
    if backend == "cpu":
        assert _cpu_calls() == (1, 1)
    _close(got, run(crit, two_calls=True), 1e-12)


@needs_triton
@pytest.mark.parametrize("kernel", ["dot", "cosine", "gaussian", "student_t"])
@pytest.mark.parametrize("shape,alpha,divergence", [((37, 23, False), 0.0, "kl"), ((23, 40, False), 0.3, "kl"),
                                                    ((16, 16, True), 0.3, "cross_entropy"), ((1, 3, False), 0.0, "kl")])
def test_triton_one_backward_for_both_directions(monkeypatch, kernel, shape, alpha, divergence):
    """fp32 (the Triton kernels compute in fp32) against two float64 reference calls; ragged tiles:
    the interpreter's 32 x 32 tiles over 37 and 23 rows."""
    n, m, exclude_self = shape
    x, y, rl, cl = _inputs(n, m, classes=2 if n * m > 3 else 1)
    options = dict(alpha=alpha, divergence=divergence, exclude_self=exclude_self)
    want = _grads(_two_calls(ik.Labels(rl, cl), ik.Labels(cl, rl), kernel, **options), x, y, 0.6)
    device = device_of("triton")
    calls = OpCalls(monkeypatch)
    got = _grads(_both(ik.Labels(rl.to(device), cl.to(device)), kernel, "triton", **options),
                 x.float().to(device), y.float().to(device), 0.6)
    assert calls.calls == {"triton": 1}
    _close([t.cpu() for t in got], want, TRITON_F32)


@needs_triton
def test_triton_bidirectional_ops_pass_opcheck_and_leave_rows_out():
    device = device_of("triton")
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(9, 4, generator=gen).to(device)
    y = torch.randn(6, 4, generator=gen).to(device)
    rl, cl = (torch.arange(9) // 3).to(device), torch.tensor([0, 0, 1, 7, 7, 2]).to(device)
    args = (x, y, torch.tensor(0.5, device=device), "dot", rl, cl, 0.1, False, 0)
    op = torch.ops.icon_kernels
    torch.library.opcheck(op.triton_bidirectional_forward.default, args)
    out = op.triton_bidirectional_forward(*args)
    assert out[4].tolist() == [True, True, True, False, False, True]      # y's rows 3, 4: no positive
    gx, gy = torch.linspace(-1, 1, 9, device=device), torch.linspace(0.5, 1, 6, device=device)
    torch.library.opcheck(op.triton_bidirectional_backward.default,
                          (gx, gy, *args, out[1], out[2], out[4], out[5], True, True, True))
    _, dy, _ = op.triton_bidirectional_backward(gx, gy, *args, out[1], out[2], out[4], out[5], True, True, False)
    assert float(dy.abs().max()) == 0


@pytest.mark.parametrize("backend", ["torch"] + (["cpu"] if HAS_CPU else []))
def test_torch_compile_fullgraph_matches_eager(backend):
    """The cpu ops trace; the torch version's backward (autograd.grad per strip) does not, so under
    torch.compile it is two calls."""
    x, y, rl, cl = _inputs(20, 12, dtype=F32)

    def step(x, y, tau):
        return ik.icon_loss_bidirectional(x, y, target=ik.Labels(rl, cl), kernel="cosine", temperature=tau,
                                          backend=backend)

    results = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        xi, yi, ti = x.clone().requires_grad_(), y.clone().requires_grad_(), torch.tensor(0.2, requires_grad=True)
        loss = fn(xi, yi, ti)
        loss.backward()
        results.append((loss.detach(), xi.grad, yi.grad, ti.grad))
    for eager, comp in zip(*results):
        torch.testing.assert_close(comp, eager, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "reference"] + (["cpu"] if HAS_CPU else []))
def test_one_element_parameters_are_one_value_at_n_or_m_1(backend):
    x, y, _, _ = _inputs(1, 5)
    rl, cl = torch.zeros(1, dtype=torch.long), torch.arange(5)
    t = torch.tensor([0.5], dtype=F64)
    got = ik.icon_loss_bidirectional(x, y, target=ik.Labels(rl, cl), kernel="dot", temperature=t, backend=backend)
    want = _two_calls(ik.Labels(rl, cl), ik.Labels(cl, rl), "dot")(x, y, torch.tensor(0.5, dtype=F64))
    assert relative_error(got, want) <= 1e-12
    z, zc = torch.randn(1, 3, dtype=F64), torch.randn(5, 3, dtype=F64)
    got = ik.icon_loss_bidirectional(x, y, target=ik.Affinity(z, zc, sigma=torch.tensor([0.7], dtype=F64)),
                                     kernel="dot", backend=backend)
    want = (ik.icon_loss(x, y, target=ik.Affinity(z, zc, sigma=0.7), kernel="dot", backend="reference")
            + ik.icon_loss(y, x, target=ik.Affinity(zc, z, sigma=0.7), kernel="dot", backend="reference")) / 2
    assert relative_error(got, want) <= 1e-12


@pytest.mark.parametrize("backend", ["torch"] + (["cpu"] if HAS_CPU else []))
def test_target_gradients_and_square_reverse_targets(backend):
    """Gradients into the target's tensors through the reverse direction (Affinity z, z_cols and
    sigma; Dense p), square Affinity with z_cols=None and symmetrize, Neighbors with self entries
    under exclude_self and with symmetrize, all against two reference calls."""
    gen = torch.Generator().manual_seed(9)
    n = 8
    x, y, _, _ = _inputs(n, n)
    z0, zc0 = torch.randn(n, 3, generator=gen, dtype=F64), torch.randn(n, 3, generator=gen, dtype=F64)
    p0 = torch.rand(n, n, generator=gen, dtype=F64)
    idx = torch.randint(0, n, (n, 3), generator=gen)
    idx[:, 0] = torch.arange(n)                       # every row lists itself
    cases = [
        (lambda z, zc, s, p: ik.Affinity(z, zc, sigma=s), lambda z, zc, s, p: ik.Affinity(zc, z, sigma=s), False),
        (lambda z, zc, s, p: ik.Affinity(z, sigma=s), lambda z, zc, s, p: ik.Affinity(z, sigma=s), True),
        (lambda z, zc, s, p: ik.Affinity(z, sigma=s, symmetrize=True),
         lambda z, zc, s, p: ik.Affinity(z, sigma=s, symmetrize=True), True),
        (lambda z, zc, s, p: ik.Dense(p), lambda z, zc, s, p: ik.Dense(p.T), False),
        (lambda z, zc, s, p: ik.Neighbors(idx, p[:, :3]), None, True),
        (lambda z, zc, s, p: ik.Neighbors(idx, p[:, :3], symmetrize=True),
         lambda z, zc, s, p: ik.Neighbors(idx, p[:, :3], symmetrize=True), True),
    ]
    for make, make_reverse, exclude_self in cases:
        # (a symmetrised target's own gradient is the reference's alone: none asked for there)
        grad = not getattr(make(z0, zc0, 0.8, p0), "symmetrize", False)

        def run(bidirectional):
            z, zc = z0.clone().requires_grad_(grad), zc0.clone().requires_grad_(grad)
            s = torch.tensor(0.8, dtype=F64, requires_grad=grad)
            p = p0.clone().requires_grad_(grad)
            if bidirectional:
                loss = ik.icon_loss_bidirectional(x, y, target=make(z, zc, s, p), kernel="dot", temperature=0.5,
                                                  exclude_self=exclude_self, backend=backend)
            elif make_reverse is None:                # the reverse of Neighbors: scattered, transposed
                keep = idx >= 0
                rows = torch.arange(n)[:, None].expand(n, 3)
                w = torch.zeros(n, n, dtype=F64).index_put((rows[keep], idx[keep]), p[:, :3][keep], accumulate=True)
                kw = dict(kernel="dot", temperature=0.5, exclude_self=exclude_self, backend="reference")
                loss = (ik.icon_loss(x, y, target=ik.Dense(w), **kw) + ik.icon_loss(y, x, target=ik.Dense(w.T), **kw)) / 2
            else:
                kw = dict(kernel="dot", temperature=0.5, exclude_self=exclude_self, backend="reference")
                loss = (ik.icon_loss(x, y, target=make(z, zc, s, p), **kw)
                        + ik.icon_loss(y, x, target=make_reverse(z, zc, s, p), **kw)) / 2
            if not grad:
                return [loss.detach()]
            grads = torch.autograd.grad(loss, (z, zc, s, p), allow_unused=True)
            return [loss.detach()] + [g if g is not None else torch.zeros(()) for g in grads]
        _close(run(True), run(False), 1e-10)


def test_a_hub_in_the_reverse_neighbor_lists_raises():
    from icon_kernels import target_adapters
    n = 3000
    idx = torch.zeros(n, 1, dtype=torch.long)                    # every row lists point 0
    idx_more = torch.cat([idx, torch.arange(n)[:, None]], 1)
    with pytest.raises(ValueError, match="indices: the reverse direction"):
        target_adapters.transposed_neighbors(idx_more, None, n)
    small, _ = target_adapters.transposed_neighbors(idx[:50], None, 50)   # under the floor: padded
    assert small.shape == (50, 50) and int((small >= 0).sum()) == 50


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int16, torch.int32])
def test_label_dtypes_and_non_contiguous_inputs(dtype):
    x, y, rl, cl = _inputs(11, 7, d=6)
    xt, yt = x.T.contiguous().T, torch.cat([y, y], 1)[:, :6]          # non-contiguous features
    want = _grads(_two_calls(ik.Labels(rl, cl), ik.Labels(cl, rl), "dot"), x, y, 0.5)
    for backend in ["torch"] + (["cpu"] if HAS_CPU else []):
        got = _grads(_both(ik.Labels(rl.to(dtype), cl.to(dtype)[::1]), "dot", backend), xt, yt, 0.5)
        _close(got, want, 1e-12)


@pytest.mark.parametrize("backend", ["torch"] + (["cpu"] if HAS_CPU else [])
                         + (["triton"] if "triton" in ik.available_backends() else []))
def test_a_frozen_tower_gets_no_gradient_and_the_other_the_right_one(backend):
    """y without grad (a locked text tower, as in LiT), then x without grad: the other side's
    gradient and the temperature's are the two calls' (the op skips the frozen side's GEMM)."""
    device = device_of(backend)
    dtype = F32 if backend == "triton" else F64
    x, y, rl, cl = _inputs(13, 9, classes=3)
    tol = TRITON_F32 if backend == "triton" else 1e-12
    for frozen in ("x", "y"):
        xx = x.clone().to(device, dtype).requires_grad_(frozen != "x")
        yy = y.clone().to(device, dtype).requires_grad_(frozen != "y")
        t = torch.tensor(0.4, dtype=dtype, device=device, requires_grad=True)
        loss = ik.icon_loss_bidirectional(xx, yy, target=ik.Labels(rl.to(device), cl.to(device)), kernel="gaussian",
                                          sigma=t, backend=backend)
        live = yy if frozen == "x" else xx
        got = torch.autograd.grad(loss, (live, t))
        x64, y64 = x.clone().requires_grad_(), y.clone().requires_grad_()
        t64 = torch.tensor(0.4, dtype=F64, requires_grad=True)
        want = _two_calls(ik.Labels(rl, cl), ik.Labels(cl, rl), "gaussian")(x64, y64, t64)
        want = torch.autograd.grad(want, (y64 if frozen == "x" else x64, t64))
        _close([g.cpu() for g in got], want, tol)


@pytest.mark.parametrize("backend", ["torch"] + (["cpu"] if HAS_CPU else []))
def test_rows_accumulate_in_fp32_under_autocast(backend):
    """As tests/test_autocast.py for icon_loss: the one-pass versions run their GEMMs outside
    torch.autocast, so bf16 inputs give fp32-accurate row losses (before the cast to bf16)."""
    from icon_kernels.backends import bidirectional
    from icon_kernels.validation import LOSS_OPTIONS, check_arguments
    x, y, rl, cl = _inputs(40, 30, d=16)
    options = {**LOSS_OPTIONS, "kernel": "dot", "temperature": 0.3}

    def rows(a, b, version):
        problem = check_arguments(a, b, target=ik.Labels(rl, cl), exclude_self=False, reduction="none", weight=None,
                                  **options)
        if version == "reference":
            return (ik.icon_loss(a, b, target=ik.Labels(rl, cl), reduction="none", backend="reference", **options),
                    ik.icon_loss(b, a, target=ik.Labels(cl, rl), reduction="none", backend="reference", **options))
        rows_x, _, rows_y, _ = bidirectional._one_pass_rows(problem, version)
        return rows_x, rows_y

    xb, yb = x.to(torch.bfloat16), y.to(torch.bfloat16)
    want = rows(xb.double(), yb.double(), "reference")
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        got = rows(xb, yb, backend)
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        assert relative_error(g.double(), w) <= 1e-5
