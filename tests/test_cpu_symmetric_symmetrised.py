"""The cpu backend's symmetric schedule for a symmetrised Affinity target with conditional rows
(csrc/cpu_symmetric_affinity_family.h; ik.Affinity(z, symmetrize=True), normalization
"conditional", self mode): row i's target is P_ij = (p_{j|i} + p_{i|j}) / (2 M_i), M_i its row's
mass. The forward sweeps the tile pairs three times (each row's LSE and LSE^p; each row's mass,
over the z tiles alone; the divergence sums under them), the backward sweeps the masses again and
forms H = W_IJ + W_JI^T from one recomputed pair of tiles. Each pair's log((p_{j|i} + p_{i|j}) / 2)
is computed once, in the tile, for both of its rows.

It must equal the plain schedule (ICON_KERNELS_SYMMETRIC=0) and the dense reference to 1e-12 in
float64 with ragged blocks forced, for every divergence (KL and cross-entropy without alpha and
beta too: no other schedule takes a symmetrised target), keep fp32 within twice naive PyTorch's own
error, pass gradcheck and opcheck, and run exactly where it applies: _C.cpu_symmetric_counts()
counts its calls and its mass sweeps."""
import itertools

import pytest
import torch

import icon_kernels as ik
from cases import relative_error
from icon_kernels.backends.ops import forward_op
from symmetric_cases import (F32, F64, LEARNED, SWITCHES, TILES, affinity_target, assert_close, counts,  # noqa: F401
                             fresh_schedule, grads_across_a_switch, run_loss, seeded_inputs, opcheck_on_both_paths)

pytestmark = pytest.mark.skipif("cpu" not in ik.available_backends(), reason="the cpu backend is not built")

# (divergence, alpha, beta): every divergence, and KL / cross-entropy with and without a mixture
MIXES = (("kl", 0.0, 0.0), ("cross_entropy", 0.0, 0.0), ("reverse_kl", 0.0, 0.0), ("tv", 0.0, 0.0),
         ("hellinger", 0.0, 0.0), ("js", 0.0, 0.0), ("chi2", 0.0, 0.0), ("kl", 0.2, 0.0), ("kl", 0.0, 0.3),
         ("cross_entropy", 0.1, 0.2), ("js", 0.2, 0.1), ("reverse_kl", 0.1, 0.2))
RAN = (1, 1, 2)       # forward, backward, mass sweeps (one in each)
NOT_RAN = (0, 0, 0)


def _counts():
    return counts("affinity_family_forward", "affinity_family_backward", "symmetrised_mass_sweeps")


def _target(z, t_kernel="gaussian", t_param=2.0):
    return affinity_target(z, t_kernel, t_param, symmetrize=True)


def _sigmas(n, lo=0.7, hi=2.5):
    """A target parameter per row (perplexity calibration's sigma_i): t_ij != t_ji."""
    return torch.linspace(lo, hi, n, dtype=F64)


# (the power kernel with its self pair kept: cpu_symmetric_affinity_family's README note)
CASES = [(learned, n, excl, per_row, *mix) for learned, n, excl, per_row, mix in itertools.product(
    range(len(LEARNED)), (2, 7, 37), (True, False), (False, True), MIXES)
    if (LEARNED[learned][0] != "power" or excl) and (n != 2 or mix in MIXES[:3]) and (per_row or mix in MIXES[:6])]


@pytest.mark.parametrize("learned,n,exclude_self,per_row,divergence,alpha,beta", CASES)
def test_float64_equals_the_plain_schedule_and_the_reference(monkeypatch, learned, n, exclude_self, per_row,
                                                               divergence, alpha, beta):
    kernel, params = LEARNED[learned]
    x, z, upstream = seeded_inputs(n, n + learned)
    target = _target(z, "gaussian", _sigmas(n) if per_row else 1.5)
    options = dict(divergence=divergence, alpha=alpha, beta=beta, exclude_self=exclude_self, param_grad=True)
    want = run_loss(x, target, kernel, params, "reference", upstream, **options)
    monkeypatch.setenv("ICON_KERNELS_SYMMETRIC", "0")
    plain = run_loss(x, target, kernel, params, "cpu", upstream, **options)
    assert _counts() == NOT_RAN
    monkeypatch.delenv("ICON_KERNELS_SYMMETRIC")
    for tile in TILES:
        monkeypatch.setenv("ICON_KERNELS_CPU_TILE_ELEMENTS", tile)
        got = run_loss(x, target, kernel, params, "cpu", upstream, **options)
        assert _counts() == RAN, tile
        # (N = 2 with the self pair kept: P and q nearly equal, a KL of 1e-5 from sums of O(1))
        assert_close(got, want, 1e-12, atol=1e-15)
        assert_close(got, plain, 1e-12, atol=1e-15)


