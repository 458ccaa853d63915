"""The dense reference: every N x M matrix materialised, gradients by autograd.

This is the test oracle and the "naive PyTorch" of the benchmarks. It is written to be obviously
correct against DESIGN.md §1, not to be fast or lean. It computes in the inputs' dtype (so in
float64 for tests; in fp16/bf16 it shows PyTorch's own low-precision error).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..targets import Affinity, Dense, Labels, Neighbors
from ..validation import KERNEL_PARAM, Problem


def _as_column(param):
    """A per-row parameter of shape (N,) becomes (N, 1) so it scales rows."""
    if isinstance(param, torch.Tensor) and param.dim() == 1:
        return param[:, None]
    return param


def pairwise_logits(kernel: str, a: torch.Tensor, b: torch.Tensor, param) -> torch.Tensor:
    """s_ij for every pair of rows of a (N x d) and b (M x d)."""
    param = _as_column(param)
    if kernel == "cosine":
        a, b, kernel = F.normalize(a, dim=1), F.normalize(b, dim=1), "dot"
    if kernel == "dot":
        return a @ b.T / param
    if kernel == "log_dot":
        return torch.log(a @ b.T)
    sq_dist = (a.square().sum(1)[:, None] + b.square().sum(1)[None, :] - 2 * a @ b.T).clamp_min(0)
    if kernel == "gaussian":
        return -sq_dist / (2 * param**2)
    if kernel == "student_t":
        return -(param + 1) / 2 * torch.log1p(sq_dist / param)
    raise ValueError(f"unknown kernel {kernel!r}")


def _masked_log_softmax(logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """log softmax over the valid columns; 0 (not -inf) elsewhere so products stay finite."""
    return torch.where(valid, logits.masked_fill(~valid, float("-inf")).log_softmax(dim=1), 0.0)


def _normalise_rows(w: torch.Tensor):
    total = w.sum(1, keepdim=True)
    empty = total == 0        # a NaN total keeps its row, so NaN inputs give a NaN loss
    return w / torch.where(empty, 1.0, total), ~empty[:, 0]


def target_probabilities(target, valid: torch.Tensor):
    """p_ij over the valid columns (rows sum to 1) and which rows have any p."""
    n, m = valid.shape
    if isinstance(target, Labels):
        same = (target.row_labels[:, None] == target.col_labels[None, :]) & valid
        return _normalise_rows(same.double())
    if isinstance(target, Neighbors):
        w = torch.ones(target.indices.shape, dtype=torch.float64, device=valid.device)
        if target.weights is not None:
            w = target.weights.double()
        dense = torch.zeros(n, m, dtype=torch.float64, device=valid.device)
        # a -1 pad's weight is no weight: ignored, also when it is NaN or Inf
        dense.scatter_add_(1, target.indices.clamp_min(0), torch.where(target.indices >= 0, w, 0.0))
        return _normalise_rows(dense * valid)
    if isinstance(target, Dense):
        return _normalise_rows(target.p * valid)
    if isinstance(target, Affinity):
        z_cols = target.z if target.z_cols is None else target.z_cols
        param = getattr(target, KERNEL_PARAM[target.kernel]) if KERNEL_PARAM[target.kernel] else 1.0
        t = pairwise_logits(target.kernel, target.z, z_cols, param)
        p = torch.where(valid, _masked_log_softmax(t, valid).exp(), 0.0)
        return p, valid.any(1)
    raise TypeError(f"unknown target {type(target).__name__}")


def _log_or_zero(t: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """log t where ``positive``, else 0: the log is never taken of 0, so no NaN gradient leaks
    through the branch torch.where does not pick."""
    return torch.log(torch.where(positive, t, 1.0))


def f_divergence_terms(name: str, p: torch.Tensor, q: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """q f(p / q) per pair for the f-divergences of DESIGN.md §1.1, written from the table there
    (p, q the mixed distributions; log q given, as the softmax gives it). Every term is formed from
    p, q and their logs, never from a ratio that overflows; the value at p = 0 is the table's."""
    has_p = p > 0
    log_p = _log_or_zero(p, has_p)
    if name == "reverse_kl":                       # q (log q - log p); +inf where p = 0 < q
        return torch.where(has_p, q * (log_q - log_p), torch.where(q > 0, float("inf"), 0.0).to(q.dtype))
    if name == "tv":
        return 0.5 * (p - q).abs()
    if name == "hellinger":                        # (sqrt p - sqrt q)^2 = p + q - 2 sqrt(p q)
        return p + q - 2 * torch.where(has_p, torch.exp(0.5 * (log_p + log_q)), 0.0)
    if name == "js":                               # m = (p + q) / 2
        log_m = _log_or_zero(0.5 * (p + q), (p + q) > 0)
        return 0.5 * (torch.where(has_p, p * (log_p - log_m), 0.0)
                      + torch.where(q > 0, q * (log_q - log_m), 0.0))
    if name == "chi2":                             # (p - q)^2 / q = exp(2 log|p - q| - log q)
        gap = (p - q).abs()
        return torch.where(gap > 0, torch.exp(2 * _log_or_zero(gap, gap > 0) - log_q), 0.0)
    raise ValueError(f"unknown f-divergence {name!r}")


def row_losses(problem: Problem):
    """(L_i for every row, 0 where left out; which rows are included)."""
    x, alpha, beta = problem.x, problem.alpha, problem.beta
    y = x if problem.y is None else problem.y
    n, m = x.shape[0], y.shape[0]
    valid = torch.ones(n, m, dtype=torch.bool, device=x.device)
    if problem.exclude_self:
        valid &= ~torch.eye(n, m, dtype=torch.bool, device=x.device)
    m_valid = valid.sum(1, keepdim=True).to(x.dtype)
    m_safe = m_valid.clamp_min(1)

    logits = pairwise_logits(problem.kernel, x, y, problem.param)
    log_q = _masked_log_softmax(logits, valid)
    p, has_p = target_probabilities(problem.target, valid)
    p = p.to(log_q.dtype)
    p_mix = torch.where(valid, (1 - alpha) * p + alpha / m_safe, 0.0)
    if beta > 0:
        log_q_mix = torch.where(valid, torch.log((1 - beta) * log_q.exp() + beta / m_safe), 0.0)
    else:
        log_q_mix = log_q
    if problem.divergence not in ("kl", "cross_entropy"):
        q_mix = torch.where(valid, log_q_mix.exp(), 0.0)
        terms = f_divergence_terms(problem.divergence, p_mix, q_mix, log_q_mix)
        loss = torch.where(valid, terms, 0.0).sum(1)
        included = has_p & (m_valid[:, 0] > 0)
        return torch.where(included, loss, 0.0), included
    zero = p_mix == 0         # 0 log 0 = 0; NaN stays NaN
    cross = (p_mix * torch.where(zero, 0.0, log_q_mix)).sum(1)
    loss = -cross
    if problem.kl:
        loss = loss + (p_mix * torch.log(torch.where(zero, 1.0, p_mix))).sum(1)
    included = has_p & (m_valid[:, 0] > 0)
    return torch.where(included, loss, 0.0), included
