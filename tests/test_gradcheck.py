"""torch.autograd.gradcheck in float64 on tiny problems, for every backend."""
import pytest
import torch

import icon_kernels as ik

BACKENDS = [b for b in ("reference", "torch", "cpu") if b in ik.available_backends()]


def _x(n, d, seed, positive=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    return (x.softmax(1) if positive else x).requires_grad_()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kernel,param", [("dot", "temperature"), ("cosine", "temperature"),
                                          ("gaussian", "sigma"), ("student_t", "dof"), ("power", "exponent")])
@pytest.mark.parametrize("alpha,beta,divergence", [(0.0, 0.0, "kl"), (0.2, 0.3, "cross_entropy")])
def test_learned_side(small_chunks, backend, kernel, param, alpha, beta, divergence):
    x, y = _x(7, 3, 0), _x(6, 3, 1)
    value = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    labels, cols = torch.tensor([0, 1, 1, 2, 0, 3, 1]), torch.tensor([1, 0, 2, 2, 1, 0])

    def f(x, y, value):
        return ik.icon_loss(x, y, target=ik.Labels(labels, cols), kernel=kernel, alpha=alpha,
                            beta=beta, divergence=divergence, backend=backend, **{param: value})
    assert torch.autograd.gradcheck(f, (x, y, value))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("t_kernel", ["gaussian", "student_t", "cosine", "power"])
@pytest.mark.parametrize("alpha,beta,divergence", [(0.0, 0.0, "kl"), (0.25, 0.1, "kl"), (0.1, 0.0, "cross_entropy")])
def test_affinity_target_side(small_chunks, backend, t_kernel, alpha, beta, divergence):
    x, z = _x(8, 3, 2), _x(8, 4, 3)
    sigma = torch.full((8,), 1.4, dtype=torch.float64, requires_grad=True)
    weight = torch.linspace(0.5, 2.0, 8, dtype=torch.float64)

    def f(x, z, sigma):
        # sigma is the gaussian's parameter and the power kernel's exponent (unused by the others)
        target = ik.Affinity(z, kernel=t_kernel, sigma=sigma, temperature=0.6, dof=1.5, exponent=sigma)
        return ik.icon_loss(x, target=target, kernel="student_t", dof=1.0, alpha=alpha, beta=beta,
                            divergence=divergence, weight=weight, backend=backend)
    assert torch.autograd.gradcheck(f, (x, z, sigma))


@pytest.mark.parametrize("backend", BACKENDS)
def test_cluster_kernel_with_neighbors_reduction_none(small_chunks, backend):
    phi = _x(9, 4, 4, positive=True)
    idx = torch.tensor([[1, 2, -1]] * 3 + [[0, 0, 5]] * 3 + [[-1, -1, -1]] * 3)
    upstream = torch.linspace(-1, 2, 9, dtype=torch.float64)

    def f(phi):
        cols = phi / phi.sum(0)
        loss = ik.icon_loss(phi, cols, target=ik.Neighbors(idx), kernel="log_dot",
                            exclude_self=True, reduction="none", backend=backend)
        return (loss * upstream).sum()
    assert torch.autograd.gradcheck(f, (phi,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_dense_target_self_mode(small_chunks, backend):
    x = _x(6, 5, 5)
    p = torch.rand(6, 6, generator=torch.Generator().manual_seed(6), dtype=torch.float64)

    def f(x):
        return ik.icon_loss(x, target=ik.Dense(p), kernel="gaussian", sigma=0.9, beta=0.2,
                            reduction="sum", backend=backend)
    assert torch.autograd.gradcheck(f, (x,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alpha,beta,divergence", [(0.0, 0.0, "kl"), (0.2, 0.3, "cross_entropy")])
def test_dense_and_neighbors_weights(small_chunks, backend, alpha, beta, divergence):
    """The target's own weights (Dense p, Neighbors weights) as differentiable inputs."""
    x = _x(6, 3, 7)
    gen = torch.Generator().manual_seed(8)
    p = (torch.rand(6, 6, generator=gen, dtype=torch.float64) + 0.1).requires_grad_()
    idx = torch.tensor([[1, 2, 2], [0, 3, -1], [4, 1, 0], [2, 5, 5], [3, 0, 1], [1, 4, 2]])
    w = (torch.rand(6, 3, generator=gen, dtype=torch.float64) + 0.1).requires_grad_()
    upstream = torch.linspace(-1, 2, 6, dtype=torch.float64)

    def f(x, p, w):
        common = dict(kernel="student_t", alpha=alpha, beta=beta, divergence=divergence,
                      reduction="none", backend=backend)
        dense = ik.icon_loss(x, target=ik.Dense(p), **common)
        sparse = ik.icon_loss(x, target=ik.Neighbors(idx, w), **common)
        return ((dense + sparse) * upstream).sum()
    assert torch.autograd.gradcheck(f, (x, p, w))
