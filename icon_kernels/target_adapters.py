"""One adapter per target type: what the package needs to know about a target, in one place.

Each adapter holds, for its type (targets.py):
- ``check``: the whole-batch checks (validation.check_arguments calls it), and ``check_shard``:
  one rank's part before anything travels (distributed/rank_agreement.py calls it);
- ``op_slots``: the target's arguments of the fused ops (backends/dispatch.py turns them into the
  op's flat arguments, and ring mode into its row and block sides);
- ``grad_tensors``: the target tensors that may require grad (the ranks agree on them), and
  ``weight_tensor``: the one whose gradient target_weight_grads.py gives (Neighbors weights,
  Dense p);
- the column side: ``addresses_global_columns`` (Neighbors indices and Dense columns name the
  global columns in distributed mode) and ``global_columns``, the target over all ranks' columns
  (gather mode; the symmetric passes to come read the column side here too).

The adapters are looked up by type through the target table (families.TARGET_TYPES_BY_NAME);
``adapter_for`` raises for an unknown type, never falls through to another target.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable, NamedTuple, Optional

import torch

from .families import TARGET_TYPES_BY_NAME
from .targets import Dense, Labels, Neighbors
from .validation import (KERNEL_PARAM, KERNELS, check_choice, check_device, check_features,
                         check_labels, check_matrix, check_positive, checking_values, inf_to_nan,
                         is_index_tensor)


class OpSlots(NamedTuple):
    """A target's arguments of the fused ops, before the kernel inputs are prepared: Affinity's
    (kernel, z, z_cols or None, parameter value) go through the same preparation as x and y."""

    row_labels: Optional[torch.Tensor] = None
    col_labels: Optional[torch.Tensor] = None
    nbr_index: Optional[torch.Tensor] = None
    nbr_weight: Optional[torch.Tensor] = None
    affinity: Optional[tuple] = None
    dense_p: Optional[torch.Tensor] = None


# the shard of one rank: `gather(t)` all-gathers rows of t across ranks (rank order) without
# gradients, `gather_with_grad(t)` with them; `order` puts this rank's columns first and
# `position[j]` is where global column j went
Gather = Callable[[torch.Tensor], torch.Tensor]


def _rows_on_rank(name: str, t: torch.Tensor, want: int, x: torch.Tensor) -> None:
    if t.device != x.device:
        raise ValueError(f"target.{name} is on {t.device} but x is on {x.device}; put them on one device")
    if t.shape[0] != want:
        raise ValueError(f"target.{name} has {t.shape[0]} rows on this rank; expected {want}")


def check_symmetrize(target, n: int, m: int) -> None:
    """``symmetrize`` (Affinity, Neighbors) is a bool; True needs a square problem: p_{i|j} is
    row j's probability of column i, so the columns must be the rows (y None or M == N) and an
    Affinity target's column features its row features (z_cols None)."""
    if not isinstance(target.symmetrize, bool):
        raise TypeError(f"symmetrize must be a bool, got {type(target.symmetrize).__name__}")
    if not target.symmetrize:
        return
    if m != n:
        raise ValueError(f"symmetrize=True needs a square problem (the columns are the rows); y has {m} rows "
                         f"and x has {n}")
    if getattr(target, "z_cols", None) is not None:
        raise ValueError("symmetrize=True needs z_cols=None (the target's columns are its rows z)")


