"""The cpu backend's symmetric schedule for joint normalisation of Dense and Neighbors targets in
self mode (csrc/cpu_symmetric_label_family.h over csrc/cpu_target_segments.h, normalization
"joint"): P_ij = w_ij / (every row's total) against q_ij = e^{s_ij} / Z. P is not symmetric, but q
is: each pair of row blocks is one Gram tile, whose rows of I read their own target row over the
columns J and whose rows of J theirs over the columns I. The forward sweeps the tile pairs twice
(each row's LSE, then log Z and each row's terms under it), or once for forward KL and
cross-entropy without beta (each row's LSE and p-weighted logit sums, its loss under log Z after
the sweep), and the backward forms
H_ij = (1 - beta) (g_i q g_ij + g_j q g_ji - 2 q_ij C) from one recomputed tile. Its stats are the
plain joint rows', so either backward runs after either forward.

It must equal the plain schedule (ICON_KERNELS_SYMMETRIC=0) and the dense reference to 1e-12 in
float64 with ragged blocks forced, keep fp32 within twice the plain schedule's error, pass
gradcheck, and run exactly where it applies: _C.cpu_symmetric_counts() counts its calls
("target_family_forward", "..._backward")."""
import itertools

import pytest
import torch

import icon_kernels as ik
from cases import relative_error
from symmetric_cases import (F32, F64, PARAM, TILES, assert_close, fresh_schedule, named_counts,  # noqa: F401
                             opcheck_on_both_paths)
from test_cpu_symmetric_dense_neighbors import TARGETS

pytestmark = pytest.mark.skipif("cpu" not in ik.available_backends(), reason="the cpu backend is not built")

RAN = {"target_family_forward": 1, "target_family_backward": 1}
NOT_RAN = {"target_family_forward": 0, "target_family_backward": 0}
FORWARD_ONLY = {"target_family_forward": 1, "target_family_backward": 0}


def _counts():
    return named_counts(*RAN)


def _run(x0, target, kernel, backend, upstream, param=0.7, param_grad=False, **options):
    """(row losses, dL/dx[, dL/dparam]) of sum_i upstream_i L_i under joint normalisation."""
    x = x0.detach().clone().requires_grad_()
    p = torch.tensor(param, dtype=x0.dtype, requires_grad=param_grad)
    loss = ik.icon_loss(x, target=target, kernel=kernel, backend=backend, reduction="none", normalization="joint",
                        **{PARAM[kernel]: p}, **options)
    grads = torch.autograd.grad(loss, [x, p] if param_grad else [x], grad_outputs=upstream.to(loss.dtype))
    return [loss.detach(), *grads]


