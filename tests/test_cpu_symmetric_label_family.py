"""The cpu backend's symmetric schedule for the Labels targets on the family rows
(csrc/cpu_symmetric_label_family.h): debiased InfoNCE / SupCon (beta > 0), the f-divergences off
their closed forms and the Student-t and power kernels, in self mode (y = None). Each pair of row
blocks is one Gram tile; the forward sweeps the tile pairs twice (each row's LSE, then its
divergence sums and Gamma under it; once for KL without beta) and the backward forms
H = W_IJ + W_JI^T from one recomputed tile.

It must equal the plain schedule (ICON_KERNELS_SYMMETRIC=0) and the dense reference to 1e-12 in
float64 with ragged blocks forced (ICON_KERNELS_CPU_TILE_ELEMENTS), keep fp32 within twice naive
PyTorch's own error (huge logits included), pass gradcheck and opcheck, and run exactly where it
applies: _C.cpu_symmetric_counts() counts its calls ("label_family_forward", "..._backward")."""
import itertools

import pytest
import torch

import icon_kernels as ik
from cases import relative_error
from symmetric_cases import (F32, F64, PARAM, SWITCHES, TILES, fresh_schedule, grads_across_a_switch,  # noqa: F401
                             named_counts, opcheck_on_both_paths)

pytestmark = pytest.mark.skipif("cpu" not in ik.available_backends(), reason="the cpu backend is not built")

RAN = {"label_family_forward": 1, "label_family_backward": 1}
NOT_RAN = {"label_family_forward": 0, "label_family_backward": 0}


def _counts():
    return named_counts(*RAN)


def _run(x0, labels, kernel, backend, upstream, param=0.7, param_grad=True, y=None, **options):
    """(row losses, dL/dx[, dL/dparam]) of sum_i upstream_i L_i."""
    x = x0.detach().clone().requires_grad_()
    p = torch.tensor(param, dtype=x0.dtype, requires_grad=param_grad)
    loss = ik.icon_loss(x, None if y is None else y(x), target=ik.Labels(labels), kernel=kernel, backend=backend,
                        reduction="none", **{PARAM[kernel]: p}, **options)
    grads = torch.autograd.grad(loss, [x, p] if param_grad else [x], grad_outputs=upstream.to(loss.dtype))
    return [loss.detach(), *grads]


def _close(got, want, tol):
    for g, w in zip(got, want):
        assert relative_error(g, w) <= tol + 1e-15 * (w.abs().max().item() == 0), (relative_error(g, w), tol)


