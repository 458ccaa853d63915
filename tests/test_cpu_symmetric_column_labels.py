"""The cpu backend's symmetric schedules for a Labels target whose column labels are not its rows',
in self mode: p_ij = [l_i = c_j] / K_i is then not symmetric, but s_ij is, and each row of a tile
pair reads its own label against the other block's column labels (LabelSide::segment), so the
label schedules take it as they are: the hot path (csrc/cpu_symmetric_labels.h), the family and
closed-form rows (csrc/cpu_symmetric_label_family.h), and joint normalisation on the family rows
(P_ij = [l_i = c_j] / (the positive pairs of every row), csrc/cpu_target_segments.h's
LabelSegments; with the rows' labels P is symmetric and csrc/cpu_symmetric_joint_family.h runs).

It must equal the plain schedule (ICON_KERNELS_SYMMETRIC=0) and the dense reference to 1e-12 in
float64 with ragged blocks forced, keep fp32 within twice the plain schedule's error, pass
gradcheck, and run where it applies (_C.cpu_symmetric_counts())."""
import itertools

import pytest
import torch

import icon_kernels as ik
from cases import relative_error
from symmetric_cases import (F32, F64, PARAM, TILES, assert_close, counts, fresh_schedule, run_loss,  # noqa: F401
                             opcheck_on_both_paths)

pytestmark = pytest.mark.skipif("cpu" not in ik.available_backends(), reason="the cpu backend is not built")

HOT = ("forward", "backward")
FAMILY = ("label_family_forward", "label_family_backward")
JOINT_FAMILY = ("joint_family_forward", "joint_family_backward")
MIXES = (("kl", 0.0, 0.0), ("cross_entropy", 0.1, 0.0), ("kl", 0.2, 0.0), ("kl", 0.1, 0.2), ("tv", 0.0, 0.0),
         ("js", 0.1, 0.2), ("reverse_kl", 0.1, 0.0), ("chi2", 0.0, 0.1), ("hellinger", 0.0, 0.0))
KERNELS = ("dot", "gaussian", "cosine", "student_t")


def _labels(n, gen):
    """Row labels in 0..3, column labels in 0..4: rows of label 3 have no positive when 3 is not
    among the column labels; some columns (label 4) are no row's positive."""
    rows = torch.randint(0, 4, (n,), generator=gen)
    cols = torch.randint(0, 5, (n,), generator=gen)
    cols[cols == 3] = 2
    return ik.Labels(rows, cols)