@pytest.mark.parametrize("t_kernel,per_row", [("gaussian", True), ("gaussian", False), ("cosine", False),
                                               ("dot", True), ("student_t", True), ("student_t", False),
                                               ("power", True), ("log_dot", False)])
@pytest.mark.parametrize("divergence", ["kl", "js"])
def test_target_kernels_and_a_parameter_per_row(monkeypatch, t_kernel, per_row, divergence):
    """Each side's p takes its own row's parameter and LSE^p (p_{j|i} under theta_i, p_{i|j} under
    theta_j) from one shared Gram entry of z; the nonlinear target kernels (Student-t, power,
    log_dot) take their logits from it per side."""
    n = 23
    x, z, upstream = seeded_inputs(n, 11)
    if t_kernel == "log_dot":
        z = z.abs() + 0.1   # log(z_i . z_j) needs z_i . z_j > 0
    target = _target(z, t_kernel, _sigmas(n, 0.6, 2.5) if per_row else torch.tensor(1.4, dtype=F64))
    want = run_loss(x, target, "student_t", {"dof": 1.0}, "reference", upstream, divergence=divergence)
    monkeypatch.setenv("ICON_KERNELS_CPU_TILE_ELEMENTS", "50")   # blocks of 5 rows
    got = run_loss(x, target, "student_t", {"dof": 1.0}, "cpu", upstream, divergence=divergence)
    assert _counts() == RAN
    assert_close(got, want, 1e-12)


@pytest.mark.parametrize("dtype,tol", [(F64, 1e-12), (F32, None)])
@pytest.mark.parametrize("divergence", ["kl", "tv"])
def test_an_outlier_far_from_every_row(monkeypatch, dtype, tol, divergence):
    """One z far from the rest: its LSE^p is thousands of e-folds below the others' (beyond the
    range where a pair's two p come from one exp, pair_factors), its row's p_{j|i} is spread while
    every p_{i|j} underflows, so its mass is about 1/2 and log p~ must stay exact where p_{i|j} = 0."""
    n = 19
    x, z, upstream = seeded_inputs(n, 3)
    z[5] += 400.0
    target64 = _target(z, "gaussian", 2.0)
    want = run_loss(x, target64, "gaussian", {"sigma": 1.2}, "reference", upstream, divergence=divergence)
    target = _target(z.to(dtype), "gaussian", 2.0)
    naive = run_loss(x.to(dtype), target, "gaussian", {"sigma": 1.2}, "reference", upstream, divergence=divergence)
    monkeypatch.setenv("ICON_KERNELS_CPU_TILE_ELEMENTS", "50")
    got = run_loss(x.to(dtype), target, "gaussian", {"sigma": 1.2}, "cpu", upstream, divergence=divergence)
    assert _counts() == RAN
    assert got[0].isfinite().all()
    for mine, theirs, exact in zip(got, naive, want):
        bound = tol if tol is not None else 2 * relative_error(theirs, exact) + 2.4e-7
        assert relative_error(mine, exact) <= bound


@pytest.mark.parametrize("learned,t_sigma,scale,divergence,alpha,beta", [
    (0, 0.05, 1.0, "kl", 0.0, 0.0), (0, 1.0, 30.0, "js", 0.0, 0.0), (0, 0.05, 1.0, "tv", 0.0, 0.0),
    (2, 0.05, 1.0, "hellinger", 0.0, 0.0), (3, 0.02, 1.0, "chi2", 0.0, 0.0), (0, 0.05, 30.0, "kl", 0.1, 0.2),
    (1, 0.02, 30.0, "reverse_kl", 0.1, 0.0), (4, 0.05, 1.0, "cross_entropy", 0.0, 0.0)])
