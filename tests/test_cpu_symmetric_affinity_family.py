"""The cpu backend's symmetric schedule for the rest of the Affinity family in self mode
(csrc/cpu_symmetric_affinity_family.h): SNE and t-SNE with an f-divergence, or KL and
cross-entropy with alpha or beta > 0 (y = None, z_cols = None). Each pair of row blocks is one Gram
tile of x and one of z; the forward sweeps the tile pairs twice (each row's LSE and LSE^p, then its
divergence sums and Gamma under them) and the backward forms H = W_IJ + W_JI^T from one recomputed
pair of tiles.

It must equal the plain schedule (ICON_KERNELS_SYMMETRIC=0) and the dense reference to 1e-12 in
float64 with ragged blocks forced (ICON_KERNELS_CPU_TILE_ELEMENTS), keep fp32 within twice naive
PyTorch's own error (huge logits included), pass gradcheck and opcheck, and run exactly where it
applies: _C.cpu_symmetric_counts() counts its calls ("affinity_family_forward", "..._backward")."""
import itertools

import pytest
import torch

import icon_kernels as ik
from cases import relative_error
from symmetric_cases import (F32, F64, LEARNED, SWITCHES, TILES, affinity_target, counts,  # noqa: F401
                             fresh_schedule, grads_across_a_switch, opcheck_on_both_paths)
from icon_kernels.backends.ops import forward_op

pytestmark = pytest.mark.skipif("cpu" not in ik.available_backends(), reason="the cpu backend is not built")

# (divergence, alpha, beta): the f-divergences, and KL / cross-entropy with a uniform mixture
MIXES = (("reverse_kl", 0.0, 0.0), ("tv", 0.0, 0.0), ("hellinger", 0.0, 0.0), ("js", 0.0, 0.0),
         ("chi2", 0.0, 0.0), ("kl", 0.2, 0.0), ("kl", 0.0, 0.3), ("cross_entropy", 0.1, 0.2), ("js", 0.2, 0.1),
         ("reverse_kl", 0.1, 0.2))
RAN = (1, 1)
NOT_RAN = (0, 0)


def _counts():
    return counts("affinity_family_forward", "affinity_family_backward")


def _target(z, t_kernel="gaussian", t_param=2.0):
    return affinity_target(z, t_kernel, t_param)


def _run(x0, z, kernel, params, backend, upstream, target=None, param_grad=False, **options):
    """(row losses, dL/dx[, dL/dparam]) of sum_i upstream_i L_i."""
    x = x0.detach().clone().requires_grad_()
    params = {k: torch.tensor(v, dtype=x0.dtype, requires_grad=param_grad) for k, v in params.items()}
    loss = ik.icon_loss(x, target=target or _target(z), kernel=kernel, backend=backend, reduction="none",
                        **params, **options)
    wrt = [x] + (list(params.values()) if param_grad else [])
    grads = torch.autograd.grad(loss, wrt, grad_outputs=upstream.to(loss.dtype))
    return [loss.detach(), *grads]


def _close(got, want, tol):
    for g, w in zip(got, want):
        assert relative_error(g, w) <= tol, (relative_error(g, w), tol)


def _inputs(n, seed, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=gen, dtype=dtype)
    z = torch.randn(n, 4, generator=gen, dtype=dtype)
    upstream = torch.rand(n, generator=gen, dtype=F64) + 0.5
    return x, z, upstream


# (the power kernel with its self pair kept: test_the_power_kernels_self_pair)
CASES = [(learned, n, excl, *mix) for learned, n, excl, mix in itertools.product(
    range(len(LEARNED)), (2, 7, 37), (True, False), MIXES)
    if (LEARNED[learned][0] != "power" or excl) and (n != 2 or mix in MIXES[:2])]


