"""Registration of the fused C++ CPU backend (csrc/, built into icon_kernels._C)."""
from __future__ import annotations

from typing import Optional

from . import bidirectional_ops, label_block_ops
from .ops import missing_extension_reason, register_backend

_REASON: Optional[str] = "not registered"


def unavailable_reason() -> Optional[str]:
    return _REASON


def register() -> None:
    """Defines icon_kernels::cpu_forward/_backward (and the ring-mode label block ops and the
    bidirectional label ops); their CPU kernels come from icon_kernels._C."""
    global _REASON
    try:
        # (absolute: a missing module then reads "No module named ...", where `from .. import`
        # reads "cannot import name ... (most likely due to a circular import)")
        import icon_kernels._C  # noqa: F401 - importing it registers the C++ kernels
    except ImportError as exc:
        _REASON = missing_extension_reason("icon_kernels._C", "C++ extension",
                                           ("ICON_KERNELS_NO_EXT", "ICON_KERNELS_NO_CPU_EXT"), exc)
        return
    register_backend("cpu")
    label_block_ops.register()
    bidirectional_ops.register("cpu")
    _REASON = None