def test_float32_huge_logits_within_twice_pytorchs_own_error(monkeypatch, learned, t_sigma, scale, divergence,
                                                             alpha, beta):
    """Target logits up to 1e5 (sigma 0.02 on z) and learned ones far apart."""
    kernel, params = LEARNED[learned]
    n = 40
    x, z, upstream = seeded_inputs(n, 5)
    x = (scale * x).to(F32).double()
    z = z.to(F32).double()
    options = dict(divergence=divergence, alpha=alpha, beta=beta)
    target64, target32 = _target(z, "gaussian", t_sigma), _target(z.float(), "gaussian", t_sigma)
    want = run_loss(x, target64, kernel, params, "reference", upstream, **options)
    naive = run_loss(x.float(), target32, kernel, params, "reference", upstream, **options)
    for tile in TILES:
        monkeypatch.setenv("ICON_KERNELS_CPU_TILE_ELEMENTS", tile)
        got = run_loss(x.float(), target32, kernel, params, "cpu", upstream, **options)
        assert _counts() == RAN
        for mine, theirs, exact in zip(got, naive, want):
            assert relative_error(mine, exact) <= 2 * relative_error(theirs, exact) + 2.4e-7


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_within_twice_pytorchs_own_error(dtype):
    n = 64
    x, z, upstream = seeded_inputs(n, 3)
    x, z = x.to(dtype), z.to(dtype)
    exact = run_loss(x.double(), _target(z.double()), "student_t", {"dof": 1.0}, "reference", upstream)
    naive = run_loss(x, _target(z), "student_t", {"dof": 1.0}, "reference", upstream)
    got = run_loss(x, _target(z), "student_t", {"dof": 1.0}, "cpu", upstream)
    assert _counts() == RAN
    assert got[1].dtype == dtype
    for mine, theirs, want in zip(got, naive, exact):
        assert relative_error(mine, want) <= 2 * relative_error(theirs, want) + 1e-4


@pytest.mark.parametrize("options", [dict(divergence="kl"), dict(divergence="js", alpha=0.1),
                                     dict(divergence="tv", beta=0.2)])
def test_gradcheck_with_ragged_blocks(monkeypatch, options):
    monkeypatch.setenv("ICON_KERNELS_CPU_TILE_ELEMENTS", "12")   # blocks of 2 rows, N = 7
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(7, 3, generator=gen, dtype=F64, requires_grad=True)
    z = torch.randn(7, 2, generator=gen, dtype=F64)
    for kernel, params in LEARNED:
        prm = {k: torch.tensor(v, dtype=F64, requires_grad=True) for k, v in params.items()}

        def f(x, *p):
            return ik.icon_loss(x, target=_target(z, "gaussian", _sigmas(7, 0.7, 1.5)), kernel=kernel,
                                backend="cpu", reduction="none", **dict(zip(prm, p)), **options)
        assert torch.autograd.gradcheck(f, (x, *prm.values()))
    assert _counts()[1] > 0


def _op_args(x, z, t_param, divergence_code=0):
    return (x, x, torch.tensor(1.0, dtype=x.dtype), "student_t", "affinity", None, None, None, None, z, z, t_param,
            "gaussian", None, 0.0, 0.0, True, divergence_code, "conditional", True)


def test_opcheck_of_the_ops():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(9, 4, generator=gen, dtype=F64)
    z = torch.randn(9, 3, generator=gen, dtype=F64)
    args = _op_args(x, z, torch.linspace(0.8, 1.6, 9, dtype=F64), 5)
    opcheck_on_both_paths(args, True, _counts, (1, 0, 1), (0, 1, 1))


