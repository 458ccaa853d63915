"""The torch.library ops: opcheck on every registered op, and torch.compile(fullgraph=True)."""
import os

import pytest
import torch

import icon_kernels as ik
from icon_kernels.backends.dispatch import op_arguments
from icon_kernels.backends.ops import forward_op
from icon_kernels.validation import check_arguments


def device_of(backend):
    """Where a backend's op runs: triton needs CUDA tensors unless the interpreter is on."""
    if backend == "cuda" or (backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1"):
        return "cuda"
    return "cpu"


def _on(device, args):
    return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)


def _problem(target_kind, dtype=torch.float64, requires_grad=True, device="cpu"):
    return _on(device, _cpu_problem(target_kind, dtype, requires_grad))


def _cpu_problem(target_kind, dtype, requires_grad):
    g = torch.Generator().manual_seed(0)
    n, m, d = 11, 9, 5
    x = torch.randn(n, d, generator=g, dtype=dtype).requires_grad_(requires_grad)
    y = torch.randn(m, d, generator=g, dtype=dtype).requires_grad_(requires_grad)
    tau = torch.tensor(0.5, dtype=dtype, requires_grad=requires_grad)
    targets = {
        "labels": ik.Labels(torch.randint(0, 3, (n,), generator=g), torch.randint(0, 3, (m,), generator=g)),
        "neighbors": ik.Neighbors(torch.randint(-1, m, (n, 3), generator=g)),
        "affinity": ik.Affinity(torch.randn(n, 4, generator=g, dtype=dtype).requires_grad_(requires_grad),
                                torch.randn(m, 4, generator=g, dtype=dtype).requires_grad_(requires_grad),
                                sigma=torch.tensor(1.2, dtype=dtype, requires_grad=requires_grad)),
        "dense": ik.Dense(torch.rand(n, m, generator=g, dtype=dtype)),
    }
    pb = check_arguments(x, y, target=targets[target_kind], kernel="dot", temperature=tau, sigma=1.0,
                         dof=1.0, exponent=1.0, alpha=0.1, beta=0.2, exclude_self=False, divergence="kl",
                         reduction="mean", weight=None)
    return op_arguments(pb)


FUSED = [b for b in ("torch", "cpu", "triton", "cuda") if b in ik.available_backends()]


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("target_kind", ["labels", "neighbors", "affinity", "dense"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_opcheck_forward(backend, target_kind, dtype):
    torch.library.opcheck(forward_op(backend), _problem(target_kind, dtype, device=device_of(backend)))


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("target_kind", ["labels", "affinity"])
@pytest.mark.parametrize("need_target_grad,need_param_grad", [(False, True), (True, True), (False, False)])
def test_opcheck_backward(backend, target_kind, need_target_grad, need_param_grad):
    device = device_of(backend)
    args = _problem(target_kind, requires_grad=False, device=device)
    _, valid, stats = forward_op(backend)(*args)
    grad_rows = torch.linspace(-1, 1, args[0].shape[0], dtype=torch.float64, device=device)
    op = getattr(torch.ops.icon_kernels, f"{backend}_backward").default
    torch.library.opcheck(op, (grad_rows, *args, valid, stats, need_target_grad, need_param_grad, False))


@pytest.mark.parametrize("backend", FUSED)
def test_torch_compile_fullgraph_matches_eager(backend):
    g = torch.Generator().manual_seed(1)
    device = device_of(backend)
    x = torch.randn(50, 16, generator=g).to(device)
    labels = (torch.arange(50) // 2).to(device)
    tau = torch.tensor(0.2, device=device)

    def step(x, tau):
        return ik.icon_loss(x, target=ik.Labels(labels), kernel="cosine", temperature=tau,
                            alpha=0.05, backend=backend)

    compiled = torch.compile(step, fullgraph=True)
    results = []
    for fn in (step, compiled):
        xi, ti = x.clone().requires_grad_(), tau.clone().requires_grad_()
        loss = fn(xi, ti)
        loss.backward()
        results.append((loss.detach(), xi.grad, ti.grad))
    for eager, comp in zip(*results):
        torch.testing.assert_close(comp, eager, rtol=1e-5, atol=1e-6)


def _global_problem(target_kind, normalization, symmetrize, requires_grad):
    """Op arguments of a square problem under joint normalisation or with a symmetrised target."""
    g = torch.Generator().manual_seed(3)
    n, d = 10, 4
    x = torch.randn(n, d, generator=g, dtype=torch.float64).requires_grad_(requires_grad)
    z = torch.randn(n, 3, generator=g, dtype=torch.float64)
    targets = {
        "labels": ik.Labels(torch.randint(0, 3, (n,), generator=g)),
        "neighbors": ik.Neighbors(torch.randint(-1, n, (n, 3), generator=g), symmetrize=symmetrize),
        "affinity": ik.Affinity(z if symmetrize else z.requires_grad_(requires_grad),
                                sigma=torch.rand(n, generator=g, dtype=torch.float64) + 0.8, symmetrize=symmetrize),
        "dense": ik.Dense(torch.rand(n, n, generator=g, dtype=torch.float64)),
    }
    pb = check_arguments(x, None, target=targets[target_kind], kernel="student_t", temperature=1.0, sigma=1.0,
                         dof=torch.tensor(1.5, dtype=torch.float64, requires_grad=requires_grad), exponent=1.0,
                         alpha=0.1, beta=0.0, exclude_self=None, divergence="js", reduction="mean", weight=None,
                         normalization=normalization)
    return op_arguments(pb)


GLOBAL_CASES = [("labels", "joint", False), ("neighbors", "joint", False), ("dense", "joint", False),
                ("affinity", "joint", False), ("affinity", "joint", True), ("affinity", "conditional", True),
                ("neighbors", "conditional", True)]


@pytest.mark.skipif("cpu" not in ik.available_backends(), reason="the cpu backend is not built")
@pytest.mark.parametrize("target_kind,normalization,symmetrize", GLOBAL_CASES)
def test_opcheck_cpu_joint_and_symmetrised(target_kind, normalization, symmetrize):
    """The cpu op's joint normalisation and symmetrised targets (csrc/cpu_global_rows.h): forward
    with its autograd rule, and the backward op."""
    args = _global_problem(target_kind, normalization, symmetrize, requires_grad=True)
    torch.library.opcheck(forward_op("cpu"), args)
    plain = _global_problem(target_kind, normalization, symmetrize, requires_grad=False)
    _, valid, stats = forward_op("cpu")(*plain)
    grad_rows = torch.linspace(-1, 1, plain[0].shape[0], dtype=torch.float64)
    need_target = target_kind == "affinity" and not symmetrize
    torch.library.opcheck(torch.ops.icon_kernels.cpu_backward.default,
                          (grad_rows, *plain, valid, stats, need_target, True, False))
