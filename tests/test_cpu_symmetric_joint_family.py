"""The cpu backend's symmetric schedule for the rest of joint normalisation on a symmetrised
Affinity target (DESIGN.md §1.2-1.3, csrc/cpu_symmetric_joint_family.h): van der Maaten's P under
an f-divergence, or KL / cross-entropy with alpha or beta > 0, in self mode. Each pair of row
blocks is one Gram tile of x and one of z, read by the rows of both sides.

It must equal the plain joint rows (ICON_KERNELS_SYMMETRIC=0) and the dense reference to 1e-12 in
float64 with ragged blocks forced, keep fp32 within twice naive PyTorch's own error, pass
gradcheck and opcheck, share its stats with the plain joint rows (whose backward computes the
learned parameter's gradient after this forward), and run exactly where it applies (_C.cpu_symmetric_counts(): "joint_family_forward",
"joint_family_backward")."""
import itertools

import pytest
import torch

import icon_kernels as ik
from cases import relative_error
from symmetric_cases import (F32, F64, TILES, affinity_target, counts, fresh_schedule,  # noqa: F401
                             opcheck_on_both_paths)
from icon_kernels.families import DIVERGENCES

pytestmark = pytest.mark.skipif("cpu" not in ik.available_backends(), reason="the cpu backend is not built")

LEARNED = (("student_t", {"dof": 1.0}), ("student_t", {"dof": 3.0}), ("gaussian", {"sigma": 1.3}),
           ("cosine", {"temperature": 0.5}), ("dot", {"temperature": 2.0}), ("power", {"exponent": 2.0}))
# (divergence, alpha, beta): the f-divergences, and KL / cross-entropy with a mixture
OBJECTIVES = (("reverse_kl", 0.0, 0.0), ("tv", 0.0, 0.0), ("hellinger", 0.0, 0.0), ("js", 0.0, 0.0),
              ("chi2", 0.0, 0.0), ("js", 0.1, 0.2), ("kl", 0.1, 0.0), ("kl", 0.0, 0.2), ("cross_entropy", 0.1, 0.1))


def _counts():
    return counts("joint_family_forward", "joint_family_backward")


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
    for g, w in zip(got, want):
        assert relative_error(g, w) <= tol or (g - w).abs().max() <= 1e-15, (relative_error(g, w), tol)


