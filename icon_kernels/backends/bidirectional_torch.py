"""The ``torch`` backend's one-pass bidirectional label loss (DESIGN.md §1.3): the readable
reference of the algorithm that csrc/cpu_bidirectional_labels.cpp runs fused.

Both directions of 1/2 [L(x->y) + L(y->x)] for a Labels target with beta = 0 and KL or
cross-entropy read the same logits s_ij = k(x_i, y_j) (a symmetric kernel: k(y_j, x_i) = s_ij).
Per strip of x's rows (blockwise.row_chunks: O(strip x M) memory, any device):

- forward: x's rows take their LSE and label sums from the strip's rows; y's rows (the strip's
  columns) merge theirs over the strips online: running max, the sum of exps rescaled when the max
  grows, the sums of s over valid entries and positives, the positive count;
- backward: the strip again, then one upstream gradient of the logits for both directions,
  G_ij = g_i (q_ij - p_ij) + g'_j (q'_ji - p'_ji) with q_ij = exp(s_ij - LSE_i) and
  q'_ji = exp(s_ij - LSE'_j), pulled back through the kernel by autograd on the strip (one
  vector-Jacobian product for x, y and the parameter).
"""
from __future__ import annotations

import torch

from ..families import learned_kernel
from . import second_backward, tile_math
from .ops import no_autocast
from .blockwise import row_chunks

NEG_INF = float("-inf")


def _masks(row_labels, col_labels, r0: int, r1: int, exclude_self: bool):
    """(valid, positive) entries of the strip's rows r0:r1 over every column."""
    m = col_labels.shape[0]
    valid = torch.ones(r1 - r0, m, dtype=torch.bool, device=col_labels.device)
    if exclude_self:
        rows = torch.arange(r0, r1, device=col_labels.device)
        valid[rows - r0, rows] = False
    return valid, (row_labels[r0:r1, None] == col_labels[None, :]) & valid


def label_row_losses(lse, sum_s, pos_s, k, alpha: float, m_valid: int, kl: bool):
    """A Labels row's loss from its statistics in closed form (rows without positives: 0, out)."""
    included = (k > 0) & (m_valid > 0)
    b = alpha / max(m_valid, 1)
    cross = (1 - alpha) * pos_s / k.clamp_min(1) + b * sum_s - lse
    loss = -cross
    if kl:
        loss = loss + tile_math.labels_entropy(k, alpha, m_valid)
    return torch.where(included, loss, 0.0), included


def label_p_mix(positive, valid, k, alpha: float, m_valid: int, along: int):
    """p~ of the strip's entries for one direction: (1 - alpha) / K on positives + alpha / M' on
    valid entries; ``along`` 1 when k counts per row, 0 per column."""
    per = ((1 - alpha) / k.clamp_min(1)).unsqueeze(along)
    return torch.where(positive, per, 0.0) + valid.to(per.dtype) * (alpha / max(m_valid, 1))


