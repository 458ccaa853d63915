"""The cpu backend's symmetric schedule for joint normalisation of an Affinity target that is not
symmetrised, in self mode (csrc/cpu_symmetric_affinity_family.h, normalization "joint"): P_ij =
p_{j|i} / N against q_ij = e^{s_ij} / Z. P is not symmetric, but q is: each pair of row blocks is
one Gram tile of x and one of z, read by the rows of I and, column by column, by the rows of J. The
forward sweeps the tile pairs twice (each row's LSE and LSE^p, then log Z and each row's terms under
it); the backward sweeps z's tiles once for the unrounded LSE^p and forms
H_ij = (1 - beta) (g_i q g_ij + g_j q g_ji - 2 q_ij C) from one recomputed pair of tiles. Its stats
are the plain joint rows', so either backward runs after either forward.

It must equal the plain joint rows (ICON_KERNELS_SYMMETRIC=0) and the dense reference to 1e-12 in
float64 with ragged blocks forced, keep fp32 within twice the plain rows' error (target logits up
to 1e4 included), pass gradcheck, and run exactly where it applies: _C.cpu_symmetric_counts()
counts its calls ("affinity_family_forward", "..._backward")."""
import itertools

import pytest
import torch

import icon_kernels as ik
from cases import relative_error
from symmetric_cases import (F32, F64, LEARNED, TILES, affinity_target, assert_close, counts,  # noqa: F401
                             fresh_schedule, run_loss, seeded_inputs, opcheck_on_both_paths)

pytestmark = pytest.mark.skipif("cpu" not in ik.available_backends(), reason="the cpu backend is not built")

RAN, NOT_RAN, FORWARD_ONLY = (1, 1), (0, 0), (1, 0)
MIXES = (("kl", 0.0, 0.0), ("cross_entropy", 0.0, 0.0), ("kl", 0.2, 0.1), ("reverse_kl", 0.0, 0.0),
         ("tv", 0.0, 0.0), ("js", 0.1, 0.2), ("hellinger", 0.0, 0.1), ("chi2", 0.1, 0.0))


def _counts():
    return counts("affinity_family_forward", "affinity_family_backward")


