"""ik.calibrate_sigma against scikit-learn's perplexity calibration
(sklearn.manifold._utils._binary_search_perplexity, the exact-method t-SNE search): the
conditional rows P(j|i) agree to 1e-4; the entropies hit log(perplexity); no N x N matrix."""
import math
import os
import sys

import pytest
import torch

import icon_kernels as ik
from icon_kernels.helpers import pair_blocks

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from big_tensor_probe import LargestTensor  # noqa: E402


def conditional_rows(z, sigma):
    d = (z[:, None, :] - z[None, :, :]).square().sum(-1)
    logits = (-d / (2 * sigma[:, None] ** 2)).fill_diagonal_(-math.inf)
    return logits.softmax(1), d


def data(n, d, seed):
    gen = torch.Generator().manual_seed(seed)
    spread = torch.rand(n, 1, generator=gen, dtype=torch.float64) * 3 + 0.2   # uneven densities
    return torch.randn(n, d, generator=gen, dtype=torch.float64) * spread


@pytest.mark.parametrize("n, d, perplexity", [(60, 5, 5.0), (150, 10, 30.0), (97, 3, 2.5)])
def test_rows_match_scikit_learn(monkeypatch, n, d, perplexity):
    perp_utils = pytest.importorskip("sklearn.manifold._utils")
    monkeypatch.setattr(pair_blocks, "BLOCK_ELEMENTS", 1000)       # several row chunks
    z = data(n, d, n)
    sigma = ik.calibrate_sigma(z, perplexity)
    assert sigma.shape == (n,) and sigma.dtype == z.dtype and bool((sigma > 0).all())
    p, sq = conditional_rows(z, sigma)
    # scikit-learn takes squared distances, P_ij = exp(-beta_i d_ij^2) over j != i: beta = 1/(2 sigma^2)
    p_sklearn = torch.from_numpy(perp_utils._binary_search_perplexity(sq.float().numpy(), perplexity, 0))
    assert (p - p_sklearn.double()).abs().max().item() <= 1e-4
    entropy = -(p * torch.log(torch.where(p > 0, p, 1.0))).sum(1)
    assert (entropy - math.log(perplexity)).abs().max().item() <= 1e-9


def test_float32_input_gives_float32_sigma_of_the_same_rows():
    z = data(40, 4, 1)
    s64 = ik.calibrate_sigma(z, 8.0)
    s32 = ik.calibrate_sigma(z.float(), 8.0)
    assert s32.dtype == torch.float32
    assert torch.allclose(s32.double(), s64, rtol=1e-4)


def test_builds_no_n_by_n_matrix(monkeypatch):
    monkeypatch.setattr(pair_blocks, "BLOCK_ELEMENTS", 1 << 16)     # blocks well below N x N
    n = 1200
    z = torch.randn(n, 6)
    with LargestTensor() as probe:
        ik.calibrate_sigma(z, 20.0)
    assert probe.numel < n * n // 4, probe.numel


@pytest.mark.parametrize("call, match", [
    (lambda: ik.calibrate_sigma(torch.randn(10, 2), 1.0), "perplexity"),
    (lambda: ik.calibrate_sigma(torch.randn(10, 2), 9.0), "perplexity"),
    (lambda: ik.calibrate_sigma(torch.randn(10, 2), "5"), "perplexity"),
    (lambda: ik.calibrate_sigma(torch.randn(10), 3.0), "z"),
    (lambda: ik.calibrate_sigma(torch.randn(10, 2), 3.0, max_iter=0), "max_iter"),
    (lambda: ik.calibrate_sigma(torch.randn(10, 2), 3.0, tol=0.0), "tol"),
    (lambda: ik.calibrate_sigma(torch.full((4, 2), float("inf")), 2.0), "z"),
])
def test_bad_arguments_raise_naming_the_argument(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()
