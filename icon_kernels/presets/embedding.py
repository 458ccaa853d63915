"""Neighbour-embedding presets: SNE, TSNE, JointTSNE (perplexity-calibrated Gaussian targets from
the input features) and UniformKNN (a uniform kNN target, optionally propagated).

The target is built from ``inputs`` without gradients and cached per inputs tensor (see
inputs_cache), so full-batch training calibrates once. Distributed: each rank passes its own rows
of embeddings and inputs; sigma and the kNN graph are computed against all ranks' inputs.
"""
from __future__ import annotations

import math

import torch

from ..helpers.knn import METRICS, knn_rows, propagate_rows
from ..helpers.pair_blocks import check_count
from ..helpers.perplexity import check_perplexity, sigma_for_rows
from ..targets import Affinity, Neighbors
from ..validation import KERNEL_PARAM, check_matrix, check_parametric_kernel
from .base import PresetLoss, check_positive
from .dispatch import all_ranks_agree, gather_rows
from .inputs_cache import InputsCache


def _check_pair(embeddings, inputs):
    check_matrix("embeddings", embeddings)
    check_matrix("inputs", inputs, rows=embeddings.shape[0])
    if inputs.device != embeddings.device:
        raise ValueError(f"inputs are on {inputs.device} but embeddings are on {embeddings.device}")


