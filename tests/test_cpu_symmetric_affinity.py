"""The cpu backend's symmetric schedule for an Affinity target (DESIGN.md §1.3,
csrc/cpu_symmetric_affinity.h): SNE and t-SNE in self mode (y = None, z_cols = None), where each
pair of row blocks is one Gram tile of x and one of z, the forward merges both sides' learned and
target statistics online and the backward forms H = W + W^T with one GEMM pass.

It must equal the plain schedule (ICON_KERNELS_SYMMETRIC=0) and the dense reference to 1e-12 in
float64 with ragged blocks forced (ICON_KERNELS_CPU_TILE_ELEMENTS), keep fp32 within twice naive
PyTorch's own error (huge target and learned logits included), pass gradcheck and opcheck, and run
exactly where it applies: _C.cpu_symmetric_counts() counts its calls ("affinity_forward",
"affinity_backward")."""
import itertools

import pytest
import torch

import icon_kernels as ik
from cases import relative_error
from symmetric_cases import (F32, F64, LEARNED, SWITCHES, TILES, affinity_target, counts,  # noqa: F401
                             fresh_schedule, grads_across_a_switch, opcheck_on_both_paths)
from icon_kernels.backends.ops import forward_op

pytestmark = pytest.mark.skipif("cpu" not in ik.available_backends(), reason="the cpu backend is not built")


def _counts():
    return counts("affinity_forward", "affinity_backward")


def _target(z, t_kernel="gaussian", t_param=2.0):
    return affinity_target(z, t_kernel, t_param)


def _run(x0, z, kernel, params, backend, upstream, target=None, **options):
    """(row losses, dL/dx) of sum_i upstream_i L_i."""
    x = x0.detach().clone().requires_grad_()
    loss = ik.icon_loss(x, target=target or _target(z), kernel=kernel, backend=backend, reduction="none",
                        **params, **options)
    grad, = torch.autograd.grad(loss, [x], grad_outputs=upstream.to(loss.dtype))
    return [loss.detach(), grad]


def _close(got, want, tol):
    for g, w in zip(got, want):
        assert relative_error(g, w) <= tol, (relative_error(g, w), tol)


def _inputs(n, seed, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=gen, dtype=dtype)
    z = torch.randn(n, 4, generator=gen, dtype=dtype)
    upstream = torch.rand(n, generator=gen, dtype=F64) + 0.5
    return x, z, upstream


# (power with its self pair included is test_the_power_kernels_self_pair's: the reference's d_ii^2
# from the Gram is rounding noise there, which W_ii = G n / (d^2 + eps) ~ 1e12 makes 1e-3 of dL/dx)
CASES = [case for case in itertools.product(range(len(LEARNED)), (2, 7, 37), (True, False), ("kl", "cross_entropy"))
         if LEARNED[case[0]][0] != "power" or case[2]]


@pytest.mark.parametrize("learned,n,exclude_self,divergence", CASES)
def test_float64_equals_the_plain_schedule_and_the_reference(monkeypatch, learned, n, exclude_self, divergence):
    kernel, params = LEARNED[learned]
    x, z, upstream = _inputs(n, n + learned)
    options = dict(divergence=divergence, exclude_self=exclude_self)
    want = _run(x, z, kernel, params, "reference", upstream, **options)
    monkeypatch.setenv("ICON_KERNELS_SYMMETRIC", "0")
    plain = _run(x, z, kernel, params, "cpu", upstream, **options)
    assert _counts() == (0, 0)
    monkeypatch.delenv("ICON_KERNELS_SYMMETRIC")
    for tile in TILES:
        monkeypatch.setenv("ICON_KERNELS_CPU_TILE_ELEMENTS", tile)
        got = _run(x, z, kernel, params, "cpu", upstream, **options)
        assert _counts() == (1, 1), tile
        _close(got, want, 1e-12)
        _close(got, plain, 1e-12)


