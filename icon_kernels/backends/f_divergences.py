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


LOG2 = math.log(2)


class PairTerms(NamedTuple):
    term: torch.Tensor          # q~ f(p~ / q~)
    q_g: torch.Tensor           # q~ g
    p_fprime: torch.Tensor      # p~ f'


def _masked(keep: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return torch.where(keep, values, 0.0)


def _softplus(d: torch.Tensor) -> torch.Tensor:
    """log(1 + e^d), exact at every d: torch's softplus returns d itself above its threshold
    (20), dropping log1p(e^-d) ~ 2e-9, a float64 error of ~1e-10 relative in js's terms."""
    return torch.logaddexp(d, d.new_zeros(()))


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


# --- the fast tile paths of the torch backend (blockwise.py) ---------------------------------------
# Where p~ = p and q~ = q (alpha = beta = 0), the three per-pair quantities need fewer passes over
# an R x M tile than pair_terms' general, masked evaluation. Two shapes of target have such paths:

# 1. A target with p = 0 at most pairs (Labels, alpha = 0): at p~ = 0 < q~ both q~ f and q~ g are
#    ZERO_P[name] * q~ (the table's value at p~ = 0; q~ g there is (f(0) - 0) q~), and p~ f' is 0.
#    A row is then ZERO_P * (its q mass off the positives) plus pair_terms on the positives alone.
ZERO_P = {"tv": 0.5, "hellinger": 1.0, "js": 0.5 * LOG2, "chi2": 1.0}   # reverse_kl: +inf (refused)


# 2. A dense target with log p finite off the self pairs (Affinity, alpha = 0: log p = t - LSE^p),
#    from tiles of p, q, log p, log q (self pairs: p = q = 0, logs -inf). The functions below
#    overwrite the tiles they are given. Each is exact where log p and log q are finite; where one
#    is -inf (a logit of -inf) or NaN, a row sum it returns is +inf or NaN, and the caller then
#    evaluates the chunk with pair_terms instead (whose +inf terms are constants, DESIGN.md §1.1).
DENSE_FORWARD_NEEDS = {"reverse_kl": ("q", "log_q", "log_p"), "tv": ("p", "q"),
                       "hellinger": ("log_p", "log_q"), "js": ("p", "q", "log_p", "log_q"),
                       "chi2": ("p", "q", "log_q")}
# the learned side's values need q (its centring weights) and these; the target side's need p too
DENSE_BACKWARD_NEEDS = {"reverse_kl": ("log_q", "log_p"), "tv": ("p",), "hellinger": ("log_p", "log_q"),
                        "js": ("log_p", "log_q"), "chi2": ("log_p", "log_q")}


def dense_terms(name: str, t: dict, clear_self) -> torch.Tensor:
    """The tile of q f(p / q) (not yet summed) from the tiles in ``t`` (DENSE_FORWARD_NEEDS[name]),
    which it overwrites; ``clear_self(tile, fill=0.0)`` sets the self pairs of a tile to ``fill``
    in place and returns it (there p = q = 0 and the logs are -inf, whose differences are NaN)."""
    if name == "reverse_kl":                                    # q (log q - log p)
        return clear_self(t["log_q"].sub_(t["log_p"])).mul_(t["q"])
    if name == "tv":                                            # 1/2 |p - q|
        return t["p"].sub_(t["q"]).abs_().mul_(0.5)
    if name == "hellinger":                                     # (sqrt p - sqrt q)^2, from the logs
        return t["log_p"].mul_(0.5).exp_().sub_(t["log_q"].mul_(0.5).exp_()).square_()
    if name == "js":
        # with d = log p - log q: log(2q / (p + q)) = log 2 - softplus(d) =: u and log(2p / (p + q)) =
        # u + d, so q f = 1/2 (p (u + d) + q u) = 1/2 (p d - (p + q)(softplus(d) - log 2))
        d = clear_self(t["log_p"].sub_(t["log_q"]))
        w = _softplus(d).sub_(LOG2).mul_(t["q"].add_(t["p"]))
        return d.mul_(t["p"]).sub_(w).mul_(0.5)
    if name == "chi2":                                          # (p - q)^2 / q = exp(2 log|p - q| - log q)
        return clear_self(t["p"].sub_(t["q"]).abs_().log_().mul_(2).sub_(t["log_q"]), float("-inf")).exp_()
    raise ValueError(f"no dense tile path for divergence {name!r}")


def dense_centred_values(name: str, t: dict, clear_self, target: bool):
    """The per-pair values whose centring gives the gradients: (X, a, Y, b) with, per pair,
    q g = a X + c q and p f' = b Y + c' p for some row constants c, c' (which the centring
    X - q sum_j X / sum_j q removes, so they are never formed); Y and b are None unless ``target``.
    ``t`` holds q, and p when ``target``, which are kept, and DENSE_BACKWARD_NEEDS[name], which
    are overwritten."""
    if name == "reverse_kl":        # q g = q (log q - log p) + q;  p f' = -q
        y = t["q"].clone() if target else None
        return clear_self(t["log_q"].sub_(t["log_p"])).mul_(t["q"]), 1.0, y, -1.0
    if name == "tv":                # q g = -1/2 q sign(p - q);  p f' = 1/2 p sign(p - q)
        sign = torch.sub(t["p"], t["q"]).sign_()
        y = torch.mul(sign, t["p"]) if target else None
        return sign.mul_(t["q"]), -0.5, y, 0.5
    if name == "hellinger":         # q g = q - sqrt(p q);  p f' = p - sqrt(p q)
        root = t["log_p"].add_(t["log_q"]).mul_(0.5).exp_()
        return root, -1.0, (root.clone() if target else None), -1.0
    if name == "js":                # q g = 1/2 q (log 2 - softplus(d));  p f' = 1/2 p (log 2 - softplus(-d))
        d = clear_self(t["log_p"].sub_(t["log_q"]))
        soft = _softplus(d)
        y = torch.sub(soft, d).mul_(t["p"]) if target else None
        return soft.mul_(t["q"]), -0.5, y, -0.5
    if name == "chi2":              # q g = q - p^2 / q;  p f' = 2 (p^2 / q - p)
        ratio = clear_self(t["log_p"].mul_(2).sub_(t["log_q"]), float("-inf")).exp_()
        return ratio, -1.0, (ratio.clone() if target else None), 2.0
    raise ValueError(f"no dense tile path for divergence {name!r}")
