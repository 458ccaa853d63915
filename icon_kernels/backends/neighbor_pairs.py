"""The sparse part of a Neighbors target, outside the tile loop (DESIGN.md §1).

A fused kernel treats a Neighbors target as if p were 0 and keeps only the uniform alpha / M'
part. The (i, indices[i, k]) pairs are handled here with a gather in O(N k d): their logits,
their linear corrections to the loss and R_i, the entropy over the merged support, and the
chain rule of the gradient correction. Work is done in row chunks so the gathered columns stay
small. Invalid entries (padding, self pairs) carry weight 0 and are masked, never multiplied,
so a NaN elsewhere cannot leak in.
"""
from __future__ import annotations

import math

import torch

from ..families import learned_kernel
from .tile_math import row_ranges

GATHER_ELEMENTS = 1 << 22     # entries of one chunk's gathered (rows x k x d) columns


def _row_chunks(n_rows: int, k: int, d: int):
    """(r0, r1) row ranges whose gathered (rows x k x d) columns hold about GATHER_ELEMENTS entries."""
    return row_ranges(n_rows, k * d, GATHER_ELEMENTS)


def _param_rows(param: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
    """The per-row parameter of rows r0:r1 as an R x 1 column."""
    return param[r0:r1, None]


def pair_logits(kernel: str, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor,
                param: torch.Tensor, dtype: torch.dtype = torch.float32):
    """(s, aux) of shape (N, k) for the pairs (i, idx[i, k]), computed in ``dtype``; param is
    per row (N,)."""
    row = learned_kernel(kernel)
    s = torch.zeros(idx.shape, dtype=dtype, device=x.device)
    aux = torch.zeros_like(s)
    for r0, r1 in _row_chunks(*idx.shape, x.shape[1]):
        a = x[r0:r1].to(dtype)
        b = y.to(dtype)[idx[r0:r1].clamp_min(0)]                    # (R, k, d)
        ab = torch.einsum("rd,rkd->rk", a, b)
        param_rows = _param_rows(param, r0, r1).to(dtype)
        if row.distance:
            ab = (a.square().sum(1, keepdim=True) + b.square().sum(2) - 2 * ab).clamp_min(0)
        aux[r0:r1] = ab
        s[r0:r1] = row.logit(ab, param_rows)
    return s, aux


def weighted_sum(weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """sum_k w_ik v_ik over the entries with w != 0."""
    return torch.where(weights != 0, weights * values, 0.0).sum(1)


def entropy_correction(idx: torch.Tensor, weights: torch.Tensor, alpha: float, m_valid: int):
    """sum over the merged support of (p~ log p~ - b log b), b = alpha / M': what the uniform
    part computed by the kernel misses. Repeated indices are merged first."""
    order = torch.argsort(idx, dim=1)
    sorted_idx = torch.gather(idx, 1, order)
    sorted_w = torch.gather(weights, 1, order)
    new = torch.ones_like(sorted_idx, dtype=torch.bool)
    new[:, 1:] = sorted_idx[:, 1:] != sorted_idx[:, :-1]
    segment = new.long().cumsum(1) - 1                               # run id within the row
    merged = torch.zeros_like(sorted_w).scatter_add_(1, segment, sorted_w)
    b = alpha / m_valid
    p_mix = (1 - alpha) * merged + b
    used = torch.zeros_like(new).scatter_(1, segment, torch.ones_like(new)) & (merged != 0)
    b_log_b = b * math.log(b) if b > 0 else 0.0
    return torch.where(used, p_mix * torch.log(p_mix) - b_log_b, 0.0).sum(1)


def _add_rows(out: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> None:
    """out[index[r]] += rows[r], the same bits every run. On CUDA index_add_ adds colliding rows
    with atomics in a varying order (an opcheck of the Triton backend failed on the H200 by 2.4e-7
    between two identical runs), while index_put_ with accumulate sorts the indices first; on the
    CPU it is the other way round (index_put_ accumulates in parallel, index_add_ in order)."""
    if out.is_cuda:
        out.index_put_((index,), rows, accumulate=True)
    else:
        out.index_add_(0, index, rows)


def chain(kernel: str, grad: torch.Tensor, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor,
          s: torch.Tensor, aux: torch.Tensor, param: torch.Tensor, shift: torch.Tensor):
    """Pull dL/ds on the pairs (N, k) back to (dX (N, d), dY (M, d), dparam per row (N,)).

    The parameter term uses s - shift, with the same row shift as the kernel's dense part."""
    row = learned_kernel(kernel)
    grad = torch.where(grad != 0, grad, 0.0)
    dx = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    dy = torch.zeros(y.shape, dtype=torch.float32, device=x.device)
    dparam = torch.zeros(x.shape[0], dtype=torch.float32, device=x.device)
    for r0, r1 in _row_chunks(*idx.shape, x.shape[1]):
        grad_rows, a, col_idx = grad[r0:r1], x[r0:r1].float(), idx[r0:r1].clamp_min(0)
        b = y.float()[col_idx]
        param_rows, shift_rows = _param_rows(param, r0, r1), shift[r0:r1, None]
        s_rows, aux_rows = s[r0:r1], aux[r0:r1]
        w = row.weight(grad_rows, aux_rows, param_rows)
        if row.param is not None:
            basis = (s_rows - shift_rows if row.param_basis is None
                     else row.param_basis(aux_rows, param_rows))
            dparam[r0:r1] = row.param_from_sum(torch.where(grad_rows != 0, grad_rows * basis, 0.0).sum(1),
                                               param_rows[:, 0])
        rows_part = torch.einsum("rk,rkd->rd", w, b)
        cols_part = w[:, :, None] * a[:, None, :]                   # (R, k, d)
        if row.distance:
            rows_part -= w.sum(1, keepdim=True) * a
            cols_part -= w[:, :, None] * b
        dx[r0:r1] = rows_part
        _add_rows(dy, col_idx.reshape(-1), cols_part.reshape(-1, x.shape[1]))
    return dx, dy, dparam


def symmetric_neighbors(index: torch.Tensor, weight, n: int, exclude_self: bool, dtype: torch.dtype):
    """A symmetrised Neighbors target as rows of (global column, weight) entries, built once in
    O(N k log(N k)), never N x N: row i holds (j, p_{j|i} / 2) for its own entries and
    (j, p_{i|j} / 2) for every row j that lists i, where p_{j|i} is row i's weights
    renormalised over its valid entries (-1 pads and, with exclude_self, the self pair drop;
    repeats add up as they do in any Neighbors row). Returns (row_ptr [n + 1], column, weight),
    entries sorted by row; the tile math sums repeated (i, j) entries."""
    rows = torch.arange(n, device=index.device)[:, None].expand_as(index)
    w = torch.ones(index.shape, dtype=dtype, device=index.device) if weight is None else weight.to(dtype)
    keep = index >= 0
    if exclude_self:
        keep &= index != rows
    w = torch.where(keep, w, 0.0)          # a dropped entry's weight is no weight, even NaN / Inf
    total = w.sum(1, keepdim=True)
    p = w / torch.where(total != 0, total, 1.0)
    r, c, v = rows[keep], index[keep], p[keep] / 2
    src, dst, val = torch.cat([r, c]), torch.cat([c, r]), torch.cat([v, v])
    order = torch.argsort(src, stable=True)
    src, dst, val = src[order], dst[order], val[order]
    row_ptr = torch.zeros(n + 1, dtype=torch.long, device=index.device)
    row_ptr[1:] = torch.cumsum(torch.bincount(src, minlength=n), 0)
    return row_ptr, dst, val


def padded_symmetric_neighbors(index: torch.Tensor, weight, n: int, exclude_self: bool, dtype: torch.dtype):
    """symmetric_neighbors as a plain Neighbors target: (index [n, k], weight [n, k]) with k the
    longest row's entry count, -1 (weight 0) padding the shorter rows. The fused ops read it as
    any Neighbors target: repeated (i, j) entries add up, so its rows are the symmetrised ones."""
    row_ptr, column, value = symmetric_neighbors(index, weight, n, exclude_self, dtype)
    counts = row_ptr[1:] - row_ptr[:-1]
    width = int(counts.max()) if n > 0 else 0
    rows = torch.repeat_interleave(torch.arange(n, device=index.device), counts)
    slot = torch.arange(column.numel(), device=index.device) - row_ptr[rows]
    padded_index = torch.full((n, width), -1, dtype=torch.long, device=index.device)
    padded_weight = torch.zeros((n, width), dtype=dtype, device=index.device)
    padded_index[rows, slot] = column
    padded_weight[rows, slot] = value
    return padded_index, padded_weight
