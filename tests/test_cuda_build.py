"""Proof that the install step compiled and linked the CUDA kernels (no GPU needed): the built
extension registers a CUDA kernel for icon_kernels::cuda_forward / cuda_backward."""
import os

import pytest
import torch
from torch.utils import cpp_extension

import icon_kernels as ik

TOOLKIT = bool(cpp_extension.CUDA_HOME and os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")))
BUILT_WITH_CUDA = (TOOLKIT and torch.version.cuda is not None and "cpu" in ik.available_backends()
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