@pytest.mark.parametrize("learned,n,exclude_self,divergence,alpha,beta", CASES)
def test_float64_equals_the_plain_schedule_and_the_reference(monkeypatch, learned, n, exclude_self, divergence,
                                                               alpha, beta):
    kernel, params = LEARNED[learned]
    x, z, upstream = _inputs(n, n + learned)
    options = dict(divergence=divergence, alpha=alpha, beta=beta, exclude_self=exclude_self)
    want = _run(x, z, kernel, params, "reference", upstream, param_grad=True, **options)
    monkeypatch.setenv("ICON_KERNELS_SYMMETRIC", "0")
    plain = _run(x, z, kernel, params, "cpu", upstream, param_grad=True, **options)
    assert _counts() == NOT_RAN
    monkeypatch.delenv("ICON_KERNELS_SYMMETRIC")
    for tile in TILES:
        monkeypatch.setenv("ICON_KERNELS_CPU_TILE_ELEMENTS", tile)
        got = _run(x, z, kernel, params, "cpu", upstream, param_grad=True, **options)
        assert _counts() == RAN, tile
        _close(got, want, 1e-12)
        _close(got, plain, 1e-12)


@pytest.mark.parametrize("n,exclude_self", [(7, True), (37, True), (37, False)])
def test_float64_cauchy_tv_rows_without_the_dof_gradient(monkeypatch, n, exclude_self):
    """t-SNE's kernel (dof 1) under TV takes q = r e^{-LSE} from the reciprocals in pass 2 and the
    backward, whose W is then 2 G r (the matrix above asks for the dof's gradient, which takes
    learned_backward instead): equal to the reference with ragged blocks."""
    kernel, params = LEARNED[0]
    x, z, upstream = _inputs(n, 29)
    options = dict(divergence="tv", exclude_self=exclude_self)
    want = _run(x, z, kernel, params, "reference", upstream, **options)
    for tile in TILES:
        monkeypatch.setenv("ICON_KERNELS_CPU_TILE_ELEMENTS", tile)
        got = _run(x, z, kernel, params, "cpu", upstream, **options)
        assert _counts() == RAN, tile
        _close(got, want, 1e-12)


@pytest.mark.parametrize("divergence,dof,alpha,beta,dof_grad,sweeps", [
    ("tv", 1.0, 0.0, 0.0, False, 3), ("tv", 1.0, 0.0, 0.0, True, 3), ("js", 1.0, 0.0, 0.0, False, 1),
    ("reverse_kl", 1.0, 0.0, 0.0, False, 1), ("tv", 1.0, 0.1, 0.0, False, 1), ("kl", 1.0, 0.2, 0.0, False, 1),
    ("tv", 3.0, 0.0, 0.0, False, 0)])
def test_the_cauchy_sweeps_where_they_apply(divergence, dof, alpha, beta, dof_grad, sweeps):
    """t-SNE's kernel (dof 1) sums its Cauchy weights in pass 1 (every divergence), and under TV with
    alpha = beta = 0 takes q from them in pass 2 and the backward too (cauchy_tv_rows); other dofs
    never. The counter sees a silent fallback to the generic rows, which the values alone would not."""
    x, z, upstream = _inputs(23, 31)
    _run(x, z, "student_t", {"dof": dof}, "cpu", upstream, param_grad=dof_grad, divergence=divergence, alpha=alpha,
         beta=beta)
    assert counts("affinity_family_forward", "affinity_family_backward", "affinity_family_cauchy_sweeps") == (
        1, 1, sweeps)


@pytest.mark.parametrize("divergence,alpha,beta", [("reverse_kl", 0.0, 0.0), ("tv", 0.0, 0.0), ("kl", 0.2, 0.1)])
def test_the_power_kernels_self_pair(monkeypatch, divergence, alpha, beta):
    """exclude_self=False with the power kernel: s_ii = -(n/2) log(eps) dominates each row, and its
    dL/dx_i is exactly 0 (x_i - x_i): the oracle takes d^2 from explicit differences (0 at the self
    pair, where the Gram's d^2 is rounding noise times W_ii ~ 1e12, which the plain path and the
    reference keep)."""
    n, exponent, sigma = 9, 2.0, 2.0
    x, z, upstream = _inputs(n, 21)

    def oracle(x):
        d2 = (x[:, None, :] - x[None, :, :]).square().sum(-1)
        q = (1 - beta) * torch.softmax(-(exponent / 2) * torch.log(d2 + 1e-12), dim=1) + beta / n
        p = (1 - alpha) * torch.softmax(-torch.cdist(z, z).square() / (2 * sigma ** 2), dim=1) + alpha / n
        if divergence == "kl":
            return (p * (p.log() - q.log())).sum(1)
        if divergence == "reverse_kl":
            return (q * (q.log() - p.log())).sum(1)
        return 0.5 * (p - q).abs().sum(1)

    xw = x.clone().requires_grad_()
    want_rows = oracle(xw)
    want = [want_rows.detach(), torch.autograd.grad(want_rows, [xw], upstream)[0]]
    for tile in TILES:
        monkeypatch.setenv("ICON_KERNELS_CPU_TILE_ELEMENTS", tile)
        got = _run(x, z, "power", {"exponent": exponent}, "cpu", upstream, target=_target(z, "gaussian", sigma),
                   divergence=divergence, alpha=alpha, beta=beta, exclude_self=False)
        assert _counts() == RAN
        _close(got, want, 1e-11)