class TargetAdapter:
    name: str = ""                          # the op's target argument (families table)
    addresses_global_columns = False

    def check(self, target, x: torch.Tensor, y: Optional[torch.Tensor], n: int, m: int):
        """The target with defaults filled in; TypeError / ValueError naming the argument."""
        raise NotImplementedError

    def check_shard(self, target, x: torch.Tensor, y: Optional[torch.Tensor], n_cols: int) -> None:
        """This rank's target parts, as far as they travel or are indexed before check_arguments
        sees the global columns: type, dimensions and row counts."""
        raise NotImplementedError

    def op_slots(self, target) -> OpSlots:
        raise NotImplementedError

    def grad_tensors(self, target) -> dict:
        """{z, z_cols, t_param, p, weights}: the target tensors that may require grad (or None)."""
        return {}

    def weight_tensor(self, target) -> Optional[torch.Tensor]:
        return None

    def global_width(self, target) -> int:
        """The global column count a shard's target fixes by its own shape (Dense p's width);
        -1 when it fixes none. Every rank checks it against the sum of the shards."""
        return -1

    def global_columns(self, target, gather: Gather, gather_with_grad: Gather, order: torch.Tensor,
                       position: torch.Tensor):
        """The target with its column side made global, in the reordered column order."""
        raise NotImplementedError

    def reverse(self, target, n: int, m: int):
        """The checked target of the reverse direction (rows y, columns x: ik.icon_loss_bidirectional):
        the transpose of its weights, renormalised over the new rows as any target is."""
        raise NotImplementedError


class LabelsAdapter(TargetAdapter):
    name = "labels"

    def check(self, target, x, y, n, m):
        check_labels("row_labels", target.row_labels, n, x.device)
        col = target.col_labels
        if col is None:
            if m != n:
                raise ValueError(f"col_labels is required when y has {m} rows and x has {n}")
            col = target.row_labels
        check_labels("col_labels", col, m, x.device)
        return Labels(target.row_labels, col)

    def check_shard(self, target, x, y, n_cols):
        check_labels("target.row_labels", target.row_labels, x.shape[0], x.device)
        if target.col_labels is None:       # the row labels label the columns too
            _rows_on_rank("row_labels (also the column labels)", target.row_labels, n_cols, x)
        else:
            check_labels("target.col_labels", target.col_labels, n_cols, x.device, "x")

    def op_slots(self, target):
        return OpSlots(row_labels=target.row_labels, col_labels=target.col_labels)

    def reverse(self, target, n, m):
        return Labels(target.col_labels, target.row_labels)

    def global_columns(self, target, gather, gather_with_grad, order, position):
        cols = target.row_labels if target.col_labels is None else target.col_labels
        # int64 on every rank, so the all-gather moves equal sizes whatever integer dtype each holds
        return Labels(target.row_labels.long(), gather(cols.long())[order])


class NeighborsAdapter(TargetAdapter):
    name = "neighbors"
    addresses_global_columns = True

    def check(self, target, x, y, n, m):
        idx, w = target.indices, target.weights
        if not is_index_tensor(idx):
            raise TypeError("indices must be a signed integer tensor of shape (N, k)"
                            + (f", got dtype {idx.dtype}" if isinstance(idx, torch.Tensor) else ""))
        if idx.dim() != 2 or idx.shape[0] != n:
            raise ValueError(f"indices must have shape ({n}, k), got {tuple(idx.shape)}")
        check_device("indices", idx, x)
        if checking_values() and idx.numel() and bool(((idx < -1) | (idx >= m)).any()):
            raise ValueError(f"indices must lie in [0, {m}) or be -1 for padding")
        if w is not None:
            if not isinstance(w, torch.Tensor) or not w.is_floating_point():
                raise TypeError("weights must be a floating-point tensor")
            if w.shape != idx.shape:
                raise ValueError(f"weights must have the shape of indices {tuple(idx.shape)}, got {tuple(w.shape)}")
            check_device("weights", w, x)
            if checking_values() and bool((w < 0).any()):
                raise ValueError("weights must be >= 0")
        check_symmetrize(target, n, m)
        return Neighbors(idx.long(), w, target.symmetrize)

    def check_shard(self, target, x, y, n_cols):
        idx = target.indices
        if not is_index_tensor(idx) or idx.dim() != 2:
            raise TypeError("target.indices must be a 2-D signed integer tensor (this rank's rows x k) of global "
                            "column indices")
        _rows_on_rank("indices", idx, x.shape[0], x)

    def op_slots(self, target):
        return OpSlots(nbr_index=target.indices, nbr_weight=target.weights)

    def grad_tensors(self, target):
        return {"weights": target.weights}

    def weight_tensor(self, target):
        return target.weights

    def reverse(self, target, n, m):
        if target.symmetrize:            # p_ij = p_ji already
            return target
        return Neighbors(*transposed_neighbors(target.indices, target.weights, m))

    def global_columns(self, target, gather, gather_with_grad, order, position):
        idx = target.indices
        remapped = torch.where(idx >= 0, position[idx.clamp(0, position.numel() - 1)], idx)
        remapped = torch.where(idx >= position.numel(), idx, remapped)   # out of range: validation reports it
        return Neighbors(remapped, target.weights, target.symmetrize)