@pytest.mark.parametrize("divergence", ["kl", "cross_entropy"])
def test_the_power_kernels_self_pair(monkeypatch, divergence):
    """exclude_self=False with the power kernel: s_ii = -(n/2) log(eps) dominates each row, and its
    dL/dx_i is exactly 0 (x_i - x_i): the oracle takes d^2 from explicit differences (0 at the self
    pair, where the Gram's d^2 is rounding noise times W_ii ~ 1e12)."""
    n, exponent, sigma = 9, 2.0, 2.0
    x, z, upstream = _inputs(n, 21)

    def oracle(x):
        d2 = (x[:, None, :] - x[None, :, :]).square().sum(-1)
        log_q = torch.log_softmax(-(exponent / 2) * torch.log(d2 + 1e-12), dim=1)
        log_p = torch.log_softmax(-torch.cdist(z, z).square() / (2 * sigma ** 2), dim=1)
        rows = (log_p.exp() * ((log_p if divergence == "kl" else 0) - log_q)).sum(1)
        return rows

    xw = x.clone().requires_grad_()
    want_rows = oracle(xw)
    want = [want_rows.detach(), torch.autograd.grad(want_rows, [xw], upstream)[0]]
    for tile in TILES:
        monkeypatch.setenv("ICON_KERNELS_CPU_TILE_ELEMENTS", tile)
        got = _run(x, z, "power", {"exponent": exponent}, "cpu", upstream, target=_target(z, "gaussian", sigma),
                   divergence=divergence, exclude_self=False)
        assert _counts() == (1, 1)
        _close(got, want, 1e-12)


@pytest.mark.parametrize("t_kernel,per_row", [("gaussian", True), ("gaussian", False), ("cosine", False),
                                               ("dot", True), ("student_t", True), ("student_t", False),
                                               ("power", True), ("log_dot", False)])
def test_target_kernels_and_a_parameter_per_row(monkeypatch, t_kernel, per_row):
    """sigma_i per row (perplexity calibration, ik.helpers.calibrate_sigma) scales each side's
    target logits by its own row: t_ij != t_ji while the Gram tile is shared. The Student-t, power
    and log_dot target kernels are not linear in the Gram term: each side takes its row's logits
    from it (target_row_logits, pair_target_logits)."""
    n = 23
    x, z, upstream = _inputs(n, 11)
    if t_kernel == "log_dot":
        z = z.abs() + 0.1   # log(z_i . z_j) needs z_i . z_j > 0
    t_param = torch.linspace(0.6, 2.5, n, dtype=F64) if per_row else torch.tensor(1.4, dtype=F64)
    target = _target(z, t_kernel, t_param)
    want = _run(x, z, "student_t", {"dof": 1.0}, "reference", upstream, target=target)
    monkeypatch.setenv("ICON_KERNELS_CPU_TILE_ELEMENTS", "50")   # blocks of 5 rows
    got = _run(x, z, "student_t", {"dof": 1.0}, "cpu", upstream, target=target)
    assert _counts() == (1, 1)
    _close(got, want, 1e-12)


def _schedule_counts(divergence):
    """(forward, backward) calls of the schedule that takes divergence at alpha = beta = 0: this
    file's for KL and cross-entropy, the Affinity family schedule's for the f-divergences."""
    if divergence in ("kl", "cross_entropy"):
        return _counts()
    return counts("affinity_family_forward", "affinity_family_backward")


