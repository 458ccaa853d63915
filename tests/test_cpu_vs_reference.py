"""The fused C++ CPU backend equals the dense reference on the foundation's full matrix."""
import itertools
import zlib

import pytest
import torch

import icon_kernels as ik
from cases import KERNELS, TARGETS, clone_problem, loss_and_grads, relative_error
from test_torch_vs_reference import SETTINGS, build, check_against_reference

pytestmark = pytest.mark.skipif("cpu" not in ik.available_backends(),
                                reason="cpu backend unavailable (C++ extension not built)")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("setting", SETTINGS, ids=[s[0] for s in SETTINGS])
@pytest.mark.parametrize("kernel,target_kind", list(itertools.product(KERNELS, TARGETS)))
def test_every_kernel_target_and_option(kernel, target_kind, setting, dtype):
    seed = zlib.crc32(f"{kernel}{target_kind}{setting[0]}".encode()) % 1000
    problem, upstream = build(kernel, target_kind, setting, dtype, seed=seed)
    check_against_reference(problem, upstream, dtype, backend="cpu")


@pytest.mark.parametrize("setting", SETTINGS, ids=[s[0] for s in SETTINGS])
@pytest.mark.parametrize("kernel,target_kind", list(itertools.product(KERNELS, TARGETS)))
def test_several_row_blocks_f64(kernel, target_kind, setting):
    """N = 150 rows: three row blocks of 64, the last one ragged."""
    seed = zlib.crc32(f"{kernel}{target_kind}{setting[0]}".encode()) % 1000
    problem, upstream = build(kernel, target_kind, setting, torch.float64, seed=seed, n=150, m=131)
    check_against_reference(problem, upstream, torch.float64, backend="cpu")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("param_tensor", ["scalar", "rows"])
@pytest.mark.parametrize("setting", SETTINGS[:3], ids=[s[0] for s in SETTINGS[:3]])
@pytest.mark.parametrize("kernel", ["dot", "cosine", "gaussian", "student_t"])
def test_learnable_kernel_parameter(kernel, setting, param_tensor, dtype):
    problem, upstream = build(kernel, "labels", setting, dtype, seed=7, param_tensor=param_tensor)
    check_against_reference(problem, upstream, dtype, backend="cpu")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("setting", SETTINGS, ids=[s[0] for s in SETTINGS])
@pytest.mark.parametrize("t_kernel", KERNELS)
def test_affinity_target_gradients(t_kernel, setting, dtype):
    problem, upstream = build("student_t", "affinity", setting, dtype, seed=11, target_grad=True,
                              t_kernel=t_kernel)
    check_against_reference(problem, upstream, dtype, backend="cpu")


@pytest.mark.parametrize("n,m,d", [(1, 1, 3), (2, 5, 1), (5, 3, 130), (200, 17, 8)])
@pytest.mark.parametrize("rect", [False, True])
def test_ragged_and_tiny_shapes(n, m, d, rect):
    setting = SETTINGS[2] if rect else SETTINGS[0]
    problem, upstream = build("gaussian", "affinity", setting, torch.float64, seed=3, n=n, m=m, d=d)
    check_against_reference(problem, upstream, torch.float64, backend="cpu")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_half_inputs_are_upcast(dtype):
    problem, upstream = build("cosine", "labels", SETTINGS[0], dtype, seed=5, n=64, m=64, d=32)
    x, y, target, kwargs = problem
    exact = loss_and_grads(*clone_problem(x, y, target, kwargs, torch.float64), "reference", upstream)
    naive = loss_and_grads(*clone_problem(x, y, target, kwargs, dtype), "reference", upstream)
    ours = loss_and_grads(x, y, target, kwargs, "cpu", upstream)
    assert ours[0].dtype == dtype
    assert relative_error(ours[0], exact[0]) <= 2 * relative_error(naive[0], exact[0]) + 1e-4
    for mine, theirs, want in zip(ours[1], naive[1], exact[1]):
        assert relative_error(mine, want) <= 2 * relative_error(theirs, want) + 1e-4


def test_threads_do_not_change_the_result():
    problem, upstream = build("gaussian", "neighbors", SETTINGS[2], torch.float64, seed=8, n=300, m=280)
    results = []
    for threads in (1, 2):
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            results.append(loss_and_grads(*clone_problem(*problem, torch.float64), "cpu", upstream))
        finally:
            torch.set_num_threads(old)
    assert relative_error(results[0][0], results[1][0]) <= 1e-13
    for a, b in zip(results[0][1], results[1][1]):
        assert relative_error(a, b) <= 1e-13
