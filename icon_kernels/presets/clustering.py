"""InfoNCEClustering: I-Con's cluster kernel (``log_dot`` on soft assignments) with augmentation
and/or kNN targets."""
from __future__ import annotations

import torch

from ..targets import Labels, Neighbors
from ..validation import check_labels, check_matrix
from .base import PresetLoss
from .dispatch import all_reduce_sum, gather_rows, global_first_row


def same_id_neighbors(row_ids: torch.Tensor, col_ids: torch.Tensor) -> torch.Tensor:
    """(N, g) column indices j with col_ids[j] == row_ids[i] (row i's augmentation partners,
    itself included when it is a column), -1 padded; g is the largest group. O(N * g) memory."""
    order = torch.argsort(col_ids)
    sorted_ids = col_ids[order]
    first = torch.searchsorted(sorted_ids, row_ids, side="left")
    last = torch.searchsorted(sorted_ids, row_ids, side="right")
    width = max(int((last - first).max()), 1)
    pos = first[:, None] + torch.arange(width, device=row_ids.device)[None, :]
    inside = pos < last[:, None]
    return torch.where(inside, order[pos.clamp_max(order.numel() - 1)], torch.full_like(pos, -1))


def check_cluster_options(n_clusters, exclude_self):
    """The options every cluster-kernel preset shares; TypeError/ValueError naming them."""
    if isinstance(n_clusters, bool) or not isinstance(n_clusters, int):
        raise TypeError(f"n_clusters must be an int, got {type(n_clusters).__name__}")
    if n_clusters < 2:
        raise ValueError(f"n_clusters must be >= 2, got {n_clusters}")
    if not isinstance(exclude_self, bool):
        raise TypeError(f"exclude_self must be a bool, got {type(exclude_self).__name__}")
    return n_clusters, exclude_self


def check_cluster_logits(logits, n_clusters):
    check_matrix("logits", logits)
    if logits.shape[1] != n_clusters:
        raise ValueError(f"logits must have n_clusters = {n_clusters} columns, got {logits.shape[1]}")


def cluster_kernel_loss(preset, logits, target):
    """The loss of the cluster kernel q(j|i) = sum_c phi_ic phi_jc / n_c, phi = softmax(logits)
    (log_dot with x = phi, y = phi / n; n_c summed over all ranks), against ``target``."""
    phi = logits.softmax(dim=1)
    sizes = all_reduce_sum(phi.sum(0), preset.placement)
    return preset._loss(phi, phi / sizes, target=target, kernel="log_dot", exclude_self=preset.exclude_self)


class InfoNCEClustering(PresetLoss):
    """InfoNCE clustering: ``InfoNCEClustering(n_clusters)(logits, sample_ids=..., neighbors=...)``.

    ``logits`` (N, n_clusters) are a cluster head's outputs; phi = softmax(logits) are the soft
    assignments. I-Con pair: q(j|i) = sum_c phi_ic phi_jc / n_c with n_c = sum_k phi_kc (the
    cluster kernel: the log_dot kernel with x = phi, y = phi / n); p(j|i) uniform over i's
    positives j != i: the other views of the same sample (``sample_ids``: rows with equal ids
    are augmentations of one sample), the entries of a kNN graph (``neighbors``: ik.Neighbors or
    an (N, k) index tensor, e.g. ik.knn or ik.propagate), or both (the union of the two lists:
    partners with weight 1, neighbour entries with their weights). I-Con's result: this is the
    "InfoNCE clustering" of the I-Con table, and with ``alpha`` > 0 the debiased InfoNCE
    clustering behind the paper's ImageNet-1K results.

    ``exclude_self=False`` (the default) follows the paper and the authors' code: q(.|i) is
    normalised over all j, the self pair included (it sums to 1 without renormalising), and p
    puts no mass on j = i (self entries of a neighbour list are dropped). ``exclude_self=True``
    leaves the self pair out of q as well and renormalises q over j != i; the two differ by
    mean_i -log(1 - q(i|i)) for one positive per row.

    Distributed: sample ids are global (equal across ranks for views of one sample), neighbour
    indices are global row indices, and n_c is summed over all ranks (with its gradient).
    """

    def __init__(self, n_clusters, *, exclude_self=False, **kwargs):
        super().__init__(**kwargs)
        self.n_clusters, self.exclude_self = check_cluster_options(n_clusters, exclude_self)

    def forward(self, logits, *, sample_ids=None, neighbors=None):
        check_cluster_logits(logits, self.n_clusters)
        return cluster_kernel_loss(self, logits, self._target(logits, sample_ids, neighbors))

    def _target(self, logits, sample_ids, neighbors):
        n = logits.shape[0]
        if sample_ids is None and neighbors is None:
            raise ValueError("give sample_ids (augmentation target), neighbors (kNN target) or both")
        if sample_ids is not None:
            check_labels("sample_ids", sample_ids, n, logits.device, "logits")
        if neighbors is not None:
            if isinstance(neighbors, torch.Tensor):
                neighbors = Neighbors(neighbors)
            if not isinstance(neighbors, Neighbors):
                raise TypeError(f"neighbors must be ik.Neighbors or an (N, k) index tensor, got {type(neighbors).__name__}")
            if neighbors.indices.dim() != 2 or neighbors.indices.shape[0] != n:
                raise ValueError(f"neighbors must have {n} rows, got shape {tuple(neighbors.indices.shape)}")
        if neighbors is None and self.exclude_self:
            return Labels(sample_ids)
        first_row = None
        parts = []
        if sample_ids is not None:
            all_ids, first_row = gather_rows(sample_ids, self.placement)
            partners = same_id_neighbors(sample_ids, all_ids)
            parts.append((partners, torch.ones(partners.shape, dtype=logits.dtype, device=logits.device)))
        if neighbors is not None:
            weights = neighbors.weights
            if weights is None:
                weights = torch.ones(neighbors.indices.shape, dtype=logits.dtype, device=logits.device)
            parts.append((neighbors.indices.long(), weights))
        indices = torch.cat([idx for idx, _ in parts], 1)
        weights = torch.cat([w.to(parts[-1][1].dtype) for _, w in parts], 1)
        if not self.exclude_self:            # p(.|i) is over the other points: drop j = i
            if first_row is None:
                first_row = global_first_row(n, self.placement, logits.device)
            own = first_row + torch.arange(n, device=indices.device)[:, None]
            indices = torch.where(indices == own, -1, indices)
        return Neighbors(indices, weights)
