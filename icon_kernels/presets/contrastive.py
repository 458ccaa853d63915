"""Contrastive and supervised presets: InfoNCE / SimCLR, SupCon, CLIPLoss, TSimCLR,
PrototypeCrossEntropy and HarmonicLoss, each one ``ik.icon_loss`` call (two for CLIP) with its
(p, q) pair.

Every preset also takes ``alpha`` / ``beta`` (debiasing), ``reduction``, ``backend`` and
``process_group`` / ``dist_mode`` / ``distributed`` (see base.PresetLoss).
"""
from __future__ import annotations

import math

import torch

from ..backends.bidirectional import loss as bidirectional_loss
from ..targets import Labels
from ..validation import KERNEL_PARAM, check_labels, check_matrix, check_parametric_kernel
from .base import PresetLoss, check_positive, check_views
from .dispatch import global_ids, run_loss_replicated_columns


def _two_view_loss(preset, view1, view2, **kernel):
    """The augmentation-target loss of two views (each view's positive is the other view of its
    sample), in the cross-entropy form, with the learned kernel ``kernel``."""
    check_views(view1, view2)
    z = torch.cat([view1, view2])
    ids = global_ids(view1.shape[0], preset.placement, z.device).repeat(2)
    return preset._loss(z, target=Labels(ids), **kernel)


class InfoNCE(PresetLoss):
    """InfoNCE / NT-Xent (SimCLR): ``InfoNCE(temperature)(view1, view2)``.

    I-Con pair: p(j|i) = 1 for j the other view of the same sample (labels = sample id over the
    2B concatenated views, self excluded); q(j|i) = softmax_j of cos(z_i, z_j) / temperature over
    the other 2B - 1 views. I-Con's result: InfoNCE is the KL between these two (Theorem: SimCLR /
    InfoNCE as I-Con with an augmentation target). The value reported is the cross-entropy form of
    the papers, mean_i -log q(partner(i)|i); with one positive it equals the KL. It matches
    NT-Xent (e.g. pytorch-metric-learning's NTXentLoss) at the same temperature.
    Distributed: sample ids are made unique across ranks (local i on rank r -> i * W + r).
    """

    DIVERGENCE = "cross_entropy"

    def __init__(self, temperature=0.1, **kwargs):
        super().__init__(**kwargs)
        self.temperature = check_positive("temperature", temperature)

    def forward(self, view1, view2):
        return _two_view_loss(self, view1, view2, kernel="cosine", temperature=self.temperature)


class SimCLR(InfoNCE):
    """SimCLR's NT-Xent loss: the same as ``InfoNCE(temperature)(view1, view2)``."""


class TSimCLR(PresetLoss):
    """t-SimCLR: ``TSimCLR(dof)(view1, view2)``, InfoNCE with a Student-t learned kernel.

    I-Con pair: p = the augmentation target of InfoNCE (the other view of the same sample);
    q(j|i) ∝ (1 + ||z_i - z_j||^2 / dof)^(-(dof + 1) / 2) over the other views, on the raw
    (unnormalised) embeddings; dof = 1 is the Cauchy kernel of t-SNE. I-Con's result: swapping
    InfoNCE's Gaussian-like q for t-SNE's heavy-tailed one gives t-SimCLR (Böhm et al. 2023), a
    contrastive method that also embeds for visualisation. Reported in the cross-entropy form
    mean_i -log q(partner(i)|i), equal to the KL with one positive per row.
    """

    DIVERGENCE = "cross_entropy"

    def __init__(self, dof=1.0, **kwargs):
        super().__init__(**kwargs)
        self.dof = check_positive("dof", dof)

    def forward(self, view1, view2):
        return _two_view_loss(self, view1, view2, kernel="student_t", dof=self.dof)


class SupCon(PresetLoss):
    """Supervised contrastive loss L_out (Khosla et al. 2020): ``SupCon(temperature)(embeddings, labels)``.

    I-Con pair: p(j|i) uniform over the other samples of i's class; q(j|i) = softmax_j of
    cos(z_i, z_j) / temperature over all j != i. I-Con's result: SupCon is the KL between them.
    Reported in the paper's cross-entropy form, L_i = -(1/|P(i)|) sum_{p in P(i)} log q(p|i), the
    mean over anchors that have a positive (as pytorch-metric-learning's SupConLoss). It differs
    from the KL by the entropy log|P(i)| of p. For several views, concatenate them and repeat the
    labels. Labels are global class ids, also across ranks.
    """

    DIVERGENCE = "cross_entropy"

    def __init__(self, temperature=0.1, **kwargs):
        super().__init__(**kwargs)
        self.temperature = check_positive("temperature", temperature)

    def forward(self, embeddings, labels):
        check_matrix("embeddings", embeddings)
        check_labels("labels", labels, embeddings.shape[0], embeddings.device, "embeddings")
        return self._loss(embeddings, target=Labels(labels), kernel="cosine",
                          temperature=self.temperature)