def exp_under(s: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """exp(s - LSE) in s's dtype with the LSE unrounded (float64): (s - hi) - lo. At logits of 1e3
    an LSE rounded to fp32 is off by an ulp of s, and a row's q would not sum to 1 (the naive
    log_softmax's own error is far below that); -inf (no valid entry) shifts by 0."""
    lse = tile_math.finite_shift(lse)
    hi = lse.to(s.dtype)
    return torch.exp((s - hi) - (lse - hi.double()).to(s.dtype))


class BidirectionalLabels(torch.autograd.Function):
    """(rows_x, included_x, rows_y, included_y) of both directions; gradients to x, y, param."""

    @staticmethod
    def forward(ctx, *args):
        with no_autocast(args[0].device):   # fp32 accumulation under torch.autocast, as the ops
            return BidirectionalLabels._forward(ctx, *args)

    @staticmethod
    def _forward(ctx, x, y, param, kernel, row_labels, col_labels, alpha, exclude_self, kl):
        acc = tile_math.accumulation_dtype(x.dtype)
        xa, ya, pa = x.to(acc), y.to(acc), param.to(acc)
        n, m = x.shape[0], y.shape[0]
        lse_x = torch.empty(n, dtype=torch.float64, device=x.device)
        sums_x = torch.empty(2, n, dtype=acc, device=x.device)
        k_x = torch.empty(n, dtype=acc, device=x.device)
        col_max = torch.full((m,), NEG_INF, dtype=acc, device=x.device)
        col_exp = torch.zeros(m, dtype=torch.float64, device=x.device)
        sums_y = torch.zeros(2, m, dtype=torch.float64, device=x.device)
        k_y = torch.zeros(m, dtype=acc, device=x.device)
        for r0, r1 in row_chunks(n, m):
            s, _ = tile_math.logits(kernel, xa[r0:r1], ya, pa)
            valid, positive = _masks(row_labels, col_labels, r0, r1, exclude_self)
            s = s.masked_fill(~valid, NEG_INF)
            on_valid, on_positive = torch.where(valid, s, 0.0), torch.where(positive, s, 0.0)
            lse_x[r0:r1] = tile_math.row_lse(s, wide=True)
            sums_x[0, r0:r1], sums_x[1, r0:r1] = tile_math.row_sum(on_valid), tile_math.row_sum(on_positive)
            k_x[r0:r1] = positive.sum(1)
            # y's rows over this strip: merged into the running max and its rescaled sum of exps
            top = torch.maximum(col_max, s.amax(0))
            safe = torch.where(top == NEG_INF, 0.0, top)      # a column with no finite logit yet adds 0
            col_exp = col_exp * torch.exp(col_max - safe).double() + torch.exp(s - safe).sum(0, dtype=torch.float64)
            col_max = top
            sums_y += torch.stack((on_valid.sum(0, dtype=torch.float64), on_positive.sum(0, dtype=torch.float64)))
            k_y += positive.sum(0)
        lse_y = torch.where(col_max == NEG_INF, 0.0, col_max).double() + torch.log(col_exp)
        lse_y = torch.where(col_max == NEG_INF, NEG_INF, lse_y)
        self_pairs = 1 if exclude_self else 0
        rows_x, inc_x = label_row_losses(lse_x.to(acc), sums_x[0], sums_x[1], k_x, alpha, m - self_pairs, kl)
        rows_y, inc_y = label_row_losses(lse_y.to(acc), sums_y[0].to(acc), sums_y[1].to(acc), k_y, alpha, n - self_pairs,
                                    kl)
        ctx.save_for_backward(x, y, param, row_labels, col_labels, lse_x, k_x, inc_x, lse_y, k_y, inc_y)
        ctx.options = (kernel, alpha, exclude_self)
        ctx.mark_non_differentiable(inc_x, inc_y)
        return rows_x, inc_x, rows_y, inc_y

    @staticmethod
    def backward(ctx, *grads):
        with no_autocast(ctx.saved_tensors[0].device):
            return BidirectionalLabels._backward(ctx, *grads)

    @staticmethod
    def _backward(ctx, grad_x_rows, _gix, grad_y_rows, _giy):
        x, y, param, row_labels, col_labels, lse_x, k_x, inc_x, lse_y, k_y, inc_y = ctx.saved_tensors
        kernel, alpha, exclude_self = ctx.options
        acc = k_x.dtype
        n, m = x.shape[0], y.shape[0]
        self_pairs = 1 if exclude_self else 0
        zeros = torch.zeros((), dtype=acc, device=x.device)
        g_x = torch.where(inc_x, grad_x_rows.to(acc), zeros) if grad_x_rows is not None else zeros.expand(n)
        g_y = torch.where(inc_y, grad_y_rows.to(acc), zeros) if grad_y_rows is not None else zeros.expand(m)
        xa, ya, pa = x.detach().to(acc), y.detach().to(acc), param.detach().to(acc)
        needs = ctx.needs_input_grad[:3]
        dx, dy, dparam = torch.zeros_like(xa), torch.zeros_like(ya), torch.zeros_like(pa)
        for r0, r1 in row_chunks(n, m):
            with torch.enable_grad():     # (only what needs a gradient: a frozen tower costs nothing)
                xs, ys, ps = (t.detach().requires_grad_(need) for t, need in zip((xa[r0:r1], ya, pa), needs))
                s, _ = tile_math.logits(kernel, xs, ys, ps)
            valid, positive = _masks(row_labels, col_labels, r0, r1, exclude_self)
            sv = s.detach()
            q_x = torch.where(valid, exp_under(sv, lse_x[r0:r1, None]), 0.0)
            q_y = torch.where(valid, exp_under(sv, lse_y[None, :]), 0.0)
            p_x = label_p_mix(positive, valid, k_x[r0:r1], alpha, m - self_pairs, along=1)
            p_y = label_p_mix(positive, valid, k_y, alpha, n - self_pairs, along=0)
            # a row left out (g = 0) adds nothing, also where its q is NaN
            grad = (torch.where(g_x[r0:r1, None] != 0, g_x[r0:r1, None] * (q_x - p_x), 0.0)
                    + torch.where(g_y[None, :] != 0, g_y[None, :] * (q_y - p_y), 0.0))
            wanted = [t for t, need in zip((xs, ys, ps), needs) if need]
            got = iter(torch.autograd.grad(s, wanted, grad, allow_unused=True) if s.requires_grad else [])
            gx, gy, gp = (next(got, None) if need else None for need in needs)
            if gx is not None:
                dx[r0:r1] += gx
            if gy is not None:
                dy += gy
            if gp is not None:
                dparam += gp
        grads = second_backward.guard([dx.to(x.dtype), dy.to(y.dtype), dparam.to(param.dtype)],
                                      "the torch backend's bidirectional pass")
        return (*grads, None, None, None, None, None, None)


def fits(problem) -> bool:
    """Whether the one-pass torch version computes ``problem`` (x -> y) and its reverse."""
    return learned_kernel(problem.kernel).symmetric


def row_losses(problem, x, y, param, kernel):
    """(rows_x, included_x, rows_y, included_y) of a checked Labels problem, x / y / kernel / param
    as the ops take them (dispatch.kernel_inputs: cosine as dot on normalised rows)."""
    t = problem.target
    return BidirectionalLabels.apply(x, y, param.reshape(()), kernel, t.row_labels, t.col_labels,
                                     problem.alpha, problem.exclude_self, problem.divergence == "kl")
