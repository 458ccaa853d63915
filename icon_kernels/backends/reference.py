"""The dense reference: every N x M matrix materialised, gradients by autograd.

This is the test oracle and the "naive PyTorch" of the benchmarks. It is written to be obviously
correct against DESIGN.md §1, not to be fast or lean. It computes in the inputs' dtype (so in
float64 for tests; in fp16/bf16 it shows PyTorch's own low-precision error).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..families import POWER_EPS
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
    if kernel == "power":           # harmonic: q ∝ (d² + eps)^(-n/2), eps a library constant
        # eps = 1e-12 underflows in fp16: the log is taken in fp32 at least (-inf and, in
        # backward, 0 / 0 at a masked self pair otherwise)
        acc = torch.promote_types(sq_dist.dtype, torch.float32)
        return -param / 2 * torch.log(sq_dist.to(acc) + POWER_EPS).to(sq_dist.dtype)
    raise ValueError(f"unknown kernel {kernel!r}")


def _masked_log_softmax(logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """log softmax over the valid columns; 0 (not -inf) elsewhere so products stay finite."""
    return torch.where(valid, logits.masked_fill(~valid, float("-inf")).log_softmax(dim=1), 0.0)


def _normalise_rows(w: torch.Tensor):
    total = w.sum(1, keepdim=True)
    empty = total == 0        # a NaN total keeps its row, so NaN inputs give a NaN loss
    return w / torch.where(empty, 1.0, total), ~empty[:, 0]


def target_probabilities(target, valid: torch.Tensor):
    """p_ij over the valid columns (rows sum to 1), which rows have any p, and log p where the
    target gives it exactly (Affinity's log-softmax, finite where p underflows; else None)."""
    if getattr(target, "symmetrize", False):
        w, log_w = _symmetrized(target, valid)
        p, has_p = _normalise_rows(w)
        if log_w is None:
            return p, has_p, None
        log_total = torch.log(torch.where(has_p, w.sum(1), 1.0))[:, None]
        return p, has_p, torch.where(valid, log_w - log_total, float("-inf"))
    return _conditional_rows(target, valid)


def _symmetrized(target, valid: torch.Tensor):
    """w_ij = (p_{j|i} + p_{i|j}) / 2 of the target's conditional rows (a square problem, so
    ``valid`` is symmetric), and log w from their logs where the rows have exact ones (Affinity)."""
    p, _, log_p = _conditional_rows(target, valid)
    w = 0.5 * (p + p.T)
    if log_p is None:
        return w, None
    lp = torch.where(valid, log_p, 0.0)
    return w, torch.where(valid, torch.logaddexp(lp, lp.T) - math.log(2), float("-inf"))


def joint_target(target, valid: torch.Tensor):
    """DESIGN.md §1.2: (p over all valid pairs, summing to 1; log p where exact, else None;
    whether any pair has p). p is the target's weights renormalised over all valid pairs: Labels
    1 on the positives, Neighbors its (summed) weights, Dense p, Affinity its rows p(j|i), and a
    symmetrised target (p_{j|i} + p_{i|j}) / 2, so p_ij = (p_{j|i} + p_{i|j}) / 2N."""
    if getattr(target, "symmetrize", False):
        w, log_w = _symmetrized(target, valid)
    elif isinstance(target, Affinity):
        w, _, log_w = _conditional_rows(target, valid)
    else:                                   # the weights before the rows' renormalisation
        w, _, log_w = _conditional_rows(target, valid, normalise=lambda t: (t, None))
    total = w.sum()
    some = total != 0                       # a NaN total keeps p NaN
    p = w / torch.where(some, total, 1.0)
    if log_w is not None:
        log_w = torch.where(valid, log_w - torch.log(torch.where(some, total, 1.0)), float("-inf"))
    return p, log_w, some


def _conditional_rows(target, valid: torch.Tensor, normalise=_normalise_rows):
    """The target's rows over the valid columns, normalised by ``normalise`` (Affinity's are its
    row softmax); see target_probabilities."""
    n, m = valid.shape
    if isinstance(target, Labels):
        same = (target.row_labels[:, None] == target.col_labels[None, :]) & valid
        return (*normalise(same.double()), None)
    if isinstance(target, Neighbors):
        w = torch.ones(target.indices.shape, dtype=torch.float64, device=valid.device)
        if target.weights is not None:
            w = target.weights.double()
        dense = torch.zeros(n, m, dtype=torch.float64, device=valid.device)
        # a -1 pad's weight is no weight: ignored, also when it is NaN or Inf
        dense.scatter_add_(1, target.indices.clamp_min(0), torch.where(target.indices >= 0, w, 0.0))
        return (*normalise(dense * valid), None)
    if isinstance(target, Dense):
        return (*normalise(target.p * valid), None)
    if isinstance(target, Affinity):
        z_cols = target.z if target.z_cols is None else target.z_cols
        param = getattr(target, KERNEL_PARAM[target.kernel]) if KERNEL_PARAM[target.kernel] else 1.0
        t = pairwise_logits(target.kernel, target.z, z_cols, param)
        log_p = torch.where(valid, _masked_log_softmax(t, valid), float("-inf"))
        return torch.where(valid, log_p.exp(), 0.0), valid.any(1), log_p
    raise TypeError(f"unknown target {type(target).__name__}")


def _where_log(positive: torch.Tensor, log_t: torch.Tensor) -> torch.Tensor:
    """log_t where ``positive``, else 0: a branch torch.where does not pick stays finite, so no
    NaN gradient leaks through it."""
    return torch.where(positive, log_t, 0.0)


def f_divergence_terms(name: str, log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """q f(p / q) per pair for the f-divergences of DESIGN.md §1.1, from log p and log q alone
    (-inf where a probability is 0; p, q the mixed distributions), written from the table there:
    no ratio that overflows, no log of an underflowed probability, the table's value at p = 0."""
    has_p, has_q = log_p != float("-inf"), log_q != float("-inf")   # NaN counts: NaN in, NaN out
    lp, lq = _where_log(has_p, log_p), _where_log(has_q, log_q)
    p, q = torch.where(has_p, lp.exp(), 0.0), torch.where(has_q, lq.exp(), 0.0)
    inf = torch.full_like(p, float("inf"))
    if name == "reverse_kl":                       # q (log q - log p); +inf where p = 0 < q
        return torch.where(has_q, torch.where(has_p, q * (lq - lp), inf), 0.0)
    if name == "tv":
        return 0.5 * (p - q).abs()
    if name == "hellinger":                        # (sqrt p - sqrt q)^2, no cancellation near p = q
        return (torch.where(has_p, (0.5 * lp).exp(), 0.0) - torch.where(has_q, (0.5 * lq).exp(), 0.0)) ** 2
    if name == "js":                               # log m = log((p + q) / 2), formed in logs
        either = has_p | has_q
        log_m = torch.where(either, torch.logaddexp(torch.where(either, log_p, 0.0),
                                                    torch.where(either, log_q, 0.0)), 0.0) - math.log(2)
        return 0.5 * (torch.where(has_p, p * (lp - log_m), 0.0) + torch.where(has_q, q * (lq - log_m), 0.0))
    if name == "chi2":                             # (p - q)^2 / q = exp(2 log|p - q| - log q)
        gap = (p - q).abs()
        both = (gap != 0) & has_q                  # a NaN gap counts: NaN in, NaN out
        finite = torch.exp(2 * _where_log(both, torch.log(torch.where(both, gap, 1.0))) - _where_log(both, lq))
        return torch.where(both, finite, torch.where(gap != 0, inf, 0.0))
    raise ValueError(f"unknown f-divergence {name!r}")


def _mixtures(p, log_q, valid, alpha, beta, size):
    """(p~, log q~) on the valid pairs: the uniform mixtures of DESIGN.md §1 over ``size`` pairs
    (M' per row, or every valid pair under joint normalisation)."""
    p_mix = torch.where(valid, (1 - alpha) * p + alpha / size, 0.0)
    if beta == 0:
        return p_mix, log_q
    return p_mix, torch.where(valid, torch.log((1 - beta) * log_q.exp() + beta / size), 0.0)


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
    if problem.normalization == "joint":
        return _joint_rows(problem, valid, logits)
    log_q = _masked_log_softmax(logits, valid)
    p, has_p, log_p = target_probabilities(problem.target, valid)
    p = p.to(log_q.dtype)
    p_mix, log_q_mix = _mixtures(p, log_q, valid, alpha, beta, m_safe)
    if problem.divergence not in ("kl", "cross_entropy"):
        return _f_divergence_rows(problem, valid, log_q_mix, p, p_mix, log_p, has_p, m_valid)
    zero = p_mix == 0         # 0 log 0 = 0; NaN stays NaN
    cross = (p_mix * torch.where(zero, 0.0, log_q_mix)).sum(1)
    loss = -cross
    if problem.kl:
        loss = loss + (p_mix * torch.log(torch.where(zero, 1.0, p_mix))).sum(1)
    included = has_p & (m_valid[:, 0] > 0)
    return torch.where(included, loss, 0.0), included


def _f_divergence_rows(problem: Problem, valid, log_q_mix, p, p_mix, log_p, has_p, m_valid):
    """L_i = sum_j q~ f(p~ / q~) over the valid columns, in fp32 at least (half-precision terms
    overflow), from log p~ and log q~ (DESIGN.md §1.1)."""
    acc = torch.promote_types(log_q_mix.dtype, torch.float32)
    if log_p is None:                       # log p~ of a target given by its probabilities
        log_p_mix = torch.log(torch.where(p_mix != 0, p_mix, 1.0)).to(acc)
        log_p_mix = torch.where(p_mix != 0, log_p_mix, float("-inf"))   # NaN stays: NaN in, NaN out
    elif problem.alpha == 0:                # the exact log-softmax, also where p underflows
        log_p_mix = log_p.to(acc)
    else:                                   # p~ >= alpha / M' here, so the linear mix is exact enough
        log_p_mix = torch.log(torch.where(valid, p_mix, 1.0)).to(acc)
    log_p_mix = torch.where(valid, log_p_mix, float("-inf"))
    log_q = torch.where(valid, log_q_mix.to(acc), float("-inf"))
    terms = f_divergence_terms(problem.divergence, log_p_mix, log_q)
    loss = torch.where(valid, terms, 0.0).sum(1)
    included = has_p & (m_valid[:, 0] > 0)
    return torch.where(included, loss, 0.0).to(log_q_mix.dtype), included


def _joint_rows(problem: Problem, valid, logits):
    """Joint normalisation (DESIGN.md §1.2): q_ij = e^{s_ij} / Z over all valid pairs, with
    log Z = logsumexp_i LSE_i, p the target renormalised over all valid pairs (joint_target),
    alpha / beta mixing in 1 / (number of valid pairs). Returns each row's contribution
    sum_j D-term(p~_ij, q~_ij) to the one divergence, and which rows have a valid column. No
    valid pair, or no pair with p, gives 0 with zero gradients (as an all-left-out batch)."""
    alpha, beta = problem.alpha, problem.beta
    has_cols = valid.any(1)
    nothing = torch.where(valid, logits, 0.0).sum(1) * 0          # zeros, connected to the inputs
    if not bool(has_cols.any()):
        return nothing, has_cols
    n_pairs = valid.sum().to(logits.dtype)
    log_z = torch.logsumexp(logits.masked_fill(~valid, float("-inf")).flatten(), 0)
    log_q = torch.where(valid, logits - log_z, 0.0)
    p, log_p, some = joint_target(problem.target, valid)
    p = p.to(log_q.dtype)
    p_mix, log_q_mix = _mixtures(p, log_q, valid, alpha, beta, n_pairs)
    if problem.divergence not in ("kl", "cross_entropy"):
        every_row = torch.ones_like(has_cols)          # a row without p still holds q's mass
        rows, _ = _f_divergence_rows(problem, valid, log_q_mix, p, p_mix, log_p, every_row,
                                     valid.sum(1, keepdim=True))
    else:
        zero = p_mix == 0                                # 0 log 0 = 0; NaN stays NaN
        rows = -(p_mix * torch.where(zero, 0.0, log_q_mix)).sum(1)
        if problem.kl:
            rows = rows + (p_mix * torch.log(torch.where(zero, 1.0, p_mix))).sum(1)
    rows = torch.where(some, rows, nothing)
    # an Inf coordinate makes a row's logits -inf: log Z takes it as q = 0, where a conditional
    # row's log-softmax gives NaN; NaN or Inf in an input gives NaN (DESIGN.md §2)
    for features in (problem.x, problem.target.z if isinstance(problem.target, Affinity) else None):
        if features is not None:
            rows = torch.where(torch.isinf(features).any(1), float("nan"), rows)
    return rows, has_cols
