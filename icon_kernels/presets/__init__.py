"""The I-Con family as ready ``nn.Module`` losses, on top of the fused ``ik.icon_loss``.

| preset | p (target) | q (learned kernel) |
|---|---|---|
| InfoNCE / SimCLR(temperature) | other view of the same sample | cosine / temperature |
| TSimCLR(dof) | other view of the same sample | Student-t |
| SupCon(temperature) | same class | cosine / temperature |
| CLIPLoss() | paired text (image) | cosine * exp(logit_scale), both directions |
| PrototypeCrossEntropy(n_classes, dim) | own class among C prototypes | dot (or cosine, gaussian, student_t, power) |
| HarmonicLoss(n_classes, dim, exponent) | own class among C prototypes | power: (d² + eps)^(-n/2) (harmonic loss) |
| SNE(perplexity) | Gaussian on inputs, perplexity-calibrated sigma_i | Gaussian |
| TSNE(perplexity, dof) | Gaussian on inputs, perplexity-calibrated sigma_i | Student-t |
| JointTSNE(perplexity, dof) | symmetrised Gaussian on inputs, joint over all pairs | Student-t, joint |
| UniformKNN(k, steps) | uniform over the kNN of the inputs (propagated) | Student-t (or any) |
| InfoNCEClustering(n_clusters) | other views and/or kNN | cluster kernel (log_dot on soft assignments) |
| KMeans(n_clusters, sigma) | Gaussian on inputs (reverse KL) | cluster kernel |
| SpectralClustering(n_clusters, k) | uniform over kNN of inputs, alpha > 0 (reverse KL) | cluster kernel |

All take ``divergence`` (the preset's own by default: cross_entropy for the contrastive ones,
kl for the others; e.g. SupCon with "tv", after Beyond I-Con), ``alpha`` / ``beta``
(debiasing), ``reduction``, ``backend`` and ``process_group`` /
``dist_mode`` / ``distributed`` (see presets/base.py, PresetLoss).
"""
from .base import PresetLoss
from .clustering import InfoNCEClustering
from .partition import KMeans, SpectralClustering
from .contrastive import CLIPLoss, HarmonicLoss, InfoNCE, PrototypeCrossEntropy, SimCLR, SupCon, TSimCLR
from .embedding import SNE, TSNE, JointTSNE, UniformKNN

__all__ = ["InfoNCE", "SimCLR", "TSimCLR", "SupCon", "CLIPLoss", "PrototypeCrossEntropy", "HarmonicLoss", "SNE",
           "TSNE", "UniformKNN", "InfoNCEClustering", "PresetLoss"]
__all__ += ["KMeans", "SpectralClustering"]
__all__ += ["JointTSNE"]
