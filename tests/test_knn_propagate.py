"""ik.knn against torch.topk on the dense distance matrix, and ik.propagate against dense powers
of the row-normalised adjacency; neither builds an N x N matrix."""
import os
import sys

import pytest
import torch
import torch.nn.functional as F

import icon_kernels as ik
from icon_kernels.helpers import pair_blocks

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from big_tensor_probe import LargestTensor  # noqa: E402


def dense_scores(z, metric):
    if metric == "euclidean":
        d = (z[:, None, :] - z[None, :, :]).square().sum(-1)
    elif metric == "cosine":
        zn = F.normalize(z, dim=1)
        d = 1 - zn @ zn.T
    else:
        d = -(z @ z.T)
    return d.fill_diagonal_(float("inf"))


@pytest.fixture
def small_blocks(monkeypatch):
    """Many ragged row chunks and column tiles on small problems."""
    monkeypatch.setattr(pair_blocks, "BLOCK_ELEMENTS", 300)
    from icon_kernels.helpers import knn as neighbors_graph
    monkeypatch.setattr(neighbors_graph, "COLUMN_TILE", 17)


@pytest.mark.parametrize("metric", ["euclidean", "cosine", "dot"])
@pytest.mark.parametrize("n, d, k", [(50, 3, 1), (83, 7, 9), (40, 2, 39)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_knn_matches_topk_of_dense_distances(small_blocks, metric, n, d, k, dtype):
    gen = torch.Generator().manual_seed(n + k)
    z = torch.randn(n, d, generator=gen, dtype=torch.float64)
    got = ik.knn(z.to(dtype), k, metric)
    assert got.dtype == torch.int64 and got.shape == (n, k)
    want = dense_scores(z, metric).topk(k, dim=1, largest=False).indices
    assert torch.equal(got, want)
    assert not (got == torch.arange(n)[:, None]).any()       # never the point itself


def test_knn_default_metric_is_euclidean_and_duplicates_still_exclude_self():
    z = torch.tensor([[0.0, 0.0], [0.0, 0.0], [5.0, 0.0], [1.0, 0.0]])
    got = ik.knn(z, 2)
    assert got[0].tolist() == [1, 3] and got[1].tolist() == [0, 3]
    assert got[2].tolist() == [3, 0] or got[2].tolist() == [3, 1]


def test_knn_builds_no_n_by_n_matrix(monkeypatch):
    monkeypatch.setattr(pair_blocks, "BLOCK_ELEMENTS", 1 << 16)     # blocks well below N x N
    n = 1500
    z = torch.randn(n, 8)
    with LargestTensor() as probe:
        idx = ik.knn(z, 5)
    assert idx.shape == (n, 5)
    assert probe.numel < n * n // 4, probe.numel


def dense_adjacency(idx, w, n):
    a = torch.zeros(n, n, dtype=torch.float64)
    a.scatter_add_(1, idx.clamp_min(0), torch.where(idx >= 0, w, 0.0))
    total = a.sum(1, keepdim=True)
    return a / torch.where(total > 0, total, 1.0)


def to_dense(nb, n):
    assert nb.indices.shape == nb.weights.shape
    rows = nb.indices
    for r in range(n):                                        # deduplicated: no repeats per row
        real = rows[r][rows[r] >= 0]
        assert real.unique().numel() == real.numel()
    return dense_adjacency(nb.indices, nb.weights.double(), n)


@pytest.mark.parametrize("steps", [1, 2, 3])
@pytest.mark.parametrize("cumulative", [False, True])
def test_propagate_equals_dense_matrix_powers(steps, cumulative):
    gen = torch.Generator().manual_seed(steps)
    n, k = 23, 4
    idx = torch.randint(-1, n, (n, k), generator=gen)
    idx[:, 0] = idx[:, 1]                                     # repeated neighbours add up
    idx[3] = -1                                               # a row with no neighbours
    w = torch.rand(n, k, generator=gen, dtype=torch.float64) + 0.1
    got = ik.propagate(ik.Neighbors(idx, w), steps, cumulative=cumulative)
    a = dense_adjacency(idx, w, n)
    powers = [torch.linalg.matrix_power(a, s) for s in range(1, steps + 1)]
    want = sum(powers) / steps if cumulative else powers[-1]
    # walks into the empty row 3 end there: the result is row-normalised again
    want = want / torch.where(want.sum(1, keepdim=True) > 0, want.sum(1, keepdim=True), 1.0)
    dense = to_dense(got, n)
    assert torch.allclose(dense, want, rtol=0, atol=1e-12)
    sums = got.weights.sum(1)
    assert torch.allclose(sums[torch.arange(n) != 3], torch.ones(n - 1, dtype=torch.float64))
    assert (got.indices[3] == -1).all()


def test_propagate_takes_a_plain_knn_index_tensor_and_gives_a_usable_target():
    z = torch.randn(30, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    idx = ik.knn(z, 3)
    nb = ik.propagate(idx, 2)
    want = torch.linalg.matrix_power(dense_adjacency(idx, torch.ones(30, 3, dtype=torch.float64), 30), 2)
    assert torch.allclose(to_dense(nb, 30), want, atol=1e-6)
    emb = torch.randn(30, 2, dtype=torch.float64)
    loss = ik.icon_loss(emb, target=ik.Neighbors(nb.indices, nb.weights.double()), kernel="student_t",
                        backend="reference")
    assert torch.isfinite(loss)
    assert torch.equal(ik.knn_target(z, 3, steps=2).indices, nb.indices)


def test_propagate_builds_no_n_by_n_matrix():
    n = 2000
    idx = ik.knn(torch.randn(n, 4), 4)
    with LargestTensor() as probe:
        nb = ik.propagate(idx, 3)
    assert nb.indices.shape[0] == n
    assert probe.numel < n * n // 4, probe.numel


@pytest.mark.parametrize("call, match", [
    (lambda: ik.knn(torch.randn(5, 2), 5), "k"),
    (lambda: ik.knn(torch.randn(5, 2), 0), "k"),
    (lambda: ik.knn(torch.randn(5, 2), 2.0), "k"),
    (lambda: ik.knn(torch.randn(5, 2), 2, "manhattan"), "metric"),
    (lambda: ik.knn(torch.arange(10).reshape(5, 2), 2), "z"),
    (lambda: ik.knn(torch.tensor([[0.0, float("nan")], [1.0, 1.0]]), 1), "z"),
    (lambda: ik.propagate(torch.tensor([[1], [0]]), 4), "steps"),
    (lambda: ik.propagate(torch.tensor([[1], [2]]), 2), "neighbors"),
    (lambda: ik.propagate(torch.tensor([[1.0], [0.0]]), 2), "neighbors"),
    (lambda: ik.propagate(ik.Neighbors(torch.tensor([[1], [0]]), -torch.ones(2, 1)), 2), "weights"),
])
def test_bad_arguments_raise_naming_the_argument(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()
