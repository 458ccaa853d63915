"""A row with no valid column (N = 1 with y = None) is left out: loss 0 and zero gradients on
every backend, whatever the target, alpha and beta (issue 13 items 1 and 2: the torch backend
divided by M' = 0, and an all-left-out Affinity batch gave NaN gradients)."""
import itertools

import pytest
import torch

import icon_kernels as ik

BACKENDS = ["reference", "torch", "cpu", "triton", "cuda"]
TARGETS = ("labels", "neighbors", "affinity", "dense")


def _target(kind, dtype, device):
    """A one-row target whose tensors require grad where the type has any."""
    if kind == "labels":
        return ik.Labels(torch.zeros(1, dtype=torch.long, device=device)), []
    if kind == "neighbors":
        w = torch.ones(1, 2, dtype=dtype, device=device, requires_grad=True)
        return ik.Neighbors(torch.tensor([[0, -1]], device=device), w), [w]
    if kind == "dense":
        p = torch.ones(1, 1, dtype=dtype, device=device, requires_grad=True)
        return ik.Dense(p), [p]
    z = torch.randn(1, 2, dtype=dtype, device=device, requires_grad=True)
    sigma = torch.tensor(1.3, dtype=dtype, device=device, requires_grad=True)
    return ik.Affinity(z, sigma=sigma), [z, sigma]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alpha,beta", [(0.0, 0.0), (0.2, 0.0), (0.0, 0.3), (0.2, 0.3)])
@pytest.mark.parametrize("target_kind,kernel", list(itertools.product(TARGETS, ("cosine", "student_t"))))
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_single_row_without_columns_is_left_out(backend, target_kind, kernel, alpha, beta, reduction):
    if backend not in ik.available_backends():
        pytest.skip(f"{backend} backend unavailable here")
    device = "cuda" if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()) else "cpu"
    dtype = torch.float64 if backend != "triton" else torch.float32
    x = torch.randn(1, 3, dtype=dtype, device=device, requires_grad=True)
    dof = torch.tensor(1.5, dtype=dtype, device=device, requires_grad=True)
    target, target_leaves = _target(target_kind, dtype, device)
    extra = {"dof": dof} if kernel == "student_t" else {}
    loss = ik.icon_loss(x, target=target, kernel=kernel, alpha=alpha, beta=beta,
                        reduction=reduction, backend=backend, **extra)
    assert torch.equal(loss.detach(), torch.zeros_like(loss))
    leaves = [x] + target_leaves + ([dof] if extra else [])
    upstream = torch.full_like(loss, 0.7)
    grads = torch.autograd.grad(loss, leaves, grad_outputs=upstream, allow_unused=True)
    for leaf, grad in zip(leaves, grads):
        assert grad is None or torch.equal(grad, torch.zeros_like(leaf)), (leaf, grad)