@pytest.mark.parametrize("t_kernel", ["student_t", "power"])
@pytest.mark.parametrize("divergence", ["kl", "js"])
def test_nonlinear_targets_in_float32_and_at_two_rows(monkeypatch, t_kernel, divergence):
    """A nonlinear target kernel with a parameter per row in float32 (p must sum to 1 in the
    backward from LSE^p's recorded residual, with no row sweep) within twice PyTorch's own error,
    and at N = 2 (one pair) in float64."""
    n = 40
    x, z, upstream = _inputs(n, 17)
    x, z = x.to(F32).double(), z.to(F32).double()
    t_param = torch.linspace(0.7, 2.0, n, dtype=F64)
    want = _run(x, z, "student_t", {"dof": 1.0}, "reference", upstream, target=_target(z, t_kernel, t_param),
                divergence=divergence)
    target32 = _target(z.float(), t_kernel, t_param.float())
    naive = _run(x.float(), z, "student_t", {"dof": 1.0}, "reference", upstream, target=target32,
                 divergence=divergence)
    for tile in TILES:
        monkeypatch.setenv("ICON_KERNELS_CPU_TILE_ELEMENTS", tile)
        got = _run(x.float(), z, "student_t", {"dof": 1.0}, "cpu", upstream, target=target32, divergence=divergence)
        assert _schedule_counts(divergence) == (1, 1), tile
        for mine, theirs, exact in zip(got, naive, want):
            assert relative_error(mine, exact) <= 2 * relative_error(theirs, exact) + 2.4e-7
    monkeypatch.delenv("ICON_KERNELS_CPU_TILE_ELEMENTS")
    x2, z2, up2 = _inputs(2, 19)
    target2 = _target(z2, t_kernel, torch.tensor([0.8, 1.7], dtype=F64))
    want2 = _run(x2, z2, "student_t", {"dof": 1.0}, "reference", up2, target=target2, divergence=divergence)
    got2 = _run(x2, z2, "student_t", {"dof": 1.0}, "cpu", up2, target=target2, divergence=divergence)
    assert _schedule_counts(divergence) == (1, 1)
    for mine, exact in zip(got2, want2):   # (one pair: the losses and gradients are 0 up to rounding)
        assert relative_error(mine, exact) <= 1e-12 or (mine - exact).abs().max() <= 1e-15


@pytest.mark.parametrize("divergence", ["kl", "cross_entropy", "js"])
def test_a_power_targets_self_pair(monkeypatch, divergence):
    """exclude_self=False with the power target kernel: t_ii = -(n/2) log(eps) dominates each row's
    p. The symmetric schedules make d_ii^2 exactly 0 (pair_gram), where the plain rows' and the
    reference's Gram-made d^2 is rounding noise that log(d^2 + eps) magnifies: the oracle takes d^2
    from explicit differences."""
    n, exponent = 9, 1.5
    x, z, upstream = _inputs(n, 23)

    def oracle(x):
        dx2 = (x[:, None, :] - x[None, :, :]).square().sum(-1)
        dz2 = (z[:, None, :] - z[None, :, :]).square().sum(-1)
        log_q = torch.log_softmax(-torch.log1p(dx2), dim=1)                      # student_t, dof 1
        log_p = torch.log_softmax(-(exponent / 2) * torch.log(dz2 + 1e-12), dim=1)
        p, q = log_p.exp(), log_q.exp()
        if divergence == "kl":
            return (p * (log_p - log_q)).sum(1)
        if divergence == "cross_entropy":
            return -(p * log_q).sum(1)
        log_m = torch.log((p + q) / 2)
        return 0.5 * (p * (log_p - log_m) + q * (log_q - log_m)).sum(1)          # js

    xw = x.clone().requires_grad_()
    want_rows = oracle(xw)
    want = [want_rows.detach(), torch.autograd.grad(want_rows, [xw], upstream)[0]]
    for tile in TILES:
        monkeypatch.setenv("ICON_KERNELS_CPU_TILE_ELEMENTS", tile)
        got = _run(x, z, "student_t", {"dof": 1.0}, "cpu", upstream, target=_target(z, "power", exponent),
                   divergence=divergence, exclude_self=False)
        assert _schedule_counts(divergence) == (1, 1), tile
        _close(got, want, 1e-12)


@pytest.mark.parametrize("learned,t_sigma,scale", [(0, 0.05, 1.0), (0, 1.0, 30.0), (2, 0.05, 1.0),
                                                   (3, 0.02, 1.0)])