class CLIPLoss(PresetLoss):
    """CLIP's symmetric contrastive loss: ``CLIPLoss()(image_emb, text_emb)``.

    I-Con pair, per direction: p(j|i) = 1 for the text j paired with image i (labels = pair id on
    the rectangular image x text problem, no self exclusion); q(j|i) = softmax_j of
    exp(logit_scale) * cos(image_i, text_j). I-Con's result: CLIP / CMC is InfoNCE across two
    modalities. The loss is the mean of the image->text and text->image cross-entropies, as in
    CLIP. ``logit_scale`` starts at log(1/0.07), is an nn.Parameter when ``learnable``, and
    exp(logit_scale) is clamped at ``max_logit_scale`` (100, as CLIP). In one process the loss is
    ``ik.icon_loss_bidirectional``: the ``cpu``, ``torch`` and ``triton`` backends compute both
    directions in one pass (on ``cpu`` four GEMM-equivalents for forward + backward instead of
    eight), ``cuda`` and ``reference`` as two calls. Distributed: each rank passes its own pairs;
    pair ids are made unique across ranks, and the two directions are two calls of
    ``ik.distributed.icon_loss``.
    """

    DIVERGENCE = "cross_entropy"

    def __init__(self, logit_scale=math.log(1 / 0.07), *, learnable=True, max_logit_scale=100.0,
                 **kwargs):
        super().__init__(**kwargs)
        if isinstance(logit_scale, bool) or not isinstance(logit_scale, (int, float)):
            raise TypeError(f"logit_scale must be a float, got {type(logit_scale).__name__}")
        if not math.isfinite(logit_scale):
            raise ValueError(f"logit_scale must be finite, got {logit_scale}")
        if not isinstance(learnable, bool):
            raise TypeError(f"learnable must be a bool, got {type(learnable).__name__}")
        self.max_logit_scale = check_positive("max_logit_scale", max_logit_scale)
        value = torch.tensor(float(logit_scale))
        if learnable:
            self.logit_scale = torch.nn.Parameter(value)
        else:
            self.register_buffer("logit_scale", value)

    def forward(self, image_emb, text_emb):
        check_matrix("image_emb", image_emb)
        check_matrix("text_emb", text_emb)
        if text_emb.shape[1] != image_emb.shape[1]:
            raise ValueError(f"text_emb has feature dimension {text_emb.shape[1]} but image_emb has {image_emb.shape[1]}")
        n, m = image_emb.shape[0], text_emb.shape[0]
        if self.reduction == "none" and n != m:
            raise ValueError("reduction='none' needs as many texts as images (one pair per row)")
        scale = self.logit_scale.exp().clamp(max=self.max_logit_scale)
        temperature = scale.reciprocal().to(device=image_emb.device, dtype=image_emb.dtype)
        img_ids = global_ids(n, self.placement, image_emb.device)
        txt_ids = global_ids(m, self.placement, image_emb.device)
        common = dict(kernel="cosine", temperature=temperature, exclude_self=False)
        if not self.placement.distributed:     # both directions from one pass where a backend can
            both = bidirectional_loss(image_emb, text_emb, target=Labels(img_ids, txt_ids), alpha=self.alpha,
                                      beta=self.beta, divergence=self.divergence, reduction=self.reduction,
                                      backend=self.backend, **common)
            return both[0] + both[1] if self.reduction == "none" else both
        image_to_text = self._loss(image_emb, text_emb, target=Labels(img_ids, txt_ids), **common)
        text_to_image = self._loss(text_emb, image_emb, target=Labels(txt_ids, img_ids), **common)
        return (image_to_text + text_to_image) / 2


