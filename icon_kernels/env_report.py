"""The environment report printed by ``python -m icon_kernels``."""
from __future__ import annotations

import os
import platform
import sys

import torch

from .backends.registry import available_backends


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception as exc:  # noqa: BLE001 - the report states what went wrong instead
        return f"not importable ({type(exc).__name__})"


def environment_report() -> str:
    from . import __version__
    lines = [
        f"icon_kernels {__version__}",
        f"python       {sys.version.split()[0]} ({platform.platform()})",
        f"torch        {torch.__version__} (CUDA build {torch.version.cuda or 'none'})",
        f"triton       {_version('triton')}",
        f"numpy        {_version('numpy')}",
        f"cpu          {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}",
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            lines.append(f"cuda:{i}       {props.name}, {props.total_memory / 2**30:.0f} GiB, "
                         f"sm_{props.major}{props.minor}")
    else:
        lines.append("cuda         no device")
    lines.append("backends:")
    for name, why in available_backends(with_reasons=True).items():
        lines.append(f"  {name:<10} {'usable' if why is None else 'unavailable: ' + why}")
    return "\n".join(lines)
