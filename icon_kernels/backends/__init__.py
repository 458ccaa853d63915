"""The backends of the one ``icon_kernels::*`` op family (DESIGN.md §3).

``registry.py`` says which backends exist and resolves ``backend="auto"``; ``ops.py`` defines the
op schemas, fake kernels and autograd once; ``dispatch.py`` turns a checked problem into op
arguments and picks the backend. The implementations: ``reference.py`` (dense autograd, the
oracle), ``blockwise.py`` (torch tile by tile), ``cpu.py`` (the C++ kernels of csrc/),
``triton.py`` (the kernels of triton/) and ``cuda.py``. ``tile_math.py``, ``neighbor_pairs.py``,
``target_weight_grads.py`` and ``second_backward.py`` are the torch tile math they share.
"""
from .registry import ALL_BACKENDS, available_backends, resolve_backend

__all__ = ["ALL_BACKENDS", "available_backends", "resolve_backend"]