class PrototypeCrossEntropy(PresetLoss):
    """Cross-entropy against class prototypes: ``PrototypeCrossEntropy(n_classes, dim)(embeddings, labels)``.

    I-Con pair: the columns y are the C class prototypes; p(c|i) = 1 for i's class (labels as
    targets); q(c|i) = softmax_c of the kernel between z_i and prototype c: with the default
    ``kernel="dot"`` and temperature 1 that is softmax(z W^T), i.e. ordinary softmax
    cross-entropy of a bias-free linear classifier. I-Con's result: supervised cross-entropy is
    I-Con with data->label pairs. "cosine" gives a cosine classifier, "gaussian" / "student_t"
    distance-based prototypes, "power" (with ``exponent``) the harmonic loss (``HarmonicLoss``).
    ``prototypes`` is a learnable (n_classes, dim) nn.Parameter; ``forward(..., prototypes=W)``
    uses a given matrix instead. Distributed: the prototypes are the
    same on every rank, so they are not gathered; only the mean is global.
    """

    DIVERGENCE = "cross_entropy"

    def __init__(self, n_classes, dim, *, kernel="dot", temperature=1.0, sigma=1.0, dof=1.0, exponent=1.0,
                 **kwargs):
        super().__init__(**kwargs)
        for name, value in (("n_classes", n_classes), ("dim", dim)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.n_classes, self.dim, self.kernel = n_classes, dim, check_parametric_kernel(kernel)
        self.temperature = check_positive("temperature", temperature)
        self.sigma = check_positive("sigma", sigma)
        self.dof = check_positive("dof", dof)
        self.exponent = check_positive("exponent", exponent)
        self.prototypes = torch.nn.Parameter(torch.randn(n_classes, dim) / math.sqrt(dim))

    def forward(self, embeddings, labels, prototypes=None):
        check_matrix("embeddings", embeddings)
        check_labels("labels", labels, embeddings.shape[0], embeddings.device, "embeddings")
        w = self.prototypes if prototypes is None else prototypes
        check_matrix("prototypes", w)
        if w.shape[1] != embeddings.shape[1]:
            raise ValueError(f"prototypes have dimension {w.shape[1]} but embeddings have {embeddings.shape[1]}")
        if bool(((labels < 0) | (labels >= w.shape[0])).any()):
            raise ValueError(f"labels must lie in [0, {w.shape[0]})")
        w = w.to(device=embeddings.device, dtype=embeddings.dtype)
        classes = torch.arange(w.shape[0], device=embeddings.device)
        params = {"temperature": self.temperature, "sigma": self.sigma, "dof": self.dof,
                  "exponent": self.exponent}
        name = KERNEL_PARAM[self.kernel]
        return run_loss_replicated_columns(
            embeddings, w, target=Labels(labels, classes), placement=self.placement,
            reduction=self.reduction, backend=self.backend, kernel=self.kernel,
            **{name: params[name]}, alpha=self.alpha, beta=self.beta, exclude_self=False,
            divergence=self.divergence)


class HarmonicLoss(PrototypeCrossEntropy):
    """Harmonic loss: ``HarmonicLoss(n_classes, dim, exponent)(embeddings, labels)``.

    Baek, Liu, Tyagi, Tegmark, "Harmonic Loss Trains Interpretable AI Models" (arXiv 2502.01628):
    the logits of a classifier are Euclidean distances d_c = ||z_i - w_c|| to class centres w_c,
    normalised by HarMax, q(c|i) = d_c^(-n) / sum_c' d_c'^(-n) with the harmonic exponent n, and
    the loss is -log q(label_i|i). I-Con pair: the columns y are the C learnable prototypes w
    (``prototypes``, an (n_classes, dim) nn.Parameter; ``forward(..., prototypes=W)`` uses a given
    matrix); p(c|i) = 1 for i's class (Labels with the row labels against the column labels
    0..C-1, the self pair not excluded); q(c|i) = the ``power`` kernel, softmax_c of
    -(n/2) log(||z_i - w_c||^2 + eps) with eps = 1e-12 (families.POWER_EPS, a library constant
    that keeps q finite where z_i sits on a prototype); divergence: cross_entropy, the paper's
    -log q. ``exponent`` is a float > 0 or a tensor (an nn.Parameter to learn it). Distributed:
    as PrototypeCrossEntropy (prototypes replicated, the mean global).
    """

    DIVERGENCE = "cross_entropy"

    def __init__(self, n_classes, dim, exponent=1.0, **kwargs):
        fixed = sorted(set(kwargs) & {"kernel", "temperature", "sigma", "dof"})
        if fixed:
            raise TypeError(f"HarmonicLoss has the power kernel; it takes no {', '.join(fixed)}")
        super().__init__(n_classes, dim, kernel="power", exponent=exponent, **kwargs)

    def extra_repr(self) -> str:
        return f"n_classes={self.n_classes}, dim={self.dim}, exponent={self.exponent}, " + super().extra_repr()