@pytest.mark.parametrize("t_kernel,per_row", [("gaussian", True), ("gaussian", False), ("cosine", False),
                                               ("dot", True), ("student_t", True), ("student_t", False),
                                               ("power", True), ("log_dot", False)])
@pytest.mark.parametrize("divergence", ["js", "reverse_kl"])
def test_target_kernels_and_a_parameter_per_row(monkeypatch, t_kernel, per_row, divergence):
    """sigma_i per row (perplexity calibration) scales each side's target logits by its own row:
    t_ij != t_ji while the Gram tile of z is shared. The Student-t, power and log_dot target
    kernels are not linear in the Gram term: each side takes its row's logits from it."""
    n = 23
    x, z, upstream = _inputs(n, 11)
    if t_kernel == "log_dot":
        z = z.abs() + 0.1   # log(z_i . z_j) needs z_i . z_j > 0
    t_param = torch.linspace(0.6, 2.5, n, dtype=F64) if per_row else torch.tensor(1.4, dtype=F64)
    target = _target(z, t_kernel, t_param)
    want = _run(x, z, "student_t", {"dof": 1.0}, "reference", upstream, target=target, divergence=divergence)
    monkeypatch.setenv("ICON_KERNELS_CPU_TILE_ELEMENTS", "50")   # blocks of 5 rows
    got = _run(x, z, "student_t", {"dof": 1.0}, "cpu", upstream, target=target, divergence=divergence)
    assert _counts() == RAN
    _close(got, want, 1e-12)


@pytest.mark.parametrize("learned,t_sigma,scale,divergence,alpha,beta", [
    (0, 0.05, 1.0, "reverse_kl", 0.0, 0.0), (0, 1.0, 30.0, "js", 0.0, 0.0), (0, 0.05, 1.0, "tv", 0.0, 0.0),
    (2, 0.05, 1.0, "hellinger", 0.0, 0.0), (3, 0.02, 1.0, "chi2", 0.0, 0.0), (0, 0.05, 30.0, "kl", 0.1, 0.2),
    (1, 0.02, 30.0, "reverse_kl", 0.1, 0.0)])
def test_float32_huge_logits_within_twice_pytorchs_own_error(monkeypatch, learned, t_sigma, scale, divergence,
                                                             alpha, beta):
    """Target logits up to 1e5 (sigma 0.02 on z) and learned ones far apart: the backward has no
    full-row renormalisation, so its p comes from LSE^p with its residual (the record in stats row
    3), its q from the LSE (row 0) and Gamma over exactly these (row 1)."""
    kernel, params = LEARNED[learned]
    n = 40
    x, z, upstream = _inputs(n, 5)
    x = (scale * x).to(F32).double()
    z = z.to(F32).double()
    options = dict(divergence=divergence, alpha=alpha, beta=beta)
    target64, target32 = _target(z, "gaussian", t_sigma), _target(z.float(), "gaussian", t_sigma)
    want = _run(x, z, kernel, params, "reference", upstream, target=target64, **options)
    naive = _run(x.float(), z, kernel, params, "reference", upstream, target=target32, **options)
    for tile in TILES:
        monkeypatch.setenv("ICON_KERNELS_CPU_TILE_ELEMENTS", tile)
        got = _run(x.float(), z, kernel, params, "cpu", upstream, target=target32, **options)
        assert _counts() == RAN
        for mine, theirs, exact in zip(got, naive, want):
            assert relative_error(mine, exact) <= 2 * relative_error(theirs, exact) + 2.4e-7


