"""Build script: the fused C++ CPU kernels and, where a CUDA toolkit and a CUDA build of torch
are present, the CUDA kernels (csrc/) become the extension icon_kernels._C.

Built ahead of time with torch.utils.cpp_extension (ninja makes it fast), which needs torch at
build time: install with `pip install --no-build-isolation -e .`. Set ICON_KERNELS_NO_EXT=1 to
skip the extension; the package then runs without the `cpu` backend and says why. The Triton
kernels are JIT-compiled at run time.
"""
import os

from setuptools import setup

ext_modules, cmdclass = [], {}
if os.environ.get("ICON_KERNELS_NO_EXT") != "1":
    import torch
    from torch.utils import cpp_extension

    sanitize = os.environ.get("ICON_KERNELS_SANITIZE")   # e.g. "address" for an ASan build
    sanitizer_flags = [f"-fsanitize={sanitize}", "-fno-omit-frame-pointer", "-g"] if sanitize else []
    # The extension is built on the machine that runs it, so it may use that CPU's vector ISA;
    # ICON_KERNELS_PORTABLE=1 builds for the generic x86-64 baseline instead.
    # -fno-trapping-math: the SIMD row loops evaluate both sides of their selects (no FP exception
    # flags are read anywhere); with trapping math GCC keeps them slow (vlog: 10 ns vs 1.3 ns a pair)
    cxx_flags = ["-O3", "-fopenmp", "-fno-trapping-math"] + sanitizer_flags + (
        [] if os.environ.get("ICON_KERNELS_PORTABLE") == "1" else ["-march=native"])
    sources = ["csrc/cpu_loss.cpp", "csrc/cpu_label_blocks.cpp", "csrc/cpu_bidirectional_labels.cpp", "csrc/cpu_ops.cpp"]
    # CUDA kernels whenever a toolkit and a CUDA build of torch are present, GPU or not.
    nvcc = cpp_extension.CUDA_HOME and os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc"))
    with_cuda = bool(torch.version.cuda and nvcc and os.environ.get("ICON_KERNELS_NO_CUDA") != "1")
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")   # Ampere + Hopper; user value wins
        ext_modules.append(cpp_extension.CUDAExtension(
            "icon_kernels._C", sources + ["csrc/cuda_loss.cu"],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=["-fopenmp"] + sanitizer_flags,
        ))
    else:
        ext_modules.append(cpp_extension.CppExtension(
            "icon_kernels._C", sources, extra_compile_args=cxx_flags,
            extra_link_args=["-fopenmp"] + sanitizer_flags,
        ))
    cmdclass["build_ext"] = cpp_extension.BuildExtension

setup(ext_modules=ext_modules, cmdclass=cmdclass)
