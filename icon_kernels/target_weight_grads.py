"""Gradients with respect to the weights of a Neighbors or Dense target, for every backend.

DESIGN.md §2: a target tensor that requires grad gets its exact gradient, never a dropped one.
The target is p_ij = w_ij / W_i with W_i the sum of row i's weights over its valid columns, and
p~ = (1 - alpha) p + alpha / M'. With

    h_ij = log p~_ij - log q~_ij + 1  (kl)   or   -log q~_ij  (cross_entropy)   where p~_ij > 0,
    h_ij = 0 where p~_ij = 0 (a structural zero: the one-sided derivative of p log p there is
           -inf; like the dense reference, its own term contributes nothing),
    H_i  = sum_j p_ij h_ij,

the chain rule through the row normalisation gives, on valid columns (0 elsewhere),

    dL/dw_ij = g_i (1 - alpha) (h_ij - H_i) / W_i.

Every backend saves the row LSE_i (row 0 of its statistics), from which log q~ follows at any
pair, so one implementation serves them all. It recomputes what it needs in the accumulation
dtype: the (N, k) pair logits for Neighbors (an O(N k d) gather, never N x M), and row chunks of
the logits tile for Dense (whose p is itself N x M).
"""
from __future__ import annotations

import torch

from . import neighbor_pairs, torch_backend

PAIRS_ELEMENTS = 1 << 22        # (rows x k x k) entries per chunk when merging repeated indices


def _h(pb, p_mix: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """h on the entries of a tile of p~ and log q (see the module docstring)."""
    if pb.beta > 0:
        log_q = torch.log((1 - pb.beta) * log_q.exp() + pb.beta / pb.m_mix)
    h = torch.log(p_mix) - log_q + 1 if pb.kl else -log_q
    return torch.where(p_mix == 0, 0.0, h)


def _weight_grad(pb, g_rows, w, total, p_mix, log_q, valid):
    """g (1 - alpha) (h - H) / W on ``valid`` entries of a (rows x entries) tile of weights w."""
    p = w / torch.where(total == 0, 1.0, total)
    h = _h(pb, p_mix, log_q)
    big_h = torch.where(p == 0, 0.0, p * h).sum(1, keepdim=True)
    grad = g_rows * (1 - pb.alpha) * (h - big_h) / torch.where(total == 0, 1.0, total)
    return torch.where(valid & (g_rows != 0), grad, 0.0)


def dense_grad(args, g: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
    """dL/dp of a Dense target (N x M), in p's dtype."""
    pb = torch_backend._cast(args)
    n, m = pb.x.shape[0], pb.y.shape[0]
    lse = stats[0].to(pb.x.dtype)
    grad = torch.zeros(n, m, dtype=pb.x.dtype, device=pb.x.device)
    for r0, r1 in torch_backend.row_chunks(n, m):
        s, _ = torch_backend._learned_tile(pb, r0, r1)
        log_q = s - tile_shift(lse[r0:r1])
        valid = torch.ones(r1 - r0, m, dtype=torch.bool, device=s.device)
        torch_backend._off_self(valid, r0, pb.exclude_self, False)
        w = torch.where(valid, pb.dense_p[r0:r1], 0.0)
        total = w.sum(1, keepdim=True)
        p_mix = torch.where(valid, (1 - pb.alpha) * w / torch.where(total == 0, 1.0, total)
                            + pb.alpha / pb.m_mix, 0.0)
        grad[r0:r1] = _weight_grad(pb, g[r0:r1, None], w, total, p_mix, log_q, valid)
    return grad.to(args[13].dtype)


def tile_shift(lse: torch.Tensor) -> torch.Tensor:
    """The row LSE as a column, -inf (no valid column) as 0 so masked entries stay -inf."""
    return torch.where(lse == float("-inf"), 0.0, lse)[:, None]


def _merged_weights(idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """For each entry (i, k): the sum of row i's weights at column idx[i, k] (repeats add up)."""
    n, k = idx.shape
    merged = torch.empty_like(w)
    step = max(1, PAIRS_ELEMENTS // max(k * k, 1))
    for r0 in range(0, n, step):
        i = idx[r0:r0 + step]
        same = i[:, :, None] == i[:, None, :]
        merged[r0:r0 + step] = (same * w[r0:r0 + step, None, :]).sum(2)
    return merged


def neighbors_grad(args, g: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
    """dL/dweights of a Neighbors target (N x k), in the weights' dtype."""
    pb = torch_backend._cast(args)
    n = pb.x.shape[0]
    idx = pb.nbr_index
    valid = idx >= 0
    if pb.exclude_self:
        valid &= idx != torch.arange(n, device=idx.device)[:, None]
    w = torch.where(valid, pb.nbr_weight, 0.0)
    total = w.sum(1, keepdim=True)
    s, _ = neighbor_pairs.pair_logits(pb.kernel, pb.x, pb.y, torch.where(valid, idx, 0),
                                      pb.param.expand(n), dtype=pb.x.dtype)
    log_q = s - tile_shift(stats[0].to(pb.x.dtype))
    merged = _merged_weights(torch.where(valid, idx, -1), w)
    p_mix = (1 - pb.alpha) * merged / torch.where(total == 0, 1.0, total) + pb.alpha / pb.m_mix
    grad = _weight_grad(pb, g[:, None], w, total, p_mix, log_q, valid)
    return grad.to(args[8].dtype)
