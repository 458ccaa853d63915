"""The ``torch`` backend's symmetric schedule (DESIGN.md §1.3) for self mode on a Labels target:
the readable version of what csrc/cpu_symmetric_labels.h runs fused.

In self mode (y = x) with a symmetric kernel, s_ij = s_ji: each pair of row blocks (I, J), I <= J,
is one tile S_IJ = k(x_I, x_J).

- forward: the rows of I merge their statistics over the columns J from the tile, and the rows of
  J theirs over the columns I from its transpose: running max, the sum of exps rescaled when the
  max grows, the sums of s over valid entries and positives, the positive count;
- backward: the tile again, and dL/dS_IJ = G_IJ + G_JI^T (row i's term at (i, j), row j's at
  (j, i) = s_ij; on a diagonal block the tile holds both already), pulled back through the kernel
  by autograd on the tile: half the logit GEMMs and one gradient GEMM per tile pair instead of two.

Labels target, beta = 0, KL or cross-entropy, one kernel parameter; ICON_KERNELS_SYMMETRIC=0 and
torch.compile (its backward calls torch.autograd.grad) run the plain blockwise schedule instead.
"""
from __future__ import annotations

import math
import os

import torch

from ..families import learned_kernel
from ..target_adapters import adapter_for
from . import blockwise, second_backward, tile_math
from .ops import no_autocast
from .bidirectional_torch import exp_under, label_p_mix, label_row_losses

NEG_INF = float("-inf")
SWITCH = "ICON_KERNELS_SYMMETRIC"


def schedules_enabled() -> bool:
    """The off switch of the symmetric and bidirectional schedules, read at every call as the C++
    kernels read it: unset, "" or "1" on, "0" off, anything else an error."""
    value = os.environ.get(SWITCH, "")
    if value not in ("", "0", "1"):
        raise ValueError(f"{SWITCH} must be 0 or 1, got {value!r}")
    return value != "0"


def block_rows(n: int) -> int:
    """Rows of a block: a block pair's tile holds about blockwise.CHUNK_ELEMENTS entries."""
    return max(1, min(n, math.isqrt(blockwise.CHUNK_ELEMENTS)))


def block_pairs(n: int):
    """(i0, i1, j0, j1) over the block pairs I <= J."""
    b = block_rows(n)
    for i0 in range(0, n, b):
        for j0 in range(i0, n, b):
            yield i0, min(n, i0 + b), j0, min(n, j0 + b)


def _masks(labels, i0, i1, j0, j1, exclude_self):
    rows, cols = torch.arange(i0, i1, device=labels.device), torch.arange(j0, j1, device=labels.device)
    valid = torch.ones(i1 - i0, j1 - j0, dtype=torch.bool, device=labels.device)
    if exclude_self:
        valid &= rows[:, None] != cols[None, :]
    return valid, (labels[i0:i1, None] == labels[None, j0:j1]) & valid


class _Rows:
    """Every row's statistics, merged online over the column blocks."""

    def __init__(self, n, acc, device):
        self.max = torch.full((n,), NEG_INF, dtype=acc, device=device)
        self.exp = torch.zeros(n, dtype=torch.float64, device=device)
        self.sums = torch.zeros(2, n, dtype=torch.float64, device=device)
        self.k = torch.zeros(n, dtype=acc, device=device)

    def add(self, r0, r1, s, valid, positive):
        """Rows r0:r1 over one block of columns: s (masked to -inf off the valid set), dim 1."""
        top = torch.maximum(self.max[r0:r1], s.amax(1))
        safe = torch.where(top == NEG_INF, 0.0, top)       # a row with no finite logit yet adds 0
        self.exp[r0:r1] = (self.exp[r0:r1] * torch.exp(self.max[r0:r1] - safe).double()
                           + torch.exp(s - safe[:, None]).sum(1, dtype=torch.float64))
        self.max[r0:r1] = top
        self.sums[0, r0:r1] += torch.where(valid, s, 0.0).sum(1, dtype=torch.float64)
        self.sums[1, r0:r1] += torch.where(positive, s, 0.0).sum(1, dtype=torch.float64)
        self.k[r0:r1] += positive.sum(1)

    def lse(self):
        """The rows' LSE in float64 (unrounded: exp_under takes it so)."""
        lse = torch.where(self.max == NEG_INF, 0.0, self.max).double() + torch.log(self.exp)
        return torch.where(self.max == NEG_INF, NEG_INF, lse)


