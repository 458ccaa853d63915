"""k-nearest-neighbour graphs and neighbour propagation, without an N x N matrix.

``knn(z, k, metric)``: blockwise top-k over column tiles (a running top-k per row chunk merged
with each tile), on the device of ``z`` (any backend's device: plain torch ops).
``propagate(neighbors, steps)``: sparse random walks on that graph, deduplicated and row-normalised.
``knn_target(z, k, metric, steps)``: the uniform kNN target of I-Con ("UniformKNN"), propagated.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..targets import Neighbors
from .pair_blocks import COLUMN_TILE, check_count, check_points, row_chunks, self_pair_mask, squared_distances

METRICS = ("euclidean", "cosine", "dot")


def knn(z: torch.Tensor, k: int, metric: str = "euclidean") -> torch.Tensor:
    """(N, k) int64 indices of the k nearest *other* points of every row of z, nearest first.

    metric: "euclidean" (default), "cosine" (1 - cosine similarity) or "dot" (largest inner
    product first). Memory is O(N * k + block), never N x N.
    """
    check_points("z", z)
    check_count("k", k, 1, z.shape[0] - 1)
    return knn_rows(z, z, k, metric, self_start=0)


def knn_rows(rows: torch.Tensor, cols: torch.Tensor, k: int, metric: str,
             self_start: Optional[int]) -> torch.Tensor:
    """kNN of ``rows`` among ``cols``; row i's own point is column ``self_start + i`` (excluded),
    or nothing is excluded when self_start is None."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}; got {metric!r}")
    if metric == "cosine":
        rows, cols = F.normalize(rows, dim=1), F.normalize(cols, dim=1)
    n, m = rows.shape[0], cols.shape[0]
    tile = min(COLUMN_TILE, m)
    out = torch.empty(n, k, dtype=torch.int64, device=rows.device)
    for r0, r1 in row_chunks(n, tile + k):
        a = rows[r0:r1]
        best = torch.full((r1 - r0, k), float("inf"), dtype=rows.dtype, device=rows.device)
        best_idx = torch.full((r1 - r0, k), -1, dtype=torch.int64, device=rows.device)
        for c0 in range(0, m, tile):
            c1 = min(m, c0 + tile)
            b = cols[c0:c1]
            if metric == "euclidean":
                score = squared_distances(a, b)
            elif metric == "cosine":
                score = 1.0 - a @ b.T
            else:
                score = -(a @ b.T)
            if self_start is not None:
                score = score.masked_fill(self_pair_mask(r0, r1, c0, c1, self_start, a.device), float("inf"))
            idx = torch.arange(c0, c1, device=a.device).expand(r1 - r0, -1)
            merged, pick = torch.cat([best, score], 1).topk(k, dim=1, largest=False, sorted=True)
            best_idx = torch.cat([best_idx, idx], 1).gather(1, pick)
            best = merged
        out[r0:r1] = best_idx
    return out


def _as_graph(neighbors, name: str = "neighbors"):
    """(indices (N, k) int64, weights (N, k) float, N) of a square graph given as ik.Neighbors or
    an index tensor; -1 pads and gets weight 0."""
    if isinstance(neighbors, Neighbors):
        idx, w = neighbors.indices, neighbors.weights
    elif isinstance(neighbors, torch.Tensor):
        idx, w = neighbors, None
    else:
        raise TypeError(f"{name} must be ik.Neighbors or an (N, k) integer tensor, got {type(neighbors).__name__}")
    if not isinstance(idx, torch.Tensor) or idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
        raise TypeError(f"{name}: indices must be an integer tensor of shape (N, k)")
    if idx.dim() != 2 or idx.shape[0] == 0:
        raise ValueError(f"{name}: indices must have shape (N, k) with N >= 1, got {tuple(idx.shape)}")
    n = idx.shape[0]
    idx = idx.long()
    if bool(((idx < -1) | (idx >= n)).any()):
        raise ValueError(f"{name}: indices must lie in [0, {n}) (a square graph on the N rows) or be -1")
    if w is None:
        w = torch.ones(idx.shape, dtype=torch.get_default_dtype(), device=idx.device)
    else:
        if not isinstance(w, torch.Tensor) or not w.is_floating_point():
            raise TypeError(f"{name}: weights must be a floating-point tensor")
        if w.shape != idx.shape:
            raise ValueError(f"{name}: weights must have the shape of indices {tuple(idx.shape)}, got {tuple(w.shape)}")
        if w.device != idx.device:
            raise ValueError(f"{name}: weights are on {w.device} but indices are on {idx.device}")
        if bool((w < 0).any()):
            raise ValueError(f"{name}: weights must be >= 0")
    w = torch.where(idx >= 0, w, torch.zeros((), dtype=w.dtype, device=w.device))
    return idx, w, n


