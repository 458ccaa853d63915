"""The fused C++ CPU ops under CPU autocast (bf16 and fp16): they run their GEMMs on their own
terms (autocast excluded inside the op), so a mixed-precision training step on the default
backend works and the loss accumulates in fp32."""
import pytest
import torch

import icon_kernels as ik
from cases import relative_error

pytestmark = pytest.mark.skipif("cpu" not in ik.available_backends(), reason="C++ extension not built")

DTYPES = [torch.bfloat16, torch.float16]


def _problem(seed=0, n=40, d=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    labels = torch.arange(n) // 2
    return x, labels


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "f16"])
@pytest.mark.parametrize("kernel,target", [("cosine", "labels"), ("gaussian", "labels"), ("student_t", "affinity")])
def test_fp32_leaf_under_autocast_matches_fp32_reference(dtype, kernel, target):
    """fp32 inputs under autocast: the op's GEMMs must stay fp32 (they were autocast to
    ``dtype`` and the kernel then read them as fp32: "expected scalar type Float")."""
    x0, labels = _problem()
    tgt = ik.Labels(labels) if target == "labels" else ik.Affinity(x0 + 0.1, sigma=1.0)
    upstream = torch.tensor(0.7, dtype=torch.float64)

    def run(x, backend):
        loss = ik.icon_loss(x, target=tgt, kernel=kernel, alpha=0.05, backend=backend)
        return loss, torch.autograd.grad(loss, x, grad_outputs=upstream.to(loss.dtype))[0]

    x = x0.clone().requires_grad_()
    with torch.autocast("cpu", dtype=dtype):
        got_loss, got_grad = run(x, "cpu")
    want_loss, want_grad = run(x0.double().requires_grad_(), "reference")
    assert got_loss.dtype == torch.float32
    assert relative_error(got_loss, want_loss) < 1e-5
    assert relative_error(got_grad, want_grad) < 1e-5


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "f16"])
def test_mixed_precision_training_step_on_the_default_backend(dtype):
    """model(x) is ``dtype`` under autocast and the default backend (auto -> cpu) takes it."""
    x, labels = _problem(1)
    model = torch.nn.Linear(16, 8)
    with torch.autocast("cpu", dtype=dtype):
        z = model(x)
        assert z.dtype == dtype
        loss = ik.icon_loss(z, target=ik.Labels(labels))                 # cosine, backend="auto"
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(model.weight.grad).all()
    assert model.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "f16"])
@pytest.mark.parametrize("kernel", ["dot", "gaussian"])
def test_low_precision_embeddings_under_autocast_accumulate_in_fp32(dtype, kernel):
    """On ``dtype`` embeddings under autocast the op computes in fp32: the loss equals the float64
    reference on the same embeddings up to the final rounding to ``dtype``, and so does the
    gradient (returned in ``dtype``)."""
    x, labels = _problem(2)
    with torch.autocast("cpu", dtype=dtype):
        z = torch.nn.Linear(16, 8)(x).detach().requires_grad_()
        loss = ik.icon_loss(z, target=ik.Labels(labels), kernel=kernel, temperature=0.5, backend="cpu")
        (grad,) = torch.autograd.grad(loss, z)
    z64 = z.detach().double().requires_grad_()
    want = ik.icon_loss(z64, target=ik.Labels(labels), kernel=kernel, temperature=0.5, backend="reference")
    (want_grad,) = torch.autograd.grad(want, z64)
    assert loss.dtype == grad.dtype == dtype
    assert relative_error(loss, want) <= 2 * relative_error(want.to(dtype), want) + 1e-6
    assert relative_error(grad, want_grad) <= 2 * relative_error(want_grad.to(dtype), want_grad) + 1e-6


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "f16"])
def test_ring_label_block_ops_under_autocast(dtype):
    """The ring-mode block ops exclude autocast too: the same fp32 statistics and gradients."""
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(6, 4, generator=g), torch.randn(5, 4, generator=g)
    rows, cols = torch.randint(0, 3, (6,), generator=g), torch.randint(0, 3, (5,), generator=g)
    stats_args = (x, y, torch.tensor(0.7), "gaussian", rows, cols, True, 2, 8)

    def backward():
        out = [torch.zeros_like(x), torch.zeros_like(y), torch.zeros(6)]
        want = torch.ops.icon_kernels.cpu_label_block_stats(*stats_args)
        torch.ops.icon_kernels.cpu_label_block_backward(
            torch.rand(6, generator=torch.Generator().manual_seed(4)), x, y, torch.tensor(0.7), "gaussian",
            rows, cols, 0.1, True, 2, 9, want[0], want[1], 8, *out)
        return out

    want_stats, want_grads = torch.ops.icon_kernels.cpu_label_block_stats(*stats_args), backward()
    with torch.autocast("cpu", dtype=dtype):
        got_stats, got_grads = torch.ops.icon_kernels.cpu_label_block_stats(*stats_args), backward()
    assert got_stats.dtype == torch.float32 and torch.equal(got_stats, want_stats)
    for got, want in zip(got_grads, want_grads):
        assert torch.equal(got, want)
