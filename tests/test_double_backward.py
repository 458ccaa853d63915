"""Double backward (a gradient penalty: grad with create_graph=True, then a second backward)
raises a clear NotImplementedError on the fused backends that names backend="reference", which
supports it (issue 13 item 9: the errors were opaque, from mm(out=...) or a missing formula)."""

import pytest
import torch

import icon_kernels as ik


def _problem(device="cpu"):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(8, 5, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    return x, ik.Labels(torch.arange(8, device=device) // 2)


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton", "cuda"])
def test_second_backward_raises_naming_the_reference(backend):
    if backend not in ik.available_backends():
        pytest.skip(f"{backend} backend unavailable here")
    on_gpu = backend == "cuda" or (backend == "triton" and torch.cuda.is_available())
    x, target = _problem("cuda" if on_gpu else "cpu")
    loss = ik.icon_loss(x, target=target, kernel="gaussian", backend=backend)
    (grad,) = torch.autograd.grad(loss, x, create_graph=True)
    # the first backward itself is exact (triton computes float64 inputs in fp32)
    (plain,) = torch.autograd.grad(ik.icon_loss(x, target=target, kernel="gaussian",
                                                backend="reference"), x)
    rtol = 1e-5 if backend == "triton" else 1e-9
    assert torch.allclose(grad.detach(), plain, rtol=rtol, atol=rtol * 1e-3)
    with pytest.raises(NotImplementedError, match=rf"{backend}.*backend='reference'"):
        grad.square().sum().backward()


def test_reference_supports_double_backward():
    x, target = _problem()
    def penalty(x):
        loss = ik.icon_loss(x, target=target, kernel="gaussian", backend="reference")
        (grad,) = torch.autograd.grad(loss, x, create_graph=True)
        return grad.square().sum()
    assert torch.autograd.gradcheck(penalty, (x,))
