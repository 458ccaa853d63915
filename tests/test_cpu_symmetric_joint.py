"""The cpu backend's symmetric schedule for joint t-SNE (DESIGN.md §1.2-1.3,
csrc/cpu_symmetric_joint.h): a symmetrised Affinity target under joint normalisation in self mode,
where P_ij = P_ji and q_ij = q_ji, so each pair of row blocks is one Gram tile of x and one of z
and each pair's values serve both rows.

It must equal the plain joint rows (ICON_KERNELS_SYMMETRIC=0) and the dense reference to 1e-12 in
float64 with ragged blocks forced, keep fp32 within twice naive PyTorch's own error, pass
gradcheck and opcheck, and run exactly where it applies (_C.cpu_symmetric_counts():
"joint_forward", "joint_backward"; "joint_one_exp_sweeps" where a pair's two p come from one exp)."""
import itertools

import pytest
import torch

import icon_kernels as ik
from cases import relative_error
from symmetric_cases import (F32, F64, TILES, affinity_target, counts, fresh_schedule,  # noqa: F401
                             opcheck_on_both_paths)

pytestmark = pytest.mark.skipif("cpu" not in ik.available_backends(), reason="the cpu backend is not built")

LEARNED = (("student_t", {"dof": 1.0}), ("student_t", {"dof": 3.0}), ("gaussian", {"sigma": 1.3}),
           ("cosine", {"temperature": 0.5}), ("power", {"exponent": 2.0}))


def _counts():
    return counts("joint_forward", "joint_backward")


def _target(z, sigma=2.0, t_kernel="gaussian"):
    return affinity_target(z, t_kernel, sigma, symmetrize=True)


def _run(x0, target, kernel, params, backend, upstream, **options):
    """(row losses, dL/dx) of sum_i upstream_i L_i."""
    x = x0.detach().clone().requires_grad_()
    loss = ik.icon_loss(x, target=target, kernel=kernel, backend=backend, reduction="none",
                        normalization="joint", **params, **options)
    grad, = torch.autograd.grad(loss, [x], grad_outputs=upstream.to(loss.dtype))
    return [loss.detach(), grad]


def _close(got, want, tol):
    """Relative error within tol, or 1e-15 absolute: at N = 2 the loss and gradient are 0 (P = q =
    1/2), where the reference's rounding leaves 6e-17."""
    for g, w in zip(got, want):
        assert relative_error(g, w) <= tol or (g - w).abs().max() <= 1e-15, (relative_error(g, w), tol)


def _inputs(n, seed, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 5, generator=gen, dtype=dtype), torch.randn(n, 4, generator=gen, dtype=dtype),
            torch.rand(n, generator=gen, dtype=F64) + 0.5)


CASES = list(itertools.product(range(len(LEARNED)), (2, 7, 37), ("kl", "cross_entropy")))


@pytest.mark.parametrize("learned,n,divergence", CASES)
def test_float64_equals_the_plain_joint_rows_and_the_reference(monkeypatch, learned, n, divergence):
    kernel, params = LEARNED[learned]
    x, z, upstream = _inputs(n, n + learned)
    target = _target(z, torch.linspace(1.0, 2.5, n, dtype=F64))    # sigma_i per row (perplexity)
    want = _run(x, target, kernel, params, "reference", upstream, divergence=divergence)
    monkeypatch.setenv("ICON_KERNELS_SYMMETRIC", "0")
    plain = _run(x, target, kernel, params, "cpu", upstream, divergence=divergence)
    assert _counts() == (0, 0)
    monkeypatch.delenv("ICON_KERNELS_SYMMETRIC")
    for tile in TILES:
        monkeypatch.setenv("ICON_KERNELS_CPU_TILE_ELEMENTS", tile)
        got = _run(x, target, kernel, params, "cpu", upstream, divergence=divergence)
        assert _counts() == (1, 1), tile
        _close(got, want, 1e-12)
        _close(got, plain, 1e-12)


@pytest.mark.parametrize("t_kernel,per_row,n", [("student_t", True, 23), ("student_t", False, 23), ("power", True, 23),
                                                 ("log_dot", False, 23), ("student_t", True, 2)])