def _inputs(n, seed, d=5):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=F64)
    upstream = torch.rand(n, generator=gen, dtype=F64) + 0.5
    upstream[n // 2] = 0             # a row with zero upstream gradient (under joint rows it still moves Z)
    return x, upstream, _labels(n, gen)


def _schedule(kernel, normalization, divergence, beta):
    """The counters of the schedule that takes the case."""
    if normalization == "joint":
        return FAMILY
    hot = kernel in ("dot", "gaussian", "cosine") and beta == 0 and divergence in ("kl", "cross_entropy")
    return HOT if hot else FAMILY


def _params(kernel):
    return {PARAM[kernel]: 1.0 if kernel == "student_t" else 0.7}


CASES = [(k, norm, n, excl, *mix) for k, norm, (n, excl), mix in itertools.product(
    KERNELS, ("conditional", "joint"), ((2, True), (7, False), (23, True)), MIXES) if n != 2 or mix in MIXES[:2]]


@pytest.mark.parametrize("kernel,normalization,n,exclude_self,divergence,alpha,beta", CASES)
def test_float64_equals_the_plain_schedule_and_the_reference(monkeypatch, kernel, normalization, n, exclude_self,
                                                               divergence, alpha, beta):
    x, upstream, target = _inputs(n, n)
    names = _schedule(kernel, normalization, divergence, beta)
    # the learned parameter's gradient: the conditional schedules' own, the plain one's after a joint forward
    options = dict(divergence=divergence, alpha=alpha, beta=beta, exclude_self=exclude_self,
                   normalization=normalization)
    want = run_loss(x, target, kernel, _params(kernel), "reference", upstream, param_grad=True, **options)
    monkeypatch.setenv("ICON_KERNELS_SYMMETRIC", "0")
    plain = run_loss(x, target, kernel, _params(kernel), "cpu", upstream, param_grad=True, **options)
    assert counts(*names) == (0, 0)
    monkeypatch.delenv("ICON_KERNELS_SYMMETRIC")
    for tile in TILES:
        monkeypatch.setenv("ICON_KERNELS_CPU_TILE_ELEMENTS", tile)
        got = run_loss(x, target, kernel, _params(kernel), "cpu", upstream, param_grad=True, **options)
        assert counts(*names)[0] == 1, tile
        assert_close(got, want, 1e-12, atol=1e-15)
        assert_close(got, plain, 1e-12, atol=1e-15)
        got = run_loss(x, target, kernel, _params(kernel), "cpu", upstream, **options)   # dx alone
        assert counts(*names) == (1, 1), tile
        assert_close(got, want[:2], 1e-12, atol=1e-15)


@pytest.mark.parametrize("kernel,param,scale", [("dot", 0.05, 3.0), ("gaussian", 0.5, 1.0), ("student_t", 1.0, 3.0)])
@pytest.mark.parametrize("normalization,divergence,alpha,beta", [
    ("conditional", "kl", 0.0, 0.0), ("conditional", "js", 0.0, 0.0), ("conditional", "kl", 0.1, 0.2),
    ("joint", "kl", 0.0, 0.0), ("joint", "js", 0.1, 0.0), ("joint", "cross_entropy", 0.1, 0.2)])
def test_float32_within_twice_the_plain_schedules_error(monkeypatch, kernel, param, scale, normalization, divergence,
                                                        alpha, beta):
    """Logits up to 1e3."""
    gen = torch.Generator().manual_seed(5)
    n = 60
    x = (scale * torch.randn(n, 16, generator=gen, dtype=F64)).to(F32).double()
    upstream = torch.rand(n, generator=gen, dtype=F64) + 0.5
    target = _labels(n, gen)
    options = dict(divergence=divergence, alpha=alpha, beta=beta, normalization=normalization)
    params = {PARAM[kernel]: param}
    exact = run_loss(x, target, kernel, params, "reference", upstream, **options)
    monkeypatch.setenv("ICON_KERNELS_SYMMETRIC", "0")
    plain = run_loss(x.float(), target, kernel, params, "cpu", upstream, **options)
    monkeypatch.delenv("ICON_KERNELS_SYMMETRIC")
    for tile in ("800", ""):
        monkeypatch.setenv("ICON_KERNELS_CPU_TILE_ELEMENTS", tile)
        got = run_loss(x.float(), target, kernel, params, "cpu", upstream, **options)
        assert counts(*_schedule(kernel, normalization, divergence, beta)) == (1, 1)
        for mine, ours, want in zip(got, plain, exact):
            assert relative_error(mine, want) <= 2 * relative_error(ours, want) + 2.4e-7


@pytest.mark.parametrize("kernel,options", [
    ("dot", dict()), ("student_t", dict(divergence="js", alpha=0.1)), ("gaussian", dict(divergence="tv")),
    ("dot", dict(normalization="joint")), ("gaussian", dict(normalization="joint", divergence="hellinger", beta=0.2))])
def test_gradcheck_with_ragged_blocks(monkeypatch, kernel, options):
    names = _schedule(kernel, options.get("normalization", "conditional"), options.get("divergence", "kl"),
                      options.get("beta", 0.0))
    monkeypatch.setenv("ICON_KERNELS_CPU_TILE_ELEMENTS", "12")   # blocks of 2 rows, N = 7
    x, _, target = _inputs(7, 1, d=3)
    x.requires_grad_()

    def f(x):
        return ik.icon_loss(x, target=target, kernel=kernel, backend="cpu", reduction="none",
                            **{PARAM[kernel]: 1.3}, **options)
    assert torch.autograd.gradcheck(f, (x,))
    assert counts(*names)[1] > 0


def test_the_joint_rows_with_the_rows_labels_stay_on_the_joint_family_schedule():
    """Equal column labels give a symmetric P: the joint family schedule's one value per pair."""
    x, _, target = _inputs(12, 3)
    x.requires_grad_()
    same = ik.Labels(target.row_labels, target.row_labels.clone())
    ik.icon_loss(x, target=same, kernel="dot", backend="cpu", normalization="joint").backward()
    assert counts(*JOINT_FAMILY, *FAMILY) == (1, 1, 0, 0)
    ik.icon_loss(x, target=target, kernel="dot", backend="cpu", normalization="joint").backward()
    assert counts(*JOINT_FAMILY, *FAMILY) == (0, 0, 1, 1)


@pytest.mark.parametrize("divergence,alpha,beta", [("kl", 0.2, 0.0), ("cross_entropy", 0.0, 0.0), ("js", 0.1, 0.2)])
@pytest.mark.parametrize("forward_env,backward_env", [("0", "1"), ("1", "0")])
def test_joint_rows_either_backward_after_either_forward(monkeypatch, forward_env, backward_env, divergence, alpha,
                                                         beta):
    """The joint rows' stats are the plain joint rows' (log Z, Gamma_i, 0, the row's share of q;
    the one sweep's Gamma_i = -sum_j p~): the switch at the backward decides which backward runs."""
    x0, upstream, target = _inputs(30, 2)
    options = dict(divergence=divergence, alpha=alpha, beta=beta, normalization="joint")
    exact = run_loss(x0, target, "gaussian", {"sigma": 0.8}, "reference", upstream, **options)
    x = x0.clone().requires_grad_()
    monkeypatch.setenv("ICON_KERNELS_SYMMETRIC", forward_env)
    loss = ik.icon_loss(x, target=target, kernel="gaussian", sigma=0.8, backend="cpu", reduction="none", **options)
    monkeypatch.setenv("ICON_KERNELS_SYMMETRIC", backward_env)
    (loss * upstream).sum().backward()
    assert counts(*FAMILY) == (int(forward_env == "1"), int(backward_env == "1"))
    assert relative_error(x.grad, exact[1]) <= 1e-12


@pytest.mark.parametrize("divergence", [0, 1])   # kl, cross_entropy: the one sweep's closed-form row masses
@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_joint_rows_without_a_positive_pair_keep_the_plain_stats(monkeypatch, divergence, alpha):
    """No column label is any row's: every row is left out, and the stats are the plain joint rows'
    (row 1: -sum_j p~ = -M' b, finite; a 0 * inf there once made it NaN)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(7, 3, generator=gen, dtype=F64)
    rows, cols = torch.randint(0, 2, (7,), generator=gen), torch.full((7,), 5)
    args = (x, x, torch.tensor(0.7, dtype=F64), "dot", "labels", rows, cols, None, None, None, None, None, "dot",
            None, alpha, 0.0, True, divergence, "joint", False)
    out = {}
    for env in ("0", "1"):
        monkeypatch.setenv("ICON_KERNELS_SYMMETRIC", env)
        out[env] = torch.ops.icon_kernels.cpu_forward(*args)
    assert counts(*FAMILY) == (1, 0)
    assert not out["1"][1].any()
    for mine, plain in zip(out["1"], out["0"]):
        torch.testing.assert_close(mine, plain, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("normalization,divergence,names", [("conditional", 0, HOT), ("conditional", 5, FAMILY),
                                                            ("joint", 0, FAMILY)])
def test_opcheck_of_the_ops(normalization, divergence, names):
    x, _, target = _inputs(9, 2, d=4)
    args = (x, x, torch.tensor(0.7, dtype=F64), "dot", "labels", target.row_labels, target.col_labels, None, None,
            None, None, None, "dot", None, 0.1, 0.0, True, divergence, normalization, False)
    opcheck_on_both_paths(args, False, lambda: counts(*names), (1, 0), (0, 1))