def _inputs(n, seed):
    x, z, upstream = seeded_inputs(n, seed)
    upstream[n // 2] = 0             # a row with zero upstream gradient: it still moves Z
    return x, z, upstream


# (the power kernel with its self pair kept: test_cpu_symmetric_affinity_family's note)
CASES = [(learned, n, excl, *mix) for learned, n, excl, mix in itertools.product(
    range(len(LEARNED)), (2, 7, 37), (True, False), MIXES)
    if (LEARNED[learned][0] != "power" or excl) and (n != 2 or mix in MIXES[:2]) and (n != 7 or excl)]


@pytest.mark.parametrize("learned,n,exclude_self,divergence,alpha,beta", CASES)
def test_float64_equals_the_plain_joint_rows_and_the_reference(monkeypatch, learned, n, exclude_self, divergence,
                                                               alpha, beta):
    kernel, params = LEARNED[learned]
    x, z, upstream = _inputs(n, n + learned)
    target = affinity_target(z)
    options = dict(divergence=divergence, alpha=alpha, beta=beta, exclude_self=exclude_self, normalization="joint")
    want = run_loss(x, target, kernel, params, "reference", upstream, **options)
    monkeypatch.setenv("ICON_KERNELS_SYMMETRIC", "0")
    plain = run_loss(x, target, kernel, params, "cpu", upstream, **options)
    assert _counts() == NOT_RAN
    monkeypatch.delenv("ICON_KERNELS_SYMMETRIC")
    for tile in TILES:
        monkeypatch.setenv("ICON_KERNELS_CPU_TILE_ELEMENTS", tile)
        got = run_loss(x, target, kernel, params, "cpu", upstream, **options)
        assert _counts() == RAN, tile
        assert got[0].isfinite().all()
        assert_close(got, want, 1e-12, atol=1e-15)
        assert_close(got, plain, 1e-12, atol=1e-15)


@pytest.mark.parametrize("t_kernel,per_row", [("gaussian", True), ("cosine", False), ("student_t", True),
                                               ("power", False), ("log_dot", False)])
@pytest.mark.parametrize("divergence", ["kl", "js"])
def test_target_kernels_and_a_parameter_per_row(monkeypatch, t_kernel, per_row, divergence):
    """sigma_i per row scales each side's target logits by its own row (t_ij != t_ji); the
    nonlinear target kernels take each side's logits from the shared Gram tile of z."""
    n = 23
    x, z, upstream = _inputs(n, 11)
    if t_kernel == "log_dot":
        z = z.abs() + 0.1   # log(z_i . z_j) needs z_i . z_j > 0
    t_param = torch.linspace(0.6, 2.5, n, dtype=F64) if per_row else torch.tensor(1.4, dtype=F64)
    target = affinity_target(z, t_kernel, t_param)
    options = dict(divergence=divergence, normalization="joint")
    want = run_loss(x, target, "student_t", {"dof": 1.0}, "reference", upstream, **options)
    monkeypatch.setenv("ICON_KERNELS_CPU_TILE_ELEMENTS", "50")   # blocks of 5 rows
    got = run_loss(x, target, "student_t", {"dof": 1.0}, "cpu", upstream, **options)
    assert _counts() == RAN
    assert_close(got, want, 1e-12)


@pytest.mark.parametrize("learned,t_sigma,scale,divergence,alpha,beta", [
    (0, 0.02, 1.0, "kl", 0.0, 0.0), (0, 1.0, 30.0, "js", 0.0, 0.0), (2, 0.05, 1.0, "tv", 0.0, 0.0),
    (3, 0.02, 30.0, "kl", 0.1, 0.2), (1, 0.02, 1.0, "reverse_kl", 0.0, 0.0)])
def test_float32_within_twice_the_plain_rows_error(monkeypatch, learned, t_sigma, scale, divergence, alpha, beta):
    """Target logits up to 1e4 (sigma 0.02 on z: float32's ulp there is 1e-3, so p sums to 1 in the
    backward only from the unrounded LSE^p, its sweep of z) and learned logits far apart."""
    kernel, params = LEARNED[learned]
    n = 40
    x, z, upstream = _inputs(n, 5)
    x, z = (scale * x).to(F32).double(), z.to(F32).double()
    options = dict(divergence=divergence, alpha=alpha, beta=beta, normalization="joint")
    target64, target32 = affinity_target(z, "gaussian", t_sigma), affinity_target(z.float(), "gaussian", t_sigma)
    exact = run_loss(x, target64, kernel, params, "reference", upstream, **options)
    monkeypatch.setenv("ICON_KERNELS_SYMMETRIC", "0")
    plain = run_loss(x.float(), target32, kernel, params, "cpu", upstream, **options)
    monkeypatch.delenv("ICON_KERNELS_SYMMETRIC")
    for tile in ("200", ""):
        monkeypatch.setenv("ICON_KERNELS_CPU_TILE_ELEMENTS", tile)
        got = run_loss(x.float(), target32, kernel, params, "cpu", upstream, **options)
        assert _counts() == RAN
        for mine, ours, want in zip(got, plain, exact):
            assert relative_error(mine, want) <= 2 * relative_error(ours, want) + 2.4e-7


@pytest.mark.parametrize("kernel,options", [("student_t", dict()), ("gaussian", dict(divergence="js", alpha=0.1)),
                                            ("dot", dict(divergence="tv", beta=0.2))])
def test_gradcheck_with_ragged_blocks(monkeypatch, kernel, options):
    monkeypatch.setenv("ICON_KERNELS_CPU_TILE_ELEMENTS", "12")   # blocks of 2 rows, N = 7
    x, z, _ = seeded_inputs(7, 1, d=3)
    x.requires_grad_()
    target = affinity_target(z, "gaussian", torch.linspace(0.8, 1.6, 7, dtype=F64))
    param = {"student_t": {"dof": 1.0}, "gaussian": {"sigma": 1.3}, "dot": {"temperature": 0.7}}[kernel]

    def f(x):
        return ik.icon_loss(x, target=target, kernel=kernel, backend="cpu", reduction="none", normalization="joint",
                            **param, **options)
    assert torch.autograd.gradcheck(f, (x,))
    assert _counts()[1] > 0


def test_runs_only_where_it_applies(monkeypatch):
    """Self mode, joint normalisation, an Affinity target that is not symmetrised with z_cols z, one
    scalar learned parameter and any kernel but log_dot. The learned parameter's gradient, z's and
    a y that is not x's autograd input run the plain joint backward after this forward."""
    x, z, _ = seeded_inputs(12, 4, d=4, dz=3)
    x.requires_grad_()

    def ran(target=None, y=None, **kw):
        kw.setdefault("kernel", "student_t")
        ik.icon_loss(x, y, target=target or affinity_target(z), backend="cpu", normalization="joint", **kw).backward()
        return _counts()

    assert ran() == RAN
    assert ran(divergence="tv", kernel="gaussian") == RAN
    assert ran(y=x, exclude_self=True, beta=0.2) == RAN
    assert ran(target=ik.Affinity(z, z, kernel="gaussian")) == RAN
    assert ran(kernel="gaussian", sigma=torch.tensor(1.0, dtype=F64, requires_grad=True)) == FORWARD_ONLY
    assert ran(target=ik.Affinity(z.clone().requires_grad_(), kernel="gaussian")) == FORWARD_ONLY
    assert ran(y=x.detach().clone(), exclude_self=True) == NOT_RAN
    assert ran(target=ik.Affinity(z, z.clone(), kernel="gaussian")) == NOT_RAN
    assert ran(kernel="gaussian", sigma=torch.linspace(0.5, 1.5, 12, dtype=F64)) == NOT_RAN
    assert ran(target=ik.Affinity(z, kernel="gaussian", symmetrize=True)) == NOT_RAN   # the joint schedules'
    monkeypatch.setenv("ICON_KERNELS_SYMMETRIC", "0")
    assert ran() == NOT_RAN


@pytest.mark.parametrize("what", ["param", "z", "y_detached"])
def test_the_plain_backward_after_this_forward(what):
    x0, z0, upstream = _inputs(11, 8)
    grads = []
    for backend in ("cpu", "reference"):
        x, z = x0.clone().requires_grad_(), z0.clone().requires_grad_(what == "z")
        sigma = torch.tensor(0.9, dtype=F64, requires_grad=what == "param")
        y = x.detach() if what == "y_detached" else None
        loss = ik.icon_loss(x, y, target=affinity_target(z), kernel="gaussian", sigma=sigma, alpha=0.1,
                            backend=backend, reduction="none", normalization="joint", exclude_self=True,
                            divergence="js")
        wrt = [v for v in (x, z, sigma) if v.requires_grad]
        grads.append(torch.autograd.grad(loss, wrt, upstream))
    assert _counts() == FORWARD_ONLY
    for mine, want in zip(*grads):
        assert relative_error(mine, want) <= 1e-12


@pytest.mark.parametrize("divergence", ["js", "kl"])
@pytest.mark.parametrize("forward_env,backward_env", [("0", "1"), ("1", "0")])
def test_either_backward_after_either_forward(monkeypatch, forward_env, backward_env, divergence):
    """The stats are the plain joint rows' (log Z, Gamma_i, LSE^p_i, the row's share of q): the
    switch at the backward decides which backward runs."""
    x0, z, upstream = _inputs(30, 2)
    target = affinity_target(z, "gaussian", 0.7)
    exact = run_loss(x0, target, "student_t", {"dof": 1.0}, "reference", upstream, divergence=divergence,
                     normalization="joint")
    x = x0.clone().requires_grad_()
    monkeypatch.setenv("ICON_KERNELS_SYMMETRIC", forward_env)
    loss = ik.icon_loss(x, target=target, kernel="student_t", dof=1.0, backend="cpu", reduction="none",
                        normalization="joint", divergence=divergence)
    monkeypatch.setenv("ICON_KERNELS_SYMMETRIC", backward_env)
    (loss * upstream).sum().backward()
    assert _counts() == (int(forward_env == "1"), int(backward_env == "1"))
    assert relative_error(x.grad, exact[1]) <= 1e-12


@pytest.mark.parametrize("where", ["x", "z"])
@pytest.mark.parametrize("bad", ["inf", "nan"])
def test_non_finite_inputs_as_the_plain_rows(monkeypatch, bad, where):
    """A NaN or infinite learned or target feature: every row's loss and gradient are what the plain
    joint rows give (NaN through log Z, or through a row's LSE^p)."""
    x, z, upstream = _inputs(9, 3)
    (x if where == "x" else z)[4, 1] = float(bad)
    target = affinity_target(z)
    options = dict(divergence="js", normalization="joint")
    monkeypatch.setenv("ICON_KERNELS_SYMMETRIC", "0")
    plain = run_loss(x, target, "gaussian", {"sigma": 1.0}, "cpu", upstream, **options)
    monkeypatch.delenv("ICON_KERNELS_SYMMETRIC")
    got = run_loss(x, target, "gaussian", {"sigma": 1.0}, "cpu", upstream, **options)
    assert _counts() == RAN
    for mine, theirs in zip(got, plain):
        torch.testing.assert_close(mine, theirs, equal_nan=True, rtol=1e-12, atol=1e-15)


def test_opcheck_of_the_ops():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(9, 4, generator=gen, dtype=F64)
    z = torch.randn(9, 3, generator=gen, dtype=F64)
    args = (x, x, torch.tensor(1.0, dtype=F64), "student_t", "affinity", None, None, None, None, z, z,
            torch.linspace(0.8, 1.6, 9, dtype=F64), "gaussian", None, 0.1, 0.0, True, 5, "joint", False)
    opcheck_on_both_paths(args, False, _counts, (1, 0), (0, 1))