def test_nonlinear_target_kernels(monkeypatch, t_kernel, per_row, n):
    """Target kernels whose logits are not linear in the Gram term: each side of a pair takes its
    own row's logit (its parameter) from the shared Gram entry of z, in both passes and the
    backward (target_row_logits, pair_target_logits)."""
    x, z, upstream = _inputs(n, 13)
    if t_kernel == "log_dot":
        z = z.abs() + 0.1   # log(z_i . z_j) needs z_i . z_j > 0
    t_param = torch.linspace(0.6, 2.5, n, dtype=F64) if per_row else torch.tensor(1.4, dtype=F64)
    target = _target(z, t_param, t_kernel)
    want = _run(x, target, "student_t", {"dof": 1.0}, "reference", upstream)
    monkeypatch.setenv("ICON_KERNELS_CPU_TILE_ELEMENTS", "50")   # blocks of 5 rows
    got = _run(x, target, "student_t", {"dof": 1.0}, "cpu", upstream)
    assert _counts() == (1, 1)
    _close(got, want, 1e-12)


def test_a_dot_target_and_zero_upstream_gradients(monkeypatch):
    """Rows with g = 0 still move Z (their q): the centre C takes every row."""
    monkeypatch.setenv("ICON_KERNELS_CPU_TILE_ELEMENTS", "18")   # blocks of 3 rows
    n = 11
    x, z, upstream = _inputs(n, 7)
    upstream[[0, 4, 7]] = 0
    target = _target(z, 0.7, "cosine")
    want = _run(x, target, "student_t", {"dof": 1.0}, "reference", upstream)
    got = _run(x, target, "student_t", {"dof": 1.0}, "cpu", upstream)
    assert _counts() == (1, 1)
    _close(got, want, 1e-12)


def _counts_and_one_exp_sweeps():
    """(forward calls, backward calls, sweeps that took one exp per pair): one read, which resets
    every counter."""
    return counts("joint_forward", "joint_backward", "joint_one_exp_sweeps")


@pytest.mark.parametrize("sigma,outlier,divergence,sweeps", [
    (1.5, 0.0, "kl", 2), (1.5, 0.0, "cross_entropy", 2), ("per_row", 0.0, "kl", 0), (1.5, 100.0, "kl", 0)])
def test_one_exp_per_pair_where_the_target_logits_are_symmetric(monkeypatch, sigma, outlier, divergence, sweeps):
    """One target parameter for every row makes t_ij = t_ji: both sides' p of a pair come from one
    exp and the LSE factors (pair_factors), in the forward and the backward, unless the LSE^p
    range would overflow the factors (an outlier 100 away: LSE^p near -5000 against 1.4e3 in
    float64) or the parameter differs per row; each way equal to the reference and the plain
    rows."""
    n = 29
    x, z, upstream = _inputs(n, 17)
    z[3] += outlier
    if sigma == "per_row":
        sigma = torch.linspace(1.0, 2.0, n, dtype=F64)
    target = _target(z, sigma)
    want = _run(x, target, "student_t", {"dof": 1.0}, "reference", upstream, divergence=divergence)
    monkeypatch.setenv("ICON_KERNELS_SYMMETRIC", "0")
    plain = _run(x, target, "student_t", {"dof": 1.0}, "cpu", upstream, divergence=divergence)
    monkeypatch.delenv("ICON_KERNELS_SYMMETRIC")
    _counts()
    for tile in TILES:
        monkeypatch.setenv("ICON_KERNELS_CPU_TILE_ELEMENTS", tile)
        got = _run(x, target, "student_t", {"dof": 1.0}, "cpu", upstream, divergence=divergence)
        assert _counts_and_one_exp_sweeps() == (1, 1, sweeps)
        _close(got, want, 1e-12)
        _close(got, plain, 1e-12)


@pytest.mark.parametrize("learned,t_sigma,scale,sweeps", [(0, 0.05, 1.0, 0), (0, 1.0, 30.0, 2), (2, 0.3, 1.0, 2)])
def test_float32_huge_logits_within_twice_pytorchs_own_error(monkeypatch, learned, t_sigma, scale, sweeps):
    """sweeps: whether the pairs take one exp (pair_factors); at sigma 0.05 the LSE^p range
    exceeds float32's 160 e-folds."""
    kernel, params = LEARNED[learned]
    n = 40
    x, z, upstream = _inputs(n, 5)
    x, z = (scale * x).to(F32).double(), z.to(F32).double()
    want = _run(x, _target(z, t_sigma), kernel, params, "reference", upstream)
    naive = _run(x.float(), _target(z.float(), t_sigma), kernel, params, "reference", upstream)
    for tile in TILES:
        monkeypatch.setenv("ICON_KERNELS_CPU_TILE_ELEMENTS", tile)
        got = _run(x.float(), _target(z.float(), t_sigma), kernel, params, "cpu", upstream)
        assert _counts_and_one_exp_sweeps() == (1, 1, sweeps)
        for mine, theirs, exact in zip(got, naive, want):
            assert relative_error(mine, exact) <= 2 * relative_error(theirs, exact) + 2.4e-7


