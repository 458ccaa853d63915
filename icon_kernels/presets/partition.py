"""KMeans and SpectralClustering: I-Con's reverse-KL clustering members. The learned side is the
cluster kernel of InfoNCEClustering (``log_dot`` on soft assignments); the target is fixed, built
from the input features: a Gaussian affinity (k-means) or a kNN graph (spectral clustering).

Both compute the I-Con loss with the divergence reversed, mean_i KL(q(.|i) || p(.|i)), with q the
learned cluster kernel and p the fixed target (``divergence="reverse_kl"``, DESIGN.md §1.1): the
clustering rows of the I-Con table (Alshammari et al., arXiv 2504.16929, Fig. 1: k-means is the
"Gaussian" supervisory column and normalised cuts the graph column of the learned "uniform on
clusters" row), in the direction that makes the loss the k-means objective (derivation in the
KMeans docstring).
"""
from __future__ import annotations

import torch

from ..helpers.knn import METRICS, knn_rows
from ..helpers.pair_blocks import check_count
from ..targets import Affinity, Neighbors
from ..validation import check_matrix
from .base import check_positive
from .clustering import check_cluster_logits, check_cluster_options, cluster_kernel_loss
from .dispatch import gather_rows
from .embedding import _InputTargetLoss


class _ClusterKernelLoss(_InputTargetLoss):
    """The cluster kernel q(j|i) = sum_c phi_ic phi_jc / n_c, phi = softmax(logits), against a
    target the subclass builds from ``inputs``."""

    DIVERGENCE = "reverse_kl"

    def __init__(self, n_clusters, *, exclude_self=False, **kwargs):
        super().__init__(**kwargs)
        self.n_clusters, self.exclude_self = check_cluster_options(n_clusters, exclude_self)

    def _check_logits(self, logits):
        check_cluster_logits(logits, self.n_clusters)

    def _check_inputs(self, logits, inputs):
        check_matrix("inputs", inputs, rows=logits.shape[0])
        if inputs.device != logits.device:
            raise ValueError(f"inputs are on {inputs.device} but logits are on {logits.device}")

    def _cluster_loss(self, logits, target):
        return cluster_kernel_loss(self, logits, target)

    def extra_repr(self) -> str:
        return f"n_clusters={self.n_clusters}, exclude_self={self.exclude_self}, " + super().extra_repr()


class KMeans(_ClusterKernelLoss):
    """I-Con's k-means: ``KMeans(n_clusters, sigma=1.0)(logits, inputs)``.

    (p, q, divergence): p(j|i) = softmax_j(-||x_i - x_j||^2 / (2 sigma^2)), a Gaussian affinity on
    the ``inputs`` x (fixed: no gradient reaches the inputs); q(j|i) = sum_c phi_ic phi_jc / n_c,
    the learned cluster kernel on phi = softmax(logits) with n_c = sum_k phi_kc (as in
    InfoNCEClustering); divergence ``"reverse_kl"``, mean_i KL(q(.|i) || p(.|i)). This is the
    k-means entry of the I-Con table (Alshammari et al., "I-Con", arXiv 2504.16929: Gaussian
    supervisory kernel, "uniform on clusters" learned kernel).

    Why this direction: with the self pair included (``exclude_self=False``, the default, as the
    paper normalises the cluster kernel over all j), sum_j q(j|i) ||x_i - x_j||^2 summed over i is
    sum_c (1/n_c) sum_ij phi_ic phi_jc ||x_i - x_j||^2 = 2 * sum_ic phi_ic ||x_i - mu_c||^2 with
    mu_c = sum_j phi_jc x_j / n_c, i.e. twice the soft k-means inertia. Hence

        N * loss = inertia / sigma^2 - sum_i H(q(.|i)) + sum_i log Z_i,

    where Z_i = sum_j exp(-||x_i - x_j||^2 / (2 sigma^2)) does not depend on the logits. The
    forward KL(p || q) has no such form. The entropy term rewards larger clusters (about
    log n_c per row for hard assignments); ``sigma`` sets the trade-off, and sigma -> 0 leaves
    soft k-means. Choose sigma on the scale of the distances within a cluster.

    ``exclude_self=True`` drops the self pair from both p and q (each renormalised over j != i).
    ``divergence`` replaces reverse_kl (e.g. "kl" or "tv"); then the identity above no longer
    holds. Distributed: each rank passes its own rows of logits and inputs; n_c is summed over
    the ranks and the Gaussian target covers all ranks' inputs.
    """

    def __init__(self, n_clusters, *, sigma=1.0, **kwargs):
        kwargs.setdefault("cache_targets", False)          # the target is only a view of inputs
        super().__init__(n_clusters, **kwargs)
        self.sigma = check_positive("sigma", sigma)

    def target(self, logits, inputs) -> Affinity:
        sigma = self.sigma.to(logits.dtype) if isinstance(self.sigma, torch.Tensor) else self.sigma
        return Affinity(inputs.detach().to(logits.dtype), kernel="gaussian", sigma=sigma)

    def forward(self, logits, inputs):
        self._check_logits(logits)
        self._check_inputs(logits, inputs)
        return self._cluster_loss(logits, self.target(logits, inputs))

    def extra_repr(self) -> str:
        return f"sigma={self.sigma}, " + super().extra_repr()


