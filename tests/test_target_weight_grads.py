"""Neighbors weights and Dense p that require grad get their exact gradient on every backend
(issue 13 item 3: they were silently dropped, .grad stayed None)."""
import itertools

import pytest
import torch

import icon_kernels as ik
from cases import clone_problem, loss_and_grads, relative_error, to_device
from cases import SETTINGS, build

DEVICE = {"torch": "cpu", "cpu": "cpu", "triton": "cuda" if torch.cuda.is_available() else "cpu",
          "cuda": "cuda"}
# fp32 on the fused backends against the float64 reference (as in the per-backend suites)
TOL = {torch.float64: 1e-9, torch.float32: 5e-5}
CASES = list(itertools.product(("cosine", "student_t", "log_dot"), ("neighbors", "dense")))


def _check(backend, kernel, target_kind, setting, dtype, n=37, m=29, d=13):
    if backend not in ik.available_backends():
        pytest.skip(f"{backend} backend unavailable here")
    problem, upstream = build(kernel, target_kind, setting, dtype, seed=17, target_grad=True,
                              n=n, m=m, d=d)
    x, y, target, kwargs = problem
    weights = target.weights if target_kind == "neighbors" else target.p
    assert weights.requires_grad
    want_loss, want_grads = loss_and_grads(*clone_problem(*problem, torch.float64), "reference", upstream)
    got_loss, got_grads = loss_and_grads(*to_device(problem, DEVICE[backend]), backend,
                                         upstream.to(DEVICE[backend]))
    assert relative_error(got_loss.cpu(), want_loss) <= TOL[dtype]
    assert len(got_grads) == len(want_grads)
    # the last leaf is the target's weights: its gradient exists and is not zero
    assert want_grads[-1].abs().sum() > 0
    for i, (g, w) in enumerate(zip(got_grads, want_grads)):
        assert g.shape == w.shape
        assert relative_error(g.cpu(), w) <= TOL[dtype], f"gradient {i}: rel err {relative_error(g.cpu(), w)}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("setting", SETTINGS, ids=[s[0] for s in SETTINGS])
@pytest.mark.parametrize("kernel,target_kind", CASES)
@pytest.mark.parametrize("backend", ["torch", "cpu", "cuda"])
def test_weights_gradient(small_chunks, backend, kernel, target_kind, setting, dtype):
    _check(backend, kernel, target_kind, setting, dtype)


@pytest.mark.parametrize("setting", SETTINGS, ids=[s[0] for s in SETTINGS])
@pytest.mark.parametrize("target_kind", ["neighbors", "dense"])
def test_weights_gradient_triton(target_kind, setting):
    _check("triton", "student_t", target_kind, setting, torch.float32, n=40, m=35, d=16)


def test_weights_gradient_with_repeated_neighbours_and_zero_weights():
    """Repeated indices add up and a zero weight is a structural zero (alpha = 0): the exact
    gradient of the reference, on the torch and cpu backends, float64."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(9, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([[1, 1, 2], [0, 3, -1], [4, 4, 4], [2, 2, 0], [5, 6, 7],
                        [8, 0, 1], [3, 3, 5], [1, 2, 3], [0, 0, 0]])
    base = torch.rand(9, 3, generator=gen, dtype=torch.float64)
    base[4, 1] = 0.0
    for backend in [b for b in ("torch", "cpu") if b in ik.available_backends()]:
        grads = []
        for name in ("reference", backend):
            w = base.clone().requires_grad_()
            loss = ik.icon_loss(x, target=ik.Neighbors(idx, w), kernel="student_t", backend=name)
            grads.append(torch.autograd.grad(loss, w)[0])
        assert relative_error(grads[1], grads[0]) <= 1e-10