# the kernel-parameter fields of ik.Affinity (temperature, sigma, dof, exponent), from the table
AFFINITY_PARAMS = tuple(dict.fromkeys(name for name in KERNEL_PARAM.values() if name))


class AffinityAdapter(TargetAdapter):
    name = "affinity"

    @staticmethod
    def _param(target):
        return getattr(target, KERNEL_PARAM[target.kernel]) if KERNEL_PARAM[target.kernel] else 1.0

    def check(self, target, x, y, n, m):
        check_choice("kernel", target.kernel, KERNELS)
        check_features("z", target.z, n, None, x)
        z_cols = target.z_cols
        if z_cols is None:
            if y is not None and m != n:
                raise ValueError(f"z_cols is required when y has {m} rows and x has {n}")
        else:
            check_features("z_cols", z_cols, m, target.z.shape[1], x)
        check_symmetrize(target, n, m)
        for name in AFFINITY_PARAMS:
            check_positive(name, getattr(target, name), x, n)
        return replace(target, **{name: inf_to_nan(getattr(target, name)) for name in AFFINITY_PARAMS})

    def check_shard(self, target, x, y, n_cols):
        if target.z_cols is None and y is not None and target.symmetrize is not True:
            # (a symmetrised target's columns are its rows: z_cols is z, on every rank)
            raise ValueError("z_cols (this rank's column target features) is required when y is given")
        check_matrix("target.z", target.z)
        _rows_on_rank("z", target.z, x.shape[0], x)
        z_cols = target.z if target.z_cols is None else target.z_cols
        check_matrix("target.z_cols", z_cols)
        _rows_on_rank("z_cols", z_cols, n_cols, x)
        if z_cols.shape[1] != target.z.shape[1]:
            raise ValueError(f"target.z_cols has {z_cols.shape[1]} features; target.z has {target.z.shape[1]}")

    def op_slots(self, target):
        return OpSlots(affinity=(target.kernel, target.z, target.z_cols, self._param(target)))

    def grad_tensors(self, target):
        t_param = None
        if isinstance(target.kernel, str):           # the ranks compare kernels before this matters
            t_param = getattr(target, KERNEL_PARAM.get(target.kernel) or "", None)
        return {"z": target.z, "z_cols": target.z_cols, "t_param": t_param}

    def reverse(self, target, n, m):
        if target.symmetrize:            # p_ij = p_ji already
            return target
        param = self._param(target)
        if isinstance(param, torch.Tensor) and param.numel() > 1:
            raise ValueError(f"the target's {KERNEL_PARAM[target.kernel]} has one value per row of x; the reverse "
                             "direction (rows y) needs one value for all rows")
        if target.z_cols is None:        # one set of features for rows and columns
            return target
        return replace(target, z=target.z_cols, z_cols=target.z)

    def global_columns(self, target, gather, gather_with_grad, order, position):
        z_cols = target.z if target.z_cols is None else target.z_cols
        return replace(target, z_cols=gather_with_grad(z_cols)[order])


