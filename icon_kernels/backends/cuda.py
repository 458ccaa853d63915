"""Registration of the fused CUDA backend (csrc/cuda_loss.cu, compiled into the extension
icon_kernels._C_cuda whenever a CUDA toolkit and a CUDA build of torch were present at install,
GPU or not; it does not need the CPU kernels' extension icon_kernels._C)."""
from __future__ import annotations

from typing import Optional

import torch

from .ops import missing_extension_reason, register_backend

_REASON: Optional[str] = "not registered"


def unavailable_reason() -> Optional[str]:
    return _REASON


def has_cuda_kernels() -> bool:
    """Whether the built extension registered CUDA kernels for icon_kernels::cuda_forward."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("icon_kernels::cuda_forward", "CUDA")


def register() -> None:
    """Defines icon_kernels::cuda_forward/_backward; usable with CUDA kernels and a device."""
    global _REASON
    try:
        # (absolute: a missing module then reads "No module named ...", where `from .. import`
        # reads "cannot import name ... (most likely due to a circular import)")
        import icon_kernels._C_cuda  # noqa: F401 - importing it registers the CUDA kernels
    except ImportError as exc:
        _REASON = missing_extension_reason(
            "icon_kernels._C_cuda", "CUDA extension", ("ICON_KERNELS_NO_EXT", "ICON_KERNELS_NO_CUDA"), exc,
            otherwise=" (it needs a CUDA toolkit and a CUDA build of torch at install time)")
        return
    register_backend("cuda")
    if not has_cuda_kernels():     # (a module without the kernels' registration: a broken build)
        _REASON = "icon_kernels._C_cuda registered no CUDA kernel for icon_kernels::cuda_forward"
    elif not torch.cuda.is_available():
        _REASON = "needs a CUDA device (torch.cuda.is_available() is False)"
    else:
        _REASON = None
