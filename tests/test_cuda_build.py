"""Proof that the install step compiled and linked the CUDA kernels (no GPU needed): the built
extension icon_kernels._C_cuda registers a CUDA kernel for icon_kernels::cuda_forward /
cuda_backward, and needs nothing from the CPU kernels' extension icon_kernels._C."""
import os
import subprocess
import sys

import pytest
import torch
from torch.utils import cpp_extension

import icon_kernels as ik

TOOLKIT = bool(cpp_extension.CUDA_HOME and os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")))
BUILT_WITH_CUDA = (TOOLKIT and torch.version.cuda is not None and os.environ.get("ICON_KERNELS_NO_EXT") != "1"
                   and os.environ.get("ICON_KERNELS_NO_CUDA") != "1")


@pytest.mark.skipif(not BUILT_WITH_CUDA, reason="no CUDA toolkit / CUDA torch at build time, or no extension")
@pytest.mark.parametrize("op", ["cuda_forward", "cuda_backward"])
def test_extension_registers_cuda_kernels(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"icon_kernels::{op}", "CUDA")
    assert not torch._C._dispatch_has_kernel_for_dispatch_key(f"icon_kernels::{op}", "CPU")


def test_cuda_backend_reports_why_it_is_unusable():
    why = ik.available_backends(with_reasons=True)["cuda"]
    if torch.cuda.is_available() and BUILT_WITH_CUDA:
        assert why is None
    else:
        assert isinstance(why, str) and why


@pytest.mark.skipif(not BUILT_WITH_CUDA, reason="no CUDA toolkit / CUDA torch at build time, or no extension")
def test_cuda_kernels_load_without_the_cpu_extension():
    """What bench/gpu_check.sh relies on (it builds with ICON_KERNELS_NO_CPU_EXT=1): with the CPU
    extension unimportable, _C_cuda still registers the CUDA kernels and the cuda backend is
    usable wherever a device is."""
    code = ("import sys, torch; sys.modules['icon_kernels._C'] = None\n"   # makes `import _C` fail
            "import icon_kernels as ik\n"
            "why = ik.available_backends(with_reasons=True)\n"
            "assert 'icon_kernels._C is not built' in why['cpu'], why['cpu']\n"
            "assert torch._C._dispatch_has_kernel_for_dispatch_key('icon_kernels::cuda_forward', 'CUDA')\n"
            "assert why['cuda'] is None if torch.cuda.is_available() else 'needs a CUDA device' in why['cuda'], why\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_cuda_backend_names_the_missing_extension():
    code = ("import sys; sys.modules['icon_kernels._C_cuda'] = None\n"
            "import icon_kernels as ik\n"
            "print(ik.available_backends(with_reasons=True)['cuda'])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "icon_kernels._C_cuda is not built" in out.stdout
