"""Build script.

The package is pure Python for now; the Triton kernels are JIT-compiled at run time. The fused
C++/CUDA extension (icon_kernels._C, built from csrc/ with torch.utils.cpp_extension) is added
here by the CPU and CUDA kernel work.
"""
from setuptools import setup

setup()