def test_float32_huge_logits_within_twice_pytorchs_own_error(monkeypatch, learned, t_sigma, scale):
    """Target logits up to 1e5 (sigma 0.02 on z) and learned ones far apart: the backward has no
    full-row renormalisation, so its p and q must sum to 1 from the forward's very tiles and each
    LSE's rounding (stats rows 1 and 3)."""
    kernel, params = LEARNED[learned]
    n = 40
    x, z, upstream = _inputs(n, 5)
    x = (scale * x).to(F32).double()
    z = z.to(F32).double()
    target64, target32 = _target(z, "gaussian", t_sigma), _target(z.float(), "gaussian", t_sigma)
    want = _run(x, z, kernel, params, "reference", upstream, target=target64)
    naive = _run(x.float(), z, kernel, params, "reference", upstream, target=target32)
    for tile in TILES:
        monkeypatch.setenv("ICON_KERNELS_CPU_TILE_ELEMENTS", tile)
        got = _run(x.float(), z, kernel, params, "cpu", upstream, target=target32)
        assert _counts() == (1, 1)
        for mine, theirs, exact in zip(got, naive, want):
            assert relative_error(mine, exact) <= 2 * relative_error(theirs, exact) + 2.4e-7


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_within_twice_pytorchs_own_error(dtype):
    n = 64
    x, z, upstream = _inputs(n, 3)
    x, z = x.to(dtype), z.to(dtype)
    exact = _run(x.double(), z.double(), "student_t", {"dof": 1.0}, "reference", upstream)
    naive = _run(x, z, "student_t", {"dof": 1.0}, "reference", upstream)
    got = _run(x, z, "student_t", {"dof": 1.0}, "cpu", upstream)
    assert _counts() == (1, 1)
    assert got[1].dtype == dtype
    for mine, theirs, want in zip(got, naive, exact):
        assert relative_error(mine, want) <= 2 * relative_error(theirs, want) + 1e-4


def test_gradcheck_with_ragged_blocks(monkeypatch):
    monkeypatch.setenv("ICON_KERNELS_CPU_TILE_ELEMENTS", "12")   # blocks of 2 rows, N = 7
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(7, 3, generator=gen, dtype=F64, requires_grad=True)
    z = torch.randn(7, 2, generator=gen, dtype=F64)
    sigma = torch.linspace(0.7, 1.5, 7, dtype=F64)
    for kernel, params in LEARNED:
        def f(x):
            return ik.icon_loss(x, target=_target(z, "gaussian", sigma), kernel=kernel, backend="cpu",
                                reduction="none", **params)
        assert torch.autograd.gradcheck(f, (x,))
    assert _counts()[1] > 0


def test_opcheck_of_the_symmetric_affinity_ops():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(9, 4, generator=gen, dtype=F64)
    z = torch.randn(9, 3, generator=gen, dtype=F64)
    args = (x, x, torch.tensor(1.0, dtype=F64), "student_t", "affinity", None, None, None, None, z, z,
            torch.linspace(0.8, 1.6, 9, dtype=F64), "gaussian", None, 0.0, 0.0, True, 0, "conditional", False)
    opcheck_on_both_paths(args, False, _counts, (1, 0), (0, 1))