def _inputs(n, seed, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    upstream = torch.rand(n, generator=gen, dtype=F64) + 0.5
    upstream[n // 3] = 0   # a row with no upstream gradient still moves Z
    return (torch.randn(n, 5, generator=gen, dtype=dtype), torch.randn(n, 4, generator=gen, dtype=dtype), upstream)


def _check(monkeypatch, x, target, kernel, params, upstream, tol=1e-12, **options):
    want = _run(x, target, kernel, params, "reference", upstream, **options)
    monkeypatch.setenv("ICON_KERNELS_SYMMETRIC", "0")
    plain = _run(x, target, kernel, params, "cpu", upstream, **options)
    assert _counts() == (0, 0)
    monkeypatch.delenv("ICON_KERNELS_SYMMETRIC")
    for tile in TILES:
        monkeypatch.setenv("ICON_KERNELS_CPU_TILE_ELEMENTS", tile)
        got = _run(x, target, kernel, params, "cpu", upstream, **options)
        assert _counts() == (1, 1), tile
        _close(got, want, tol)
        _close(got, plain, tol)


@pytest.mark.parametrize("objective,n", list(itertools.product(range(len(OBJECTIVES)), (2, 23))))
def test_float64_every_objective_equals_the_plain_joint_rows_and_the_reference(monkeypatch, objective, n):
    divergence, alpha, beta = OBJECTIVES[objective]
    x, z, upstream = _inputs(n, n + objective)
    target = _target(z, torch.linspace(1.0, 2.5, n, dtype=F64))   # sigma_i per row (perplexity)
    _check(monkeypatch, x, target, "student_t", {"dof": 1.0}, upstream, divergence=divergence, alpha=alpha, beta=beta)


@pytest.mark.parametrize("learned,divergence", list(itertools.product(range(len(LEARNED)), ("js", "tv"))))
def test_float64_every_learned_kernel(monkeypatch, learned, divergence):
    kernel, params = LEARNED[learned]
    x, z, upstream = _inputs(19, 3 + learned)
    _check(monkeypatch, x, _target(z, 1.7), kernel, params, upstream, divergence=divergence, beta=0.1)


@pytest.mark.parametrize("t_kernel,per_row", [("student_t", True), ("student_t", False), ("power", True),
                                              ("log_dot", False), ("cosine", True)])
def test_float64_every_target_kernel(monkeypatch, t_kernel, per_row):
    """Each side of a pair takes p_{j|i} under row i's parameter and p_{i|j} under row j's
    (other_target_logits)."""
    n = 21
    x, z, upstream = _inputs(n, 11)
    if t_kernel == "log_dot":
        z = z.abs() + 0.1   # log(z_i . z_j) needs z_i . z_j > 0
    t_param = torch.linspace(0.6, 2.5, n, dtype=F64) if per_row else torch.tensor(1.4, dtype=F64)
    _check(monkeypatch, x, _target(z, t_param, t_kernel), "student_t", {"dof": 1.0}, upstream, divergence="js")


@pytest.mark.parametrize("learned", [0, 2, 3, 4])
def test_float64_with_the_self_pair_kept(monkeypatch, learned):
    """The self pair is one entry of the diagonal tile: H_ii = 2 G_ii (a distance kernel's is 0).
    (Not the power kernel: the symmetric schedules make its d_ii^2 exactly 0, the plain rows and
    the reference keep the Gram's rounding, which log(d^2 + eps) turns into 1e-4 of the loss.)"""
    kernel, params = LEARNED[learned]
    x, z, upstream = _inputs(17, 5)
    _check(monkeypatch, x, _target(z, 1.5), kernel, params, upstream, divergence="hellinger", beta=0.1,
           exclude_self=False)


@pytest.mark.parametrize("sigma,outlier,divergence,alpha,sweeps", [
    (1.5, 0.0, "js", 0.0, 2), (1.5, 0.0, "tv", 0.1, 2), (1.5, 0.0, "kl", 0.1, 2), ("per_row", 0.0, "js", 0.0, 0),
    (1.5, 100.0, "js", 0.0, 0)])
def test_one_exp_per_pair_where_the_target_logits_are_symmetric(monkeypatch, sigma, outlier, divergence, alpha,
                                                                sweeps):
    """One target parameter for every row: log P from one log1p per pair and the LSE factors
    (pair_factors), in pass 2 and the backward, unless the LSE^p range would overflow them (an
    outlier 100 away) or the parameter differs per row; alpha > 0 (log of the mixture) too."""
    n = 23
    x, z, upstream = _inputs(n, 21)
    z[4] += outlier
    if sigma == "per_row":
        sigma = torch.linspace(1.0, 2.0, n, dtype=F64)
    options = {"divergence": divergence, "alpha": alpha}
    target = _target(z, sigma)
    want = _run(x, target, "student_t", {"dof": 1.0}, "reference", upstream, **options)
    for tile in TILES:
        monkeypatch.setenv("ICON_KERNELS_CPU_TILE_ELEMENTS", tile)
        got = _run(x, target, "student_t", {"dof": 1.0}, "cpu", upstream, **options)
        assert counts("joint_family_forward", "joint_family_backward", "joint_one_exp_sweeps") == (1, 1, sweeps)
        _close(got, want, 1e-12)


@pytest.mark.parametrize("divergence,t_sigma,scale", [("js", 0.3, 1.0), ("tv", 1.0, 20.0), ("kl", 0.5, 1.0)])
def test_float32_within_twice_pytorchs_own_error(monkeypatch, divergence, t_sigma, scale):
    n = 40
    x, z, upstream = _inputs(n, 5)
    x, z = (scale * x).to(F32).double(), z.to(F32).double()
    options = {"divergence": divergence, "beta": 0.1 if divergence == "kl" else 0.0}
    want = _run(x, _target(z, t_sigma), "student_t", {"dof": 1.0}, "reference", upstream, **options)
    naive = _run(x.float(), _target(z.float(), t_sigma), "student_t", {"dof": 1.0}, "reference", upstream, **options)
    for tile in TILES:
        monkeypatch.setenv("ICON_KERNELS_CPU_TILE_ELEMENTS", tile)
        got = _run(x.float(), _target(z.float(), t_sigma), "student_t", {"dof": 1.0}, "cpu", upstream, **options)
        assert _counts() == (1, 1)
        for mine, theirs, exact in zip(got, naive, want):
            assert relative_error(mine, exact) <= 2 * relative_error(theirs, exact) + 2.4e-7


def test_gradcheck_with_ragged_blocks(monkeypatch):
    monkeypatch.setenv("ICON_KERNELS_CPU_TILE_ELEMENTS", "12")   # blocks of 2 rows, N = 7
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(7, 3, generator=gen, dtype=F64, requires_grad=True)
    z = torch.randn(7, 2, generator=gen, dtype=F64)
    target = _target(z, torch.linspace(0.7, 1.5, 7, dtype=F64))
    for kernel, params in LEARNED:
        for divergence, beta in (("js", 0.0), ("chi2", 0.0), ("kl", 0.2)):
            def f(x):
                return ik.icon_loss(x, target=target, kernel=kernel, backend="cpu", reduction="none",
                                    normalization="joint", divergence=divergence, beta=beta, **params)
            assert torch.autograd.gradcheck(f, (x,))
            forward, backward = _counts()
            assert forward > 0 and backward > 0


def test_gradcheck_of_the_learned_parameter_after_this_forward(monkeypatch):
    """The learned parameter's gradient runs the plain backward on this forward's stats."""
    monkeypatch.setenv("ICON_KERNELS_CPU_TILE_ELEMENTS", "12")
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(7, 3, generator=gen, dtype=F64, requires_grad=True)
    z = torch.randn(7, 2, generator=gen, dtype=F64)
    sigma = torch.tensor(1.2, dtype=F64, requires_grad=True)
    target = _target(z, torch.linspace(0.7, 1.5, 7, dtype=F64))

    def f(x, sigma):
        return ik.icon_loss(x, target=target, kernel="gaussian", sigma=sigma, backend="cpu", reduction="none",
                            normalization="joint", divergence="tv", beta=0.1)
    assert torch.autograd.gradcheck(f, (x, sigma))
    forward, backward = _counts()
    assert forward > 0 and backward == 0


def test_the_learned_parameter_gradient_equals_the_reference(monkeypatch):
    monkeypatch.setenv("ICON_KERNELS_CPU_TILE_ELEMENTS", "50")
    n = 23
    x, z, upstream = _inputs(n, 9)
    target = _target(z, 1.6)
    grads = []
    for backend in ("reference", "cpu"):
        sigma = torch.tensor(1.3, dtype=F64, requires_grad=True)
        loss = ik.icon_loss(x, target=target, kernel="gaussian", sigma=sigma, backend=backend, reduction="none",
                            normalization="joint", divergence="tv", beta=0.1)
        grads.append(torch.autograd.grad(loss, [sigma], upstream)[0])
    assert _counts() == (1, 0)   # (the plain backward, on this forward's stats)
    assert relative_error(grads[1], grads[0]) <= 1e-12


def test_opcheck_of_the_joint_family_ops():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(9, 4, generator=gen, dtype=F64)
    z = torch.randn(9, 3, generator=gen, dtype=F64)
    js = DIVERGENCES["js"].code
    args = (x, x, torch.tensor(1.0, dtype=F64), "student_t", "affinity", None, None, None, None, z, z,
            torch.linspace(0.8, 1.6, 9, dtype=F64), "gaussian", None, 0.0, 0.1, True, js, "joint", True)
    opcheck_on_both_paths(args, False, _counts, (1, 0), (0, 1))


def test_runs_only_where_it_applies(monkeypatch):
    gen = torch.Generator().manual_seed(4)
    n = 12
    x = torch.randn(n, 4, generator=gen, dtype=F64, requires_grad=True)
    z = torch.randn(n, 3, generator=gen, dtype=F64)

    def ran(target=None, y=None, **kw):
        kw.setdefault("kernel", "student_t")
        kw.setdefault("normalization", "joint")
        kw.setdefault("divergence", "js")
        ik.icon_loss(x, y, target=target or _target(z), backend="cpu", **kw).backward()
        return _counts()

    assert ran() == (1, 1)
    assert ran(y=x) == (1, 1)
    assert ran(divergence="tv", alpha=0.2) == (1, 1)
    assert ran(divergence="kl", beta=0.1) == (1, 1)
    assert ran(divergence="kl") == (0, 0)                                   # joint t-SNE's own schedule
    assert ran(normalization="conditional") == (0, 0)                       # a conditional symmetrised target
    assert ran(target=ik.Affinity(z, kernel="gaussian")) == (0, 0)          # not symmetrised
    assert ran(y=x.detach().clone()) == (0, 0)
    positive = (x.detach().abs() + 0.1).requires_grad_()
    ik.icon_loss(positive, target=_target(z), kernel="log_dot", backend="cpu", normalization="joint",
                 divergence="js").backward()
    assert _counts() == (0, 0)                                              # log_dot: not this schedule
    assert ran(kernel="gaussian", sigma=torch.linspace(0.5, 1.5, n, dtype=F64)) == (0, 0)
    assert ran(kernel="gaussian", sigma=torch.tensor(1.0, dtype=F64, requires_grad=True)) == (1, 0)
    zg = z.clone().requires_grad_()
    with pytest.raises(ValueError, match="symmetrize=True"):   # (the Python layer's rule, unchanged)
        ran(target=_target(zg))
    assert _counts() == (0, 0)
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
    options = {"divergence": "js", "beta": 0.1}
    want = _run(x0, target, "student_t", {"dof": 1.0}, "reference", upstream, **options)
    x = x0.clone().requires_grad_()
    for key, value in forward_env.items():
        monkeypatch.setenv(key, value)
    loss = ik.icon_loss(x, target=target, kernel="student_t", backend="cpu", reduction="none",
                        normalization="joint", **options)
    for key in forward_env:
        monkeypatch.delenv(key)
    for key, value in backward_env.items():
        monkeypatch.setenv(key, value)
    grad, = torch.autograd.grad(loss, [x], upstream)
    _close([loss.detach(), grad], want, 1e-12)


def test_the_joint_t_sne_preset_with_another_divergence_runs_it():
    gen = torch.Generator().manual_seed(3)
    emb = torch.randn(40, 2, generator=gen, dtype=F64, requires_grad=True)
    data = torch.randn(40, 6, generator=gen, dtype=F64)
    ik.JointTSNE(perplexity=10.0, divergence="js")(emb, data).backward()
    assert _counts() == (1, 1)


# --- joint normalisation of a Labels target: P_ij = [y_i = y_j] / (the positive pairs), symmetric too

def _labels(n, classes, seed):
    return torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(seed))


# reverse KL needs alpha > 0 against labels (p = 0 off the positives); KL and cross-entropy with
# alpha = beta = 0 take this schedule too
LABEL_OBJECTIVES = (("reverse_kl", 0.1, 0.0), ("kl", 0.0, 0.0), ("cross_entropy", 0.0, 0.0)) + OBJECTIVES[1:]


@pytest.mark.parametrize("objective,n", list(itertools.product(range(len(LABEL_OBJECTIVES)), (2, 23))))
def test_float64_labels_every_objective(monkeypatch, objective, n):
    divergence, alpha, beta = LABEL_OBJECTIVES[objective]
    x, _, upstream = _inputs(n, 30 + objective)
    _check(monkeypatch, x, ik.Labels(_labels(n, 3, objective)), "gaussian", {"sigma": 1.2}, upstream,
           divergence=divergence, alpha=alpha, beta=beta)


@pytest.mark.parametrize("learned,divergence", list(itertools.product(range(len(LEARNED)), ("kl", "tv"))))
def test_float64_labels_every_learned_kernel(monkeypatch, learned, divergence):
    kernel, params = LEARNED[learned]
    x, _, upstream = _inputs(19, 40 + learned)
    _check(monkeypatch, x, ik.Labels(_labels(19, 4, learned)), kernel, params, upstream, divergence=divergence,
           beta=0.1 if divergence == "tv" else 0.0)


@pytest.mark.parametrize("exclude_self", [True, False])
def test_float64_labels_singletons_and_the_self_pair(monkeypatch, exclude_self):
    """Classes of one row (no positive without the self pair) and the self pair kept (a positive)."""
    n = 13
    x, _, upstream = _inputs(n, 50)
    labels = torch.arange(n) // 3
    labels[-1] = 99   # a class of one
    _check(monkeypatch, x, ik.Labels(labels), "dot", {"temperature": 0.7}, upstream, divergence="js",
           exclude_self=exclude_self)


def test_float32_labels_within_twice_pytorchs_own_error(monkeypatch):
    n = 40
    x, _, upstream = _inputs(n, 5)
    x = (8.0 * x).to(F32).double()
    target = ik.Labels(_labels(n, 5, 1))
    options = {"divergence": "js", "beta": 0.1, "kernel": "dot", "temperature": 0.1}
    def run(xx, backend):
        xx = xx.detach().clone().requires_grad_()
        loss = ik.icon_loss(xx, target=target, backend=backend, reduction="none", normalization="joint", **options)
        return [loss.detach(), torch.autograd.grad(loss, [xx], upstream.to(loss.dtype))[0]]
    want, naive = run(x, "reference"), run(x.float(), "reference")
    for tile in TILES:
        monkeypatch.setenv("ICON_KERNELS_CPU_TILE_ELEMENTS", tile)
        got = run(x.float(), "cpu")
        assert _counts() == (1, 1)
        for mine, theirs, exact in zip(got, naive, want):
            assert relative_error(mine, exact) <= 2 * relative_error(theirs, exact) + 2.4e-7


def test_labels_gradcheck_and_where_it_runs(monkeypatch):
    monkeypatch.setenv("ICON_KERNELS_CPU_TILE_ELEMENTS", "12")
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(7, 3, generator=gen, dtype=F64, requires_grad=True)
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 2])

    def f(x):
        return ik.icon_loss(x, target=ik.Labels(labels), kernel="gaussian", backend="cpu", reduction="none",
                            normalization="joint", divergence="hellinger", beta=0.2)
    assert torch.autograd.gradcheck(f, (x,))
    forward, backward = _counts()
    assert forward > 0 and backward > 0
    monkeypatch.delenv("ICON_KERNELS_CPU_TILE_ELEMENTS")

    def ran(**kw):
        kw.setdefault("target", ik.Labels(labels))
        ik.icon_loss(x, backend="cpu", normalization="joint", kernel="dot", **kw).backward()
        return _counts()
    assert ran() == (1, 1)                                                          # KL: this schedule too
    assert ran(divergence="tv", alpha=0.1) == (1, 1)
    assert ran(target=ik.Labels(labels, labels.roll(1)), y=x) == (0, 0)           # other column labels
    assert ran(target=ik.Labels(labels, labels.clone()), y=x) == (1, 1)           # equal values
