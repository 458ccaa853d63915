"""The cpu backend's symmetric schedule (DESIGN.md §1.3, csrc/cpu_symmetric_labels.h): in self mode
(y = None) on the label hot path, each pair of row blocks is one Gram tile; the forward merges both
sides' row statistics online and the backward forms H = W_IJ + W_JI^T for dX with one GEMM.

It must equal the plain schedule (ICON_KERNELS_SYMMETRIC=0) and the dense reference to 1e-12 in
float64 with ragged blocks forced (ICON_KERNELS_CPU_TILE_ELEMENTS), keep fp32 within twice naive
PyTorch's own error (huge logits included), pass gradcheck and opcheck, and run exactly where it
applies: _C.cpu_symmetric_counts() counts the calls that ran it."""
import itertools

import pytest
import torch

import icon_kernels as ik
from cases import relative_error
from symmetric_cases import (F32, F64, SWITCHES, TILES, fresh_schedule, grads_across_a_switch,  # noqa: F401
                             counts, named_counts, opcheck_on_both_paths)

pytestmark = pytest.mark.skipif("cpu" not in ik.available_backends(), reason="the cpu backend is not built")


def _counts():
    return named_counts("forward", "backward")    # (the bidirectional ops' are theirs)


def _run(x0, labels, kernel, backend, upstream, y=None, param=0.5, param_grad=True, **options):
    """(row losses, dL/dx, dL/dparam) of sum_i upstream_i L_i."""
    x = x0.detach().clone().requires_grad_()
    p = torch.tensor(param, dtype=x0.dtype, requires_grad=param_grad)
    name = "sigma" if kernel == "gaussian" else "temperature"
    yy = None if y is None else y(x)
    loss = ik.icon_loss(x, yy, target=ik.Labels(labels), kernel=kernel, backend=backend, reduction="none",
                        **{name: p}, **options)
    grads = torch.autograd.grad(loss, [x, p] if param_grad else [x], grad_outputs=upstream.to(loss.dtype))
    return [loss.detach(), *grads]


def _close(got, want, tol):
    for g, w in zip(got, want):
        assert relative_error(g, w) <= tol + 1e-15 * (w.abs().max().item() == 0), (relative_error(g, w), tol)


CASES = list(itertools.product(("dot", "gaussian", "cosine"), (2, 7, 37), (True, False), (0.0, 0.3),
                               ("kl", "cross_entropy")))


