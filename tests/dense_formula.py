"""The I-Con loss written densely in float64 from DESIGN.md §1, §1.1 and §2, as a second oracle
beside the reference backend (issue 16, acceptance 1).

Nothing here comes from icon_kernels' internals: no backend, no per-pair function of
families.py, no validation. It reads only the public fields of the target records (ik.Labels,
ik.Neighbors, ik.Dense, ik.Affinity) and writes every step as the design states it, in the
plainest torch: distances as ||a_i - b_j||² by broadcasting (the backends expand them), q and p
as masked softmaxes, the uniform mixtures, the table of §1.1 per pair (from p~ and q~
themselves, not from logs), the left-out rows and the reduction of §1 / §2. Gradients are
torch.autograd's. It is meant for small problems (it materialises N x M x d) whose
probabilities do not underflow in float64, which is where its plain per-pair formulas are exact.

Conditional normalisation only (one distribution per row); tests/test_joint_normalization.py has
the joint one (DESIGN.md §1.2).
"""
from __future__ import annotations

import math

import torch

import icon_kernels as ik

# DESIGN.md §1, the power kernel: s = -(n/2) log(d² + eps), eps = 1e-12
POWER_EPS = 1e-12
# the keyword of each kernel's parameter (DESIGN.md §1's table); log_dot has none
PARAM_NAME = {"dot": "temperature", "cosine": "temperature", "gaussian": "sigma", "student_t": "dof",
              "power": "exponent", "log_dot": None}


def _column(param):
    """A per-row parameter (N,) scales rows: (N, 1). Floats and 0-d tensors pass unchanged."""
    if isinstance(param, torch.Tensor) and param.dim() == 1:
        return param[:, None]
    return param


def logits(kernel: str, a: torch.Tensor, b: torch.Tensor, param) -> torch.Tensor:
    """s_ij of DESIGN.md §1's table for every row a_i and column b_j."""
    param = _column(param)
    if kernel == "cosine":
        a, b = a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)
        return a @ b.T / param
    if kernel == "dot":
        return a @ b.T / param
    if kernel == "log_dot":
        return torch.log(a @ b.T)
    sq = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)      # ||a_i - b_j||², exactly 0 at a_i = b_j
    if kernel == "gaussian":
        return -sq / (2 * param ** 2)
    if kernel == "student_t":
        return -((param + 1) / 2) * torch.log(1 + sq / param)
    if kernel == "power":
        return -(param / 2) * torch.log(sq + POWER_EPS)
    raise ValueError(f"unknown kernel {kernel!r}")


def valid_pairs(n: int, m: int, exclude_self: bool) -> torch.Tensor:
    """V_i: every column, or every column but i when self pairs are excluded."""
    valid = torch.ones(n, m, dtype=torch.bool)
    if exclude_self:
        valid &= ~torch.eye(n, m, dtype=torch.bool)
    return valid


