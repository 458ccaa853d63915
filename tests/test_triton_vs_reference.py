"""The Triton backend equals the dense reference. Without a GPU the kernels run under
TRITON_INTERPRET=1 (set in conftest.py) on small ragged shapes; fp32 and fp16 inputs."""
import itertools
import zlib

import pytest
import torch

import icon_kernels as ik
from cases import KERNELS, TARGETS, clone_problem, loss_and_grads, relative_error, to_device
from test_torch_vs_reference import SETTINGS, build

pytestmark = pytest.mark.skipif("triton" not in ik.available_backends(),
                                reason=f"triton backend unavailable: {ik.available_backends(with_reasons=True)['triton']}")
# fp32 against the float64 reference. Scalar parameter grads are sums of per-row terms of both
# signs; their fp32 error reaches 3e-5 here (the reference itself in fp32: up to 8.5e-5 for dof).
TOL = {torch.float32: 5e-5}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"   # cpu: the interpreter
SHAPES = [(45, 38, 16), (70, 70, 33), (33, 61, 64)]


def check(problem, upstream, dtype, tol):
    x, y, target, kwargs = problem
    want_loss, want_grads = loss_and_grads(*clone_problem(x, y, target, kwargs, torch.float64),
                                           "reference", upstream)
    got_loss, got_grads = loss_and_grads(*to_device(problem, DEVICE), "triton", upstream.to(DEVICE))
    got_loss, got_grads = got_loss.cpu(), [g.cpu() for g in got_grads]
    assert got_loss.dtype == dtype
    assert relative_error(got_loss, want_loss) <= tol, (got_loss, want_loss)
    for i, (g, w) in enumerate(zip(got_grads, want_grads)):
        assert g.shape == w.shape
        assert relative_error(g, w) <= tol, f"gradient {i}: rel err {relative_error(g, w)}"


def _seed(*parts):
    return zlib.crc32("".join(map(str, parts)).encode()) % 1000


@pytest.mark.parametrize("setting", SETTINGS, ids=[s[0] for s in SETTINGS])
@pytest.mark.parametrize("kernel,target_kind", list(itertools.product(KERNELS, TARGETS)))
def test_every_kernel_target_and_option(kernel, target_kind, setting):
    shape = SHAPES[_seed(kernel, target_kind, setting[0]) % len(SHAPES)]
    n, m, d = shape
    problem, upstream = build(kernel, target_kind, setting, torch.float32,
                              seed=_seed(kernel, target_kind, setting[0]), n=n, m=m, d=d)
    check(problem, upstream, torch.float32, TOL[torch.float32])


@pytest.mark.parametrize("param_tensor", ["scalar", "rows"])
@pytest.mark.parametrize("kernel", ["dot", "cosine", "gaussian", "student_t"])
def test_learnable_kernel_parameter(kernel, param_tensor):
    problem, upstream = build(kernel, "labels", SETTINGS[1], torch.float32, seed=7,
                              param_tensor=param_tensor, n=50, m=50, d=16)
    check(problem, upstream, torch.float32, TOL[torch.float32])


@pytest.mark.parametrize("setting", SETTINGS, ids=[s[0] for s in SETTINGS])
@pytest.mark.parametrize("t_kernel", KERNELS)
def test_affinity_target_gradients(t_kernel, setting):
    problem, upstream = build("student_t", "affinity", setting, torch.float32, seed=11,
                              target_grad=True, t_kernel=t_kernel, n=40, m=35, d=16)
    check(problem, upstream, torch.float32, TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("kernel,target_kind", list(itertools.product(KERNELS, TARGETS)))
def test_every_kernel_and_target_in_half_precision(kernel, target_kind, dtype):
    """DESIGN §5: error against the exact result <= 2x naive PyTorch's same-dtype error. Under
    the interpreter fp16 runs the native tensor-core path; bf16 is upcast right after loading.
    With the fp32 rows of test_every_kernel_target_and_option this is every kernel x target x
    dtype once: the GPU selection (tests/gpu_selection.py) runs it on the device."""
    problem, upstream = build(kernel, target_kind, SETTINGS[0], dtype, seed=_seed(kernel, target_kind, dtype),
                              n=64, m=64, d=32)
    x, y, target, kwargs = problem
    exact = loss_and_grads(*clone_problem(x, y, target, kwargs, torch.float64), "reference", upstream)
    naive = loss_and_grads(*clone_problem(x, y, target, kwargs, dtype), "reference", upstream)
    ours = loss_and_grads(*to_device(problem, DEVICE), "triton", upstream.to(DEVICE))
    ours = ours[0].cpu(), [g.cpu() for g in ours[1]]
    assert ours[0].dtype == dtype
    floor = 1e-4
    assert relative_error(ours[0], exact[0]) <= 2 * relative_error(naive[0], exact[0]) + floor
    for mine, theirs, want in zip(ours[1], naive[1], exact[1]):
        assert relative_error(mine, want) <= 2 * relative_error(theirs, want) + floor


def test_low_temperature_huge_logits():
    g = torch.Generator().manual_seed(2)
    x = (30 * torch.randn(64, 16, generator=g)).requires_grad_()
    target = ik.Labels(torch.arange(64) // 2)
    kw = dict(kernel="dot", temperature=0.01)
    up = torch.tensor(1.3)
    want = loss_and_grads(x.detach().double().requires_grad_(), None, target, kw, "reference", up)
    got = loss_and_grads(*to_device((x, None, target, kw), DEVICE), "triton", up.to(DEVICE))
    got = got[0].cpu(), [g.cpu() for g in got[1]]
    assert torch.isfinite(got[0]) and torch.isfinite(got[1][0]).all()
    assert relative_error(got[0], want[0]) <= 1e-5
    assert relative_error(got[1][0], want[1][0]) <= 1e-5


@pytest.mark.parametrize("kernel,target_kind", [("dot", "labels"), ("gaussian", "neighbors"),
                                                ("student_t", "affinity"), ("log_dot", "dense")])
@pytest.mark.parametrize("setting", SETTINGS[1:3], ids=[s[0] for s in SETTINGS[1:3]])
def test_feature_dim_chunked(monkeypatch, kernel, target_kind, setting):
    """d beyond the register budget is looped over in chunks (shrunk here so d = 50 takes
    4 ragged chunks of 16)."""
    from icon_kernels._triton import launchers
    monkeypatch.setattr(launchers, "MAX_BLOCK_D", 32)
    monkeypatch.setattr(launchers, "D_CHUNK", 16)
    problem, upstream = build(kernel, target_kind, setting, torch.float32, seed=9, n=40, m=37,
                              d=50, target_grad=target_kind == "affinity",
                              param_tensor=kernel != "log_dot" and "rows")
    check(problem, upstream, torch.float32, TOL[torch.float32])


def test_feature_dim_300_uses_chunks():
    problem, upstream = build("cosine", "labels", SETTINGS[0], torch.float32, seed=4, n=36, m=36, d=300)
    check(problem, upstream, torch.float32, TOL[torch.float32])
