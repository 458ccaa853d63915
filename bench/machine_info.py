"""The machine a benchmark ran on: host, CPU, memory, versions (python, torch, triton,
icon_kernels), the git commit of the checkout and the usable backends."""
from __future__ import annotations

import os
import platform
import socket
import subprocess

import torch

import icon_kernels as ik

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(path, key):
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _git():
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "-uno"], cwd=ROOT, capture_output=True,
                               text=True, timeout=10).stdout.strip()
        return (head + ("+dirty" if dirty else "")) or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info():
    mem = _read("/proc/meminfo", "MemTotal")
    avail = _read("/proc/meminfo", "MemAvailable")
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - not installed or broken: reported as None
        triton_version = None
    return {
        "host": socket.gethostname(), "platform": platform.platform(),
        "cpu": _read("/proc/cpuinfo", "model name") or platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "mem_total_gib": int(mem.split()[0]) / 2**20 if mem else None,
        "mem_available_gib": int(avail.split()[0]) / 2**20 if avail else None,
        "python": platform.python_version(), "torch": torch.__version__, "triton": triton_version,
        "icon_kernels": ik.__version__, "git": _git(), "cuda_available": torch.cuda.is_available(),
        "backends": ik.available_backends(),
    }
