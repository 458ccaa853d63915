"""Compiles the Triton kernels ahead of time for a GPU target, without a GPU.

Run in a process *without* TRITON_INTERPRET (tests/test_triton_gpu_compile.py does that): it
lowers every kernel through Triton's real pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin with
the bundled ptxas) for sm_90 (Hopper) and sm_80 (Ampere). This catches code that the
interpreter accepts but the GPU compiler rejects. Prints one line per compiled variant.
"""
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from icon_kernels._triton.backward_kernels import icon_backward_cols_kernel, icon_backward_rows_kernel
from icon_kernels._triton.forward_kernels import icon_forward_kernel, icon_mixture_kernel

INTS = {"N", "M", "D", "DZ", "stride_dense", "stride_x", "stride_y", "stride_z", "stride_zc"}
FLOATS = {"m_valid", "alpha", "beta"}
INT_POINTERS = {"LAB", "CLAB"}
FEATURES = {"X", "Y"}


def signature(fn, constexprs, feature_dtype):
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in INTS:
            sig[name] = "i32"
        elif name in FLOATS:
            sig[name] = "fp32"
        elif name in INT_POINTERS:
            sig[name] = "*i64"
        elif name in FEATURES:
            sig[name] = feature_dtype
        else:
            sig[name] = "*fp32"
    return sig


def variants():
    """(kernel function, constexprs, feature pointer type) covering every code path."""
    base = dict(T_KERNEL=1, EXCLUDE_SELF=True, KL=True, BLOCK_M=64, BLOCK_N=64, BLOCK_DZ=16,
                PRECISION="ieee")
    cases = [  # (KERNEL, TARGET, dtype, D_CHUNKED, BLOCK_D)
        (0, 0, "*bf16", False, 128), (1, 1, "*fp16", False, 128), (2, 2, "*fp32", False, 64),
        (3, 3, "*fp32", True, 128), (0, 2, "*bf16", True, 128),
    ]
    for kernel, target, dtype, chunked, block_d in cases:
        c = dict(base, KERNEL=kernel, TARGET=target, D_CHUNKED=chunked, BLOCK_D=block_d,
                 UPCAST=dtype == "*fp32")
        yield icon_forward_kernel, dict(c, ONE_PASS=True), dtype
        yield icon_forward_kernel, dict(c, ONE_PASS=False), dtype
        yield icon_mixture_kernel, dict(c, HAS_BETA=True), dtype
        for fn in (icon_backward_rows_kernel, icon_backward_cols_kernel):
            yield fn, dict(c, HAS_BETA=kernel % 2 == 0, TARGET_GRAD=target == 2), dtype


def main(archs):
    for arch in archs:
        target = GPUTarget("cuda", arch, 32)
        for fn, constexprs, dtype in variants():
            src = ASTSource(fn, signature(fn, constexprs, dtype), constexprs)
            compiled = triton.compile(src, target=target, options={"num_warps": 4})
            assert compiled.asm.get("cubin"), "no cubin produced"
            print(f"sm_{arch} {fn.__name__} {dtype} KERNEL={constexprs['KERNEL']} "
                  f"TARGET={constexprs['TARGET']} D_CHUNKED={constexprs['D_CHUNKED']}: ok", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main([int(a) for a in sys.argv[1:]] or [90]))