def test_runs_only_where_it_applies(monkeypatch):
    """Self mode with a symmetrised target, conditional rows and one learned parameter, every
    divergence. Joint normalisation has its own schedules; a y that is not x's autograd input, a
    learned parameter per row or log_dot run the plain rows."""
    gen = torch.Generator().manual_seed(4)
    n = 12
    x = torch.randn(n, 4, generator=gen, dtype=F64, requires_grad=True)
    z = torch.randn(n, 3, generator=gen, dtype=F64)

    def ran(target=None, y=None, **kw):
        kw.setdefault("kernel", "student_t")
        ik.icon_loss(x, y, target=target or _target(z), backend="cpu", **kw).backward()
        return _counts()

    assert ran() == RAN
    assert ran(divergence="cross_entropy") == RAN
    assert ran(divergence="tv", kernel="gaussian") == RAN
    assert ran(divergence="kl", alpha=0.1) == RAN
    assert ran(y=x, exclude_self=True) == RAN                               # y is x itself
    assert ran(target=_target(z, "student_t", _sigmas(n))) == RAN
    assert ran(kernel="gaussian", sigma=torch.tensor(1.0, dtype=F64, requires_grad=True)) == RAN
    assert ran(normalization="joint") == NOT_RAN                            # the joint schedules'
    assert ran(target=ik.Affinity(z, kernel="gaussian")) == (0, 0, 0)      # not symmetrised: cpu_symmetric_affinity.h
    assert ran(y=x.detach().clone(), exclude_self=True) == NOT_RAN
    assert ran(kernel="gaussian", sigma=torch.linspace(0.5, 1.5, n, dtype=F64)) == NOT_RAN
    xp = torch.rand(n, 4, generator=gen, dtype=F64, requires_grad=True)    # log_dot needs x . y > 0
    ik.icon_loss(xp, target=_target(z), kernel="log_dot", backend="cpu").backward()
    assert _counts() == NOT_RAN
    monkeypatch.setenv("ICON_KERNELS_SYMMETRIC", "0")
    assert ran() == NOT_RAN


@pytest.mark.parametrize("divergence,alpha", [("kl", 0.0), ("js", 0.0), ("kl", 0.2)])
def test_the_plain_backward_after_a_symmetric_forward(divergence, alpha):
    """A y that is not x's autograd input runs the plain backward on this forward's stats (rows 0
    and 2: the LSE and LSE^p rounded to T, which the plain rows symmetrise with)."""
    n = 13
    x0, z0, upstream = seeded_inputs(n, 9)
    target = _target(z0, "gaussian", _sigmas(n, 1.0, 2.0))
    grads = {}
    for backend in ("cpu", "reference"):
        x = x0.clone().requires_grad_()
        loss = ik.icon_loss(x, x.detach(), target=target, kernel="gaussian", backend=backend, reduction="none",
                            exclude_self=True, divergence=divergence, alpha=alpha)
        grads[backend] = torch.autograd.grad(loss, [x], upstream)
    assert _counts() == (1, 0, 1)
    assert relative_error(grads["cpu"][0], grads["reference"][0]) <= 1e-12


@pytest.mark.parametrize("forward_env,backward_env,symmetric_backward", SWITCHES)
def test_the_backward_follows_its_forwards_schedule(monkeypatch, forward_env, backward_env, symmetric_backward):
    """A backward takes its forward's schedule and blocks (the record in stats row 3): the plain
    forward leaves row 3 at 0 for these problems, and this backward reads the forward's Gamma."""
    n = 160
    x0, z0, upstream = seeded_inputs(n, 8)
    x0, z0 = x0.to(F32), z0.to(F32)

    def loss_of(x, backend):
        return ik.icon_loss(x, target=_target(z0.to(x.dtype), "gaussian", 0.5), kernel="student_t", dof=1.0,
                            divergence="js", backend=backend, reduction="none")

    got, exact, naive = grads_across_a_switch(monkeypatch, x0, loss_of, upstream, forward_env, backward_env)
    assert _counts()[1] == int(symmetric_backward)
    assert relative_error(got, exact) <= 2 * relative_error(naive, exact) + 2.4e-7


def test_rows_with_zero_upstream_gradient(monkeypatch):
    monkeypatch.setenv("ICON_KERNELS_CPU_TILE_ELEMENTS", "18")   # blocks of 3 rows
    n = 11
    x, z, upstream = seeded_inputs(n, 7)
    upstream[[0, 4, 7]] = 0
    target = _target(z, "gaussian", _sigmas(n))
    for options in (dict(divergence="kl"), dict(divergence="tv"), dict(divergence="kl", alpha=0.1, beta=0.1)):
        want = run_loss(x, target, "student_t", {"dof": 1.5}, "reference", upstream, param_grad=True, **options)
        got = run_loss(x, target, "student_t", {"dof": 1.5}, "cpu", upstream, param_grad=True, **options)
        assert _counts() == RAN
        assert_close(got, want, 1e-12)


