"""The fused CUDA backend equals the dense reference (skipped without a GPU)."""
import itertools
import zlib

import pytest
import torch

import icon_kernels as ik
from cases import KERNELS, TARGETS, clone_problem, loss_and_grads, relative_error, to_device
from test_torch_vs_reference import SETTINGS, TOL, build

pytestmark = pytest.mark.skipif("cuda" not in ik.available_backends(),
                                reason="cuda backend unavailable (needs a GPU and the CUDA build)")


def check(problem, upstream, dtype):
    want_loss, want_grads = loss_and_grads(*clone_problem(*problem, torch.float64), "reference", upstream)
    got_loss, got_grads = loss_and_grads(*to_device(problem, "cuda"), "cuda", upstream.cuda())
    assert got_loss.dtype == dtype
    assert relative_error(got_loss.cpu(), want_loss) <= TOL[dtype]
    for g, w in zip(got_grads, want_grads):
        assert relative_error(g.cpu(), w) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("setting", SETTINGS, ids=[s[0] for s in SETTINGS])
@pytest.mark.parametrize("kernel,target_kind", list(itertools.product(KERNELS, TARGETS)))
def test_every_kernel_target_and_option(kernel, target_kind, setting, dtype):
    seed = zlib.crc32(f"{kernel}{target_kind}{setting[0]}".encode()) % 1000
    problem, upstream = build(kernel, target_kind, setting, dtype, seed=seed, n=300, m=270)
    check(problem, upstream, dtype)


@pytest.mark.parametrize("t_kernel", KERNELS)
def test_affinity_target_gradients(t_kernel):
    problem, upstream = build("student_t", "affinity", SETTINGS[1], torch.float64, seed=11,
                              target_grad=True, t_kernel=t_kernel, param_tensor="rows")
    check(problem, upstream, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_half_error_within_twice_pytorchs_own(dtype):
    problem, upstream = build("cosine", "labels", SETTINGS[0], dtype, seed=5, n=512, m=512, d=64)
    exact = loss_and_grads(*to_device(clone_problem(*problem, torch.float64), "cuda"), "reference", upstream.cuda())
    naive = loss_and_grads(*to_device(problem, "cuda"), "reference", upstream.cuda())
    ours = loss_and_grads(*to_device(problem, "cuda"), "cuda", upstream.cuda())
    assert relative_error(ours[0], exact[0]) <= 2 * relative_error(naive[0], exact[0]) + 1e-4
    for mine, theirs, want in zip(ours[1], naive[1], exact[1]):
        assert relative_error(mine, want) <= 2 * relative_error(theirs, want) + 1e-4


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


def test_shared_memory_above_48kb():
    # fp32, d = dz = 3000: 4 * (2 * 6000 + 4 * 256) = 52,096 bytes per block, past the default
    # 48 KB, so the kernels must opt in to more dynamic shared memory (launch failed before)
    problem, upstream = wide_affinity_problem(torch.float32, d=3000, dz=3000)
    check(problem, upstream, torch.float32)


def test_shared_memory_above_device_limit_says_which_backend():
    limit = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()),
                    "shared_memory_per_block_optin", 227 * 1024)
    d = limit // 32 + 64      # fp64 needs 8 * (2 * (d + d) + 1024) > 32 d > limit bytes
    problem, upstream = wide_affinity_problem(torch.float64, d=d, dz=d, n=4)
    with pytest.raises(RuntimeError, match=rf"d = {d} and dz = {d} in float64 need \d+ bytes of shared "
                                           rf"memory per block, more than this device's limit of \d+ bytes; "
                                           rf"use backend 'triton' or 'torch'"):
        loss_and_grads(*to_device(problem, "cuda"), "cuda", upstream.cuda())