def test_gradcheck_with_ragged_blocks(monkeypatch):
    monkeypatch.setenv("ICON_KERNELS_CPU_TILE_ELEMENTS", "12")   # blocks of 2 rows, N = 7
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(7, 3, generator=gen, dtype=F64, requires_grad=True)
    z = torch.randn(7, 2, generator=gen, dtype=F64)
    for kernel, params in LEARNED:
        def f(x):
            return ik.icon_loss(x, target=_target(z, torch.linspace(0.7, 1.5, 7, dtype=F64)), kernel=kernel,
                                backend="cpu", reduction="none", normalization="joint", **params)
        assert torch.autograd.gradcheck(f, (x,))
    assert _counts()[1] > 0


def test_opcheck_of_the_joint_ops():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(9, 4, generator=gen, dtype=F64)
    z = torch.randn(9, 3, generator=gen, dtype=F64)
    args = (x, x, torch.tensor(1.0, dtype=F64), "student_t", "affinity", None, None, None, None, z, z,
            torch.linspace(0.8, 1.6, 9, dtype=F64), "gaussian", None, 0.0, 0.0, True, 0, "joint", True)
    opcheck_on_both_paths(args, False, _counts, (1, 0), (0, 1))


def test_runs_only_where_it_applies(monkeypatch):
    gen = torch.Generator().manual_seed(4)
    n = 12
    x = torch.randn(n, 4, generator=gen, dtype=F64, requires_grad=True)
    z = torch.randn(n, 3, generator=gen, dtype=F64)

    def ran(target=None, y=None, **kw):
        kw.setdefault("kernel", "student_t")
        kw.setdefault("normalization", "joint")
        ik.icon_loss(x, y, target=target or _target(z), backend="cpu", **kw).backward()
        return _counts()

    assert ran() == (1, 1)
    assert ran(y=x) == (1, 1)
    assert ran(divergence="cross_entropy") == (1, 1)
    assert ran(normalization="conditional") == (0, 0)
    assert ran(target=ik.Affinity(z, kernel="gaussian")) == (0, 0)          # not symmetrised
    assert ran(target=ik.Affinity(z, kernel="student_t", symmetrize=True)) == (1, 1)   # nonlinear
    assert ran(y=x.detach().clone()) == (0, 0)
    assert ran(alpha=0.1) == (0, 0)
    assert ran(beta=0.1) == (0, 0)
    assert ran(divergence="tv") == (0, 0)
    assert ran(kernel="gaussian", sigma=torch.linspace(0.5, 1.5, n, dtype=F64)) == (0, 0)
    assert ran(kernel="gaussian", sigma=torch.tensor(1.0, dtype=F64, requires_grad=True)) == (1, 0)
    monkeypatch.setenv("ICON_KERNELS_SYMMETRIC", "0")
    assert ran() == (0, 0)


@pytest.mark.parametrize("forward_env,backward_env", [
    ({"ICON_KERNELS_SYMMETRIC": "0"}, {"ICON_KERNELS_SYMMETRIC": "1"}),
    ({"ICON_KERNELS_SYMMETRIC": "1"}, {"ICON_KERNELS_SYMMETRIC": "0"}),
    ({"ICON_KERNELS_CPU_TILE_ELEMENTS": "200"}, {}),
])
def test_mixed_schedules_share_the_stats(monkeypatch, forward_env, backward_env):
    """The stats are the plain joint rows': either backward runs after either forward (the switch
    as it is at the backward), with the float64 result unchanged."""
    n = 30
    x0, z, upstream = _inputs(n, 8)
    target = _target(z, torch.linspace(1.0, 2.0, n, dtype=F64))
    want = _run(x0, target, "student_t", {"dof": 1.0}, "reference", upstream)
    x = x0.clone().requires_grad_()
    for key, value in forward_env.items():
        monkeypatch.setenv(key, value)
    loss = ik.icon_loss(x, target=target, kernel="student_t", backend="cpu", reduction="none",
                        normalization="joint")
    for key in forward_env:
        monkeypatch.delenv(key)
    for key, value in backward_env.items():
        monkeypatch.setenv(key, value)
    grad, = torch.autograd.grad(loss, [x], upstream)
    _close([loss.detach(), grad], want, 1e-12)


def test_the_joint_t_sne_preset_runs_it():
    gen = torch.Generator().manual_seed(3)
    emb = torch.randn(40, 2, generator=gen, dtype=F64, requires_grad=True)
    data = torch.randn(40, 6, generator=gen, dtype=F64)
    ik.JointTSNE(perplexity=10.0)(emb, data).backward()
    assert _counts() == (1, 1)
