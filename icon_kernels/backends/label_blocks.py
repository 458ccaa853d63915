"""Ring mode's column blocks of the hot case through the fused CPU kernel
(csrc/cpu_label_blocks.cpp): Labels target, beta = 0, dot or gaussian kernel, kl or cross_entropy,
the ``cpu`` backend (an f-divergence's blocks take the generic path, column_blocks.py).

One rotation gives the loss. Each block's partial statistics (LSE, positive count K, sum of s
over the positives S+ and over the valid columns S) merge in ``column_blocks.merge``, and the
row loss follows from the merged ones in closed form (DESIGN.md §1 with p~ = (1 - alpha) [pos]/K
+ alpha/M' and log q = s - LSE):

    cross_i = (1 - alpha) S+_i / K_i + (alpha / M') S_i - LSE_i,
    L_i = sum_j p~ log p~ - cross_i (KL)   or   -cross_i (cross-entropy).

The backward rotation adds each block's dL/dx, dL/dy and per-row dL/dparam in place under the
merged LSE and K.
"""
from __future__ import annotations

from typing import Dict

import torch

from . import tile_math

KERNELS = ("dot", "gaussian")
DIVERGENCES = ("kl", "cross_entropy")      # the closed form of finish_rows


def applies(target: str, beta: float, kernel: str, backend: str, divergence: str = "kl") -> bool:
    """Whether ring blocks of this problem run on the fused kernel (``backend`` resolved)."""
    return (backend == "cpu" and target == "labels" and beta == 0 and kernel in KERNELS
            and divergence in DIVERGENCES)


def _diagonal(rows, block) -> int:
    """Block column of local row 0's self pair."""
    return rows.row_offset - block.offset


def partials(rows, block) -> Dict[str, torch.Tensor]:
    lse, count, positive_sum, valid_sum = torch.ops.icon_kernels.cpu_label_block_stats(
        rows.x, block.y, rows.param, rows.kernel, rows.row_labels, block.col_labels, rows.exclude_self,
        _diagonal(rows, block), rows.tile_elements)
    return {"lse": lse, "mass": count, "pos_s": positive_sum, "sum_s": valid_sum}


def finish_rows(rows, stats):
    """(L_i, 0 for rows left out; included) from the merged statistics."""
    count = stats["mass"]                    # K_i, the row's positives
    included = (count > 0) & (rows.m_valid > 0)
    count = torch.where(count > 0, count, 1.0)
    cross = (1 - rows.alpha) * stats["pos_s"] / count - stats["lse"]
    if rows.alpha > 0:
        cross = cross + rows.alpha / rows.m_mix * stats["sum_s"]
    row = -cross
    if rows.kl:
        row = row + tile_math.labels_entropy(count, rows.alpha, rows.m_mix)
    return torch.where(included, row, 0.0), included


def gradient_block(rows, block, stats, g, row_grads, block_grads) -> None:
    """Adds the block's gradients: dL/dx and dL/dparam per row into ``row_grads``, dL/dy into
    ``block_grads[0]``. ``g`` is the upstream gradient per row, 0 for rows left out."""
    torch.ops.icon_kernels.cpu_label_block_backward(
        g, rows.x, block.y, rows.param, rows.kernel, rows.row_labels, block.col_labels, rows.alpha,
        rows.exclude_self, _diagonal(rows, block), rows.m_mix, stats["lse"], stats["mass"],
        rows.tile_elements, row_grads[0], block_grads[0], row_grads[1])
