"""Gradients with respect to the weights of a Neighbors or Dense target, for every backend.

DESIGN.md §2: a target tensor that requires grad gets its exact gradient, never a dropped one.
The target is p_ij = w_ij / W_i with W_i the sum of row i's weights over its valid columns, and
p~ = (1 - alpha) p + alpha / M'. With

    h_ij = log p~_ij - log q~_ij + 1  (kl),   -log q~_ij  (cross_entropy),
           f'(p~_ij / q~_ij)  (the f-divergences, DESIGN.md §1.1)   where p~_ij > 0,
    h_ij = 0 where p~_ij = 0 (a structural zero: the one-sided derivative of p log p there is
           -inf; like the dense reference, its own term contributes nothing),
    H_i  = sum_j p_ij h_ij,

the chain rule through the row normalisation gives, on valid columns (0 elsewhere),

    dL/dw_ij = g_i (1 - alpha) (h_ij - H_i) / W_i.

Every backend saves the row LSE_i (row 0 of its statistics), from which log q~ follows at any
pair, so one implementation serves them all (ring mode's blocks use ``h`` too). It recomputes
what it needs in the accumulation dtype: the (N, k) pair logits for Neighbors (an O(N k d)
gather and an O(N k log k) merge of repeated indices, never N x M), and row chunks of the
logits tile for Dense (whose p is itself N x M). Row sums run in float64 blocks
(tile_math.row_sum), as the loss's own do.
"""
from __future__ import annotations

import torch

from ..families import DIVERGENCES, F_DIVERGENCE_CODES
from . import blockwise, f_divergences, neighbor_pairs, tile_math


def h(p_mix: torch.Tensor, log_q_mix: torch.Tensor, divergence: int) -> torch.Tensor:
    """dL_i/dp~_ij of the rule above, from p~ and log q~ (0 where p~ = 0; NaN stays NaN); for an
    f-divergence (op code ``divergence``) it is f'(p~ / q~) of DESIGN.md §1.1."""
    if divergence in F_DIVERGENCE_CODES:
        positive = p_mix != 0
        log_p = torch.where(positive, torch.log(torch.where(positive, p_mix, 1.0)), float("-inf"))
        value = f_divergences.fprime(divergence, p_mix, log_p, log_q_mix)
    elif divergence == DIVERGENCES["kl"].code:
        value = torch.log(p_mix) - log_q_mix + 1
    else:
        value = -log_q_mix
    return torch.where(p_mix == 0, 0.0, value)


def _log_q_mix(problem, log_q: torch.Tensor) -> torch.Tensor:
    if problem.beta == 0:
        return log_q
    return torch.log((1 - problem.beta) * log_q.exp() + problem.beta / problem.m_mix)


def _weight_grad(problem, g_rows, w, total, p_mix, log_q, valid):
    """g (1 - alpha) (h - H) / W on the ``valid`` entries of a (rows x entries) tile of weights w,
    where ``total`` (rows x 1) is W and H (``h_mean``) is sum_j p h, h's p-weighted row mean."""
    safe_total = torch.where(total == 0, 1.0, total)
    p = w / safe_total
    h_values = h(p_mix, _log_q_mix(problem, log_q), problem.divergence)
    h_mean = tile_math.row_sum(tile_math.where_positive(p, p * h_values)).to(h_values.dtype)[:, None]
    grad = g_rows * (1 - problem.alpha) * (h_values - h_mean) / safe_total
    return torch.where(valid & (g_rows != 0), grad, 0.0)


def dense_grad(args, g: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
    """dL/dp of a Dense target (N x M), in the accumulation dtype; ``args`` are the op's."""
    problem = blockwise.cast_args(args)
    n, m = problem.x.shape[0], problem.y.shape[0]
    shift = tile_math.finite_shift(stats[blockwise.LSE].to(problem.x.dtype))
    grad = torch.zeros(n, m, dtype=problem.x.dtype, device=problem.x.device)
    for r0, r1 in blockwise.row_chunks(n, m):
        s, _ = blockwise.learned_tile(problem, r0, r1)
        log_q = s - shift[r0:r1, None]
        valid = blockwise.off_self(torch.ones(r1 - r0, m, dtype=torch.bool, device=s.device), r0,
                                   problem.exclude_self, False)
        w = torch.where(valid, problem.dense_p[r0:r1], 0.0)
        total = tile_math.row_sum(w).to(w.dtype)[:, None]
        p_mix = torch.where(valid, (1 - problem.alpha) * w / torch.where(total == 0, 1.0, total)
                            + problem.alpha / problem.m_mix, 0.0)
        grad[r0:r1] = _weight_grad(problem, g[r0:r1, None], w, total, p_mix, log_q, valid)
    return grad


def _merged_weights(idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """For each entry (i, k): the sum of row i's weights at column idx[i, k] (repeats add up);
    by sorting each row's indices, O(N k log k)."""
    order = torch.argsort(idx, dim=1)
    sorted_idx = torch.gather(idx, 1, order)
    starts = torch.ones_like(sorted_idx, dtype=torch.bool)
    starts[:, 1:] = sorted_idx[:, 1:] != sorted_idx[:, :-1]
    run = starts.long().cumsum(1) - 1                      # which run of equal indices, per row
    run_sums = torch.zeros_like(w).scatter_add_(1, run, torch.gather(w, 1, order))
    return torch.empty_like(w).scatter_(1, order, torch.gather(run_sums, 1, run))


def neighbors_grad(args, g: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
    """dL/dweights of a Neighbors target (N x k). Everything here is O(N k), so it runs in
    float64 (where the device has it): the pair logits, log q~ and h - H keep fp32 inputs' own
    accuracy at large M, where q~ mixes q ~ 1/M with beta / M'."""
    problem = blockwise.cast_args(args)
    n = problem.x.shape[0]
    acc = problem.x.dtype if problem.x.device.type == "mps" else torch.float64
    idx = problem.nbr_index
    valid = idx >= 0
    if problem.exclude_self:
        valid &= idx != torch.arange(n, device=idx.device)[:, None]
    w = torch.where(valid, problem.nbr_weight.to(acc), 0.0)
    total = w.sum(1, keepdim=True)
    s, _ = neighbor_pairs.pair_logits(problem.kernel, problem.x, problem.y,
                                      torch.where(valid, idx, 0), problem.param.to(acc).expand(n),
                                      dtype=acc)
    log_q = s - tile_math.finite_shift(stats[blockwise.LSE].to(acc))[:, None]
    merged = _merged_weights(torch.where(valid, idx, -1), w)
    p_mix = ((1 - problem.alpha) * merged / torch.where(total == 0, 1.0, total)
             + problem.alpha / problem.m_mix)
    return _weight_grad(problem, g[:, None].to(acc), w, total, p_mix, log_q, valid)
