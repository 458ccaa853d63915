"""Reduction of the per-row losses (DESIGN.md §1 'Row loss and reduction')."""
from __future__ import annotations

from typing import Optional

import torch


def reduce_rows(rows: torch.Tensor, included: torch.Tensor, weight: Optional[torch.Tensor],
                reduction: str) -> torch.Tensor:
    """``rows`` is 0 for rows left out. "mean" is the (weighted) mean over included rows, and 0 with
    zero gradients when no row is included."""
    if weight is not None:
        weight = weight.to(rows.dtype)
        rows = rows * weight
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    counted = included.to(rows.dtype) if weight is None else torch.where(included, weight, 0.0)
    denominator = counted.sum()
    return total / torch.where(denominator != 0, denominator, 1.0)