def softmax_over(t: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """softmax over j in V_i of t_ij, 0 off V_i (and on a row with no valid column)."""
    some = valid.any(1, keepdim=True)
    masked = torch.where(valid, t, -math.inf)
    masked = torch.where(some, masked, 0.0)          # a row without columns: no -inf row to normalise
    return torch.where(valid, masked.softmax(dim=1), 0.0)


def _normalised(w: torch.Tensor):
    """Rows of nonnegative weights over V_i, renormalised to sum 1; which rows have any mass."""
    total = w.sum(1, keepdim=True)
    has = total[:, 0] > 0
    return w / torch.where(total > 0, total, 1.0), has


def target_rows(target, valid: torch.Tensor):
    """p_ij of DESIGN.md §1's target table (rows sum to 1 over V_i) and which rows have a p."""
    n, m = valid.shape
    if getattr(target, "symmetrize", False):
        raise NotImplementedError("a symmetrised target: tests/test_joint_normalization.py has its formula")
    if isinstance(target, ik.Labels):
        cols = target.row_labels if target.col_labels is None else target.col_labels
        w = ((target.row_labels[:, None] == cols[None, :]) & valid).double()
        return _normalised(w)
    if isinstance(target, ik.Neighbors):
        idx = target.indices
        k = idx.shape[1]
        weights = torch.ones(n, k, dtype=torch.float64) if target.weights is None else target.weights
        # w_ij = sum of w_ik over the k with indices[i, k] = j (repeats add up); -1 pads carry nothing
        hits = (idx[:, :, None] == torch.arange(m)[None, None, :]) & (idx >= 0)[:, :, None]
        w = (weights[:, :, None] * hits).sum(1)
        return _normalised(w * valid)                  # j outside V_i is dropped
    if isinstance(target, ik.Dense):
        return _normalised(target.p * valid)
    if isinstance(target, ik.Affinity):
        z_cols = target.z if target.z_cols is None else target.z_cols
        name = PARAM_NAME[target.kernel]
        t = logits(target.kernel, target.z, z_cols, getattr(target, name) if name else None)
        return softmax_over(t, valid), valid.any(1)
    raise TypeError(f"unknown target {type(target).__name__}")


def pair_terms(divergence: str, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The per-pair term of L_i from DESIGN.md §1 (kl, cross_entropy) and §1.1's table (q~ f(p~/q~)),
    for p~ >= 0 and q~ > 0; at p~ = 0 each takes the table's 'value at p~ = 0' (a constant there:
    the other branch's own derivative at p~ = 0 is infinite for hellinger and js, whose limit
    the design gives)."""
    pos = p > 0
    sp = torch.where(pos, p, 1.0)        # p~ where it is > 0: its logs and roots stay finite
    if divergence == "kl":
        return torch.where(pos, p * (torch.log(sp) - torch.log(q)), 0.0)
    if divergence == "cross_entropy":
        return -p * torch.log(q)
    if divergence == "reverse_kl":
        return torch.where(pos, q * (torch.log(q) - torch.log(sp)), math.inf)
    if divergence == "tv":
        return 0.5 * (p - q).abs()
    if divergence == "hellinger":
        return torch.where(pos, (sp.sqrt() - q.sqrt()) ** 2, q)
    if divergence == "js":
        mid = p + q
        return 0.5 * (torch.where(pos, p * torch.log(2 * sp / mid), 0.0) + q * torch.log(2 * q / mid))
    if divergence == "chi2":
        return (p - q) ** 2 / q
    raise ValueError(f"unknown divergence {divergence!r}")


def row_losses(x, y, target, *, kernel, param, alpha, beta, exclude_self, divergence):
    """(L_i for every row, 0 for a row left out; which rows are included)."""
    cols = x if y is None else y
    n, m = x.shape[0], cols.shape[0]
    valid = valid_pairs(n, m, exclude_self)
    m_valid = valid.sum(1, keepdim=True).double()
    m_safe = m_valid.clamp_min(1)
    q = softmax_over(logits(kernel, x, cols, param), valid)
    p, has_p = target_rows(target, valid)
    p_mix = torch.where(valid, (1 - alpha) * p + alpha / m_safe, 0.0)
    q_mix = torch.where(valid, (1 - beta) * q + beta / m_safe, 1.0)     # 1 off V_i: its terms are masked
    terms = torch.where(valid, pair_terms(divergence, p_mix, q_mix), 0.0)
    # DESIGN.md §1 / §2, README "Bad input": a row with no p (no positive, an empty neighbour
    # list, a Dense row of zeros) or no valid column (M' = 0) is left out: L_i = 0 with zero
    # gradients, and out of the mean's denominator. This holds whatever alpha is (the reference
    # backend does the same: included = has_p & M' > 0, reference.row_losses), and for every
    # divergence (tv, hellinger, js, chi2 of a row without p would be finite, but it is left out).
    included = has_p & (m_valid[:, 0] > 0)
    return torch.where(included, terms.sum(1), 0.0), included


def reduce(rows, included, weight, reduction):
    """DESIGN.md §1: "none" is w_i L_i (0 for rows left out), "sum" its sum, "mean" the sum over
    the weighted count of the included rows (0 when no row is included)."""
    if weight is not None:
        rows = rows * weight
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    count = included.double() if weight is None else torch.where(included, weight, 0.0)
    total = count.sum()
    return rows.sum() / torch.where(total > 0, total, 1.0)


def icon_loss(x, y=None, *, target, kernel="cosine", temperature=0.1, sigma=1.0, dof=1.0, exponent=1.0,
              alpha=0.0, beta=0.0, exclude_self=None, divergence="kl", reduction="mean", weight=None):
    """ik.icon_loss's signature (DESIGN.md §2; normalization="conditional", no backend), densely.
    Its inputs must be float64."""
    if exclude_self is None:
        exclude_self = y is None
    params = {"temperature": temperature, "sigma": sigma, "dof": dof, "exponent": exponent}
    name = PARAM_NAME[kernel]
    rows, included = row_losses(x, y, target, kernel=kernel, param=params[name] if name else None,
                                alpha=alpha, beta=beta, exclude_self=exclude_self, divergence=divergence)
    return reduce(rows, included, weight, reduction)
