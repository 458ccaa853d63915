"""Supervisory targets p(.|i) of the I-Con loss (DESIGN.md §1).

Each target is a small record of tensors; the math lives in the backends.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

Scalar = Union[float, torch.Tensor]


@dataclass
class Labels:
    """p_ij = 1[l_i = c_j] / K_i over valid columns j (augmentations, SupCon, CLIP pair ids).

    ``col_labels`` defaults to ``row_labels`` when the columns are the rows (or M == N).
    """

    row_labels: torch.Tensor
    col_labels: Optional[torch.Tensor] = None


@dataclass
class Neighbors:
    """p_ij = w_ik / sum_k w_ik at j = indices[i, k]; -1 pads (their weights are ignored),
    repeats add up, invalid j drop."""

    indices: torch.Tensor
    weights: Optional[torch.Tensor] = None


@dataclass
class Affinity:
    """p(.|i) = softmax over valid j of a learned-kernel logit t_ij computed on target features z.

    ``kernel`` is one of dot, cosine, gaussian, student_t, log_dot with its parameter
    (temperature, sigma or dof). Parameters may be floats, 0-d tensors or (N,) per-row tensors,
    and tensors may require grad, as may ``z`` and ``z_cols``.
    """

    z: torch.Tensor
    z_cols: Optional[torch.Tensor] = None
    kernel: str = "gaussian"
    sigma: Scalar = 1.0
    temperature: Scalar = 1.0
    dof: Scalar = 1.0


@dataclass
class Dense:
    """A given N x M matrix of nonnegative weights, renormalised over the valid columns."""

    p: torch.Tensor


TARGET_TYPES = (Labels, Neighbors, Affinity, Dense)
