"""icon_kernels: fused, memory-lean kernels for the I-Con loss family.

    import icon_kernels as ik
    loss = ik.icon_loss(x, target=ik.Labels(labels), kernel="cosine", temperature=0.1)
"""
from .backends import cpu as _cpu_backend
from .backends import cuda as _cuda_backend
from .backends import blockwise as _torch_backend
from .backends import triton as _triton_backend
from . import distributed
from .backends.registry import available_backends
from .functional import icon_loss, icon_loss_bidirectional
from .modules import ICon
from .helpers.knn import knn, knn_target, propagate
from .helpers.perplexity import calibrate_sigma
from .presets import (SNE, TSNE, CLIPLoss, HarmonicLoss, InfoNCE, InfoNCEClustering,
                      PrototypeCrossEntropy, SimCLR, SupCon, TSimCLR, UniformKNN)
from .presets import KMeans, SpectralClustering
from .presets import JointTSNE
from .backends.ops import register_backend as _register_backend
from .targets import Affinity, Dense, Labels, Neighbors

__version__ = "0.1.0"

_register_backend("torch", _torch_backend.forward, _torch_backend.backward)
_triton_backend.register()
_cpu_backend.register()
_cuda_backend.register()

__all__ = ["icon_loss", "icon_loss_bidirectional", "ICon", "Labels", "Neighbors", "Affinity", "Dense", "available_backends",
           "InfoNCE", "SimCLR", "TSimCLR", "SupCon", "CLIPLoss", "PrototypeCrossEntropy", "HarmonicLoss", "SNE",
           "TSNE", "UniformKNN", "InfoNCEClustering", "knn", "knn_target", "propagate", "calibrate_sigma"]
__all__ += ["KMeans", "SpectralClustering"]
__all__ += ["JointTSNE"]