@pytest.mark.parametrize("kernel,n,exclude_self,alpha,divergence", CASES)
def test_float64_equals_the_plain_schedule_and_the_reference(monkeypatch, kernel, n, exclude_self, alpha,
                                                               divergence):
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n, 5, generator=gen, dtype=F64)
    labels = torch.randint(0, max(1, n // 3), (n,), generator=gen)   # SupCon-like, some rows alone
    upstream = torch.rand(n, generator=gen, dtype=F64) + 0.5
    options = dict(alpha=alpha, divergence=divergence, exclude_self=exclude_self)
    want = _run(x, labels, kernel, "reference", upstream, **options)
    monkeypatch.setenv("ICON_KERNELS_SYMMETRIC", "0")
    plain = _run(x, labels, kernel, "cpu", upstream, **options)
    assert _counts() == {"forward": 0, "backward": 0}
    monkeypatch.delenv("ICON_KERNELS_SYMMETRIC")
    for tile in TILES:
        monkeypatch.setenv("ICON_KERNELS_CPU_TILE_ELEMENTS", tile)
        got = _run(x, labels, kernel, "cpu", upstream, **options)
        assert _counts() == {"forward": 1, "backward": 1}, tile
        _close(got, want, 1e-12)
        _close(got, plain, 1e-12)


@pytest.mark.parametrize("temperature,scale", [(0.01, 1.0), (0.01, 30.0), (0.05, 30.0)])
def test_float32_huge_logits_within_twice_pytorchs_own_error(monkeypatch, temperature, scale):
    """Logits up to 1e6: the backward's q must sum to 1 with no full-row renormalisation, which
    needs the forward's very logits (fast_label_backward's LOGITS) and the LSE's rounding (stats
    row 2). Blocks of 20+ rows run the SIMD body, where an unrounded s (fma) cost 7e-3 once."""
    gen = torch.Generator().manual_seed(5)
    n = 40
    x = (scale * torch.randn(n, 16, generator=gen, dtype=F64)).to(F32).double()
    labels = torch.arange(n) // 2
    upstream = torch.rand(n, generator=gen, dtype=F64) + 0.5
    want = _run(x, labels, "dot", "reference", upstream, param=temperature)
    naive = _run(x.float(), labels, "dot", "reference", upstream, param=temperature)
    for tile in TILES:
        monkeypatch.setenv("ICON_KERNELS_CPU_TILE_ELEMENTS", tile)
        got = _run(x.float(), labels, "dot", "cpu", upstream, param=temperature)
        assert _counts() == {"forward": 1, "backward": 1}
        for mine, theirs, exact in zip(got, naive, want):
            assert relative_error(mine, exact) <= 2 * relative_error(theirs, exact) + 2.4e-7


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_within_twice_pytorchs_own_error(dtype):
    gen = torch.Generator().manual_seed(3)
    n = 64
    x = torch.nn.functional.normalize(torch.randn(n, 32, generator=gen, dtype=F64), dim=1).to(dtype)
    labels = torch.arange(n) // 2
    upstream = torch.rand(n, generator=gen, dtype=F64) + 0.5
    exact = _run(x.double(), labels, "cosine", "reference", upstream, param_grad=False)
    naive = _run(x, labels, "cosine", "reference", upstream, param_grad=False)
    got = _run(x, labels, "cosine", "cpu", upstream, param_grad=False)
    assert _counts() == {"forward": 1, "backward": 1}
    assert got[1].dtype == dtype
    for mine, theirs, want in zip(got, naive, exact):
        assert relative_error(mine, want) <= 2 * relative_error(theirs, want) + 1e-4


def test_gradcheck_with_ragged_blocks(monkeypatch):
    monkeypatch.setenv("ICON_KERNELS_CPU_TILE_ELEMENTS", "12")   # blocks of 2 rows, N = 7
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(7, 3, generator=gen, dtype=F64, requires_grad=True)
    t = torch.tensor(0.7, dtype=F64, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    for kernel, name in (("dot", "temperature"), ("gaussian", "sigma")):
        def f(x, t):
            return ik.icon_loss(x, target=ik.Labels(labels), kernel=kernel, backend="cpu", alpha=0.1,
                                reduction="none", **{name: t})
        assert torch.autograd.gradcheck(f, (x, t))
    assert _counts()["backward"] > 0


def test_opcheck_of_the_symmetric_ops():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(9, 4, generator=gen, dtype=F64)
    labels = torch.arange(9) // 3
    args = (x, x, torch.tensor(0.5, dtype=F64), "dot", "labels", labels, labels, None, None, None, None, None,
            "dot", None, 0.1, 0.0, True, 0, "conditional", False)
    opcheck_on_both_paths(args, True, lambda: counts("forward", "backward"), (1, 0), (0, 1))


def test_runs_only_where_it_applies(monkeypatch):
    """Self mode on the label hot path with one scalar parameter; not for a separate y (even one
    equal to x), a per-row temperature, other targets, beta > 0, or when switched off."""
    gen = torch.Generator().manual_seed(4)
    n = 12
    x = torch.randn(n, 4, generator=gen, dtype=F64, requires_grad=True)
    labels = torch.arange(n) // 2

    def ran(**kw):
        y = kw.pop("y", None)
        target = kw.pop("target", ik.Labels(labels))
        ik.icon_loss(x, y, target=target, backend="cpu", **kw).backward()
        return _counts()

    assert ran(kernel="dot") == {"forward": 1, "backward": 1}
    assert ran(kernel="gaussian") == {"forward": 1, "backward": 1}
    assert ran(kernel="dot", y=x, exclude_self=True) == {"forward": 1, "backward": 1}      # y is x itself
    assert ran(kernel="cosine", y=x, exclude_self=True) == {"forward": 1, "backward": 1}   # one normalised x
    assert ran(kernel="dot", target=ik.Labels(labels, labels.to(torch.int32))) == {"forward": 1, "backward": 1}
    # other column labels: each row reads its own label
    assert ran(kernel="dot", target=ik.Labels(labels, labels.flip(0))) == {"forward": 1, "backward": 1}
    assert ran(kernel="dot", y=x.detach().clone(), exclude_self=True) == {"forward": 0, "backward": 0}
    assert ran(kernel="dot", temperature=torch.linspace(0.3, 0.6, n, dtype=F64)) == {"forward": 0, "backward": 0}
    assert ran(kernel="dot", beta=0.2) == {"forward": 0, "backward": 0}
    assert ran(kernel="student_t") == {"forward": 0, "backward": 0}
    assert ran(kernel="dot", divergence="tv") == {"forward": 0, "backward": 0}
    assert ran(kernel="dot", target=ik.Neighbors(torch.randint(0, n, (n, 3), generator=gen))) == \
        {"forward": 0, "backward": 0}
    monkeypatch.setenv("ICON_KERNELS_SYMMETRIC", "0")
    assert ran(kernel="dot") == {"forward": 0, "backward": 0}


def test_y_equal_to_x_but_detached_gets_only_the_row_gradient():
    """y = x.detach() shares x's storage: the forward may run the symmetric schedule (the values
    are the same), but dL/dx is the row side alone, so the backward must not fold dy into dx."""
    gen = torch.Generator().manual_seed(6)
    n = 10
    x0 = torch.randn(n, 4, generator=gen, dtype=F64)
    labels = torch.arange(n) // 2
    grads = []
    for backend in ("cpu", "reference"):
        x = x0.clone().requires_grad_()
        ik.icon_loss(x, x.detach(), target=ik.Labels(labels), kernel="dot", exclude_self=True,
                     backend=backend).backward()
        grads.append(x.grad)
    assert _counts() == {"forward": 1, "backward": 0}
    assert relative_error(grads[0], grads[1]) <= 1e-12


def test_a_bad_switch_value_names_the_variable(monkeypatch):
    monkeypatch.setenv("ICON_KERNELS_SYMMETRIC", "yes")
    x = torch.randn(6, 3, dtype=F64)
    with pytest.raises(RuntimeError, match="ICON_KERNELS_SYMMETRIC must be 0 or 1"):
        ik.icon_loss(x, target=ik.Labels(torch.arange(6) // 2), kernel="dot", backend="cpu")


def test_rows_left_out_and_zero_upstream_gradients(monkeypatch):
    """Rows without positives (left out) and rows with g = 0 add nothing, on both sides of a tile."""
    monkeypatch.setenv("ICON_KERNELS_CPU_TILE_ELEMENTS", "18")   # blocks of 3 rows
    gen = torch.Generator().manual_seed(7)
    n = 11
    x = torch.randn(n, 4, generator=gen, dtype=F64)
    labels = torch.tensor([0, 0, 1, 2, 2, 3, 4, 4, 4, 5, 6])    # rows 2, 5, 9, 10 have no positive
    upstream = torch.rand(n, generator=gen, dtype=F64)
    upstream[[0, 7]] = 0
    want = _run(x, labels, "gaussian", "reference", upstream)
    got = _run(x, labels, "gaussian", "cpu", upstream)
    assert _counts() == {"forward": 1, "backward": 1}
    _close(got, want, 1e-12)


@pytest.mark.parametrize("forward_env,backward_env,symmetric_backward", SWITCHES)
def test_the_backward_follows_its_forwards_schedule(monkeypatch, forward_env, backward_env, symmetric_backward):
    """The switches are read at every call, but a backward must take its forward's schedule and
    blocks (recorded in the stats): a symmetric backward after a plain forward, or with other
    blocks, had q that no longer sum to 1 (4e-3 and 9e-2 relative error at logits of 1e6)."""
    gen = torch.Generator().manual_seed(8)
    n = 160
    x0 = (30 * torch.randn(n, 16, generator=gen, dtype=F64)).to(F32)
    labels = torch.arange(n) // 2
    upstream = torch.rand(n, generator=gen, dtype=F64) + 0.5

    def loss_of(x, backend):
        return ik.icon_loss(x, target=ik.Labels(labels), kernel="dot", temperature=0.01, backend=backend,
                            reduction="none")

    got, exact, naive = grads_across_a_switch(monkeypatch, x0, loss_of, upstream, forward_env, backward_env)
    assert _counts()["backward"] == int(symmetric_backward)
    assert relative_error(got, exact) <= 2 * relative_error(naive, exact) + 2.4e-7