def test_the_stats(monkeypatch):
    """Rows 0 and 2 are the LSE and LSE^p as the plain forward's (the plain backward symmetrises
    with row 2), row 3 the record 8 b with no residual (the pairs take LSE^p rounded to T, as the
    plain rows do); the plain forward leaves row 3 at 0."""
    gen = torch.Generator().manual_seed(12)
    n = 30
    x = torch.randn(n, 4, generator=gen)
    z = torch.randn(n, 3, generator=gen)
    args = _op_args(x, z, torch.linspace(1.0, 3.0, n))
    monkeypatch.setenv("ICON_KERNELS_CPU_TILE_ELEMENTS", "200")   # blocks of 10 rows
    _, _, stats = forward_op("cpu")(*args)
    assert _counts() == (1, 0, 1)
    assert torch.equal(stats[3], torch.full((n,), 80.0))
    monkeypatch.setenv("ICON_KERNELS_SYMMETRIC", "0")
    _, _, plain = forward_op("cpu")(*args)
    assert _counts() == NOT_RAN
    assert torch.equal(plain[3], torch.zeros(n))
    for row in (0, 2):
        assert torch.allclose(plain[row], stats[row], rtol=1e-6, atol=0)


@pytest.mark.parametrize("sigma_r", [1e-154, 1e-150])
def test_minus_infinite_target_logits_with_a_finite_lse(monkeypatch, sigma_r):
    """Row 4's sigma_r makes -d^2 / (2 sigma_r^2) overflow to -inf for its farther columns (1e-154:
    -5e307 d^2) while its nearest stay finite: its LSE^p is finite, p_{j|4} is 0 at the -inf
    columns, and each of those pairs' log((p_{j|4} + p_{4|j}) / 2) is p_{4|j}'s alone. Equal to the
    plain schedule and the reference, every loss finite."""
    n = 9
    x, z, upstream = seeded_inputs(n, 14, dz=2)
    sigma = _sigmas(n)
    sigma[4] = sigma_r
    target = _target(z, "gaussian", sigma)
    want = run_loss(x, target, "student_t", {"dof": 1.0}, "reference", upstream, divergence="js")
    monkeypatch.setenv("ICON_KERNELS_SYMMETRIC", "0")
    plain = run_loss(x, target, "student_t", {"dof": 1.0}, "cpu", upstream, divergence="js")
    monkeypatch.delenv("ICON_KERNELS_SYMMETRIC")
    monkeypatch.setenv("ICON_KERNELS_CPU_TILE_ELEMENTS", "18")   # blocks of 3 rows
    got = run_loss(x, target, "student_t", {"dof": 1.0}, "cpu", upstream, divergence="js")
    assert _counts() == RAN
    assert got[0].isfinite().all()
    assert_close(got, want, 1e-12)
    assert_close(got, plain, 1e-12)


@pytest.mark.parametrize("bad", ["overflow", "nan"])
def test_non_finite_target_logits_as_the_plain_schedule(monkeypatch, bad):
    """Rows whose squared distances are NaN (z = 1e200: inf - inf in the Gram form) or NaN
    features: any row whose LSE^p is not finite makes every row's p_{i|j} NaN under
    symmetrisation, as in the plain schedule; the patterns must match (the -inf logits with a
    finite LSE^p are the test above)."""
    n = 6
    x, z, upstream = seeded_inputs(n, 13)
    z = z[:, :1].clone()
    z[:2] = 1e200 if bad == "overflow" else float("nan")    # rows 0, 1: block 0 (blocks of 2 rows)
    target = _target(z, "gaussian", 1.0)
    monkeypatch.setenv("ICON_KERNELS_CPU_TILE_ELEMENTS", "8")
    for divergence in ("kl", "js", "tv"):
        got = ik.icon_loss(x, target=target, kernel="gaussian", divergence=divergence, backend="cpu",
                           reduction="none")
        assert _counts()[0] == 1
        monkeypatch.setenv("ICON_KERNELS_SYMMETRIC", "0")
        want = ik.icon_loss(x, target=target, kernel="gaussian", divergence=divergence, backend="cpu",
                            reduction="none")
        monkeypatch.delenv("ICON_KERNELS_SYMMETRIC")
        assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf()), divergence
        finite = want.isfinite()
        assert relative_error(got[finite], want[finite]) <= 1e-12