def test_runs_only_where_it_applies(monkeypatch):
    """Self mode with an unsymmetrised Gaussian or dot target, KL or cross-entropy, alpha = beta = 0,
    conditional rows and one learned parameter. The backward also needs x and y to be one
    autograd input and no gradient for z, the target's parameter or the learned parameter (the
    plain backward runs then, after this forward: tested for its values below)."""
    gen = torch.Generator().manual_seed(4)
    n = 12
    x = torch.randn(n, 4, generator=gen, dtype=F64, requires_grad=True)
    z = torch.randn(n, 3, generator=gen, dtype=F64)

    def ran(target=None, y=None, **kw):
        kw.setdefault("kernel", "student_t")
        ik.icon_loss(x, y, target=target or _target(z), backend="cpu", **kw).backward()
        return _counts()

    assert ran() == (1, 1)
    assert ran(kernel="gaussian") == (1, 1)
    assert ran(y=x, exclude_self=True) == (1, 1)                            # y is x itself
    assert ran(target=ik.Affinity(z, z, kernel="gaussian")) == (1, 1)      # z_cols is z itself
    assert ran(target=_target(z, "cosine", 0.5)) == (1, 1)
    assert ran(divergence="cross_entropy") == (1, 1)
    assert ran(target=ik.Affinity(z, z.clone(), kernel="gaussian")) == (0, 0)
    assert ran(y=x.detach().clone(), exclude_self=True) == (0, 0)
    assert ran(target=ik.Affinity(z, kernel="student_t")) == (1, 1)         # a nonlinear target kernel
    assert ran(target=ik.Affinity(z, kernel="gaussian", symmetrize=True)) == (0, 0)
    assert ran(alpha=0.1) == (0, 0)
    assert ran(beta=0.1) == (0, 0)
    assert ran(divergence="tv") == (0, 0)
    assert ran(normalization="joint") == (0, 0)
    assert ran(kernel="gaussian", sigma=torch.linspace(0.5, 1.5, n, dtype=F64)) == (0, 0)
    assert ran(kernel="gaussian", sigma=torch.tensor(1.0, dtype=F64, requires_grad=True)) == (1, 0)
    assert ran(target=ik.Affinity(z.clone().requires_grad_(), kernel="gaussian")) == (1, 0)
    xp = torch.rand(n, 4, generator=gen, dtype=F64, requires_grad=True)    # log_dot needs x . y > 0
    ik.icon_loss(xp, target=_target(z), kernel="log_dot", backend="cpu").backward()
    assert _counts() == (0, 0)
    monkeypatch.setenv("ICON_KERNELS_SYMMETRIC", "0")
    assert ran() == (0, 0)


@pytest.mark.parametrize("needs", ["param", "z", "t_param", "y_detached"])
def test_the_plain_backward_after_a_symmetric_forward(needs):
    """What the symmetric backward does not compute (the learned or target parameter's gradient,
    z's, or a y that is not x's autograd input) runs the plain backward on this forward's stats."""
    n = 13
    x0, z0, upstream = _inputs(n, 9)
    grads = {}
    for backend in ("cpu", "reference"):
        x = x0.clone().requires_grad_()
        z = z0.clone().requires_grad_(needs == "z")
        sigma = torch.tensor(1.1, dtype=F64, requires_grad=needs == "param")
        t_sigma = torch.linspace(1.0, 2.0, n, dtype=F64).requires_grad_(needs == "t_param")
        y = x.detach() if needs == "y_detached" else None
        loss = ik.icon_loss(x, y, target=ik.Affinity(z, kernel="gaussian", sigma=t_sigma), kernel="gaussian",
                            sigma=sigma, backend=backend, reduction="none", exclude_self=True)
        wrt = [x] + [t for t in (z, sigma, t_sigma) if t.requires_grad]
        grads[backend] = torch.autograd.grad(loss, wrt, upstream)
    assert _counts() == (1, 0)
    for got, want in zip(grads["cpu"], grads["reference"]):
        assert relative_error(got, want) <= 1e-12


@pytest.mark.parametrize("forward_env,backward_env,symmetric_backward", SWITCHES)
def test_the_backward_follows_its_forwards_schedule(monkeypatch, forward_env, backward_env, symmetric_backward):
    """The switches are read at every call, but a backward takes its forward's schedule and blocks
    (the record in stats row 3): the symmetric backward reads the forward's tiles bit for bit."""
    n = 160
    x0, z0, upstream = _inputs(n, 8)
    x0, z0 = x0.to(F32), z0.to(F32)

    def loss_of(x, backend):
        return ik.icon_loss(x, target=_target(z0.to(x.dtype), "gaussian", 0.05), kernel="student_t", dof=1.0,
                            backend=backend, reduction="none")

    got, exact, naive = grads_across_a_switch(monkeypatch, x0, loss_of, upstream, forward_env, backward_env)
    assert _counts()[1] == int(symmetric_backward)
    assert relative_error(got, exact) <= 2 * relative_error(naive, exact) + 2.4e-7


