"""A training step under torch.autocast (bf16 and fp16) works on every backend, and the fused
backends keep their own fp32 accumulation inside (issue 13 item 8: under CPU autocast the
fused cpu op's internal GEMM was cast to bf16 while the kernel read fp32 buffers, and crashed)."""
import math
import os

import pytest
import torch

import icon_kernels as ik

BACKENDS = ["reference", "torch", "cpu", "triton"]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _usable(backend):
    if backend not in ik.available_backends():
        pytest.skip(f"{backend} backend unavailable here")
    if backend == "triton" and DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU tensors reach triton only through the interpreter")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("target", ["labels", "affinity"])
@pytest.mark.parametrize("backend", BACKENDS + ["cuda"])
def test_training_step_under_autocast(backend, target, dtype):
    _usable(backend)
    device = "cuda" if backend == "cuda" else DEVICE
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 8).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    inputs = torch.randn(24, 16, device=device)
    tgt = (ik.Labels(torch.arange(24, device=device) // 3) if target == "labels"
           else ik.Affinity(inputs, kernel="gaussian", sigma=4.0))
    before = model.weight.detach().clone()
    with torch.autocast(device_type=device, dtype=dtype):
        emb = model(inputs)
        assert emb.dtype == dtype
        loss = ik.icon_loss(emb, target=tgt, kernel="dot", temperature=0.5, backend=backend)
    loss.backward()
    assert torch.isfinite(loss).item()
    assert model.weight.grad is not None and torch.isfinite(model.weight.grad).all()
    opt.step()
    assert not torch.equal(model.weight.detach(), before)
    if backend == "reference":
        return            # the dense oracle runs its matmuls in the autocast dtype, as PyTorch does
    # the fused op accumulates in fp32 on the low-precision embeddings it was given, and the
    # loss comes back in their dtype: within one ulp of a float64 evaluation of the same
    # embeddings (a bf16 GEMM inside would be off by several)
    exact_tgt = tgt if target == "labels" else ik.Affinity(inputs.double(), kernel="gaussian", sigma=4.0)
    want = ik.icon_loss(emb.detach().double(), target=exact_tgt, kernel="dot", temperature=0.5,
                        backend="reference").item()
    ulp = torch.finfo(dtype).eps * 2.0 ** math.floor(math.log2(abs(want)))
    assert abs(loss.item() - want) <= ulp, (loss.item(), want, ulp)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("backend", ["torch", "cpu", "triton", "cuda"])
def test_fused_row_losses_accumulate_in_fp32_under_autocast(backend, dtype):
    """The per-row losses the fused op returns (fp32, before the cast to the inputs' dtype) are
    fp32-accurate on low-precision inputs under autocast: the op's GEMMs are not autocast."""
    from icon_kernels.backends.dispatch import row_losses
    from icon_kernels.validation import check_arguments
    _usable(backend)
    device = "cuda" if backend == "cuda" else DEVICE
    gen = torch.Generator().manual_seed(1)
    emb = torch.randn(40, 16, generator=gen).to(device=device, dtype=dtype)
    target = ik.Labels(torch.arange(40, device=device) // 4)
    options = dict(target=target, kernel="dot", temperature=0.3, sigma=1.0, dof=1.0, exponent=1.0,
                   alpha=0.0, beta=0.0, exclude_self=None, divergence="kl", reduction="none", weight=None)
    with torch.autocast(device_type=device, dtype=dtype):
        rows, _ = row_losses(check_arguments(emb, None, **options), backend)
    want, _ = row_losses(check_arguments(emb.double(), None, **options), "reference")
    assert rows.dtype == torch.float32
    err = ((rows.double() - want.to(rows.device)).norm() / want.norm()).item()
    assert err <= 1e-5, err
