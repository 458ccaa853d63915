"""The torch backend on CUDA tensors equals the float64 reference (skipped without a GPU)."""
import pytest
import torch

from cases import KERNELS, TARGETS, clone_problem, loss_and_grads, relative_error, to_device
from cases import SETTINGS, build

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("target_kind", TARGETS)
@pytest.mark.parametrize("setting", SETTINGS[:2], ids=[s[0] for s in SETTINGS[:2]])
def test_cuda_matches_reference(kernel, target_kind, setting):
    problem, upstream = build(kernel, target_kind, setting, torch.float64, seed=1)
    want_loss, want_grads = loss_and_grads(*clone_problem(*problem, torch.float64), "reference", upstream)
    got_loss, got_grads = loss_and_grads(*to_device(problem, "cuda"), "torch", upstream.cuda())
    assert got_loss.is_cuda
    assert relative_error(got_loss.cpu(), want_loss) <= 1e-9
    for g, w in zip(got_grads, want_grads):
        assert relative_error(g.cpu(), w) <= 1e-9