def test_rows_with_zero_upstream_gradient(monkeypatch):
    monkeypatch.setenv("ICON_KERNELS_CPU_TILE_ELEMENTS", "18")   # blocks of 3 rows
    n = 11
    x, z, upstream = _inputs(n, 7)
    upstream[[0, 4, 7]] = 0
    want = _run(x, z, "student_t", {"dof": 1.0}, "reference", upstream)
    got = _run(x, z, "student_t", {"dof": 1.0}, "cpu", upstream)
    assert _counts() == (1, 1)
    _close(got, want, 1e-12)


def test_the_stats_record(monkeypatch):
    """Rows 0 and 2 are LSE and LSE^p as the plain forward's (the plain backward reads them), row 1
    LSE's rounding residual and row 3 the record 8 b + r (b the block side, |r| <= 1/2); the plain
    forward leaves row 3 at 0 (no record)."""
    gen = torch.Generator().manual_seed(12)
    n = 30
    x = torch.randn(n, 4, generator=gen)
    z = torch.randn(n, 3, generator=gen)
    args = (x, x, torch.tensor(1.0), "student_t", "affinity", None, None, None, None, z, z, torch.tensor(2.0),
            "gaussian", None, 0.0, 0.0, True, 0, "conditional", False)
    monkeypatch.setenv("ICON_KERNELS_CPU_TILE_ELEMENTS", "200")   # blocks of 10 rows
    _, _, stats = forward_op("cpu")(*args)
    assert _counts() == (1, 0)
    ulp = torch.nextafter(stats[0].abs(), torch.tensor(float("inf"))) - stats[0].abs()
    assert torch.all(stats[1].abs() <= ulp / 2) and torch.any(stats[1] != 0)
    assert torch.equal(torch.round(stats[3] / 8), torch.full((n,), 10.0))
    assert torch.all((stats[3] - 80).abs() <= 0.5)
    monkeypatch.setenv("ICON_KERNELS_SYMMETRIC", "0")
    _, _, plain = forward_op("cpu")(*args)
    assert _counts() == (0, 0)
    assert torch.equal(plain[3], torch.zeros(n))
    for row in (0, 2):
        assert torch.allclose(plain[row], stats[row], rtol=1e-6, atol=0)


@pytest.mark.parametrize("bad", ["inf", "nan"])
def test_non_finite_target_logits_in_a_rows_first_block(monkeypatch, bad):
    """A row whose first column block has no finite target logit (t = -inf from an overflowing
    distance, or NaN) still takes that block's learned terms into its LSE, and NaN stays NaN: as
    the plain schedule (a review found the block skipped)."""
    n = 6
    x, z, upstream = _inputs(n, 13)
    z = z[:, :1].clone()
    z[:2] = 1e200 if bad == "inf" else float("nan")    # rows 0, 1: block 0 (blocks of 2 rows)
    target = _target(z, "gaussian", 1.0)
    monkeypatch.setenv("ICON_KERNELS_CPU_TILE_ELEMENTS", "8")
    got = ik.icon_loss(x, target=target, kernel="gaussian", backend="cpu", reduction="none")
    assert _counts()[0] == 1
    monkeypatch.setenv("ICON_KERNELS_SYMMETRIC", "0")
    want = ik.icon_loss(x, target=target, kernel="gaussian", backend="cpu", reduction="none")
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
    finite = want.isfinite()
    assert finite.any() or bad == "nan"
    assert relative_error(got[finite], want[finite]) <= 1e-12
