"""Registration of the Triton backend (kernels and launchers live in triton/, reached through the
``_triton`` symlink). Usable with a CUDA device, or on CPU tensors under TRITON_INTERPRET=1."""
from __future__ import annotations

import os
from typing import Optional

import torch

from .ops import register_backend

_REASON: Optional[str] = "not registered"


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def unavailable_reason() -> Optional[str]:
    return _REASON


def register() -> None:
    """Registers icon_kernels::triton_forward/_backward when Triton can run here."""
    global _REASON
    if not (torch.cuda.is_available() or interpreting()):
        _REASON = "needs a CUDA device (or TRITON_INTERPRET=1 to run the kernels on CPU tensors)"
        return
    try:
        from ._triton import launchers
    except Exception as exc:  # noqa: BLE001 - the reason is reported by available_backends()
        _REASON = f"triton kernels failed to import: {type(exc).__name__}: {exc}"
        return
    register_backend("triton", launchers.forward, launchers.backward)
    _REASON = None
