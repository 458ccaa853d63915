"""The cpu backend's symmetric schedule for Dense and Neighbors targets in self mode
(csrc/cpu_symmetric_label_family.h over csrc/cpu_target_segments.h): each pair of row blocks is one
Gram tile, whose rows of I read their own target row over the columns J and whose rows of J read
theirs over the columns I; the forward sweeps the tile pairs once (forward KL and cross-entropy
without beta: a closed form of the LSE and the p-weighted logit sums, csrc/cpu_symmetric_target_kl.h;
t-SNE's Cauchy kernel from reciprocals) or twice (every other divergence, alpha, beta), and the
backward forms H = W_IJ + W_JI^T from one recomputed tile.

It must equal the plain schedule (ICON_KERNELS_SYMMETRIC=0) and the dense reference to 1e-12 in
float64 with ragged blocks forced (ICON_KERNELS_CPU_TILE_ELEMENTS), keep fp32 within twice the
plain schedule's error, pass gradcheck, and run exactly where it applies:
_C.cpu_symmetric_counts() counts its calls ("target_family_forward", "..._backward")."""
import itertools

import pytest
import torch

import icon_kernels as ik
from cases import relative_error
from symmetric_cases import F32, F64, PARAM, TILES, fresh_schedule, named_counts, opcheck_on_both_paths  # noqa: F401

pytestmark = pytest.mark.skipif("cpu" not in ik.available_backends(), reason="the cpu backend is not built")

RAN = {"target_family_forward": 1, "target_family_backward": 1}
NOT_RAN = {"target_family_forward": 0, "target_family_backward": 0}


def _counts():
    return named_counts(*RAN)


def _neighbors(n, gen, dtype=F64, k=4):
    """Indices with repeats, self entries and -1 padding, positive and zero weights; row 1 has only
    zero weights (left out) where N > 2."""
    idx = torch.randint(0, n, (n, k), generator=gen)
    idx[:, 0] = torch.arange(n)                      # a self entry in every row
    if k > 2:
        idx[:, 2] = idx[:, 1]                        # a repeat
    if k > 3:
        idx[::3, 3] = -1                             # padding
    w = torch.rand(n, k, generator=gen, dtype=dtype) + 0.1
    w[::4, 1] = 0                                    # a zero weight
    if n > 2:
        w[1] = 0                                     # a row without weight
    return ik.Neighbors(idx, w)


def _dense(n, gen, dtype=F64):
    """Weights with zeros; row 1 all zero (left out) where N > 2."""
    p = torch.rand(n, n, generator=gen, dtype=dtype)
    p = torch.where(p < 0.3, torch.zeros((), dtype=dtype), p)
    if n > 2:
        p[1] = 0
    return ik.Dense(p)


TARGETS = {"neighbors": _neighbors, "dense": _dense}


def _run(x0, target, kernel, backend, upstream, param=0.7, param_grad=True, **options):
    """(row losses, dL/dx[, dL/dparam]) of sum_i upstream_i L_i."""
    x = x0.detach().clone().requires_grad_()
    p = torch.tensor(param, dtype=x0.dtype, requires_grad=param_grad)
    loss = ik.icon_loss(x, target=target, kernel=kernel, backend=backend, reduction="none",
                        **{PARAM[kernel]: p}, **options)
    grads = torch.autograd.grad(loss, [x, p] if param_grad else [x], grad_outputs=upstream.to(loss.dtype))
    return [loss.detach(), *grads]


def _close(got, want, tol):
    for g, w in zip(got, want):
        assert relative_error(g, w) <= tol + 1e-15 * (w.abs().max().item() == 0), (relative_error(g, w), tol)