def _inputs(n, seed, d=5):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=F64)
    labels = torch.randint(0, max(1, n // 3), (n,), generator=gen)   # SupCon-like, some rows alone
    upstream = torch.rand(n, generator=gen, dtype=F64) + 0.5
    return x, labels, upstream


# (divergence, alpha, beta) on the family rows for every kernel; the two KL rows without beta (and
# the f-divergences with alpha = beta = 0) are there only for student_t and power (dot, cosine and
# Gaussian run cpu_symmetric_labels.h, or the closed-form rows)
MIXES = (("kl", 0.2, 0.2), ("cross_entropy", 0.0, 0.3), ("tv", 0.1, 0.0), ("js", 0.1, 0.2),
         ("reverse_kl", 0.1, 0.0), ("hellinger", 0.0, 0.1), ("chi2", 0.1, 0.1))
NO_BETA = (("kl", 0.0, 0.0), ("cross_entropy", 0.3, 0.0), ("tv", 0.0, 0.0), ("js", 0.0, 0.0))
CASES = [(k, n, excl, *mix) for k, n, excl, mix in itertools.product(
    ("dot", "gaussian", "cosine", "student_t", "power"), (2, 7, 37), (True, False), MIXES)
    if not (k == "power" and not excl)]   # the power self pair: test_power_kernel_self_pair
CASES += [(k, n, excl, *mix) for k, n, excl, mix in itertools.product(("student_t", "power"), (2, 7, 37), (True, False),
                                                                      NO_BETA) if excl or k != "power"]
# the closed-form rows (cpu_f_label_rows.h: dot, cosine, Gaussian with alpha = beta = 0): one sweep
CLOSED = (("tv", 0.0, 0.0), ("hellinger", 0.0, 0.0), ("js", 0.0, 0.0), ("chi2", 0.0, 0.0))
CASES += [(k, n, excl, *mix) for k, n, excl, mix in itertools.product(("dot", "gaussian", "cosine"), (2, 7, 37),
                                                                      (True, False), CLOSED)]


@pytest.mark.parametrize("kernel,n,exclude_self,divergence,alpha,beta", CASES)
def test_float64_equals_the_plain_schedule_and_the_reference(monkeypatch, kernel, n, exclude_self, divergence,
                                                               alpha, beta):
    x, labels, upstream = _inputs(n, n)
    options = dict(alpha=alpha, beta=beta, divergence=divergence, exclude_self=exclude_self)
    want = _run(x, labels, kernel, "reference", upstream, **options)
    monkeypatch.setenv("ICON_KERNELS_SYMMETRIC", "0")
    plain = _run(x, labels, kernel, "cpu", upstream, **options)
    assert _counts() == NOT_RAN
    monkeypatch.delenv("ICON_KERNELS_SYMMETRIC")
    for tile in TILES:
        monkeypatch.setenv("ICON_KERNELS_CPU_TILE_ELEMENTS", tile)
        got = _run(x, labels, kernel, "cpu", upstream, **options)
        assert _counts() == RAN, tile
        _close(got, want, 1e-12)
        _close(got, plain, 1e-12)


@pytest.mark.parametrize("divergence,alpha,beta", [("kl", 0.2, 0.2), ("tv", 0.0, 0.0), ("kl", 0.0, 0.0)])
@pytest.mark.parametrize("scale", [1e-6, 1.0])
def test_power_kernel_self_pair(monkeypatch, divergence, alpha, beta, scale):
    """With the self pair kept, its d^2 is exactly 0 here (pair_gram), so log(d^2 + eps) is the
    true value, and its W_ii (G n / eps ~ 1e12) adds nothing to dX: the oracle takes d^2 from
    explicit differences (the Gram's d^2 is rounding noise, which the plain path and the reference
    keep: 1e-3 of the gradient). At scale 1e-6, d^2 ~ eps and every pair's q counts."""
    n, exponent = 9, 2.0
    x, labels, upstream = _inputs(n, 11)
    x = scale * x

    def oracle(x):
        d2 = (x[:, None, :] - x[None, :, :]).square().sum(-1)
        s = -(exponent / 2) * torch.log(d2 + 1e-12)
        q = (1 - beta) * torch.softmax(s, dim=1) + beta / n
        same = (labels[:, None] == labels[None, :]).to(F64)
        p = (1 - alpha) * same / same.sum(1, keepdim=True) + alpha / n
        if divergence == "kl":
            return (torch.xlogy(p, p) - p * q.log()).sum(1)
        return 0.5 * (p - q).abs().sum(1)

    xw = x.clone().requires_grad_()
    want_rows = oracle(xw)
    want = [want_rows.detach(), torch.autograd.grad(want_rows, [xw], upstream)[0]]
    for tile in TILES:
        monkeypatch.setenv("ICON_KERNELS_CPU_TILE_ELEMENTS", tile)
        got = _run(x, labels, "power", "cpu", upstream, param=exponent, param_grad=False, exclude_self=False,
                   divergence=divergence, alpha=alpha, beta=beta)
        assert _counts() == RAN
        _close(got, want, 1e-11)


@pytest.mark.parametrize("kernel,param,scale,divergence,beta", [
    ("dot", 0.01, 1.0, "kl", 0.2), ("dot", 0.01, 30.0, "kl", 0.2), ("dot", 0.05, 30.0, "cross_entropy", 0.5),
    ("dot", 0.01, 30.0, "tv", 0.0), ("dot", 0.01, 30.0, "js", 0.2), ("student_t", 5.0, 30.0, "kl", 0.0),
    ("gaussian", 0.05, 1.0, "kl", 0.2)])
def test_float32_huge_logits_within_twice_pytorchs_own_error(monkeypatch, kernel, param, scale, divergence, beta):
    """Logits up to 1e6: the backward's q must sum to 1 with no row sweep to renormalise them,
    which needs the LSE's rounding (the record in stats row 3), and Gamma over exactly those q.
    Blocks of 20+ rows run the SIMD body."""
    gen = torch.Generator().manual_seed(5)
    n = 40
    x = (scale * torch.randn(n, 16, generator=gen, dtype=F64)).to(F32).double()
    labels = torch.arange(n) // 2
    upstream = torch.rand(n, generator=gen, dtype=F64) + 0.5
    options = dict(param=param, divergence=divergence, alpha=0.1, beta=beta)
    want = _run(x, labels, kernel, "reference", upstream, **options)
    naive = _run(x.float(), labels, kernel, "reference", upstream, **options)
    monkeypatch.setenv("ICON_KERNELS_SYMMETRIC", "0")
    plain = _run(x.float(), labels, kernel, "cpu", upstream, **options)
    monkeypatch.delenv("ICON_KERNELS_SYMMETRIC")
    for tile in TILES:
        monkeypatch.setenv("ICON_KERNELS_CPU_TILE_ELEMENTS", tile)
        got = _run(x.float(), labels, kernel, "cpu", upstream, **options)
        assert _counts() == RAN
        for mine, theirs, exact in zip(got, naive, want):
            # the parameter's gradient is one number: naive PyTorch's may land within 0.3 ulp by
            # chance (t-SimCLR's dof: 3.7e-8), so it may take 8 ulps of float32 (the plain
            # schedule's is 4.7e-7 there)
            floor = 8 * 2.0 ** -23 if exact.numel() == 1 else 0.0
            assert relative_error(mine, exact) <= max(2 * relative_error(theirs, exact) + 2.4e-7, floor)
        # and no worse than the plain schedule, which renormalises each row (naive PyTorch's own
        # error at logits of 1e6 is large enough to hide a lost LSE residual)
        for mine, ours, exact in zip(got, plain, want):
            floor = 8 * 2.0 ** -23 if exact.numel() == 1 else 0.0
            assert relative_error(mine, exact) <= max(2 * relative_error(ours, exact) + 2.4e-7, floor)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_within_twice_pytorchs_own_error(dtype):
    gen = torch.Generator().manual_seed(3)
    n = 64
    x = torch.nn.functional.normalize(torch.randn(n, 32, generator=gen, dtype=F64), dim=1).to(dtype)
    labels = torch.arange(n) // 2
    upstream = torch.rand(n, generator=gen, dtype=F64) + 0.5
    options = dict(param_grad=False, alpha=0.2, beta=0.2)
    exact = _run(x.double(), labels, "cosine", "reference", upstream, **options)
    naive = _run(x, labels, "cosine", "reference", upstream, **options)
    got = _run(x, labels, "cosine", "cpu", upstream, **options)
    assert _counts() == RAN
    assert got[1].dtype == dtype
    for mine, theirs, want in zip(got, naive, exact):
        assert relative_error(mine, want) <= 2 * relative_error(theirs, want) + 1e-4


@pytest.mark.parametrize("kernel,options", [
    ("dot", dict(alpha=0.1, beta=0.2)), ("gaussian", dict(divergence="tv", alpha=0.1)),
    ("student_t", dict()), ("power", dict(divergence="js", beta=0.1))])
def test_gradcheck_with_ragged_blocks(monkeypatch, kernel, options):
    monkeypatch.setenv("ICON_KERNELS_CPU_TILE_ELEMENTS", "12")   # blocks of 2 rows, N = 7
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(7, 3, generator=gen, dtype=F64, requires_grad=True)
    t = torch.tensor(1.3, dtype=F64, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2])

    def f(x, t):
        return ik.icon_loss(x, target=ik.Labels(labels), kernel=kernel, backend="cpu", reduction="none",
                            **{PARAM[kernel]: t}, **options)
    assert torch.autograd.gradcheck(f, (x, t))
    assert _counts()["label_family_backward"] > 0


def test_opcheck_of_the_symmetric_ops():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(9, 4, generator=gen, dtype=F64)
    labels = torch.arange(9) // 3
    args = (x, x, torch.tensor(0.5, dtype=F64), "dot", "labels", labels, labels, None, None, None, None, None,
            "dot", None, 0.1, 0.2, True, 0, "conditional", False)
    opcheck_on_both_paths(args, True, _counts, {"label_family_forward": 1, "label_family_backward": 0},
                          {"label_family_forward": 0, "label_family_backward": 1})


def test_runs_only_where_it_applies(monkeypatch):
    """Self mode with one scalar parameter, a Labels target on the family rows (beta > 0, an
    f-divergence off its closed form, a kernel the hot path lacks) or the closed-form rows (up to
    2^22 positive pairs); not on the hot path (its own schedule), for a separate y, a per-row
    parameter, other targets, log_dot, joint normalisation with the rows' labels (the joint family
    schedule's), or when off. Any column labels."""
    gen = torch.Generator().manual_seed(4)
    n = 12
    x = torch.randn(n, 4, generator=gen, dtype=F64, requires_grad=True)
    labels = torch.arange(n) // 2

    def ran(**kw):
        y = kw.pop("y", None)
        target = kw.pop("target", ik.Labels(labels))
        ik.icon_loss(x, y, target=target, backend="cpu", **kw).backward()
        return _counts()

    assert ran(kernel="dot", beta=0.2) == RAN
    assert ran(kernel="gaussian", divergence="tv", alpha=0.1) == RAN
    assert ran(kernel="gaussian", divergence="tv") == RAN                      # the closed-form rows
    assert ran(kernel="student_t") == RAN
    assert ran(kernel="power", divergence="hellinger") == RAN
    assert ran(kernel="cosine", y=x, exclude_self=True, beta=0.2) == RAN       # one normalised x
    assert ran(kernel="dot", beta=0.2, target=ik.Labels(labels, labels.to(torch.int32))) == RAN
    assert ran(kernel="dot") == NOT_RAN                                         # the hot path's own
    # other column labels (test_cpu_symmetric_column_labels)
    assert ran(kernel="dot", beta=0.2, target=ik.Labels(labels, labels.flip(0))) == RAN
    assert ran(kernel="dot", beta=0.2, y=x.detach().clone(), exclude_self=True) == NOT_RAN
    assert ran(kernel="dot", beta=0.2, temperature=torch.linspace(0.3, 0.6, n, dtype=F64)) == NOT_RAN
    assert ran(kernel="student_t", target=ik.Neighbors(torch.randint(0, n, (n, 3), generator=gen))) == NOT_RAN
    phi = torch.softmax(torch.randn(n, 3, generator=gen, dtype=F64), dim=1).requires_grad_()
    ik.icon_loss(phi, target=ik.Labels(labels), kernel="log_dot", beta=0.2, backend="cpu").backward()
    assert _counts() == NOT_RAN
    assert ran(kernel="student_t", normalization="joint") == NOT_RAN
    # the closed-form rows keep every positive's logit: more than 2^22 of them run the plain rows
    big = torch.randn(2100, 2, generator=gen, dtype=F64, requires_grad=True)
    ik.icon_loss(big, target=ik.Labels(torch.zeros(2100, dtype=torch.long)), kernel="dot", divergence="js",
                 backend="cpu").backward()
    assert _counts() == NOT_RAN
    monkeypatch.setenv("ICON_KERNELS_SYMMETRIC", "0")
    assert ran(kernel="dot", beta=0.2) == NOT_RAN


@pytest.mark.parametrize("options", [dict(divergence="js", beta=0.2), dict(alpha=0.1)])
def test_y_equal_to_x_but_detached_gets_the_plain_backward(options):
    """y = x.detach() shares x's storage: the forward runs this schedule (the values are the same),
    but dL/dx is the row side alone, so the plain backward runs after it, reading its stats (after
    two sweeps, and after the one sweep of KL without beta)."""
    x0, labels, upstream = _inputs(10, 6, d=4)
    grads = []
    for backend in ("cpu", "reference"):
        x = x0.clone().requires_grad_()
        loss = ik.icon_loss(x, x.detach(), target=ik.Labels(labels), kernel="student_t", exclude_self=True,
                            backend=backend, reduction="none", **options)
        (loss * upstream).sum().backward()
        grads.append(x.grad)
    assert _counts() == {"label_family_forward": 1, "label_family_backward": 0}
    assert relative_error(grads[0], grads[1]) <= 1e-12


def test_rows_left_out_and_zero_upstream_gradients(monkeypatch):
    """Rows without positives (left out) and rows with g = 0 add nothing, on both sides of a tile."""
    monkeypatch.setenv("ICON_KERNELS_CPU_TILE_ELEMENTS", "18")   # blocks of 3 rows
    gen = torch.Generator().manual_seed(7)
    n = 11
    x = torch.randn(n, 4, generator=gen, dtype=F64)
    labels = torch.tensor([0, 0, 1, 2, 2, 3, 4, 4, 4, 5, 6])    # rows 2, 5, 9, 10 have no positive
    upstream = torch.rand(n, generator=gen, dtype=F64)
    upstream[[0, 7]] = 0
    for kernel, options in (("gaussian", dict(alpha=0.2, beta=0.2)), ("student_t", dict(divergence="tv")),
                            ("student_t", dict(alpha=0.1))):
        want = _run(x, labels, kernel, "reference", upstream, **options)
        got = _run(x, labels, kernel, "cpu", upstream, **options)
        assert _counts() == RAN
        _close(got, want, 1e-12)


@pytest.mark.parametrize("forward_env,backward_env,symmetric_backward", SWITCHES)
def test_the_backward_follows_its_forwards_schedule(monkeypatch, forward_env, backward_env, symmetric_backward):
    """The switches are read at every call, but a backward takes its forward's schedule and blocks
    (recorded in the stats): this backward needs the forward's Gamma (stats rows 1, 2), which the
    plain forward does not save, and the LSE residual of the record."""
    gen = torch.Generator().manual_seed(8)
    n = 160
    x0 = (30 * torch.randn(n, 16, generator=gen, dtype=F64)).to(F32)
    labels = torch.arange(n) // 2
    upstream = torch.rand(n, generator=gen, dtype=F64) + 0.5

    def loss_of(x, backend):
        return ik.icon_loss(x, target=ik.Labels(labels), kernel="dot", temperature=0.01, alpha=0.1, beta=0.2,
                            backend=backend, reduction="none")

    got, exact, naive = grads_across_a_switch(monkeypatch, x0, loss_of, upstream, forward_env, backward_env)
    assert _counts()["label_family_backward"] == int(symmetric_backward)
    assert relative_error(got, exact) <= 2 * relative_error(naive, exact) + 2.4e-7


def test_non_finite_inputs_as_the_plain_schedule(monkeypatch):
    """A NaN feature makes its row's and its pairs' losses NaN, as the plain schedule's."""
    x, labels, upstream = _inputs(9, 9, d=4)
    x[3, 1] = float("nan")
    options = dict(beta=0.2, divergence="kl")
    monkeypatch.setenv("ICON_KERNELS_SYMMETRIC", "0")
    plain = _run(x, labels, "gaussian", "cpu", upstream, **options)
    monkeypatch.delenv("ICON_KERNELS_SYMMETRIC")
    monkeypatch.setenv("ICON_KERNELS_CPU_TILE_ELEMENTS", "18")
    got = _run(x, labels, "gaussian", "cpu", upstream, **options)
    assert _counts() == RAN
    for g, p in zip(got, plain):
        assert torch.equal(g.isnan(), p.isnan())
        assert torch.allclose(g, p, rtol=1e-12, atol=0, equal_nan=True)


# (chi2 only where no positive's q underflows: its p^2 / q is inf there, in every implementation)
@pytest.mark.parametrize("divergence,kernel,param,scale", [
    (div, *case) for div in ("tv", "hellinger", "js")
    for case in (("dot", 0.01, 30.0), ("dot", 0.1, 1.0), ("gaussian", 0.5, 1.0))] + [("chi2", "dot", 0.5, 1.0)])
def test_float32_closed_form_rows_within_twice_pytorchs_own_error(monkeypatch, divergence, kernel, param, scale):
    """The closed-form rows' one sweep (alpha = beta = 0, dot or Gaussian): the LSE with its
    residual and D = sum_pos d in two parts from the positives in double, the positives' G in
    double, as the plain closed-form rows form them; logits up to 1e6. (Not here: a Gaussian of
    sigma 0.05 on unit-scale x, logits near -3000 with q on one column per row, where the exact
    dL/dx is 3e-32 and this schedule's is 5e-14 against the plain schedule's exact 0: its D comes
    from the forward, not from the backward's own row.)"""
    gen = torch.Generator().manual_seed(6)
    n = 40
    x = (scale * torch.randn(n, 16, generator=gen, dtype=F64)).to(F32).double()
    labels = torch.arange(n) // 4
    upstream = torch.rand(n, generator=gen, dtype=F64) + 0.5
    options = dict(param=param, divergence=divergence)
    want = _run(x, labels, kernel, "reference", upstream, **options)
    naive = _run(x.float(), labels, kernel, "reference", upstream, **options)
    for tile in TILES:
        monkeypatch.setenv("ICON_KERNELS_CPU_TILE_ELEMENTS", tile)
        monkeypatch.setenv("ICON_KERNELS_SYMMETRIC", "0")
        plain = _run(x.float(), labels, kernel, "cpu", upstream, **options)
        monkeypatch.delenv("ICON_KERNELS_SYMMETRIC")
        got = _run(x.float(), labels, kernel, "cpu", upstream, **options)
        assert _counts() == RAN
        for mine, theirs, ours, exact in zip(got, naive, plain, want):
            floor = 8 * 2.0 ** -23 if exact.numel() == 1 else 0.0
            # (blocks of 2 or 10 rows make the Gaussian's Gram from tiny GEMMs, whose rounding takes
            # both schedules past twice naive PyTorch's error at sigma 0.5: 4e-6 against 1.3e-6)
            if tile == "":
                assert relative_error(mine, exact) <= max(2 * relative_error(theirs, exact) + 2.4e-7, floor)
            # and within 3x the plain schedule's, whose backward takes D and renormalises q over its
            # own row (here D is the forward's: tv at tau 0.1 measured 2.6x, 4.2e-6 against 1.6e-6,
            # where naive PyTorch's error is 2.5e-2)
            assert relative_error(mine, exact) <= max(3 * relative_error(ours, exact) + 2.4e-7, floor)


@pytest.mark.parametrize("bad", ["nan", "inf", "far"])
def test_closed_form_rows_with_non_finite_logits_take_the_two_sweeps(monkeypatch, bad):
    """A NaN or infinite logit leaves the one sweep's closed forms (as the plain closed-form rows
    leave theirs for the family rows): the two sweeps run instead, with no record, so that the plain
    backward runs after them (its closed-form rows leave such a row to the family rows); the losses
    and gradients are the plain schedule's, NaN where it has NaN."""
    x, labels, upstream = _inputs(9, 9, d=4)
    # far: a Gaussian with one sample at 1e200, whose row has no finite logit (the others have
    # -inf at its column only): the other rows' values must still be the plain schedule's
    x[3, 1] = 1e200 if bad == "far" else float(bad)
    kernel = "gaussian" if bad == "far" else "dot"
    options = dict(divergence="js", param_grad=False)
    monkeypatch.setenv("ICON_KERNELS_SYMMETRIC", "0")
    plain = _run(x, labels, kernel, "cpu", upstream, **options)
    monkeypatch.delenv("ICON_KERNELS_SYMMETRIC")
    monkeypatch.setenv("ICON_KERNELS_CPU_TILE_ELEMENTS", "18")
    got = _run(x, labels, kernel, "cpu", upstream, **options)
    assert _counts() == {"label_family_forward": 1, "label_family_backward": 0}
    for g, p in zip(got, plain):
        assert torch.equal(g.isnan(), p.isnan()) and torch.equal(g.isinf(), p.isinf())
        finite = p.isfinite()
        assert torch.allclose(g[finite], p[finite], rtol=1e-12, atol=0)
    assert got[0].isfinite().any() or bad == "nan"   # the other rows' losses were compared
