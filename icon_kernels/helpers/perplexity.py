"""Per-row Gaussian bandwidths calibrated to a perplexity (SNE / t-SNE), without an N x N matrix.

``calibrate_sigma(z, perplexity)`` returns sigma (N,) such that the conditional row
P(j|i) = exp(-||z_i - z_j||^2 / (2 sigma_i^2)) / sum_{k != i} exp(-||z_i - z_k||^2 / (2 sigma_i^2)),
j != i, has entropy H_i = log(perplexity) nats (perplexity = 2^{H in bits}).

Method: batched, bracketed Newton-bisection over all rows of a row chunk at once, on u_i = log(beta_i * s_i), where
beta_i = 1 / (2 sigma_i^2) is the precision on squared distances (scikit-learn's parametrisation)
and s_i is the row's mean squared distance beyond its nearest point (a scale, so one bracket
[-U, U] fits every row). A Newton step (dH/du = -Var(beta D)) is taken when it stays inside the
row's bracket, else the bracket is halved. Each step is one fused entropy pass over the chunk's block of squared
distances: H = log Z + beta * sum_j P_j D_j. The block is (rows of the chunk) x (all columns);
the chunk is sized so a block holds about pair_blocks.BLOCK_ELEMENTS entries. Everything runs in
float64 on the device of z.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .pair_blocks import check_points, row_chunks, self_pair_mask, squared_distances

BRACKET = 80.0          # u in [-BRACKET, BRACKET]; e^80 covers any sane spread of distances


def calibrate_sigma(z: torch.Tensor, perplexity: float, *, max_iter: int = 200,
                    tol: float = 1e-12) -> torch.Tensor:
    """(N,) sigma_i of z's conditional Gaussian rows (self excluded) at the given perplexity.

    perplexity must lie strictly between 1 and N - 1. Bisection stops when every row's entropy is
    within ``tol`` nats of log(perplexity), or after ``max_iter`` halvings. Returned in z's dtype.
    """
    check_points("z", z)
    check_perplexity(perplexity, z.shape[0] - 1)
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be an int >= 1, got {max_iter!r}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol > 0:
        raise ValueError(f"tol must be a float > 0, got {tol!r}")
    return sigma_for_rows(z, z, perplexity, self_start=0, max_iter=max_iter, tol=float(tol)).to(z.dtype)


def check_perplexity(perplexity, m_valid=None) -> float:
    """A float > 1, and below the number of other points m_valid when that is known."""
    if isinstance(perplexity, bool) or not isinstance(perplexity, (int, float)):
        raise TypeError(f"perplexity must be a float, got {type(perplexity).__name__}")
    if m_valid is None:
        if not perplexity > 1.0:
            raise ValueError(f"perplexity must be > 1, got {perplexity}")
        return float(perplexity)
    if not 1.0 < perplexity < m_valid:
        raise ValueError(f"perplexity must lie strictly between 1 and the number of other points "
                         f"({m_valid}), got {perplexity}")
    return float(perplexity)


def sigma_for_rows(rows: torch.Tensor, cols: torch.Tensor, perplexity: float,
                   self_start: Optional[int], max_iter: int = 200, tol: float = 1e-12) -> torch.Tensor:
    """float64 sigma of each of ``rows`` against ``cols``; row i's own point is column
    ``self_start + i`` (left out), or nothing is left out when self_start is None."""
    rows, cols = rows.detach().double(), cols.detach().double()
    n, m = rows.shape[0], cols.shape[0]
    target = math.log(perplexity)
    sigma = torch.empty(n, dtype=torch.float64, device=rows.device)
    for r0, r1 in row_chunks(n, m):
        dist = squared_distances(rows[r0:r1], cols)
        valid = torch.ones_like(dist, dtype=torch.bool)
        if self_start is not None:
            valid &= ~self_pair_mask(r0, r1, 0, m, self_start, dist.device)
        nearest = torch.where(valid, dist, torch.full_like(dist, float("inf"))).min(1, keepdim=True).values
        shifted = torch.where(valid, (dist - nearest).clamp_min(0), torch.zeros_like(dist))
        count = valid.sum(1, keepdim=True)
        scale = (shifted.sum(1, keepdim=True) / count).clamp_min(1e-300)
        shifted = shifted / scale                           # beta * D = exp(u) * shifted
        u = _bisect(shifted, valid, target, max_iter, tol)
        sigma[r0:r1] = torch.sqrt(scale[:, 0] / 2.0) * torch.exp(-u / 2.0)
    return sigma


def _entropy(shifted: torch.Tensor, valid: torch.Tensor, u: torch.Tensor):
    """(H, dH/du) of the rows p_j ∝ exp(-e^u * shifted_j) over the valid j, in nats; with
    E = e^u * shifted, H = log Z + <E> and dH/du = -Var(E). shifted >= 0 is 0 at the nearest
    point, so Z never underflows to 0."""
    energy = torch.exp(u)[:, None] * shifted
    weights = torch.where(valid, torch.exp(-energy), torch.zeros_like(energy))
    total = weights.sum(1)
    mean = (weights * energy).sum(1) / total
    second = (weights * energy * energy).sum(1) / total
    return torch.log(total) + mean, -(second - mean * mean).clamp_min(0)


def _bisect(shifted: torch.Tensor, valid: torch.Tensor, target: float, max_iter: int, tol: float):
    """u per row with H(u) = target (H decreases as u grows): Newton steps kept inside a bisection
    bracket, so every step either converges quadratically or halves the bracket."""
    lo = torch.full((shifted.shape[0],), -BRACKET, dtype=shifted.dtype, device=shifted.device)
    hi = torch.full_like(lo, BRACKET)
    u = torch.zeros_like(lo)
    for _ in range(max_iter):
        entropy, slope = _entropy(shifted, valid, u)
        excess = entropy - target
        if bool((excess.abs() <= tol).all()):
            break
        too_flat = excess > 0                                # entropy too high: sharpen
        lo = torch.where(too_flat, u, lo)
        hi = torch.where(too_flat, hi, u)
        if float((hi - lo).max()) < 1e-13:
            break
        newton = u - excess / torch.where(slope < 0, slope, torch.full_like(slope, -1e-300))
        inside = (newton > lo) & (newton < hi)
        done = excess.abs() <= tol                           # converged rows stay where they are
        u = torch.where(done, u, torch.where(inside, newton, (lo + hi) / 2))
    return u