class DenseAdapter(TargetAdapter):
    name = "dense"
    addresses_global_columns = True

    def check(self, target, x, y, n, m):
        p = target.p
        if not isinstance(p, torch.Tensor) or not p.is_floating_point():
            raise TypeError("p must be a floating-point tensor of shape (N, M)")
        if tuple(p.shape) != (n, m):
            raise ValueError(f"p must have shape ({n}, {m}), got {tuple(p.shape)}")
        check_device("p", p, x)
        if checking_values() and bool((p < 0).any()):
            raise ValueError("p must be >= 0")
        return target

    def check_shard(self, target, x, y, n_cols):
        p = target.p
        if not isinstance(p, torch.Tensor) or not p.is_floating_point() or p.dim() != 2:
            raise TypeError("target.p must be a 2-D floating-point tensor (this rank's rows x the global columns)")
        _rows_on_rank("p", p, x.shape[0], x)

    def op_slots(self, target):
        return OpSlots(dense_p=target.p)

    def grad_tensors(self, target):
        return {"p": target.p}

    def weight_tensor(self, target):
        return target.p

    def global_width(self, target):
        return target.p.shape[1]

    def reverse(self, target, n, m):
        return Dense(target.p.t())

    def global_columns(self, target, gather, gather_with_grad, order, position):
        return Dense(target.p[:, order])


# A hub (a point that many rows list) makes the transposed lists long: beyond this many times the
# target's entries (and REVERSE_PADDING_FLOOR entries, 48 MiB of index and weight) the reverse
# direction raises instead of padding (dispatch.HUB_PADDING_FACTOR is the same rule for symmetrize)
REVERSE_PADDING_FACTOR = 4
REVERSE_PADDING_FLOOR = 1 << 22


def transposed_neighbors(indices: torch.Tensor, weights: Optional[torch.Tensor], m: int):
    """(indices, weights) of the transposed neighbour lists: row j of the result lists every row i
    of ``indices`` that lists j, with that entry's weight (a repeat stays a repeat), padded with -1
    to the longest list. Differentiable in ``weights``; weights None stays None. Raises when a hub
    would make the padding more than REVERSE_PADDING_FACTOR times the entries."""
    n, k = indices.shape
    listed = indices >= 0
    cols = indices[listed]
    rows = torch.arange(n, device=indices.device).unsqueeze(1).expand(n, k)[listed]
    order = torch.argsort(cols, stable=True)
    cols, rows = cols[order], rows[order]
    counts = torch.bincount(cols, minlength=m)
    width = max(1, int(counts.max())) if cols.numel() else 1
    if m * width > max(REVERSE_PADDING_FACTOR * cols.numel() + m, REVERSE_PADDING_FLOOR):
        raise ValueError(f"indices: the reverse direction lists, for each of the {m} columns, the rows that list "
                         f"it, padded to the longest list; a column listed by {width} rows makes that {m * width} "
                         f"entries for the target's {cols.numel()} (a hub). Give the reverse direction's target "
                         "yourself (two ik.icon_loss calls), or an ik.Dense target")
    slot = torch.arange(cols.numel(), device=indices.device) - (torch.cumsum(counts, 0) - counts)[cols]
    out_idx = torch.full((m, width), -1, dtype=indices.dtype, device=indices.device)
    out_idx[cols, slot] = rows
    if weights is None:
        return out_idx, None
    out_w = weights.new_zeros((m, width)).index_put((cols, slot), weights[listed][order])
    return out_idx, out_w


_ADAPTERS = {a.name: a for a in (LabelsAdapter(), NeighborsAdapter(), AffinityAdapter(), DenseAdapter())}
_BY_CLASS = {row.cls: _ADAPTERS[row.name] for row in TARGET_TYPES_BY_NAME.values()}


def adapter_for(target) -> TargetAdapter:
    """The adapter of a target object; TypeError naming the argument for anything else."""
    for cls, adapter in _BY_CLASS.items():
        if isinstance(target, cls):
            return adapter
    raise TypeError("target must be ik.Labels, ik.Neighbors, ik.Affinity or ik.Dense, "
                    f"got {type(target).__name__}")