def _inputs(n, seed, d=5):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=F64)
    upstream = torch.rand(n, generator=gen, dtype=F64) + 0.5
    upstream[n // 2] = 0             # a row with zero upstream gradient: it still moves Z
    return x, upstream, gen


MIXES = (("kl", 0.0, 0.0), ("cross_entropy", 0.0, 0.0), ("kl", 0.2, 0.0), ("kl", 0.1, 0.3),
         ("cross_entropy", 0.0, 0.2), ("reverse_kl", 0.1, 0.0), ("tv", 0.0, 0.0), ("js", 0.1, 0.2),
         ("chi2", 0.1, 0.1), ("hellinger", 0.0, 0.1))
CASES = [(t, k, n, excl, *mix) for t, k, n, excl, mix in itertools.product(
    TARGETS, ("dot", "gaussian", "cosine", "student_t", "power"), (2, 7, 23), (True, False), MIXES)
    if not (k == "power" and not excl) and (n != 2 or mix in MIXES[:3])]   # (power: the dense_neighbors note)


@pytest.mark.parametrize("target,kernel,n,exclude_self,divergence,alpha,beta", CASES)
def test_float64_equals_the_plain_schedule_and_the_reference(monkeypatch, target, kernel, n, exclude_self,
                                                               divergence, alpha, beta):
    x, upstream, gen = _inputs(n, n)
    tgt = TARGETS[target](n, gen)
    param = 1.0 if kernel == "student_t" else 0.7
    options = dict(param=param, alpha=alpha, beta=beta, divergence=divergence, exclude_self=exclude_self)
    want = _run(x, tgt, kernel, "reference", upstream, **options)
    monkeypatch.setenv("ICON_KERNELS_SYMMETRIC", "0")
    plain = _run(x, tgt, kernel, "cpu", upstream, **options)
    assert _counts() == NOT_RAN
    monkeypatch.delenv("ICON_KERNELS_SYMMETRIC")
    for tile in TILES:
        monkeypatch.setenv("ICON_KERNELS_CPU_TILE_ELEMENTS", tile)
        got = run = _run(x, tgt, kernel, "cpu", upstream, **options)
        assert _counts() == RAN, tile
        assert run[0].isfinite().all()
        assert_close(got, want, 1e-12, atol=1e-15)
        assert_close(got, plain, 1e-12, atol=1e-15)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("kernel,param,scale", [("dot", 0.05, 3.0), ("gaussian", 0.5, 1.0),
                                                ("student_t", 1.0, 3.0), ("power", 2.0, 1.0)])
@pytest.mark.parametrize("divergence,alpha,beta", [("kl", 0.0, 0.0), ("cross_entropy", 0.1, 0.0),
                                                   ("kl", 0.1, 0.2), ("js", 0.1, 0.0)])
def test_float32_within_twice_the_plain_schedules_error(monkeypatch, target, kernel, param, scale, divergence,
                                                        alpha, beta):
    """Logits up to 1e3, q under log Z rounded to float32 in both schedules."""
    gen = torch.Generator().manual_seed(5)
    n = 60
    x = (scale * torch.randn(n, 16, generator=gen, dtype=F64)).to(F32).double()
    upstream = torch.rand(n, generator=gen, dtype=F64) + 0.5
    tgt64 = TARGETS[target](n, gen, k=15) if target == "neighbors" else TARGETS[target](n, gen)
    tgt32 = (ik.Neighbors(tgt64.indices, tgt64.weights.float()) if target == "neighbors"
             else ik.Dense(tgt64.p.float()))
    options = dict(param=param, divergence=divergence, alpha=alpha, beta=beta)
    exact = _run(x, tgt64, kernel, "reference", upstream, **options)
    monkeypatch.setenv("ICON_KERNELS_SYMMETRIC", "0")
    plain = _run(x.float(), tgt32, kernel, "cpu", upstream, **options)
    monkeypatch.delenv("ICON_KERNELS_SYMMETRIC")
    for tile in ("800", ""):
        monkeypatch.setenv("ICON_KERNELS_CPU_TILE_ELEMENTS", tile)
        got = _run(x.float(), tgt32, kernel, "cpu", upstream, **options)
        assert _counts() == RAN
        for mine, ours, want in zip(got, plain, exact):
            assert relative_error(mine, want) <= 2 * relative_error(ours, want) + 2.4e-7


@pytest.mark.parametrize("target,kernel,options", [
    ("neighbors", "student_t", dict()), ("neighbors", "gaussian", dict(alpha=0.1, beta=0.2)),
    ("dense", "dot", dict(divergence="tv", alpha=0.1)), ("dense", "power", dict(divergence="js", beta=0.1)),
    ("neighbors", "cosine", dict(divergence="hellinger", alpha=0.2))])
def test_gradcheck_with_ragged_blocks(monkeypatch, target, kernel, options):
    monkeypatch.setenv("ICON_KERNELS_CPU_TILE_ELEMENTS", "12")   # blocks of 2 rows, N = 7
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(7, 3, generator=gen, dtype=F64, requires_grad=True)
    tgt = TARGETS[target](7, gen)

    def f(x):
        return ik.icon_loss(x, target=tgt, kernel=kernel, backend="cpu", reduction="none", normalization="joint",
                            **{PARAM[kernel]: 1.3}, **options)
    assert torch.autograd.gradcheck(f, (x,))
    assert _counts()["target_family_backward"] > 0


def test_runs_only_where_it_applies(monkeypatch):
    """Self mode, joint normalisation, a Dense or Neighbors target, one scalar parameter and any
    kernel but log_dot. The learned parameter's gradient and a y that is not x's autograd input run
    the plain joint backward after this forward (its stats are the plain ones; the cpu backend
    computes no weight gradient under joint normalisation)."""
    gen = torch.Generator().manual_seed(4)
    n = 12
    x = torch.randn(n, 4, generator=gen, dtype=F64, requires_grad=True)
    nbr = ik.Neighbors(torch.randint(0, n, (n, 3), generator=gen))

    def ran(**kw):
        y = kw.pop("y", None)
        target = kw.pop("target", nbr)
        ik.icon_loss(x, y, target=target, backend="cpu", normalization="joint", **kw).backward()
        return _counts()

    assert ran(kernel="student_t") == RAN
    assert ran(kernel="dot", divergence="tv") == RAN
    assert ran(kernel="gaussian", target=ik.Dense(torch.rand(n, n, generator=gen, dtype=F64))) == RAN
    assert ran(kernel="cosine", y=x, exclude_self=True, beta=0.2) == RAN
    assert ran(kernel="gaussian", sigma=torch.tensor(0.8, dtype=F64, requires_grad=True)) == FORWARD_ONLY
    assert ran(kernel="dot", y=x.detach().clone(), exclude_self=True) == NOT_RAN
    assert ran(kernel="dot", temperature=torch.linspace(0.3, 0.6, n, dtype=F64)) == NOT_RAN
    phi = torch.softmax(torch.randn(n, 3, generator=gen, dtype=F64), dim=1).requires_grad_()
    ik.icon_loss(phi, target=nbr, kernel="log_dot", backend="cpu", normalization="joint").backward()
    assert _counts() == NOT_RAN
    monkeypatch.setenv("ICON_KERNELS_SYMMETRIC", "0")
    assert ran(kernel="student_t") == NOT_RAN


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("what", ["param", "y_detached"])
def test_the_plain_backward_after_this_forward(target, what):
    """What this backward does not compute (the learned parameter's gradient, or dL/dx of the row
    side alone) runs the plain joint backward on this forward's stats."""
    x0, upstream, gen = _inputs(11, 8, d=4)
    tgt = TARGETS[target](11, gen)
    weights = tgt.weights if target == "neighbors" else tgt.p
    grads = []
    for backend in ("cpu", "reference"):
        x = x0.clone().requires_grad_()
        w = weights.clone()
        sigma = torch.tensor(0.9, dtype=F64, requires_grad=what == "param")
        t = ik.Neighbors(tgt.indices, w) if target == "neighbors" else ik.Dense(w)
        y = x.detach() if what == "y_detached" else None
        loss = ik.icon_loss(x, y, target=t, kernel="gaussian", sigma=sigma, alpha=0.1, backend=backend,
                            reduction="none", normalization="joint", exclude_self=True, divergence="js")
        wrt = [x] + [v for v in (sigma,) if v.requires_grad]
        grads.append(torch.autograd.grad(loss, wrt, upstream))
    assert _counts() == FORWARD_ONLY
    for mine, want in zip(*grads):
        assert relative_error(mine, want) <= 1e-12


@pytest.mark.parametrize("divergence", ["js", "kl"])
@pytest.mark.parametrize("forward_env,backward_env", [("0", "1"), ("1", "0")])
def test_either_backward_after_either_forward(monkeypatch, forward_env, backward_env, divergence):
    """The stats are the plain joint rows' (log Z, Gamma_i, 0, the row's share of q; KL's one
    sweep: Gamma_i = -sum_j p~, as the plain rows put under log Z): the switch at the backward
    decides which backward runs."""
    x0, upstream, gen = _inputs(30, 2, d=4)
    tgt = TARGETS["neighbors"](30, gen)
    exact = _run(x0, tgt, "student_t", "reference", upstream, param=1.0, divergence=divergence)
    x = x0.clone().requires_grad_()
    monkeypatch.setenv("ICON_KERNELS_SYMMETRIC", forward_env)
    loss = ik.icon_loss(x, target=tgt, kernel="student_t", dof=1.0, backend="cpu", reduction="none",
                        normalization="joint", divergence=divergence)
    monkeypatch.setenv("ICON_KERNELS_SYMMETRIC", backward_env)
    (loss * upstream).sum().backward()
    assert _counts() == {"target_family_forward": int(forward_env == "1"),
                         "target_family_backward": int(backward_env == "1")}
    assert relative_error(x.grad, exact[1]) <= 1e-12


@pytest.mark.parametrize("target", TARGETS)
def test_a_target_without_any_weight(target):
    """Every weight 0: no row has a target, so every row is left out (loss 0, no gradient), as the
    plain joint rows leave them."""
    x0, upstream, gen = _inputs(9, 3, d=4)
    tgt = TARGETS[target](9, gen)
    tgt = ik.Neighbors(tgt.indices, torch.zeros_like(tgt.weights)) if target == "neighbors" \
        else ik.Dense(torch.zeros_like(tgt.p))
    want = _run(x0, tgt, "gaussian", "reference", upstream, divergence="tv")
    got = _run(x0, tgt, "gaussian", "cpu", upstream, divergence="tv")
    assert _counts() == RAN
    assert torch.equal(got[0], torch.zeros(9, dtype=F64))
    assert_close(got, want, 1e-12, atol=1e-15)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("bad", ["feature", "weight"])
def test_non_finite_inputs_as_the_plain_schedule(monkeypatch, target, bad):
    """A NaN feature or weight: the non-finite losses and gradients where the plain joint rows have
    them, equal values elsewhere."""
    x, upstream, gen = _inputs(9, 9, d=4)
    tgt = TARGETS[target](9, gen)
    if bad == "feature":
        x[3, 1] = float("nan")
    elif target == "neighbors":
        tgt.weights[5, 1] = float("nan")
    else:
        tgt.p[5, 2] = float("nan")
    for kernel, options in (("gaussian", dict(beta=0.2)), ("student_t", dict(param=1.0)), ("dot", dict(alpha=0.1))):
        monkeypatch.setenv("ICON_KERNELS_SYMMETRIC", "0")
        plain = _run(x, tgt, kernel, "cpu", upstream, **options)
        monkeypatch.delenv("ICON_KERNELS_SYMMETRIC")
        monkeypatch.setenv("ICON_KERNELS_CPU_TILE_ELEMENTS", "18")
        got = _run(x, tgt, kernel, "cpu", upstream, **options)
        assert _counts() == RAN
        for g, p in zip(got, plain):
            assert torch.equal(g.isnan(), p.isnan())
            assert torch.allclose(g, p, rtol=1e-12, atol=0, equal_nan=True)


@pytest.mark.parametrize("target", TARGETS)
def test_opcheck_of_the_ops(target):
    from test_cpu_symmetric_dense_neighbors import op_args
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(9, 4, generator=gen, dtype=F64)
    args = op_args(TARGETS[target](9, gen), x, "joint", 5)
    opcheck_on_both_paths(args, False, _counts, FORWARD_ONLY, {"target_family_forward": 0, "target_family_backward": 1})