class SpectralClustering(_ClusterKernelLoss):
    """I-Con's spectral clustering: ``SpectralClustering(n_clusters, k=10, alpha=0.1)(logits,
    inputs)`` or ``(logits, neighbors=graph)``.

    (p, q, divergence): p(j|i) uniform over the k nearest other points of x_i in the ``inputs``
    (ik.knn with ``metric``; the random-walk transition matrix D^-1 W of the kNN graph, whose
    normalised cut spectral clustering relaxes), or the given ``neighbors`` (ik.Neighbors, e.g.
    ik.propagate(...), or an (N, k) index tensor, used as given); q(j|i) the learned cluster
    kernel sum_c phi_ic phi_jc / n_c on phi = softmax(logits); divergence ``"reverse_kl"``,
    mean_i KL(q(.|i) || p~(.|i)). This is the normalised-cuts / spectral-clustering entry of the
    I-Con table (Alshammari et al., arXiv 2504.16929: graph supervisory kernel, "uniform on
    clusters" learned kernel), in the reverse direction of KMeans.

    The graph target is 0 off the graph, where q is not, so the reverse KL needs target-side
    debiasing: ``alpha`` (default 0.1) mixes alpha / M' into p, and reverse_kl with alpha = 0
    raises a ValueError. Self pairs: as in KMeans (``exclude_self=False`` keeps the self pair in
    q; p has no self entry but alpha / M'). The graph is computed without gradients and cached
    per inputs tensor (``cache_targets``).
    """

    def __init__(self, n_clusters, k=10, *, metric="euclidean", alpha=0.1, **kwargs):
        super().__init__(n_clusters, alpha=alpha, **kwargs)
        if self.divergence == "reverse_kl" and self.alpha == 0:
            raise ValueError("SpectralClustering with divergence='reverse_kl' needs alpha > 0: the kNN "
                             "graph target is 0 off the graph, where the reverse KL is +inf")
        self.k = check_count("k", k, 1)
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {', '.join(METRICS)}; got {metric!r}")
        self.metric = metric

    def input_neighbors(self, inputs: torch.Tensor) -> Neighbors:
        """This rank's rows of the kNN graph of ``inputs``, global indices (cached)."""
        def compute():
            cols, start = gather_rows(inputs, self.placement)
            check_count("k", self.k, 1, cols.shape[0] - 1)
            return Neighbors(knn_rows(inputs.detach(), cols, self.k, self.metric, self_start=start))
        return self._cached(inputs, ("knn", self.k, self.metric), compute)

    def forward(self, logits, inputs=None, *, neighbors=None):
        self._check_logits(logits)
        n = logits.shape[0]
        if (inputs is None) == (neighbors is None):
            raise ValueError("give inputs (the preset builds their kNN graph) or neighbors, not both")
        if inputs is not None:
            self._check_inputs(logits, inputs)
            target = self.input_neighbors(inputs)
        else:
            if isinstance(neighbors, torch.Tensor):
                neighbors = Neighbors(neighbors)
            if not isinstance(neighbors, Neighbors):
                raise TypeError(f"neighbors must be ik.Neighbors or an (N, k) index tensor, got {type(neighbors).__name__}")
            if neighbors.indices.dim() != 2 or neighbors.indices.shape[0] != n:
                raise ValueError(f"neighbors must have {n} rows, got shape {tuple(neighbors.indices.shape)}")
            target = neighbors
        if target.weights is not None:
            target = Neighbors(target.indices, target.weights.to(logits.dtype))
        return self._cluster_loss(logits, target)

    def extra_repr(self) -> str:
        return f"k={self.k}, metric={self.metric!r}, " + super().extra_repr()