@pytest.mark.parametrize("divergence", ["js", "reverse_kl", "tv"])
def test_float32_learned_logits_in_the_thousands_as_the_plain_schedule(monkeypatch, divergence):
    """Dot-kernel logits near 2000 (ulp 1.2e-4): both schedules take log q = s - LSE with the LSE
    rounded to float32 (the plain forward's family rows as well), so the row losses are off by
    about 1e-6 where naive PyTorch's log_softmax (s - max - log sum) is off by 3e-8: this schedule
    is no worse than the plain one there, and its gradient (dominated by the Gram's own rounding
    at these logits) stays within twice naive PyTorch's error."""
    kernel, params = LEARNED[4]
    n = 40
    x, z, upstream = _inputs(n, 5)
    x = (30 * x).to(F32).double()
    z = z.to(F32).double()
    options = dict(divergence=divergence)
    target64, target32 = _target(z, "gaussian", 0.05), _target(z.float(), "gaussian", 0.05)
    want = _run(x, z, kernel, params, "reference", upstream, target=target64, **options)
    naive = _run(x.float(), z, kernel, params, "reference", upstream, target=target32, **options)
    monkeypatch.setenv("ICON_KERNELS_SYMMETRIC", "0")
    plain = _run(x.float(), z, kernel, params, "cpu", upstream, target=target32, **options)
    monkeypatch.delenv("ICON_KERNELS_SYMMETRIC")
    got = _run(x.float(), z, kernel, params, "cpu", upstream, target=target32, **options)
    assert _counts() == RAN
    assert relative_error(got[0], want[0]) <= 2 * relative_error(plain[0], want[0])
    assert relative_error(got[1], want[1]) <= 2 * relative_error(naive[1], want[1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_within_twice_pytorchs_own_error(dtype):
    n = 64
    x, z, upstream = _inputs(n, 3)
    x, z = x.to(dtype), z.to(dtype)
    options = dict(divergence="js")
    exact = _run(x.double(), z.double(), "student_t", {"dof": 1.0}, "reference", upstream, **options)
    naive = _run(x, z, "student_t", {"dof": 1.0}, "reference", upstream, **options)
    got = _run(x, z, "student_t", {"dof": 1.0}, "cpu", upstream, **options)
    assert _counts() == RAN
    assert got[1].dtype == dtype
    for mine, theirs, want in zip(got, naive, exact):
        assert relative_error(mine, want) <= 2 * relative_error(theirs, want) + 1e-4


@pytest.mark.parametrize("options", [dict(divergence="reverse_kl"), dict(divergence="js", alpha=0.1),
                                     dict(divergence="kl", beta=0.2)])
def test_gradcheck_with_ragged_blocks(monkeypatch, options):
    monkeypatch.setenv("ICON_KERNELS_CPU_TILE_ELEMENTS", "12")   # blocks of 2 rows, N = 7
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(7, 3, generator=gen, dtype=F64, requires_grad=True)
    z = torch.randn(7, 2, generator=gen, dtype=F64)
    sigma = torch.linspace(0.7, 1.5, 7, dtype=F64)
    for kernel, params in LEARNED:
        prm = {k: torch.tensor(v, dtype=F64, requires_grad=True) for k, v in params.items()}

        def f(x, *p):
            return ik.icon_loss(x, target=_target(z, "gaussian", sigma), kernel=kernel, backend="cpu",
                                reduction="none", **dict(zip(prm, p)), **options)
        assert torch.autograd.gradcheck(f, (x, *prm.values()))
    assert _counts()[1] > 0


def test_opcheck_of_the_ops():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(9, 4, generator=gen, dtype=F64)
    z = torch.randn(9, 3, generator=gen, dtype=F64)
    args = (x, x, torch.tensor(1.0, dtype=F64), "student_t", "affinity", None, None, None, None, z, z,
            torch.linspace(0.8, 1.6, 9, dtype=F64), "gaussian", None, 0.1, 0.0, True, 5, "conditional", False)
    opcheck_on_both_paths(args, True, _counts, (1, 0), (0, 1))


def test_runs_only_where_it_applies(monkeypatch):
    """Self mode with any target kernel, an f-divergence or alpha / beta > 0 (or a symmetrised target),
    conditional rows (or joint ones of a target that is not symmetrised) and one learned parameter
    (KL and cross-entropy without alpha and beta run cpu_symmetric_affinity.h). The backward also
    needs x and y to be one autograd input and no gradient for z or the target's parameter (the
    plain backward runs then: tested below)."""
    gen = torch.Generator().manual_seed(4)
    n = 12
    x = torch.randn(n, 4, generator=gen, dtype=F64, requires_grad=True)
    z = torch.randn(n, 3, generator=gen, dtype=F64)

    def ran(target=None, y=None, **kw):
        kw.setdefault("kernel", "student_t")
        kw.setdefault("divergence", "js")
        ik.icon_loss(x, y, target=target or _target(z), backend="cpu", **kw).backward()
        return _counts()

    assert ran() == RAN
    assert ran(divergence="tv", kernel="gaussian") == RAN
    assert ran(divergence="kl", alpha=0.1) == RAN
    assert ran(divergence="cross_entropy", beta=0.1) == RAN
    assert ran(y=x, exclude_self=True) == RAN                               # y is x itself
    assert ran(target=ik.Affinity(z, z, kernel="gaussian")) == RAN         # z_cols is z itself
    assert ran(target=_target(z, "cosine", 0.5)) == RAN
    assert ran(kernel="gaussian", sigma=torch.tensor(1.0, dtype=F64, requires_grad=True)) == RAN
    assert ran(divergence="kl") == NOT_RAN                                  # cpu_symmetric_affinity.h's
    assert ran(divergence="cross_entropy") == NOT_RAN
    assert ran(target=ik.Affinity(z, z.clone(), kernel="gaussian")) == NOT_RAN
    assert ran(y=x.detach().clone(), exclude_self=True) == NOT_RAN
    assert ran(target=ik.Affinity(z, kernel="student_t")) == RAN   # a nonlinear target kernel
    assert ran(target=ik.Affinity(z, kernel="gaussian", symmetrize=True)) == RAN   # test_cpu_symmetric_symmetrised
    assert ran(normalization="joint") == RAN                               # test_cpu_symmetric_joint_affinity
    assert ran(kernel="gaussian", sigma=torch.linspace(0.5, 1.5, n, dtype=F64)) == NOT_RAN
    assert ran(target=ik.Affinity(z.clone().requires_grad_(), kernel="gaussian")) == (1, 0)
    xp = torch.rand(n, 4, generator=gen, dtype=F64, requires_grad=True)    # log_dot needs x . y > 0
    ik.icon_loss(xp, target=_target(z), kernel="log_dot", divergence="js", backend="cpu").backward()
    assert _counts() == NOT_RAN
    monkeypatch.setenv("ICON_KERNELS_SYMMETRIC", "0")
    assert ran() == NOT_RAN


@pytest.mark.parametrize("needs", ["z", "t_param", "y_detached"])
@pytest.mark.parametrize("divergence,alpha", [("js", 0.0), ("kl", 0.2)])
def test_the_plain_backward_after_a_symmetric_forward(needs, divergence, alpha):
    """What this backward does not compute (z's or the target parameter's gradient, or a y that is
    not x's autograd input) runs the plain backward on this forward's stats (rows 0 and 2)."""
    n = 13
    x0, z0, upstream = _inputs(n, 9)
    grads = {}
    for backend in ("cpu", "reference"):
        x = x0.clone().requires_grad_()
        z = z0.clone().requires_grad_(needs == "z")
        t_sigma = torch.linspace(1.0, 2.0, n, dtype=F64).requires_grad_(needs == "t_param")
        y = x.detach() if needs == "y_detached" else None
        loss = ik.icon_loss(x, y, target=ik.Affinity(z, kernel="gaussian", sigma=t_sigma), kernel="gaussian",
                            backend=backend, reduction="none", exclude_self=True, divergence=divergence, alpha=alpha)
        wrt = [x] + [t for t in (z, t_sigma) if t.requires_grad]
        grads[backend] = torch.autograd.grad(loss, wrt, upstream)
    assert _counts() == (1, 0)
    for got, want in zip(grads["cpu"], grads["reference"]):
        assert relative_error(got, want) <= 1e-12


@pytest.mark.parametrize("forward_env,backward_env,symmetric_backward", SWITCHES)
def test_the_backward_follows_its_forwards_schedule(monkeypatch, forward_env, backward_env, symmetric_backward):
    """The switches are read at every call, but a backward takes its forward's schedule and blocks
    (the record in stats row 3): this backward needs the forward's Gamma, which the plain forward
    does not save, and reads the forward's tiles bit for bit."""
    n = 160
    x0, z0, upstream = _inputs(n, 8)
    x0, z0 = x0.to(F32), z0.to(F32)

    def loss_of(x, backend):
        return ik.icon_loss(x, target=_target(z0.to(x.dtype), "gaussian", 0.05), kernel="student_t", dof=1.0,
                            divergence="js", backend=backend, reduction="none")

    got, exact, naive = grads_across_a_switch(monkeypatch, x0, loss_of, upstream, forward_env, backward_env)
    assert _counts()[1] == int(symmetric_backward)
    assert relative_error(got, exact) <= 2 * relative_error(naive, exact) + 2.4e-7


def test_rows_with_zero_upstream_gradient(monkeypatch):
    monkeypatch.setenv("ICON_KERNELS_CPU_TILE_ELEMENTS", "18")   # blocks of 3 rows
    n = 11
    x, z, upstream = _inputs(n, 7)
    upstream[[0, 4, 7]] = 0
    for options in (dict(divergence="tv"), dict(divergence="kl", alpha=0.1, beta=0.1)):
        want = _run(x, z, "student_t", {"dof": 1.5}, "reference", upstream, param_grad=True, **options)
        got = _run(x, z, "student_t", {"dof": 1.5}, "cpu", upstream, param_grad=True, **options)
        assert _counts() == RAN
        _close(got, want, 1e-12)


def test_the_stats_record(monkeypatch):
    """Rows 0 and 2 are LSE and LSE^p as the plain forward's (the plain backward reads them), row 1
    Gamma and row 3 the record 8 b + r (b the block side, r LSE^p's residual in units of its last
    place, |r| <= 1/2); the plain forward leaves row 3 at 0 (no record)."""
    gen = torch.Generator().manual_seed(12)
    n = 30
    x = torch.randn(n, 4, generator=gen)
    z = torch.randn(n, 3, generator=gen)
    args = (x, x, torch.tensor(1.0), "student_t", "affinity", None, None, None, None, z, z, torch.tensor(2.0),
            "gaussian", None, 0.0, 0.0, True, 5, "conditional", False)
    monkeypatch.setenv("ICON_KERNELS_CPU_TILE_ELEMENTS", "200")   # blocks of 10 rows
    _, _, stats = forward_op("cpu")(*args)
    assert _counts() == (1, 0)
    assert torch.equal(torch.round(stats[3] / 8), torch.full((n,), 10.0))
    assert torch.all((stats[3] - 80).abs() <= 0.5) and torch.any(stats[3] != 80)
    monkeypatch.setenv("ICON_KERNELS_SYMMETRIC", "0")
    _, _, plain = forward_op("cpu")(*args)
    assert _counts() == (0, 0)
    assert torch.equal(plain[3], torch.zeros(n))
    for row in (0, 2):
        assert torch.allclose(plain[row], stats[row], rtol=1e-6, atol=0)
    assert torch.allclose(plain[1], stats[1], rtol=1e-5, atol=1e-7)   # Gamma: the plain rows' sum_j q g


@pytest.mark.parametrize("bad", ["inf", "nan"])
def test_non_finite_target_logits_as_the_plain_schedule(monkeypatch, bad):
    """Rows whose target logits overflow (t = -inf) or are NaN, in a row's first column block: the
    losses are non-finite exactly where the plain schedule's are, and equal elsewhere."""
    n = 6
    x, z, upstream = _inputs(n, 13)
    z = z[:, :1].clone()
    z[:2] = 1e200 if bad == "inf" else float("nan")    # rows 0, 1: block 0 (blocks of 2 rows)
    target = _target(z, "gaussian", 1.0)
    monkeypatch.setenv("ICON_KERNELS_CPU_TILE_ELEMENTS", "8")
    got = ik.icon_loss(x, target=target, kernel="gaussian", divergence="js", backend="cpu", reduction="none")
    assert _counts()[0] == 1
    monkeypatch.setenv("ICON_KERNELS_SYMMETRIC", "0")
    want = ik.icon_loss(x, target=target, kernel="gaussian", divergence="js", backend="cpu", reduction="none")
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
    finite = want.isfinite()
    assert finite.any() or bad == "nan"
    assert relative_error(got[finite], want[finite]) <= 1e-12


@pytest.mark.parametrize("bad", ["inf", "nan"])
@pytest.mark.parametrize("divergence", ["reverse_kl", "tv"])
def test_non_finite_learned_features_on_the_cauchy_sweep(monkeypatch, bad, divergence):
    """t-SNE's Student-t at dof 1 sums the weights 1 / (1 + d^2) in its first sweep (and under TV
    takes q from them in the second and in the backward): rows whose squared distances overflow
    (weight 0, where the logit is -inf) or are NaN give the plain schedule's non-finite losses and
    gradients, and its values elsewhere."""
    n = 6
    x, z, upstream = _inputs(n, 19)
    x[1] = 1e200 if bad == "inf" else float("nan")     # row 1: every d_1j^2 overflows, or is NaN
    target = _target(z, "gaussian", 1.0)
    monkeypatch.setenv("ICON_KERNELS_CPU_TILE_ELEMENTS", "8")
    params = {"dof": 1.0}
    got = _run(x, z, "student_t", params, "cpu", upstream, target=target, divergence=divergence)
    assert _counts() == RAN
    monkeypatch.setenv("ICON_KERNELS_SYMMETRIC", "0")
    want = _run(x, z, "student_t", params, "cpu", upstream, target=target, divergence=divergence)
    assert not want[0].isfinite().all()
    for mine, theirs in zip(got, want):
        assert torch.equal(mine.isnan(), theirs.isnan()) and torch.equal(mine.isinf(), theirs.isinf())
        finite = theirs.isfinite()
        assert relative_error(mine[finite], theirs[finite]) <= 1e-12


def test_a_row_without_a_finite_target_logit(monkeypatch):
    """One z_i whose squared norm overflows: row i's target logits are all -inf (every other row has
    t_ij = -inf at column i only), so its p is 0 / 0: NaN as the plain schedule and the reference
    give, not a finite loss from p = 0."""
    n = 7
    x, z, upstream = _inputs(n, 17)
    z[3] = 1e200
    target = _target(z, "gaussian", 1.0)
    monkeypatch.setenv("ICON_KERNELS_CPU_TILE_ELEMENTS", "8")
    for divergence in ("js", "tv", "reverse_kl", "hellinger"):
        got = ik.icon_loss(x, target=target, kernel="gaussian", divergence=divergence, backend="cpu",
                           reduction="none")
        assert _counts()[0] == 1
        monkeypatch.setenv("ICON_KERNELS_SYMMETRIC", "0")
        want = ik.icon_loss(x, target=target, kernel="gaussian", divergence=divergence, backend="cpu",
                            reduction="none")
        monkeypatch.delenv("ICON_KERNELS_SYMMETRIC")
        assert want[3].isnan() and got[3].isnan(), divergence
        # the other rows take p = 0 < q at column 3: an infinite term for some divergences
        assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf()), divergence
        finite = want.isfinite()
        assert relative_error(got[finite], want[finite]) <= 1e-12


@pytest.mark.parametrize("divergence,alpha,beta,t_sigma", [
    ("kl", 0.1, 0.0, 0.05), ("cross_entropy", 0.2, 0.0, 1.0), ("reverse_kl", 0.0, 0.0, 0.05),
    ("hellinger", 0.0, 0.0, 0.05), ("js", 0.0, 0.2, 0.05), ("reverse_kl", 0.1, 0.0, 0.02)])
def test_float32_gradients_as_the_plain_schedules(monkeypatch, divergence, alpha, beta, t_sigma):
    """The backward's q comes from the LSE rounded to float32 and Gamma from row 1 (no residual of
    either is kept): dL/dx and dL/dsigma stay within twice the plain schedule's error (which
    renormalises each row and keeps Gamma in double) and twice naive PyTorch's. Gaussian logits of
    a few hundred (LSE ulp ~1e-5) and target logits up to 1e5. The losses take log q = s - LSE
    with the LSE rounded to float32, as the plain forward's family rows do (naive PyTorch's
    log_softmax is s - max - log sum, exact to 3e-8 here, where both schedules' are off by up to
    1e-6): they are held to twice the plain schedule's error."""
    n = 48
    x, z, upstream = _inputs(n, 23)
    x = (20 * x).to(F32).double()
    z = z.to(F32).double()
    options = dict(divergence=divergence, alpha=alpha, beta=beta, param_grad=True)
    target64, target32 = _target(z, "gaussian", t_sigma), _target(z.float(), "gaussian", t_sigma)
    params = {"sigma": 3.0}
    want = _run(x, z, "gaussian", params, "reference", upstream, target=target64, **options)
    naive = _run(x.float(), z, "gaussian", params, "reference", upstream, target=target32, **options)
    monkeypatch.setenv("ICON_KERNELS_SYMMETRIC", "0")
    plain = _run(x.float(), z, "gaussian", params, "cpu", upstream, target=target32, **options)
    monkeypatch.delenv("ICON_KERNELS_SYMMETRIC")
    got = _run(x.float(), z, "gaussian", params, "cpu", upstream, target=target32, **options)
    assert _counts() == RAN
    assert relative_error(got[0], want[0]) <= 2 * relative_error(plain[0], want[0]) + 2.4e-7
    for mine, ours, theirs, exact in zip(got[1:], plain[1:], naive[1:], want[1:]):
        floor = 8 * 2.0 ** -23 if exact.numel() == 1 else 0.0   # one number: a few ulps
        assert relative_error(mine, exact) <= max(2 * relative_error(ours, exact) + 2.4e-7, floor)
        assert relative_error(mine, exact) <= max(2 * relative_error(theirs, exact) + 2.4e-7, floor)


@pytest.mark.parametrize("divergence", ["kl", "cross_entropy"])
def test_float32_kl_with_alpha_takes_gamma_over_the_backwards_q(monkeypatch, divergence):
    """KL and cross-entropy with alpha > 0 and beta = 0: pass 2 takes no q (q g = -p~), so Gamma's
    divisor sum_j q is the backward's, exp(LSE - LSE rounded to float32). Points on a sphere of
    radius 10 (Gaussian logits near -100, q spread over the row): a Gamma over sum_j q = 1 left
    1.7x the plain schedule's dL/dx error in a review's mutation; it must stay within 1.3x of it."""
    gen = torch.Generator().manual_seed(3)
    n = 200
    x = torch.nn.functional.normalize(torch.randn(n, 64, generator=gen, dtype=F64), dim=1) * 10
    x = x.to(F32).double()
    z = torch.randn(n, 4, generator=gen, dtype=F64).to(F32).double()
    upstream = torch.rand(n, generator=gen, dtype=F64) + 0.5
    options = dict(divergence=divergence, alpha=0.1, target=_target(z.float(), "gaussian", 1.0))
    want = _run(x, z, "gaussian", {"sigma": 1.0}, "reference", upstream, divergence=divergence, alpha=0.1,
                target=_target(z, "gaussian", 1.0))
    monkeypatch.setenv("ICON_KERNELS_SYMMETRIC", "0")
    plain = _run(x.float(), z, "gaussian", {"sigma": 1.0}, "cpu", upstream, **options)
    monkeypatch.delenv("ICON_KERNELS_SYMMETRIC")
    got = _run(x.float(), z, "gaussian", {"sigma": 1.0}, "cpu", upstream, **options)
    assert _counts() == RAN
    assert relative_error(got[1], want[1]) <= 1.3 * relative_error(plain[1], want[1])
