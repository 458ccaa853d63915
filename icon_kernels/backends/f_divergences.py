"""Per-pair math of the f-divergences (DESIGN.md §1.1) for the torch paths, from logs.

Row loss L_i = sum_j q~ f(r), r = p~ / q~. Its gradients need, per pair, the products

    q~ g    with g  = f(r) - r f'(r)   (learned side: dL/ds_k = (1 - beta) q_k (g_k - Gamma_i),
                                         Gamma_i = sum_j q_j g_j; q_k g_k = (q_k / q~_k) (q~ g)_k)
    p~ f'   (target side: dL/dt_k = (1 - alpha) p_k (f'_k - Phi_i), Phi_i = sum_j p_j f'_j;
             p_k f'_k = (p_k / p~_k) (p~ f')_k)

which stay finite where the ratio r itself would overflow (a p~ or q~ that underflows): each is
written with p~ and q~ outside and the logs inside, e.g. chi2's q~ g = q~ - exp(2 log p~ - log q~).
A zero probability has log -inf; the table's value at p~ = 0 holds, and a term whose own factor
is 0 is 0 (q~ g where q~ = 0, p~ f' where p~ = 0: a structural zero contributes nothing, as in the
reference, whose terms are masked there). A term that is +inf because one probability is 0 (reverse
KL at p~ = 0 < q~, chi2 at q~ = 0 < p~) is a constant, as in the oracle, whose +inf branch has no
gradient: its q~ g and p~ f' are 0, so the gradient is that of the finite terms. The oracle (reference.f_divergence_terms) keeps its
own formulas; the C++ and CUDA kernels have the same three quantities in csrc/divergence_math.h.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..families import divergence_by_code


class PairTerms(NamedTuple):
    term: torch.Tensor          # q~ f(p~ / q~)
    q_g: torch.Tensor           # q~ g
    p_fprime: torch.Tensor      # p~ f'


def _masked(keep: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return torch.where(keep, values, 0.0)


def pair_terms(code: int, p: torch.Tensor, q: torch.Tensor, log_p: torch.Tensor,
               log_q: torch.Tensor) -> PairTerms:
    """(q~ f, q~ g, p~ f') per pair of the f-divergence with op code ``code``, from p~, q~ and
    their logs (-inf where 0). Entries off the valid set must have p~ = q~ = 0: they give 0."""
    name = divergence_by_code(code).name
    has_p, has_q = log_p != float("-inf"), log_q != float("-inf")   # NaN counts: NaN in, NaN out
    lp, lq = _masked(has_p, log_p), _masked(has_q, log_q)      # finite, so unpicked branches stay finite
    if name == "reverse_kl":     # q (log q - log p); g = log q - log p + 1; f' = -q / p
        inf = torch.full_like(q, float("inf"))
        both = has_p & has_q
        term = torch.where(both, q * (lq - lp), torch.where(has_q, inf, 0.0))
        q_g = torch.where(both, q * (lq - lp + 1), 0.0)
        return PairTerms(term, q_g, torch.where(has_p, -q, 0.0))
    if name == "tv":             # 1/2 |p - q|; g = -1/2 sign(p - q); f' = 1/2 sign(p - q)
        sign = torch.sign(p - q)
        return PairTerms(0.5 * (p - q).abs(), -0.5 * q * sign, 0.5 * p * sign)
    if name == "hellinger":      # (sqrt p - sqrt q)^2; g = 1 - sqrt(p / q); f' = 1 - sqrt(q / p)
        root_pq = _masked(has_p & has_q, torch.exp(0.5 * (lp + lq)))
        term = (_masked(has_p, torch.exp(0.5 * lp)) - _masked(has_q, torch.exp(0.5 * lq))) ** 2
        return PairTerms(term, q - root_pq, p - root_pq)
    if name == "js":             # m = (p + q) / 2; g = 1/2 log(q / m); f' = 1/2 log(p / m)
        either = has_p | has_q
        log_m = _masked(either, torch.logaddexp(log_p, log_q)) - math.log(2)   # no autograd here
        p_part, q_part = _masked(has_p, p * (lp - log_m)), _masked(has_q, q * (lq - log_m))
        return PairTerms(0.5 * (p_part + q_part), 0.5 * q_part, 0.5 * p_part)
    if name == "chi2":           # (p - q)^2 / q; g = 1 - (p / q)^2; f' = 2 (p / q - 1)
        p2_over_q = torch.where(has_p & has_q, torch.exp(2 * lp - lq),
                                torch.where(has_p, float("inf"), 0.0))
        gap = (p - q).abs()
        both = (gap != 0) & has_q
        term = torch.where(both, torch.exp(2 * _masked(both, torch.log(torch.where(both, gap, 1.0))) - lq),
                           torch.where(gap != 0, float("inf"), 0.0))
        return PairTerms(term, _masked(has_q, q - p2_over_q), _masked(has_q, 2 * (p2_over_q - p)))
    raise ValueError(f"divergence code {code} ({name!r}) is not an f-divergence with fused terms")


def fprime(code: int, p: torch.Tensor, log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """f'(p~ / q~) where p~ > 0, 0 where p~ = 0 (a structural zero), for dL/dp~ of a target given
    by weights (Neighbors, Dense): p~ f' / p~, with p~ >= the smallest positive p~ of the row."""
    has_p = p != 0
    q = torch.where(log_q != float("-inf"), log_q.exp(), 0.0)
    p_fprime = pair_terms(code, p, q, log_p, log_q).p_fprime
    return torch.where(has_p, p_fprime / torch.where(has_p, p, 1.0), 0.0)
