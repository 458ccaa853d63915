"""The blockwise torch backend equals the dense reference: loss and every gradient."""
import itertools
import zlib

import pytest
import torch

from cases import (DEFAULT_PARAM, KERNELS, PARAM_OF, TARGETS, clone_problem, features,
                   loss_and_grads, make_target, relative_error)

TOL = {torch.float64: 1e-9, torch.float32: 1e-5}

# (name, rect, exclude_self, alpha, beta, divergence, reduction, weighted)
SETTINGS = [
    ("self-kl-mean", False, None, 0.0, 0.0, "kl", "mean", False),
    ("self-debiased-ce-none", False, None, 0.2, 0.3, "cross_entropy", "none", False),
    ("rect-alpha-kl-sum-weighted", True, False, 0.1, 0.0, "kl", "sum", True),
    ("square-keepself-beta-mean-weighted", False, False, 0.0, 0.15, "kl", "mean", True),
]


def build(kernel, target_kind, setting, dtype, seed, param_tensor=False, target_grad=False,
          t_kernel="gaussian", n=37, m=29, d=13):
    _, rect, exclude_self, alpha, beta, divergence, reduction, weighted = setting
    gen = torch.Generator().manual_seed(seed)
    m = m if rect else n
    x = features(n, d, kernel, torch.float64, gen).requires_grad_()
    y = features(m, d, kernel, torch.float64, gen).requires_grad_() if rect else None
    target = make_target(target_kind, n, m, rect, torch.float64, gen, t_kernel, target_grad)
    kwargs = dict(kernel=kernel, alpha=alpha, beta=beta, exclude_self=exclude_self,
                  divergence=divergence, reduction=reduction)
    if kernel in PARAM_OF:
        name = PARAM_OF[kernel]
        value = DEFAULT_PARAM[name]
        if param_tensor == "scalar":
            value = torch.tensor(value, dtype=torch.float64, requires_grad=True)
        elif param_tensor == "rows":
            value = (value * (0.75 + 0.5 * torch.rand(n, generator=gen, dtype=torch.float64))).requires_grad_()
        kwargs[name] = value
    if weighted:
        kwargs["weight"] = torch.rand(n, generator=gen, dtype=torch.float64) + 0.5
    upstream = torch.randn(n, generator=gen, dtype=torch.float64) if reduction == "none" else torch.tensor(0.7, dtype=torch.float64)
    return clone_problem(x, y, target, kwargs, dtype), upstream


def check_against_reference(problem, upstream, dtype, backend="torch"):
    x, y, target, kwargs = problem
    ref = clone_problem(x, y, target, kwargs, torch.float64)
    want_loss, want_grads = loss_and_grads(*ref, "reference", upstream)
    got_loss, got_grads = loss_and_grads(x, y, target, kwargs, backend, upstream)
    assert got_loss.dtype == dtype
    assert torch.isfinite(want_loss).all()
    assert relative_error(got_loss, want_loss) <= TOL[dtype], (got_loss, want_loss)
    assert len(got_grads) == len(want_grads)
    for i, (g, w) in enumerate(zip(got_grads, want_grads)):
        assert g.shape == w.shape
        assert relative_error(g, w) <= TOL[dtype], f"gradient {i}: rel err {relative_error(g, w)}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("setting", SETTINGS, ids=[s[0] for s in SETTINGS])
@pytest.mark.parametrize("kernel,target_kind", list(itertools.product(KERNELS, TARGETS)))
def test_every_kernel_target_and_option(small_chunks, kernel, target_kind, setting, dtype):
    problem, upstream = build(kernel, target_kind, setting, dtype, seed=zlib.crc32(f"{kernel}{target_kind}{setting[0]}".encode()) % 1000)
    check_against_reference(problem, upstream, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("param_tensor", ["scalar", "rows"])
@pytest.mark.parametrize("setting", SETTINGS[:3], ids=[s[0] for s in SETTINGS[:3]])
@pytest.mark.parametrize("kernel", ["dot", "cosine", "gaussian", "student_t"])
def test_learnable_kernel_parameter(small_chunks, kernel, setting, param_tensor, dtype):
    problem, upstream = build(kernel, "labels", setting, dtype, seed=7, param_tensor=param_tensor)
    check_against_reference(problem, upstream, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("setting", SETTINGS, ids=[s[0] for s in SETTINGS])
@pytest.mark.parametrize("t_kernel", KERNELS)
def test_affinity_target_gradients(small_chunks, t_kernel, setting, dtype):
    problem, upstream = build("student_t", "affinity", setting, dtype, seed=11, target_grad=True,
                              t_kernel=t_kernel)
    check_against_reference(problem, upstream, dtype)


@pytest.mark.parametrize("n,m,d", [(1, 1, 3), (2, 5, 1), (5, 3, 130), (64, 17, 8)])
@pytest.mark.parametrize("rect", [False, True])
def test_ragged_and_tiny_shapes(small_chunks, n, m, d, rect):
    setting = SETTINGS[2] if rect else SETTINGS[0]
    problem, upstream = build("gaussian", "affinity", setting, torch.float64, seed=3, n=n, m=m, d=d)
    x, y, target, kwargs = problem
    ref = clone_problem(x, y, target, kwargs, torch.float64)
    want_loss, want_grads = loss_and_grads(*ref, "reference", upstream)
    got_loss, got_grads = loss_and_grads(x, y, target, kwargs, "torch", upstream)
    assert relative_error(got_loss, want_loss) <= 1e-9
    for g, w in zip(got_grads, want_grads):
        assert relative_error(g, w) <= 1e-9


@pytest.mark.parametrize("temperature", [0.01, 0.05])
@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_low_temperature_and_huge_logits(temperature, scale):
    """tau = 0.01 on un-normalised features of norm ~ 30*sqrt(d): logits in the 1e5 range."""
    gen = torch.Generator().manual_seed(5)
    x = (scale * torch.randn(40, 16, generator=gen, dtype=torch.float64)).requires_grad_()
    labels = torch.arange(40) // 2
    upstream = torch.tensor(1.3, dtype=torch.float64)
    import icon_kernels as ik
    target = ik.Labels(labels)
    kw = dict(kernel="dot", temperature=temperature)
    want_loss, want_grads = loss_and_grads(x, None, target, kw, "reference", upstream)
    for dtype in (torch.float64, torch.float32):
        xd = x.detach().to(dtype).requires_grad_()
        got_loss, got_grads = loss_and_grads(xd, None, target, kw, "torch", upstream)
        assert torch.isfinite(got_loss) and torch.isfinite(got_grads[0]).all()
        assert relative_error(got_loss, want_loss) <= TOL[dtype]
        assert relative_error(got_grads[0], want_grads[0]) <= TOL[dtype]
