"""icon_kernels: fused, memory-lean kernels for the I-Con loss family.

    import icon_kernels as ik
    loss = ik.icon_loss(x, target=ik.Labels(labels), kernel="cosine", temperature=0.1)
"""
from . import cpu_backend as _cpu_backend
from . import cuda_backend as _cuda_backend
from . import torch_backend as _torch_backend
from . import triton_backend as _triton_backend
from . import distributed
from .backends import available_backends
from .functional import icon_loss
from .modules import ICon
from .neighbors_graph import knn, knn_target, propagate
from .perplexity import calibrate_sigma
from .presets import (SNE, TSNE, CLIPLoss, InfoNCE, InfoNCEClustering, PrototypeCrossEntropy,
                      SimCLR, SupCon, TSimCLR, UniformKNN)
from .ops import register_backend as _register_backend
from .targets import Affinity, Dense, Labels, Neighbors

__version__ = "0.1.0"

_register_backend("torch", _torch_backend.forward, _torch_backend.backward)
_triton_backend.register()
_cpu_backend.register()
_cuda_backend.register()

__all__ = ["icon_loss", "ICon", "Labels", "Neighbors", "Affinity", "Dense", "available_backends",
           "InfoNCE", "SimCLR", "TSimCLR", "SupCon", "CLIPLoss", "PrototypeCrossEntropy", "SNE", "TSNE",
           "UniformKNN", "InfoNCEClustering", "knn", "knn_target", "propagate", "calibrate_sigma"]
