"""Registration of the Triton backend (kernels and launchers live in triton/, reached through the
``_triton`` symlink). Usable with a CUDA device, or on CPU tensors under TRITON_INTERPRET=1."""
from __future__ import annotations

import os
from typing import Optional

import torch

from . import bidirectional_ops
from .ops import without_autocast, register_backend

_REASON: Optional[str] = "not registered"


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def unavailable_reason() -> Optional[str]:
    return _REASON


def _release(version: str) -> tuple:
    """(major, minor) of a version string such as "3.6.0" or "2.5.0rc1"."""
    parts = (version.split("+")[0].split(".") + ["0"])[:2]
    return tuple(int("".join(ch for ch in p if ch.isdigit()) or 0) for p in parts)


def interpreter_breaks(triton_version: str, numpy_version: str) -> bool:
    """The interpreter of triton < 3.7 converts 1-element arrays with __index__, which numpy >= 2.4
    refuses (TypeError: only 0-dimensional arrays can be converted to Python scalars)."""
    return _release(triton_version) < (3, 7) and _release(numpy_version) >= (2, 4)


def register() -> None:
    """Registers icon_kernels::triton_forward/_backward when Triton can run here."""
    global _REASON
    if not (torch.cuda.is_available() or interpreting()):
        _REASON = "needs a CUDA device (or TRITON_INTERPRET=1 to run the kernels on CPU tensors)"
        return
    if interpreting():
        import numpy
        import triton

        if interpreter_breaks(triton.__version__, numpy.__version__):
            _REASON = (f"the Triton {triton.__version__} interpreter (TRITON_INTERPRET=1) fails with "
                       f"numpy {numpy.__version__}: use numpy<2.4 or triton>=3.7")
            return
    try:
        from .._triton import launchers
    except Exception as exc:  # noqa: BLE001 - the reason is reported by available_backends()
        _REASON = f"triton kernels failed to import: {type(exc).__name__}: {exc}"
        return
    from . import neighbor_pairs

    launchers.use_neighbor_pairs(neighbor_pairs)
    register_backend("triton", launchers.forward, launchers.backward)
    bidirectional_ops.register("triton", without_autocast(launchers.bidirectional_forward, 0),
                               without_autocast(launchers.bidirectional_backward, 2))
    _REASON = None
