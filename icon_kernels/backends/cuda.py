"""Registration of the fused CUDA backend (csrc/cuda_loss.cu, compiled into icon_kernels._C
whenever a CUDA toolkit and a CUDA build of torch were present at install, GPU or not)."""
from __future__ import annotations

from typing import Optional

import torch

from . import cpu as cpu_backend
from .ops import register_backend

_REASON: Optional[str] = "not registered"


def unavailable_reason() -> Optional[str]:
    return _REASON


def has_cuda_kernels() -> bool:
    """Whether the built extension registered CUDA kernels for icon_kernels::cuda_forward."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("icon_kernels::cuda_forward", "CUDA")


def register() -> None:
    """Defines icon_kernels::cuda_forward/_backward; usable with CUDA kernels and a device."""
    global _REASON
    if cpu_backend.unavailable_reason() is not None:      # the same extension carries both
        _REASON = cpu_backend.unavailable_reason()
        return
    register_backend("cuda")
    if not has_cuda_kernels():
        _REASON = ("icon_kernels._C was built without CUDA kernels (no CUDA toolkit or a CPU-only "
                   "torch at install time)")
    elif not torch.cuda.is_available():
        _REASON = "needs a CUDA device (torch.cuda.is_available() is False)"
    else:
        _REASON = None
