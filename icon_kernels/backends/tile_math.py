"""Math on one row-chunk x all-columns tile, shared by the blockwise torch backend.

``logits`` forms s (and the auxiliary tile the chain rule needs); ``chain`` pulls a tile of
dL/ds back to the two feature blocks and to the kernel parameter (DESIGN.md §1, gradient table).
Kernels here are the op-level ones: "cosine" arrives as "dot" on pre-normalised features.
"""
from __future__ import annotations

import math

import torch

from ..families import learned_kernel


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Where row statistics and losses accumulate: float64 for float64 inputs, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rows_of(param: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
    """The parameter for rows r0:r1, shaped to scale the rows of an R x M tile."""
    return param[r0:r1, None] if param.dim() == 1 else param


def _per_row(param_rows: torch.Tensor) -> torch.Tensor:
    return param_rows[:, 0] if param_rows.dim() == 2 else param_rows


def row_ranges(n_rows: int, per_row_elements: int, budget: int):
    """(r0, r1) ranges over n_rows rows, each of max(1, budget // per_row_elements) rows (the
    last one shorter), so a chunk's tile of ``per_row_elements`` entries per row holds about
    ``budget`` entries. The one row-chunk generator of the backends, ring mode and the helpers;
    each passes its own budget, read when it is called (tests shrink them)."""
    step = max(1, budget // max(per_row_elements, 1))
    for r0 in range(0, n_rows, step):
        yield r0, min(n_rows, r0 + step)


SUM_BLOCK = 1024   # columns summed in the tile's dtype by row_sum before a float64 total


def row_sum(t: torch.Tensor) -> torch.Tensor:
    """Row sums of an R x M tile, in float64 (MPS: the tile's dtype): blocks of SUM_BLOCK
    columns summed in the tile's dtype, the block sums in float64, with no float64 copy of the
    tile. Row sums over 1e5 columns keep fp32's own accuracy, and a row loss formed from two such
    sums rounds once (DESIGN.md §5)."""
    r, m = t.shape
    acc = t.dtype if t.device.type == "mps" else torch.float64     # MPS has no float64
    full = m - m % SUM_BLOCK
    total = t[:, full:].sum(1, dtype=acc)
    if full:
        total += t[:, :full].reshape(r, full // SUM_BLOCK, SUM_BLOCK).sum(2).sum(1, dtype=acc)
    return total


def where_positive(p: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """values where p != 0 (0 log 0 = 0); NaN in p stays NaN."""
    return torch.where(p == 0, 0.0, values)


def finite_shift(lse: torch.Tensor) -> torch.Tensor:
    """A row LSE as the shift for ``chain``; -inf (no valid column) becomes 0, NaN stays."""
    return torch.nan_to_num(lse, nan=float("nan"), posinf=0.0, neginf=0.0)


def with_inf_rows_nan(row: torch.Tensor, *features) -> torch.Tensor:
    """Per-row values, NaN where a row of any of ``features`` (None: skipped) holds an Inf. Joint
    normalisation needs it: an Inf coordinate turns a row's logits to -inf, which a conditional
    row's log-softmax makes NaN but the global log Z absorbs as q = 0 (DESIGN.md §2: NaN or Inf in
    an input gives a NaN loss)."""
    for t in features:
        if t is not None:
            row = torch.where(torch.isinf(t).any(1), float("nan"), row)
    return row


def row_lse(s: torch.Tensor, wide: bool = False) -> torch.Tensor:
    """logsumexp over each row of a masked logits tile (-inf off the valid set). A row with a +inf
    logit gets NaN, as log_softmax gives (Inf in the inputs never yields a finite or +inf loss by
    way of -inf log q elsewhere in the row); a row with no valid column stays at -inf.
    The sum of exponentials runs in float64 (row_sum), so the LSE is only rounded to s's dtype:
    its error shifts every log q of the row, which the mixtures (alpha, beta > 0) do not cancel.
    ``wide`` returns it unrounded, in row_sum's float64 (joint normalisation's log Z)."""
    row_max = s.amax(1)
    row_max = torch.where(torch.isinf(row_max), 0.0, row_max)   # -inf rows stay -inf, +inf rows give inf
    exp_sum = row_sum(torch.exp(s - row_max[:, None]))
    lse = row_max.to(exp_sum.dtype) + torch.log(exp_sum)
    lse = lse if wide else lse.to(s.dtype)
    return torch.where(lse == float("inf"), float("nan"), lse)


def labels_entropy(k: torch.Tensor, alpha: float, m_valid: int) -> torch.Tensor:
    """sum_j p~ log p~ of a Labels row with k positives among m_valid columns, in closed form:
    k a log a + (m_valid - k) b log b with b = alpha / m_valid, a = (1 - alpha) / k + b.
    With m_valid = 0 (no valid column: the row is left out) the value is unused and 0 is returned
    for the uniform part."""
    m_valid = max(m_valid, 1)
    a = (1 - alpha) / k.clamp_min(1) + alpha / m_valid
    entropy = k * a * torch.log(a)
    if alpha > 0:
        b = alpha / m_valid
        entropy = entropy + (m_valid - k) * b * math.log(b)
    return entropy


def logits(kernel: str, a: torch.Tensor, b: torch.Tensor, prm: torch.Tensor):
    """(s, aux) for rows a (R x d) against columns b (M x d); aux is a.b or the squared distance."""
    row = learned_kernel(kernel)
    ab = a @ b.T
    if row.distance:
        ab = (a.square().sum(1, keepdim=True) + b.square().sum(1) - 2 * ab).clamp_min_(0)
    return row.logit(ab, prm), ab


def target_side(target: str, rows, col_labels, z_cols, r0: int, r1: int, col_offset: int,
                n_cols: int, dtype: torch.dtype):
    """The target side of rows r0:r1 x columns [col_offset, col_offset + n_cols), self pairs not
    yet masked: (unnormalised p, None) for Labels, Neighbors and Dense, (logits t, aux) for
    Affinity. ``rows`` holds the row side (row_labels, nbr_index, nbr_weight, dense_p, z,
    t_param, t_kernel) as the blockwise backend's problem and ring mode's RowSide both do; the
    column side is the columns' labels or target features. One place per target type for the
    whole-row tiles of the torch backend and the column blocks of ring mode."""
    if target == "labels":
        return (rows.row_labels[r0:r1, None] == col_labels[None, :]).to(dtype), None
    if target == "dense":
        return rows.dense_p[r0:r1, col_offset:col_offset + n_cols].clone(), None
    if target == "neighbors":
        global_idx = rows.nbr_index[r0:r1]
        idx = global_idx - col_offset
        inside = (global_idx >= 0) & (idx >= 0) & (idx < n_cols)     # -1 pads and other blocks drop
        w = (torch.ones(idx.shape, dtype=dtype, device=idx.device) if rows.nbr_weight is None
             else rows.nbr_weight[r0:r1])
        raw = torch.zeros(r1 - r0, n_cols, dtype=dtype, device=idx.device)
        raw.scatter_add_(1, torch.where(inside, idx, 0), torch.where(inside, w, 0.0))
        return raw, None
    if target == "affinity":
        return logits(rows.t_kernel, rows.z[r0:r1], z_cols, rows_of(rows.t_param, r0, r1))
    raise ValueError(f"unknown target {target!r}")


def _to_columns(w: torch.Tensor, a: torch.Tensor, out_b):
    """w^T a: a new tensor, or added into ``out_b`` in place (then None is returned)."""
    if out_b is None:
        return w.T @ a
    out_b.addmm_(w.T, a)
    return None


def _param_sum(grad: torch.Tensor, s: torch.Tensor, shift, weights) -> torch.Tensor:
    """sum_j G_ij (s_ij - c_i) per row, for any row constant c_i, since every row of G sums to zero.
    Without ``weights``, c is ``shift`` (the row's LSE). With ``weights`` (R x M, >= 0: q for the
    learned side, p for the target side), c is s's weighted row mean and the sum is centred again
    in float64 (row_sum): that cancels the rounding that G's row sum carries (from the LSE, say),
    and s - c rounds no coarser than s itself, where s - LSE can (DESIGN.md §5, large M). The
    centred sum stays in float64, so a scalar parameter's gradient, the sum over rows, rounds once."""
    if weights is None:
        return (grad * (s - shift)).sum(1)
    total = row_sum(weights)
    total = torch.where(total > 0, total, 1.0)
    centre = (row_sum(where_positive(weights, weights * s)) / total).to(s.dtype)
    centred = s - centre[:, None]
    return (row_sum(grad * centred)
            - row_sum(grad) * row_sum(where_positive(weights, weights * centred)) / total)


def param_grad(kernel: str, grad: torch.Tensor, aux: torch.Tensor, prm: torch.Tensor, shift: torch.Tensor,
               weights=None) -> torch.Tensor:
    """dL/dparam per row from G = dL/ds (R x M), from sum_j G_ij basis_ij by the kernel's row
    (families.py): -sum_j G s / tau (dot), -2 sum_j G s / sigma (gaussian),
    sum_j G ds/dnu (student_t), 0 (log_dot: no parameter).

    Every row of G sums to zero, so sum_j G_ij s_ij = sum_j G_ij (s_ij - shift_i) for any row
    constant; shifting by the row's LSE keeps that sum from cancelling catastrophically.
    ``weights`` (q for the learned side, p for the target side) centres that sum (_param_sum)."""
    row = learned_kernel(kernel)
    if row.param is None:
        return torch.zeros_like(grad[:, 0])
    if row.param_basis is None:
        total = _param_sum(grad, row.logit(aux, prm), shift[:, None], weights)
    else:
        total = _param_sum(grad, row.param_basis(aux, prm), 0.0, weights)
    return row.param_from_sum(total, _per_row(prm))


def chain(kernel: str, grad: torch.Tensor, a: torch.Tensor, b: torch.Tensor, aux: torch.Tensor,
          prm: torch.Tensor, shift: torch.Tensor, out_b=None, weights=None, with_param: bool = True):
    """From G = dL/ds (R x M) to (dL/da, dL/db, dL/dparam per row); with ``out_b``, dL/db is
    added into it in place (no M x d temporary) and returned as None. ``with_param=False`` skips
    the parameter's gradient (zeros), which costs several passes over the tile (param_grad)."""
    d_param = (param_grad(kernel, grad, aux, prm, shift, weights) if with_param
               else torch.zeros_like(grad[:, 0]))
    row = learned_kernel(kernel)
    w = row.weight(grad, aux, prm)
    if not row.distance:
        return w @ b, _to_columns(w, a, out_b), d_param
    d_a = w @ b - row_sum(w).to(w.dtype)[:, None] * a          # dL/d(sq) = -w / 2
    if out_b is None:
        return d_a, w.T @ a - w.sum(0)[:, None] * b, d_param
    out_b.addmm_(w.T, a).addcmul_(w.sum(0)[:, None], b, value=-1)
    return d_a, None, d_param