def _merge(idx: torch.Tensor, w: torch.Tensor, n: int):
    """Per row: add up the weights of repeated indices, drop zero weights, pack to the left.

    Returns (indices (N, U) with -1 pads, weights (N, U)), U = the largest support of a row."""
    key = torch.where(w > 0, idx, torch.full_like(idx, n))           # n sorts last: a dropped entry
    key, order = key.sort(dim=1)
    w = w.gather(1, order)
    new = torch.ones_like(key, dtype=torch.bool)
    new[:, 1:] = key[:, 1:] != key[:, :-1]
    segment = new.long().cumsum(1) - 1
    real = key < n
    width = max(int((new & real).sum(1).max()), 1)
    slot = torch.where(real, segment, torch.full_like(segment, width))  # dropped -> spare column
    out_w = torch.zeros(idx.shape[0], width + 1, dtype=w.dtype, device=w.device)
    out_w.scatter_add_(1, slot, torch.where(real, w, torch.zeros_like(w)))
    out_idx = torch.full((idx.shape[0], width + 1), -1, dtype=torch.int64, device=idx.device)
    out_idx.scatter_(1, slot, torch.where(real, key, torch.full_like(key, -1)))
    return out_idx[:, :width], out_w[:, :width]


def _normalise(idx: torch.Tensor, w: torch.Tensor):
    total = w.sum(1, keepdim=True)
    w = w / torch.where(total > 0, total, torch.ones_like(total))
    return torch.where(w > 0, idx, torch.full_like(idx, -1)), w


def propagate(neighbors, steps: int = 2, *, cumulative: bool = False) -> Neighbors:
    """Random walks of length ``steps`` (1 to 3) on a kNN graph, as a sparse ik.Neighbors target.

    With A the row-normalised adjacency of ``neighbors`` (ik.Neighbors with optional weights, or an
    (N, k) index tensor; -1 pads; repeated indices add up), the result is the sparse matrix A^steps
    (or, with ``cumulative=True``, the mean of A, A^2, ..., A^steps): every row lists each reached
    point once (deduplicated) with its walk probability, rows sum to 1, -1 pads the rows to one
    width. A walk that reaches a point without neighbours stops there, and each row is
    renormalised. Walks may return to their start; the loss drops that self pair when self-pairs
    are excluded and renormalises. Memory is O(N * k^steps), never N x N.
    """
    check_count("steps", steps, 1, 3)
    if not isinstance(cumulative, bool):
        raise TypeError(f"cumulative must be a bool, got {type(cumulative).__name__}")
    idx, w, n = _as_graph(neighbors)
    out_idx, out_w = propagate_rows(idx, w, torch.arange(n, device=idx.device), steps, cumulative)
    return Neighbors(out_idx, out_w)


def propagate_rows(idx: torch.Tensor, w: torch.Tensor, rows: torch.Tensor, steps: int,
                   cumulative: bool):
    """The walks of ``propagate`` started from the given rows only (global graph ``idx``, ``w``)."""
    n = idx.shape[0]
    base_idx, base_w = _normalise(*_merge(idx, w, n))
    cur_idx, cur_w = base_idx[rows], base_w[rows]
    parts = [(cur_idx, cur_w)]
    for _ in range(steps - 1):
        positions = cur_idx.clamp_min(0)                           # where each walk stands
        next_idx = base_idx[positions]                             # (R, U, k)
        next_w = cur_w[:, :, None] * base_w[positions]
        cur_idx, cur_w = _merge(next_idx.flatten(1), next_w.flatten(1), n)
        parts.append((cur_idx, cur_w))
    if cumulative:
        cur_idx, cur_w = _merge(torch.cat([p[0] for p in parts], 1),
                                torch.cat([p[1] for p in parts], 1) / steps, n)
    return _normalise(cur_idx, cur_w)


def knn_target(z: torch.Tensor, k: int, metric: str = "euclidean", steps: int = 1) -> Neighbors:
    """I-Con's UniformKNN target: p(j|i) uniform over the k nearest other points of z_i, then
    propagated by walks of length ``steps`` (1 = the plain kNN graph)."""
    check_count("steps", steps, 1, 3)
    indices = knn(z, k, metric)
    if steps == 1:
        return Neighbors(indices)
    return propagate(indices, steps)