class _InputTargetLoss(PresetLoss):
    """A preset whose target is computed from the input features, cached per inputs tensor."""

    def __init__(self, *, cache_targets=True, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(cache_targets, bool):
            raise TypeError(f"cache_targets must be a bool, got {type(cache_targets).__name__}")
        self.cache_targets = cache_targets
        self._cache = InputsCache()

    def _cached(self, inputs, key, compute):
        hit = self._cache.get(inputs, key) if self.cache_targets else None
        if all_ranks_agree(hit is not None, self.placement, inputs.device):
            return hit
        value = compute()
        return self._cache.put(inputs, key, value) if self.cache_targets else value


class SNE(_InputTargetLoss):
    """Stochastic Neighbour Embedding: ``SNE(perplexity)(embeddings, inputs)``.

    I-Con pair: p(j|i) ∝ exp(-||x_i - x_j||^2 / (2 sigma_i^2)), j != i, on the inputs x, with
    each sigma_i calibrated to the perplexity (ik.calibrate_sigma); q(j|i) ∝
    exp(-||z_i - z_j||^2 / (2 q_sigma^2)) on the embeddings, with q_sigma = 1/sqrt(2) by default,
    i.e. exp(-||z_i - z_j||^2) as in Hinton & Roweis. I-Con's result: SNE is exactly the I-Con
    loss with these two conditional Gaussians: the mean over rows of the conditional KL.
    """

    def __init__(self, perplexity=30.0, *, q_sigma=math.sqrt(0.5), **kwargs):
        super().__init__(**kwargs)
        self.perplexity = check_perplexity(perplexity)
        self.q_sigma = check_positive("q_sigma", q_sigma)

    def input_sigma(self, inputs: torch.Tensor) -> torch.Tensor:
        """The calibrated per-row sigma of this rank's ``inputs`` (float64, cached)."""
        def compute():
            cols, start = gather_rows(inputs, self.placement)
            check_perplexity(self.perplexity, cols.shape[0] - 1)
            return sigma_for_rows(inputs, cols, self.perplexity, self_start=start)
        return self._cached(inputs, ("sigma", self.perplexity), compute)

    def _target(self, embeddings, inputs):
        sigma = self.input_sigma(inputs).to(embeddings.dtype)
        return Affinity(inputs.detach().to(embeddings.dtype), kernel="gaussian", sigma=sigma)

    def forward(self, embeddings, inputs):
        _check_pair(embeddings, inputs)
        return self._loss(embeddings, target=self._target(embeddings, inputs), kernel="gaussian",
                          sigma=self.q_sigma)


class TSNE(SNE):
    """t-SNE: ``TSNE(perplexity, dof=1)(embeddings, inputs)``.

    I-Con pair: the perplexity-calibrated Gaussian p(j|i) of SNE on the inputs; a Student-t
    q(j|i) ∝ (1 + ||z_i - z_j||^2 / dof)^(-(dof + 1) / 2) on the embeddings (dof = 1: Cauchy).
    I-Con's result: t-SNE is I-Con with a heavy-tailed learned kernel. As in the I-Con paper the
    loss is the mean over rows of the *conditional* KL, not van der Maaten's KL of symmetrised
    joint distributions (which needs a global normalisation over all pairs).
    """

    def __init__(self, perplexity=30.0, dof=1.0, **kwargs):
        super().__init__(perplexity, **kwargs)
        self.dof = check_positive("dof", dof)

    def forward(self, embeddings, inputs):
        _check_pair(embeddings, inputs)
        return self._loss(embeddings, target=self._target(embeddings, inputs), kernel="student_t",
                          dof=self.dof)


class JointTSNE(SNE):
    """t-SNE as van der Maaten & Hinton define it: ``JointTSNE(perplexity, dof=1)(embeddings, inputs)``.

    (p, q, divergence): p_ij = (p_{j|i} + p_{i|j}) / 2N, the symmetrised perplexity-calibrated
    Gaussian conditionals p(j|i) ∝ exp(-||x_i - x_j||^2 / (2 sigma_i^2)), j != i, of SNE on the
    inputs (``ik.Affinity(..., symmetrize=True)``); q_ij = (1 + ||z_i - z_j||^2 / dof)^(-(dof + 1)/2)
    / Z, one Student-t distribution over all pairs i != j of the embeddings
    (``normalization="joint"``); divergence kl (``divergence=`` replaces it). The loss is the one
    KL(P || Q) = sum_ij p_ij log(p_ij / q_ij), the objective of scikit-learn's
    ``TSNE(method="exact")`` and of openTSNE, for the same sigma_i (tests check it against
    scikit-learn's). Paper: L. van der Maaten, G. Hinton, "Visualizing Data using t-SNE", JMLR 9
    (2008). ``ik.TSNE`` is I-Con's conditional form (a mean of row KLs) instead.

    It runs on the ``torch`` backend's column stream ("auto" on any device: O(N d) memory, tiles
    of rows x all columns, never N x N) or the dense ``reference``; the fused ``cpu``, ``triton``
    and ``cuda`` kernels do not compute joint normalisation yet. With ``distributed=True`` it
    is one loss over all ranks' pairs (ik.distributed: one Z, P symmetrised across ranks).
    Early exaggeration (P times
    e in the gradient, q - e p) is e * loss - (e - 1) * log Z; examples/joint_tsne_digits.py
    shows it.
    """

    def __init__(self, perplexity=30.0, dof=1.0, **kwargs):
        super().__init__(perplexity, **kwargs)
        self.dof = check_positive("dof", dof)

    def forward(self, embeddings, inputs):
        _check_pair(embeddings, inputs)
        sigma = self.input_sigma(inputs).to(embeddings.dtype)
        target = Affinity(inputs.detach().to(embeddings.dtype), kernel="gaussian", sigma=sigma, symmetrize=True)
        return self._loss(embeddings, target=target, kernel="student_t", dof=self.dof, normalization="joint")


class UniformKNN(_InputTargetLoss):
    """Uniform kNN target: ``UniformKNN(k, steps=1)(embeddings, inputs)``.

    I-Con pair: p(j|i) uniform over the k nearest other points of x_i in the inputs (ik.knn,
    ``metric``), or, with ``steps`` = 2 or 3, the walk distribution of that many steps on the kNN
    graph (ik.propagate: neighbour propagation); q is the chosen learned kernel on the embeddings
    (default Student-t with dof 1). I-Con's result: SNE/t-SNE with uniform kNN affinities give the
    graph-embedding methods of the I-Con table, and propagation widens p the way the paper's
    neighbour propagation does for clustering.
    """

    def __init__(self, k=10, *, steps=1, metric="euclidean", kernel="student_t", temperature=0.1,
                 sigma=1.0, dof=1.0, exponent=1.0, **kwargs):
        super().__init__(**kwargs)
        self.k = check_count("k", k, 1)
        self.steps = check_count("steps", steps, 1, 3)
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {', '.join(METRICS)}; got {metric!r}")
        self.metric, self.kernel = metric, check_parametric_kernel(kernel)
        self.temperature = check_positive("temperature", temperature)
        self.sigma = check_positive("sigma", sigma)
        self.dof = check_positive("dof", dof)
        self.exponent = check_positive("exponent", exponent)

    def input_neighbors(self, inputs: torch.Tensor) -> Neighbors:
        """This rank's rows of the (propagated) kNN target of ``inputs``, global indices (cached)."""
        def compute():
            cols, start = gather_rows(inputs, self.placement)
            check_count("k", self.k, 1, cols.shape[0] - 1)
            idx = knn_rows(inputs.detach(), cols, self.k, self.metric, self_start=start)
            if self.steps == 1:
                return Neighbors(idx)
            graph, _ = gather_rows(idx, self.placement)
            ones = torch.ones(graph.shape, dtype=inputs.dtype, device=inputs.device)
            rows = torch.arange(start, start + inputs.shape[0], device=inputs.device)
            return Neighbors(*propagate_rows(graph, ones, rows, self.steps, cumulative=False))
        return self._cached(inputs, ("knn", self.k, self.metric, self.steps), compute)

    def forward(self, embeddings, inputs):
        _check_pair(embeddings, inputs)
        target = self.input_neighbors(inputs)
        if target.weights is not None:
            target = Neighbors(target.indices, target.weights.to(embeddings.dtype))
        params = {"temperature": self.temperature, "sigma": self.sigma, "dof": self.dof,
                  "exponent": self.exponent}
        name = KERNEL_PARAM[self.kernel]
        return self._loss(embeddings, target=target, kernel=self.kernel, **{name: params[name]})
