"""The torch backend's column stream (joint normalisation, symmetrised targets) never builds an
N x N tensor: every tensor that any aten op returns during forward + backward, recorded by a
TorchDispatchMode, holds at most a few row-chunk tiles' worth of entries (the chunk budget is
shrunk so that a tile is a small fraction of N x N)."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import icon_kernels as ik
from icon_kernels.backends import blockwise

N, D, CHUNK = 384, 8, 4096          # a chunk: 10 rows x 384 columns; N x N = 147456 entries


class LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def _targets(gen):
    z = torch.randn(N, 3, generator=gen)
    idx = torch.randint(-1, N, (N, 5), generator=gen)
    return {
        "labels-joint": (ik.Labels(torch.arange(N) % 7), "joint"),
        "affinity-symmetrised-joint": (ik.Affinity(z, sigma=torch.rand(N, generator=gen) + 0.5, symmetrize=True),
                                       "joint"),
        "affinity-symmetrised-conditional": (ik.Affinity(z, symmetrize=True), "conditional"),
        "neighbors-symmetrised-joint": (ik.Neighbors(idx, torch.rand(N, 5, generator=gen), symmetrize=True),
                                        "joint"),
    }


@pytest.mark.parametrize("case", ["labels-joint", "affinity-symmetrised-joint", "affinity-symmetrised-conditional",
                                  "neighbors-symmetrised-joint"])
@pytest.mark.parametrize("divergence", ["kl", "js"])
def test_no_tensor_grows_with_n_squared(monkeypatch, case, divergence):
    monkeypatch.setattr(blockwise, "CHUNK_ELEMENTS", CHUNK)
    gen = torch.Generator().manual_seed(0)
    target, normalization = _targets(gen)[case]
    x = torch.randn(N, D, generator=gen, requires_grad=True)
    with LargestTensor() as mode:
        loss = ik.icon_loss(x, target=target, kernel="student_t", normalization=normalization,
                            divergence=divergence, backend="torch")
        loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    # a few tiles (10 x 384 = 3840 entries each), far below one N x N matrix (147456)
    assert mode.largest <= 4 * CHUNK, f"{case}: a tensor of {mode.largest} entries (N x N = {N * N})"