def _inputs(n, seed, d=5):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=F64)
    upstream = torch.rand(n, generator=gen, dtype=F64) + 0.5
    upstream[n // 2] = 0                             # a row with zero upstream gradient
    return x, upstream, gen


# (divergence, alpha, beta): the one sweep (KL, cross-entropy without beta) and the two sweeps
MIXES = (("kl", 0.0, 0.0), ("kl", 0.2, 0.0), ("cross_entropy", 0.0, 0.0), ("kl", 0.1, 0.3),
         ("cross_entropy", 0.0, 0.2), ("reverse_kl", 0.1, 0.0), ("tv", 0.0, 0.0), ("js", 0.1, 0.2),
         ("chi2", 0.1, 0.1), ("hellinger", 0.0, 0.1))
CASES = [(t, k, n, excl, *mix) for t, k, n, excl, mix in itertools.product(
    TARGETS, ("dot", "gaussian", "cosine", "student_t", "power"), (2, 7, 23), (True, False), MIXES)
    if not (k == "power" and not excl)]   # the power kernel's kept self pair: d^2 is rounding noise on
# the plain path (see test_cpu_symmetric_label_family.py's test_power_kernel_self_pair)


@pytest.mark.parametrize("target,kernel,n,exclude_self,divergence,alpha,beta", CASES)
def test_float64_equals_the_plain_schedule_and_the_reference(monkeypatch, target, kernel, n, exclude_self,
                                                               divergence, alpha, beta):
    x, upstream, gen = _inputs(n, n)
    tgt = TARGETS[target](n, gen)
    param = 1.0 if kernel == "student_t" else 0.7    # dof 1: the Cauchy rows
    options = dict(param=param, alpha=alpha, beta=beta, divergence=divergence, exclude_self=exclude_self)
    want = _run(x, tgt, kernel, "reference", upstream, **options)
    monkeypatch.setenv("ICON_KERNELS_SYMMETRIC", "0")
    plain = _run(x, tgt, kernel, "cpu", upstream, **options)
    assert _counts() == NOT_RAN
    monkeypatch.delenv("ICON_KERNELS_SYMMETRIC")
    for tile in TILES:
        monkeypatch.setenv("ICON_KERNELS_CPU_TILE_ELEMENTS", tile)
        got = _run(x, tgt, kernel, "cpu", upstream, **options)
        assert _counts() == RAN, tile
        _close(got, want, 1e-12)
        _close(got, plain, 1e-12)


@pytest.mark.parametrize("exclude_self", [True, False])
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("divergence,alpha,beta", [("kl", 0.0, 0.0), ("kl", 0.1, 0.0), ("js", 0.1, 0.2)])
def test_cauchy_rows_without_a_dof_gradient(monkeypatch, target, divergence, alpha, beta, exclude_self):
    """The kNN-graph embedding: student_t with dof 1 as a float (no dof gradient), where the
    backward takes one reciprocal per pair (and the forward, with alpha = 0, no logit per pair);
    with the self pair kept too (r_ii = 1, on a diagonal tile)."""
    x, upstream, gen = _inputs(23, 3)
    tgt = TARGETS[target](23, gen)
    options = dict(param=1.0, param_grad=False, alpha=alpha, beta=beta, divergence=divergence,
                   exclude_self=exclude_self)
    want = _run(x, tgt, "student_t", "reference", upstream, **options)
    for tile in TILES:
        monkeypatch.setenv("ICON_KERNELS_CPU_TILE_ELEMENTS", tile)
        got = _run(x, tgt, "student_t", "cpu", upstream, **options)
        assert _counts() == RAN
        _close(got, want, 1e-12)


@pytest.mark.parametrize("target", TARGETS)
def test_one_row(target):
    """N = 1: no valid column with the self pair excluded (the row is left out), and one column
    without; the tile-pair schedule needs two rows, so the plain rows run."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, generator=gen, dtype=F64)
    upstream = torch.tensor([0.7], dtype=F64)
    tgt = ik.Neighbors(torch.tensor([[0, -1]]), torch.tensor([[0.5, 1.0]], dtype=F64)) if target == "neighbors" \
        else ik.Dense(torch.tensor([[2.0]], dtype=F64))
    for excl in (True, False):
        want = _run(x, tgt, "gaussian", "reference", upstream, exclude_self=excl, alpha=0.1)
        got = _run(x, tgt, "gaussian", "cpu", upstream, exclude_self=excl, alpha=0.1)
        assert _counts() == NOT_RAN
        _close(got, want, 1e-12)


# (kernel, parameter, logit scale, parameter gradient). student_t with dof 1 both ways: without a
# dof gradient the Cauchy reciprocals run forward (alpha = 0) and backward; with one, the forward's
# LSE from the reciprocal sums meets a backward that forms every logit.
KERNELS32 = [("dot", 0.05, 3.0, True), ("gaussian", 0.5, 1.0, True), ("student_t", 1.0, 3.0, False),
             ("student_t", 1.0, 3.0, True), ("student_t", 5.0, 3.0, True), ("power", 2.0, 1.0, True)]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("kernel,param,scale,param_grad", KERNELS32)
@pytest.mark.parametrize("divergence,alpha,beta", [("kl", 0.0, 0.0), ("cross_entropy", 0.1, 0.0),
                                                   ("kl", 0.1, 0.2), ("js", 0.1, 0.0)])
def test_float32_within_twice_the_plain_schedules_error(monkeypatch, target, kernel, param, scale, param_grad,
                                                        divergence, alpha, beta):
    """No row sweep renormalises the backward's q: the LSE's residual (the record in stats row 3)
    and Gamma over exactly those q keep fp32 within twice the plain schedule's error (which
    renormalises each row), with logits up to 1e3. Blocks of 20+ rows run the SIMD body."""
    gen = torch.Generator().manual_seed(5)
    n = 60
    x = (scale * torch.randn(n, 16, generator=gen, dtype=F64)).to(F32).double()
    upstream = torch.rand(n, generator=gen, dtype=F64) + 0.5
    tgt64 = TARGETS[target](n, gen, k=15) if target == "neighbors" else TARGETS[target](n, gen)
    tgt32 = (ik.Neighbors(tgt64.indices, tgt64.weights.float()) if target == "neighbors"
             else ik.Dense(tgt64.p.float()))
    options = dict(param=param, divergence=divergence, alpha=alpha, beta=beta, param_grad=param_grad)
    exact = _run(x, tgt64, kernel, "reference", upstream, **options)
    monkeypatch.setenv("ICON_KERNELS_SYMMETRIC", "0")
    plain = _run(x.float(), tgt32, kernel, "cpu", upstream, **options)
    monkeypatch.delenv("ICON_KERNELS_SYMMETRIC")
    for tile in ("800", ""):
        monkeypatch.setenv("ICON_KERNELS_CPU_TILE_ELEMENTS", tile)
        got = _run(x.float(), tgt32, kernel, "cpu", upstream, **options)
        assert _counts() == RAN
        for mine, ours, want in zip(got, plain, exact):
            # the parameter's gradient is one number: the plain schedule's may land within an ulp
            # by chance, so it may take 8 ulps of float32
            floor = 8 * 2.0 ** -23 if want.numel() == 1 else 0.0
            assert relative_error(mine, want) <= max(2 * relative_error(ours, want) + 2.4e-7, floor)


@pytest.mark.parametrize("target,kernel,options", [
    ("neighbors", "student_t", dict()), ("neighbors", "gaussian", dict(alpha=0.1, beta=0.2)),
    ("dense", "dot", dict(divergence="tv", alpha=0.1)), ("dense", "power", dict(divergence="js", beta=0.1)),
    ("neighbors", "cosine", dict(divergence="hellinger", alpha=0.2))])
def test_gradcheck_with_ragged_blocks(monkeypatch, target, kernel, options):
    monkeypatch.setenv("ICON_KERNELS_CPU_TILE_ELEMENTS", "12")   # blocks of 2 rows, N = 7
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(7, 3, generator=gen, dtype=F64, requires_grad=True)
    t = torch.tensor(1.3, dtype=F64, requires_grad=True)
    tgt = TARGETS[target](7, gen)

    def f(x, t):
        return ik.icon_loss(x, target=tgt, kernel=kernel, backend="cpu", reduction="none",
                            **{PARAM[kernel]: t}, **options)
    assert torch.autograd.gradcheck(f, (x, t))
    assert _counts()["target_family_backward"] > 0


def test_runs_only_where_it_applies(monkeypatch):
    """Self mode with one scalar parameter, a Dense or Neighbors target, conditional (or joint) rows,
    any kernel but log_dot; not for a separate y, a per-row parameter, log_dot, or when off."""
    gen = torch.Generator().manual_seed(4)
    n = 12
    x = torch.randn(n, 4, generator=gen, dtype=F64, requires_grad=True)
    nbr = ik.Neighbors(torch.randint(0, n, (n, 3), generator=gen))

    def ran(**kw):
        y = kw.pop("y", None)
        target = kw.pop("target", nbr)
        ik.icon_loss(x, y, target=target, backend="cpu", **kw).backward()
        return _counts()

    assert ran(kernel="student_t") == RAN
    assert ran(kernel="student_t", dof=1.0) == RAN
    assert ran(kernel="dot", divergence="tv") == RAN
    assert ran(kernel="gaussian", target=ik.Dense(torch.rand(n, n, generator=gen, dtype=F64))) == RAN
    assert ran(kernel="cosine", y=x, exclude_self=True, beta=0.2) == RAN       # one x
    assert ran(kernel="dot", y=x.detach().clone(), exclude_self=True) == NOT_RAN
    assert ran(kernel="dot", temperature=torch.linspace(0.3, 0.6, n, dtype=F64)) == NOT_RAN
    assert ran(kernel="student_t", normalization="joint") == RAN   # test_cpu_symmetric_joint_targets.py
    # a symmetrised Neighbors target reaches the op as the padded rows of its explicit entries
    # (backends/dispatch.py): a plain target there
    sym = ik.Neighbors(nbr.indices, symmetrize=True)
    assert ran(kernel="student_t", target=sym) == RAN
    phi = torch.softmax(torch.randn(n, 3, generator=gen, dtype=F64), dim=1).requires_grad_()
    ik.icon_loss(phi, target=nbr, kernel="log_dot", backend="cpu").backward()
    assert _counts() == NOT_RAN
    monkeypatch.setenv("ICON_KERNELS_SYMMETRIC", "0")
    assert ran(kernel="student_t") == NOT_RAN


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("options", [dict(divergence="js", beta=0.2), dict(alpha=0.1), dict()])
def test_y_equal_to_x_but_detached_gets_the_plain_backward(target, options):
    """y = x.detach() shares x's storage: the forward runs this schedule (the values are the same),
    but dL/dx is the row side alone, so the plain backward runs after it, reading its stats."""
    x0, upstream, gen = _inputs(10, 6, d=4)
    tgt = TARGETS[target](10, gen)
    grads = []
    for backend in ("cpu", "reference"):
        x = x0.clone().requires_grad_()
        loss = ik.icon_loss(x, x.detach(), target=tgt, kernel="student_t", exclude_self=True, backend=backend,
                            reduction="none", **options)
        (loss * upstream).sum().backward()
        grads.append(x.grad)
    assert _counts() == {"target_family_forward": 1, "target_family_backward": 0}
    assert relative_error(grads[0], grads[1]) <= 1e-12


@pytest.mark.parametrize("target", TARGETS)
def test_target_weight_gradients_after_this_forward(monkeypatch, target):
    """The weights' gradient (target_weight_grads.py) reads the LSE of stats row 0, which this
    forward keeps as the plain one does; dL/dx comes from this backward."""
    monkeypatch.setenv("ICON_KERNELS_CPU_TILE_ELEMENTS", "18")
    x0, upstream, gen = _inputs(11, 8, d=4)
    tgt = TARGETS[target](11, gen)
    weights = tgt.weights if target == "neighbors" else tgt.p
    weights[1] = 0.5                                 # every row with weight (the reference's 0 / 0)
    grads = []
    for backend in ("cpu", "reference"):
        x = x0.clone().requires_grad_()
        w = weights.clone().requires_grad_()
        t = ik.Neighbors(tgt.indices, w) if target == "neighbors" else ik.Dense(w)
        loss = ik.icon_loss(x, target=t, kernel="gaussian", alpha=0.1, backend=backend, reduction="none")
        grads.append(torch.autograd.grad(loss, [x, w], upstream))
    assert _counts() == RAN
    for mine, want in zip(*grads):
        assert relative_error(mine, want) <= 1e-12


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("bad", ["feature", "weight"])
def test_non_finite_inputs_as_the_plain_schedule(monkeypatch, target, bad):
    """A NaN feature makes its row's and its pairs' losses NaN, a NaN weight its row's (target_row
    divides every column by the NaN total), as the plain schedule's; the other rows are compared."""
    x, upstream, gen = _inputs(9, 9, d=4)
    tgt = TARGETS[target](9, gen)
    if bad == "feature":
        x[3, 1] = float("nan")
    elif target == "neighbors":
        tgt.weights[5, 1] = float("nan")
    else:
        tgt.p[5, 2] = float("nan")
    for kernel, options in (("gaussian", dict(beta=0.2)), ("student_t", dict(param=1.0, param_grad=False)),
                            ("dot", dict(alpha=0.1))):
        monkeypatch.delenv("ICON_KERNELS_CPU_TILE_ELEMENTS", raising=False)
        monkeypatch.setenv("ICON_KERNELS_SYMMETRIC", "0")
        plain = _run(x, tgt, kernel, "cpu", upstream, **options)
        monkeypatch.delenv("ICON_KERNELS_SYMMETRIC")
        monkeypatch.setenv("ICON_KERNELS_CPU_TILE_ELEMENTS", "18")
        got = _run(x, tgt, kernel, "cpu", upstream, **options)
        assert _counts() == RAN
        for g, p in zip(got, plain):
            assert torch.equal(g.isnan(), p.isnan())
            assert torch.allclose(g, p, rtol=1e-12, atol=0, equal_nan=True)
        assert bad == "feature" or got[0].isfinite().any()   # the other rows' losses were compared


