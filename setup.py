"""Build script: two extensions from csrc/.

- icon_kernels._C: the fused C++ CPU kernels.
- icon_kernels._C_cuda: the CUDA kernels, where a CUDA toolkit and a CUDA build of torch are
  present (a GPU is not needed to build them).

Built ahead of time with torch.utils.cpp_extension (ninja makes it fast), which needs torch at
build time: install with `pip install --no-build-isolation -e .`. The Triton kernels are
JIT-compiled at run time. Switches (the package runs without what was skipped and says why):
ICON_KERNELS_NO_EXT=1 builds neither extension, ICON_KERNELS_NO_CUDA=1 skips _C_cuda, and
ICON_KERNELS_NO_CPU_EXT=1 skips _C: bench/gpu_check.sh builds only the CUDA kernels, because the
GPU machine's compiler did not finish the CPU kernels within its time (2026-12-04: over 220 s).
"""
import copy
import os

from setuptools import setup

ext_modules, cmdclass = [], {}
if os.environ.get("ICON_KERNELS_NO_EXT") != "1":
    import torch
    from torch.utils import cpp_extension

    sanitize = os.environ.get("ICON_KERNELS_SANITIZE")   # e.g. "address" for an ASan build
    sanitizer_flags = [f"-fsanitize={sanitize}", "-fno-omit-frame-pointer", "-g"] if sanitize else []
    # Python's CFLAGS carry -g, and debug info for these templates is much of the compile: -g0
    # (2-core VM, 2026-12-04: cpu_loss.cpp 422 s -> 271 s, a clean build of both extensions
    # ~450 s -> 304 s, _C 59.6 MB -> 8.6 MB; cpu_ops.cpp alone 32 s -> 19 s). A sanitizer
    # build keeps -g for its reports, and ICON_KERNELS_DEBUG_INFO=1 keeps it for perf annotate.
    debug_flags = [] if sanitize else ["-g"] if os.environ.get("ICON_KERNELS_DEBUG_INFO") == "1" else ["-g0"]
    # The extension is built on the machine that runs it, so it may use that CPU's vector ISA;
    # ICON_KERNELS_PORTABLE=1 builds for the generic x86-64 baseline instead.
    # -fno-trapping-math: the SIMD row loops evaluate both sides of their selects (no FP exception
    # flags are read anywhere); with trapping math GCC keeps them slow (vlog: 10 ns vs 1.3 ns a pair)
    cxx_flags = ["-O3", "-fopenmp", "-fno-trapping-math"] + sanitizer_flags + debug_flags + (
        [] if os.environ.get("ICON_KERNELS_PORTABLE") == "1" else ["-march=native"])
    # cpu_loss.cpp is one unit of 422 s on the 2-core VM (2026-12-04, with -g). Two splits were measured
    # the same day and dropped: by schedule (their shared row helpers then compile in every unit;
    # clean 2-core build 509-525 s instead of ~450 s), and by element type (float 317 s, double
    # 227 s, the dispatching unit 58 s: clean build 433 s, within the noise of ~450 s).
    sources = ["csrc/cpu_loss.cpp", "csrc/cpu_label_blocks.cpp", "csrc/cpu_bidirectional_labels.cpp", "csrc/cpu_ops.cpp"]
    if os.environ.get("ICON_KERNELS_NO_CPU_EXT") != "1":
        ext_modules.append(cpp_extension.CppExtension(
            "icon_kernels._C", sources, extra_compile_args=cxx_flags,
            extra_link_args=["-fopenmp"] + sanitizer_flags,
        ))
    # CUDA kernels whenever a toolkit and a CUDA build of torch are present, GPU or not.
    nvcc = cpp_extension.CUDA_HOME and os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc"))
    if torch.version.cuda and nvcc and os.environ.get("ICON_KERNELS_NO_CUDA") != "1":
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")   # Ampere + Hopper; user value wins
        ext_modules.append(cpp_extension.CUDAExtension(
            "icon_kernels._C_cuda", ["csrc/cuda_loss.cu", "csrc/cuda_module.cpp"],
            extra_compile_args={"cxx": ["-O3"] + debug_flags, "nvcc": ["-O3", "-lineinfo"]},
        ))
    class BuildExtensions(cpp_extension.BuildExtension):
        """Builds the two extensions at the same time, each with a ninja run and a build folder of
        its own: the CUDA extension's one long nvcc unit then overlaps the C++ units instead of
        following them (98 s more of wall time on the 2-core CI machine otherwise)."""

        def finalize_options(self):
            super().finalize_options()
            if not self.parallel:
                self.parallel = max(1, len(self.extensions or []))

        def build_extension(self, ext):
            own = copy.copy(self)        # (the threads must not share build_temp)
            own.build_temp = os.path.join(self.build_temp, ext.name.rsplit(".", 1)[-1])
            cpp_extension.BuildExtension.build_extension(own, ext)

    if ext_modules:
        cmdclass["build_ext"] = BuildExtensions

setup(ext_modules=ext_modules, cmdclass=cmdclass)
