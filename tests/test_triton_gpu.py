"""Triton backend on a real GPU at larger N and in every dtype (skipped without CUDA)."""
import pytest
import torch

import icon_kernels as ik
from cases import relative_error

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _run(x, target, backend, **kw):
    x = x.detach().clone().requires_grad_()
    loss = ik.icon_loss(x, target=target, backend=backend, **kw)
    loss.backward()
    return loss.detach().double(), x.grad.double()


CONFIGS = [
    dict(kernel="cosine", temperature=0.1),
    dict(kernel="gaussian", sigma=1.0, beta=0.1),
    dict(kernel="student_t", dof=1.0, alpha=0.1),
]


@pytest.mark.parametrize("config", CONFIGS, ids=[c["kernel"] for c in CONFIGS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_n4096_against_reference(config, dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4096, 128, device="cuda", generator=g) / 128 ** 0.5 * 3
    target = ik.Labels(torch.arange(4096, device="cuda") // 4)
    exact = _run(x.double(), target, "reference", **config)
    ours = _run(x.to(dtype), target, "triton", **config)
    if dtype == torch.float32:
        for mine, want in zip(ours, exact):
            assert relative_error(mine, want) <= 5e-5
    else:
        naive = _run(x.to(dtype), target, "reference", **config)
        for mine, theirs, want in zip(ours, naive, exact):
            assert relative_error(mine, want) <= 2 * relative_error(theirs, want) + 1e-4


def test_n65536_matches_torch_backend():
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(65536, 128, device="cuda", generator=g) / 128 ** 0.5 * 3
    target = ik.Labels(torch.arange(65536, device="cuda") // 2)
    want = _run(x, target, "torch", kernel="dot", temperature=0.1)
    got = _run(x, target, "triton", kernel="dot", temperature=0.1)
    for mine, ref in zip(got, want):
        assert relative_error(mine, ref) <= 1e-4
