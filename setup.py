"""Build script: the fused C++ CPU kernels (csrc/) become the extension icon_kernels._C.

Built ahead of time with torch.utils.cpp_extension (ninja makes it fast), which needs torch at
build time: install with `pip install --no-build-isolation -e .`. Set ICON_KERNELS_NO_EXT=1 to
skip the extension; the package then runs without the `cpu` backend and says why. The Triton
kernels are JIT-compiled at run time.
"""
import os

from setuptools import setup

ext_modules, cmdclass = [], {}
if os.environ.get("ICON_KERNELS_NO_EXT") != "1":
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    sanitize = os.environ.get("ICON_KERNELS_SANITIZE")   # e.g. "address" for an ASan build
    sanitizer_flags = [f"-fsanitize={sanitize}", "-fno-omit-frame-pointer", "-g"] if sanitize else []
    ext_modules.append(CppExtension(
        "icon_kernels._C",
        ["csrc/cpu_loss.cpp", "csrc/cpu_ops.cpp"],
        # The extension is built on the machine that runs it, so it may use that CPU's vector
        # ISA; ICON_KERNELS_PORTABLE=1 builds for the generic x86-64 baseline instead.
        extra_compile_args=["-O3", "-fopenmp"] + (
            [] if os.environ.get("ICON_KERNELS_PORTABLE") == "1" else ["-march=native"])
        + sanitizer_flags,
        extra_link_args=["-fopenmp"] + sanitizer_flags,
    ))
    cmdclass["build_ext"] = BuildExtension

setup(ext_modules=ext_modules, cmdclass=cmdclass)