def test_the_backward_follows_its_forwards_schedule(monkeypatch):
    """A plain forward (no record in stats row 3) is followed by the plain backward, also with the
    switch on at the backward; this forward by this backward, also with the switch off."""
    x0, upstream, gen = _inputs(30, 2, d=4)
    tgt = _neighbors(30, gen)
    exact = _run(x0, tgt, "student_t", "reference", upstream, param=1.0, param_grad=False)
    for forward_env, backward_env, symmetric in (("0", "1", False), ("1", "0", True)):
        x = x0.clone().requires_grad_()
        monkeypatch.setenv("ICON_KERNELS_SYMMETRIC", forward_env)
        loss = ik.icon_loss(x, target=tgt, kernel="student_t", dof=1.0, backend="cpu", reduction="none")
        monkeypatch.setenv("ICON_KERNELS_SYMMETRIC", backward_env)
        (loss * upstream).sum().backward()
        assert _counts() == {"target_family_forward": int(symmetric), "target_family_backward": int(symmetric)}
        assert relative_error(x.grad, exact[1]) <= 1e-12


def op_args(target, x, normalization, divergence):
    """The cpu forward op's arguments (ops.ARGS) of a self-mode Dense or Neighbors problem: Student-t
    with dof 1, alpha 0.1, beta 0.2."""
    nbr = isinstance(target, ik.Neighbors)
    return (x, x, torch.tensor(1.0, dtype=x.dtype), "student_t", "neighbors" if nbr else "dense", None, None,
            target.indices if nbr else None, target.weights if nbr else None, None, None, None, "dot",
            None if nbr else target.p, 0.1, 0.2, True, divergence, normalization, False)


@pytest.mark.parametrize("target", TARGETS)
def test_opcheck_of_the_ops(target):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(9, 4, generator=gen, dtype=F64)
    args = op_args(TARGETS[target](9, gen), x, "conditional", 5)
    opcheck_on_both_paths(args, True, _counts, {"target_family_forward": 1, "target_family_backward": 0},
                          {"target_family_forward": 0, "target_family_backward": 1})
