"""Which backends exist, which are usable here (and why not), and what ``backend="auto"`` picks."""
from __future__ import annotations

import os
import sys
import warnings
from typing import Dict, List, Optional, Union

import torch

from . import cpu as cpu_backend
from . import cuda as cuda_backend
from . import triton as triton_backend

ALL_BACKENDS = ("reference", "torch", "cpu", "triton", "cuda")
# fastest first; "auto" takes the first usable one for the inputs' device
# (Triton goes first on GPUs: its kernels use tensor cores, the CUDA kernels are plain FFMA loops)
_AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")}
_DEVICE_OF = {"cpu": "cpu", "triton": "cuda", "cuda": "cuda"}   # others run on any device


def _unavailable_reason(name: str) -> Optional[str]:
    """None when the backend is usable on this machine, else a one-line reason."""
    if name in ("reference", "torch"):
        return None
    if name == "cpu":
        return cpu_backend.unavailable_reason()
    if name == "triton":
        return triton_backend.unavailable_reason()
    return cuda_backend.unavailable_reason()


_WARNED_TRITON_FLOAT64 = []


def warn_triton_float64() -> None:
    """Once per process: the Triton kernels compute float64 inputs in fp32."""
    if not _WARNED_TRITON_FLOAT64:
        _WARNED_TRITON_FLOAT64.append(True)
        warnings.warn("backend 'triton' computes float64 inputs in fp32 (about 1e-7 relative error "
                      "against a float64 evaluation with exact fp32 dots, a little more with the "
                      "GPU's default tf32x3 dots); use backend 'torch' or 'cpu' (or 'cuda') "
                      "for float64 accuracy", stacklevel=_caller_outside_the_package())


_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def _caller_outside_the_package() -> int:
    """The stacklevel of the first frame outside icon_kernels (ik.icon_loss, a preset, ICon or
    ik.distributed reach the warning through different depths), so it points at the user's line."""
    frame, level = sys._getframe(1), 1        # level 1: the frame that calls warnings.warn
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    return level


def available_backends(with_reasons: bool = False) -> Union[List[str], Dict[str, Optional[str]]]:
    """Usable backends, e.g. ["reference", "torch"]; with_reasons=True maps every backend to
    None (usable) or the reason it is not."""
    reasons = {name: _unavailable_reason(name) for name in ALL_BACKENDS}
    if with_reasons:
        return reasons
    return [name for name, why in reasons.items() if why is None]


def resolve_backend(backend, device: torch.device, only=ALL_BACKENDS, what="this divergence") -> str:
    """The backend to run for tensors on ``device``; ValueError naming ``backend`` otherwise.
    ``only``: the backends that compute what is asked (a divergence's row in families.py, a
    normalization's); "auto" picks among them, falling back to the dense reference. ``what``
    names, in the error, what a backend outside ``only`` lacks."""
    if not isinstance(backend, str) or (backend != "auto" and backend not in ALL_BACKENDS):
        raise ValueError(f"backend must be 'auto' or one of {', '.join(ALL_BACKENDS)}; got {backend!r}")
    usable = available_backends()
    if backend == "auto":
        for name in _AUTO_ORDER.get(device.type, ("torch",)):
            if name in usable and name in only:
                return name
        return "torch" if "torch" in only else "reference"
    if backend not in only:
        raise ValueError(f"backend {backend!r} does not compute {what} yet; it runs on "
                         f"{', '.join(only)} (backend='auto' picks among them)")
    why = _unavailable_reason(backend)
    if why is not None:
        raise ValueError(f"backend {backend!r} is not available: {why}. "
                         f"Available backends: {', '.join(usable)}")
    wanted = _DEVICE_OF.get(backend)
    if backend == "triton" and triton_backend.interpreting():
        wanted = None        # the interpreter runs the kernels on CPU tensors
    if wanted is not None and device.type != wanted:
        raise ValueError(f"backend {backend!r} runs on {wanted} tensors, but the inputs are on {device}")
    return backend
