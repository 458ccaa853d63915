"""Address-space limit of a measurement process: a run too big for the machine becomes a clean
"OOM" (MemoryError / failed allocation) instead of a visit from the kernel's OOM killer.

``limit_address_space(extra_mib)`` sets the soft RLIMIT_AS to the current address space (VmSize)
plus ``extra_mib``; ``unlimit_address_space()`` lifts it again.
"""
from __future__ import annotations

import resource


def vmsize_bytes():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def limit_address_space(extra_mib):
    """Soft RLIMIT_AS = current address space + extra_mib (no-op when unknown or extra_mib falsy)."""
    if not extra_mib:
        return False
    vm = vmsize_bytes()
    if vm is None:
        return False
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    soft = vm + int(extra_mib * 2**20)
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    return True


def unlimit_address_space():
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (hard, hard))

