"""The CUDA kernels' shared memory: past the default 48 KB per block they opt in to more, and past
the device's limit they raise naming the backends that work (skipped without a GPU and the CUDA
build). Their checks against the reference are in test_backends_vs_reference.py."""
import pytest
import torch

import icon_kernels as ik
from cases import check_against_reference, clone_problem, loss_and_grads, to_device


def wide_affinity_problem(dtype, d, dz, n=20, seed=3, rank=4):
    """An Affinity problem with wide features (x: n x d, z: n x dz), every leaf requiring grad.
    Rows are rank-4 points embedded in d (dz) dimensions: every entry is nonzero, but pairwise
    similarities keep an O(1) spread (random wide rows would all be near-equidistant, making fp32
    losses and gradients ill-conditioned)."""
    gen = torch.Generator().manual_seed(seed)

    def embed(width):
        u = torch.randn(n, rank, generator=gen, dtype=torch.float64)
        basis, _ = torch.linalg.qr(torch.randn(width, rank, generator=gen, dtype=torch.float64))
        return (u @ basis.T).requires_grad_()

    x, z = embed(d), embed(dz)
    sigma = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    target = ik.Affinity(z, None, kernel="gaussian", sigma=sigma)
    kwargs = {"kernel": "student_t", "dof": torch.tensor(1.5, dtype=torch.float64, requires_grad=True),
              "alpha": 0.2, "beta": 0.3, "reduction": "none"}
    upstream = torch.randn(n, generator=gen, dtype=torch.float64)
    return clone_problem(x, None, target, kwargs, dtype), upstream


@pytest.mark.parametrize("backend", ["cuda"], indirect=True)
def test_shared_memory_above_48kb(backend):
    # fp32, d = dz = 3000: 4 * (2 * 6000 + 4 * 256) = 52,096 bytes per block, past the default
    # 48 KB, so the kernels must opt in to more dynamic shared memory (launch failed before)
    problem, upstream = wide_affinity_problem(torch.float32, d=3000, dz=3000)
    check_against_reference(problem, upstream, torch.float32, 1e-5, backend)


@pytest.mark.parametrize("backend", ["cuda"], indirect=True)
def test_shared_memory_above_device_limit_says_which_backend(backend):
    limit = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()),
                    "shared_memory_per_block_optin", 227 * 1024)
    d = limit // 32 + 64      # fp64 needs 8 * (2 * (d + d) + 1024) > 32 d > limit bytes
    problem, upstream = wide_affinity_problem(torch.float64, d=d, dz=d, n=4)
    with pytest.raises(RuntimeError, match=rf"d = {d} and dz = {d} in float64 need \d+ bytes of shared "
                                           rf"memory per block, more than this device's limit of \d+ bytes; "
                                           rf"use backend 'triton' or 'torch'"):
        loss_and_grads(*to_device(problem, "cuda"), backend, upstream.cuda())