class SymmetricLabels(torch.autograd.Function):
    """(rows, included) of the self-mode Labels loss; gradients to x and the parameter."""

    @staticmethod
    def forward(ctx, *args):
        with no_autocast(args[0].device):   # fp32 accumulation under torch.autocast, as the ops
            return SymmetricLabels._forward(ctx, *args)

    @staticmethod
    def _forward(ctx, x, param, kernel, labels, alpha, exclude_self, kl):
        acc = tile_math.accumulation_dtype(x.dtype)
        xa, pa = x.to(acc), param.to(acc)
        n = x.shape[0]
        stats = _Rows(n, acc, x.device)
        for i0, i1, j0, j1 in block_pairs(n):
            s, _ = tile_math.logits(kernel, xa[i0:i1], xa[j0:j1], pa)
            valid, positive = _masks(labels, i0, i1, j0, j1, exclude_self)
            s = s.masked_fill(~valid, NEG_INF)
            stats.add(i0, i1, s, valid, positive)
            if j0 != i0:                                   # the rows of J, from the transpose
                stats.add(j0, j1, s.T, valid.T, positive.T)
        lse = stats.lse()
        m_valid = n - (1 if exclude_self else 0)
        rows, included = label_row_losses(lse.to(acc), stats.sums[0].to(acc), stats.sums[1].to(acc), stats.k,
                                          alpha, m_valid, kl)
        ctx.save_for_backward(x, param, labels, lse, stats.k, included)
        ctx.options = (kernel, alpha, exclude_self)
        ctx.mark_non_differentiable(included)
        return rows, included

    @staticmethod
    def backward(ctx, *grads):
        with no_autocast(ctx.saved_tensors[0].device):
            return SymmetricLabels._backward(ctx, *grads)

    @staticmethod
    def _backward(ctx, grad_rows, _grad_included):
        x, param, labels, lse, k, included = ctx.saved_tensors
        kernel, alpha, exclude_self = ctx.options
        acc = k.dtype
        n = x.shape[0]
        m_valid = n - (1 if exclude_self else 0)
        g = torch.where(included, grad_rows.to(acc), 0.0)
        xa, pa = x.detach().to(acc), param.detach().to(acc)
        need_x, need_p = ctx.needs_input_grad[:2]
        dx, dparam = torch.zeros_like(xa), torch.zeros_like(pa)
        for i0, i1, j0, j1 in block_pairs(n):
            diagonal = i0 == j0
            with torch.enable_grad():
                xi = xa[i0:i1].detach().requires_grad_(need_x)
                xj = xi if diagonal else xa[j0:j1].detach().requires_grad_(need_x)
                p = pa.detach().requires_grad_(need_p)
                s, _ = tile_math.logits(kernel, xi, xj, p)
            valid, positive = _masks(labels, i0, i1, j0, j1, exclude_self)
            sv = s.detach()
            # row i's term at (i, j): g_i (q_ij - p~_ij); a row left out (g = 0) adds nothing
            q = torch.where(valid, exp_under(sv, lse[i0:i1, None]), 0.0)
            grad = torch.where(g[i0:i1, None] != 0,
                               g[i0:i1, None] * (q - label_p_mix(positive, valid, k[i0:i1], alpha, m_valid, 1)), 0.0)
            if not diagonal:        # row j's term at (j, i), which is s_ij too
                q_t = torch.where(valid, exp_under(sv, lse[None, j0:j1]), 0.0)
                grad = grad + torch.where(g[None, j0:j1] != 0, g[None, j0:j1] * (
                    q_t - label_p_mix(positive, valid, k[j0:j1], alpha, m_valid, 0)), 0.0)
            wanted = [t for t, need in ((xi, need_x), (xj, need_x and not diagonal), (p, need_p)) if need]
            got = iter(torch.autograd.grad(s, wanted, grad, allow_unused=True) if s.requires_grad else [])
            gi = next(got, None) if need_x else None
            gj = next(got, None) if need_x and not diagonal else None
            gp = next(got, None) if need_p else None
            if gi is not None:
                dx[i0:i1] += gi
            if gj is not None:
                dx[j0:j1] += gj
            if gp is not None:
                dparam += gp
        grads = second_backward.guard([dx.to(x.dtype), dparam.to(param.dtype)], "the torch backend's symmetric pass")
        return (*grads, None, None, None, None, None)


def fits(problem) -> bool:
    """Self mode (y None) on a Labels target whose column labels are its row labels, beta = 0,
    KL or cross-entropy, conditional, one kernel parameter, a symmetric kernel; not under
    torch.compile."""
    if problem.y is not None or adapter_for(problem.target).name != "labels":
        return False
    t = problem.target
    same_labels = t.col_labels is None or t.col_labels is t.row_labels or torch.equal(t.col_labels, t.row_labels)
    one_value = not isinstance(problem.param, torch.Tensor) or problem.param.numel() == 1
    return (same_labels and one_value and problem.beta == 0 and problem.divergence in ("kl", "cross_entropy")
            and problem.normalization == "conditional" and learned_kernel(problem.kernel).symmetric
            and not torch.compiler.is_compiling())


def row_losses(problem, x, param, kernel):
    """(rows, included) of a checked self-mode problem, x / kernel / param as the ops take them
    (dispatch.kernel_inputs: cosine as dot on normalised rows)."""
    return SymmetricLabels.apply(x, param.reshape(()), kernel, problem.target.row_labels.long(), problem.alpha,
                                 problem.exclude_self, problem.divergence == "kl")
