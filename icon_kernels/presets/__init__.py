"""The I-Con family as ready ``nn.Module`` losses, on top of the fused ``ik.icon_loss``.

| preset | p (target) | q (learned kernel) |
|---|---|---|
| InfoNCE / SimCLR(temperature) | other view of the same sample | cosine / temperature |
| TSimCLR(dof) | other view of the same sample | Student-t |
| SupCon(temperature) | same class | cosine / temperature |
| CLIPLoss() | paired text (image) | cosine * exp(logit_scale), both directions |
| PrototypeCrossEntropy(n_classes, dim) | own class among C prototypes | dot (or cosine, gaussian, student_t) |
| SNE(perplexity) | Gaussian on inputs, perplexity-calibrated sigma_i | Gaussian |
| TSNE(perplexity, dof) | Gaussian on inputs, perplexity-calibrated sigma_i | Student-t |
| UniformKNN(k, steps) | uniform over the kNN of the inputs (propagated) | Student-t (or any) |
| InfoNCEClustering(n_clusters) | other views and/or kNN | cluster kernel (log_dot on soft assignments) |

All take ``divergence`` (the preset's own by default: cross_entropy for the contrastive ones,
kl for the others; e.g. SupCon with "tv", after Beyond I-Con), ``alpha`` / ``beta``
(debiasing), ``reduction``, ``backend`` and ``process_group`` /
``dist_mode`` / ``distributed`` (see presets/base.py, PresetLoss).
"""
from .base import PresetLoss
from .clustering import InfoNCEClustering
from .contrastive import CLIPLoss, InfoNCE, PrototypeCrossEntropy, SimCLR, SupCon, TSimCLR
from .embedding import SNE, TSNE, UniformKNN

__all__ = ["InfoNCE", "SimCLR", "TSimCLR", "SupCon", "CLIPLoss", "PrototypeCrossEntropy", "SNE",
           "TSNE", "UniformKNN", "InfoNCEClustering", "PresetLoss"]
