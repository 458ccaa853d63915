"""Compiles the Triton kernels ahead of time for a GPU target, without a GPU.

Run in a process *without* TRITON_INTERPRET (tests/test_triton_gpu_compile.py and
tests/test_triton_resources.py do that): it lowers kernels through Triton's real pipeline
(TTIR -> TTGIR -> LLVM -> PTX -> cubin with the bundled ptxas) for sm_90 (Hopper) or sm_80
(Ampere). This catches code that the interpreter accepts but the GPU compiler rejects, and gives
each cubin's shared memory and per-thread stack (spills).

    python tests/triton_aot_compile.py [ARCH...]       # every code path, one line per variant
    python tests/triton_aot_compile.py --keys KEYS.json [--configs all|default] [--arch 90]
        # the launch keys recorded by tests/compile_keys.py: one JSON line per (key, config)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from icon_kernels._triton import launchers
from icon_kernels._triton.backward_kernels import icon_backward_cols_kernel, icon_backward_rows_kernel
from icon_kernels._triton.forward_kernels import icon_forward_kernel, icon_mixture_kernel
from icon_kernels._triton.symmetric_affinity_kernels import (icon_symmetric_affinity_backward_kernel,
                                                             icon_symmetric_affinity_forward_kernel,
                                                             icon_symmetric_affinity_merge_kernel)
from icon_kernels._triton.symmetric_kernels import (icon_symmetric_backward_kernel, icon_symmetric_forward_kernel,
                                                    icon_symmetric_merge_kernel)

KERNELS = {fn.__name__: fn for fn in (icon_forward_kernel, icon_mixture_kernel,
                                      icon_backward_rows_kernel, icon_backward_cols_kernel,
                                      icon_symmetric_forward_kernel, icon_symmetric_merge_kernel,
                                      icon_symmetric_backward_kernel, icon_symmetric_affinity_forward_kernel,
                                      icon_symmetric_affinity_merge_kernel, icon_symmetric_affinity_backward_kernel)}
STAGE = {"icon_forward_kernel": "forward", "icon_mixture_kernel": "forward",
         "icon_backward_rows_kernel": "backward", "icon_backward_cols_kernel": "backward",
         "icon_symmetric_forward_kernel": "forward", "icon_symmetric_backward_kernel": "backward",
         "icon_symmetric_affinity_forward_kernel": "forward", "icon_symmetric_affinity_backward_kernel": "backward"}
# self mode's triangular kernels (triangular_launches.forward / backward): launched
# with triangular_launch's tile and warps, never autotuned; the merge kernels hold row vectors only (no tile, no
# reduction: launchers estimates nothing for them, the 4 KB of scratch that every estimate adds)
MERGE_KERNELS = {"icon_symmetric_merge_kernel", "icon_symmetric_affinity_merge_kernel"}
FIXED_SHAPE = {"icon_symmetric_forward_kernel", "icon_symmetric_backward_kernel",
               "icon_symmetric_affinity_forward_kernel", "icon_symmetric_affinity_backward_kernel"} | MERGE_KERNELS
# the Affinity target's triangular kernels take no TARGET argument (launchers._target reads a launch
# without one as a Labels launch; launchers._triangular_shape names it)
AFFINITY_TRIANGULAR = {"icon_symmetric_affinity_forward_kernel", "icon_symmetric_affinity_backward_kernel"}
MERGE_SHARED = 4096
SHARED_LIMIT = launchers.SHARED_LIMIT
POINTER = {"float32": "*fp32", "float16": "*fp16", "bfloat16": "*bf16", "float64": "*fp64",
           "int64": "*i64", "int32": "*i32", "bool": "*i1"}
FLOATS = {"m_valid", "m_valid2", "reverse_param", "alpha", "beta"}
INTS = {"N", "M", "D", "DZ", "N_BUCKET", "M_BUCKET", "block0", "panel_blocks", "panel_cap", "chunks"}  # and stride_*
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
DEFAULT_CONFIG = (64, 64, 4, 2)


def signature(fn, key):
    sig = {}
    for name in fn.arg_names:
        if name in key["constexprs"] or name in ("BLOCK_M", "BLOCK_N"):
            sig[name] = "constexpr"
        elif name in FLOATS:
            sig[name] = "fp32"
        elif name in INTS or name.startswith("stride_"):
            sig[name] = "i32"
        else:                                           # a pointer: fp32 buffers unless recorded
            sig[name] = POINTER[key["tensors"].get(name, ["float32"])[0]]
    return sig


def specialisation(fn, key):
    """What the GPU's JIT specialises, from the recorded launch: pointers aligned to 16 bytes and
    integers that are multiples of 16 get tt.divisibility 16; integers equal to 1 become constants."""
    attrs, ones = {}, {}
    for i, name in enumerate(fn.arg_names):
        aligned = key["tensors"].get(name, [None, False])[1]
        is_one, div16 = key["ints"].get(name, [False, False])
        if is_one:
            ones[name] = 1
        elif aligned or div16:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return attrs, ones


def compile_key(key, config=DEFAULT_CONFIG, arch=90):
    """(compiled kernel, seconds) for one recorded launch key and one (BM, BN, warps, stages)."""
    fn = KERNELS[key["kernel"]]
    bm, bn, warps, stages = config
    attrs, ones = specialisation(fn, key)
    tile = {"BLOCK_M": bm, "BLOCK_N": bn}
    constexprs = dict(key["constexprs"], **{k: v for k, v in tile.items() if k in fn.arg_names}, **ones)
    sig = dict(signature(fn, key), **{name: "constexpr" for name in ones})
    start = time.perf_counter()
    compiled = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": warps, "num_stages": stages})
    return compiled, time.perf_counter() - start


def resource_usage(compiled) -> dict:
    """Shared memory (bytes per block, what the launch needs) and registers and stack (bytes per
    thread: register spills land there) from the cubin, as cuobjdump reports them."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
    fields = dict(tok.split(":", 1) for line in out.splitlines() if "REG:" in line
                  for tok in line.split() if ":" in tok)
    return {"shared": int(compiled.metadata.shared), "regs": int(fields["REG"]),
            "stack": int(fields["STACK"]), "local": int(fields["LOCAL"])}


def _launch_args(key) -> dict:
    """What launchers' pruning reads of a launch: its constexprs and the feature tensors' dtypes."""
    import torch
    args = dict(key["constexprs"])
    if key["kernel"] in AFFINITY_TRIANGULAR:
        args["TARGET"] = launchers.TARGET_CODES["affinity"]
    for name in ("X", "Z", "DENSE"):
        args[name] = torch.empty(0, dtype=getattr(torch, key["tensors"].get(name, ["float32"])[0]))
    return args


def _config(shape):
    bm, bn, warps, stages = shape
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


def estimated_shared(key, shape) -> int:
    """launchers' pre-compile estimate (its autotune pruning) for this key and shape."""
    if key["kernel"] in MERGE_KERNELS:
        return MERGE_SHARED
    return launchers.estimated_shared_bytes(_config(shape), _launch_args(key), STAGE[key["kernel"]])


def launched_shapes(key, autotune: bool):
    """The (BM, BN, warps, stages) launchers would compile for this key: every shape its pruning
    keeps when autotuning, else its one shape of ICON_KERNELS_TRITON_AUTOTUNE=0."""
    if key["kernel"] in MERGE_KERNELS:
        return [DEFAULT_CONFIG]               # (its BLOCK_M is the forward's: 64 or 32, one as the other)
    args, stage = _launch_args(key), STAGE[key["kernel"]]
    if key["kernel"] in FIXED_SHAPE:
        return [launchers.triangular_launch(args, stage)]
    if not autotune:
        return [launchers.fixed_shape(args, stage)]
    kept = launchers._pruner(stage)([_config(s) for s in launchers.AUTOTUNE_SHAPES], None, **args)
    return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept]


def variants():
    """Keys covering every code path (kernel codes, targets, dtypes, chunked d, all kernels, every
    divergence code of the second pass and the backward)."""
    base = dict(T_KERNEL=1, EXCLUDE_SELF=True, KL=True, BLOCK_DZ=16, PRECISION="tf32x3")
    cases = [  # (KERNEL, TARGET, dtype, D_CHUNKED, BLOCK_D, DIVERGENCE)
        (0, 0, "bfloat16", False, 128, 0), (1, 1, "float16", False, 128, 0), (2, 2, "float32", False, 64, 0),
        (3, 3, "float32", True, 128, 0), (0, 2, "bfloat16", True, 128, 0),
        (4, 2, "float16", False, 128, 0),   # the power kernel, learned and as the Affinity target's
        # the f-divergences (codes 2..6), one each, over kernels, targets (Neighbors formed in the
        # tile) and dtypes: their second pass and the backward (the first pass is kl's two-pass one)
        (0, 2, "float32", False, 64, 2), (2, 1, "float32", False, 64, 3), (1, 0, "bfloat16", False, 128, 4),
        (4, 2, "float16", False, 128, 5), (3, 3, "float32", True, 128, 6),
    ]
    for kernel, target, dtype, chunked, block_d, divergence in cases:
        upcast = dtype == "float32"
        c = dict(base, KERNEL=kernel, TARGET=target, D_CHUNKED=chunked, BLOCK_D=block_d,
                 UPCAST=upcast, UPCAST_Z=upcast, KL=divergence == 0)
        if kernel == 4:
            c["T_KERNEL"] = 4
        tensors = {"X": [dtype, True], "Y": [dtype, True], "Z": [dtype, True], "ZC": [dtype, True],
                   "LAB": ["int64", True], "CLAB": ["int64", True]}
        f_divergence = divergence > 1
        per_kernel = [] if f_divergence else [("icon_forward_kernel", dict(c, ONE_PASS=True)),
                                              ("icon_forward_kernel", dict(c, ONE_PASS=False))]
        per_kernel += [("icon_mixture_kernel", dict(c, HAS_BETA=True, DIVERGENCE=divergence))]
        per_kernel += [(name, dict(c, HAS_BETA=kernel % 2 == 0, TARGET_GRAD=target == 2, DIVERGENCE=divergence,
                                   BIDIR=False))
                       for name in ("icon_backward_rows_kernel", "icon_backward_cols_kernel")]
        if target == 0 and divergence < 2:   # both directions of a Labels loss (launchers.bidirectional_backward)
            per_kernel += [(name, dict(c, HAS_BETA=False, TARGET_GRAD=False, DIVERGENCE=divergence, BIDIR=True))
                           for name in ("icon_backward_rows_kernel", "icon_backward_cols_kernel")]
        for name, constexprs in per_kernel:
            yield {"kernel": name, "constexprs": constexprs, "tensors": tensors, "ints": {}}
    yield from triangular_variants()


def triangular_variants():
    """Self mode's triangular kernels of a Labels target (symmetric_kernels.py). The closed form (kl,
    cross_entropy at beta = 0: one pass, PASS 0): the distance kernels' row-norm correction, chunked
    d, fp16 (upcast gradient dots) and native bf16; the merge kernel with kl and cross_entropy; the
    backward at d = 256 (MAX_BLOCK_D, one block of d), which holds the most (fp32 Student-t 164 KB
    of shared memory at 32 x 32 on sm_90, fp16 115 KB). Two passes (beta > 0, the f-divergences):
    the LSE pass (PASS 1) and its merge, and the second pass (PASS 2) and the backward of every
    f-divergence code (2..6) and of kl / cross_entropy with beta > 0 (code 0, launchers._pair_code),
    over kernels, dtypes (the bf16 kl at beta > 0 on the wide 64 x 64 tile) and d up to 256; the
    second pass's merge for kl, cross_entropy and an f-divergence."""
    closed_form = dict(PASS=0, HAS_BETA=False, DIVERGENCE=0)
    cases = [  # (KERNEL, dtype, D_CHUNKED, BLOCK_D, the passes' codes)
        (0, "bfloat16", False, 128, closed_form), (1, "float32", True, 128, closed_form),
        (2, "float16", False, 64, closed_form), (3, "float32", False, 256, closed_form),
        (1, "float16", False, 256, closed_form),
        (0, "bfloat16", False, 128, dict(PASS=2, HAS_BETA=True, DIVERGENCE=2)),
        (1, "float32", True, 128, dict(PASS=2, HAS_BETA=False, DIVERGENCE=3)),
        (2, "float16", False, 64, dict(PASS=2, HAS_BETA=True, DIVERGENCE=4)),
        (4, "float32", False, 256, dict(PASS=2, HAS_BETA=True, DIVERGENCE=5)),
        (3, "bfloat16", False, 128, dict(PASS=2, HAS_BETA=False, DIVERGENCE=6)),
        (1, "float32", False, 256, dict(PASS=2, HAS_BETA=True, DIVERGENCE=0)),
        (0, "bfloat16", False, 128, dict(PASS=2, HAS_BETA=True, DIVERGENCE=0)),
    ]
    for kernel, dtype, chunked, block_d, codes in cases:
        yield from _triangular_pair(0, kernel, dtype, chunked, block_d, codes)
    yield {"kernel": "icon_symmetric_forward_kernel",
           "tensors": {"X": ["bfloat16", True], "LAB": ["int64", True], "CLAB": ["int64", True]},
           "constexprs": dict(KERNEL=0, TARGET=0, EXCLUDE_SELF=True, BLOCK_D=128, PRECISION="tf32x3", UPCAST=False,
                              D_CHUNKED=False, PASS=1, HAS_BETA=False, DIVERGENCE=0), "ints": {}}
    yield from triangular_target_variants()
    for codes in (dict(PASS=0, KL=True, DIVERGENCE=0), dict(PASS=0, KL=False, DIVERGENCE=0),
                  dict(PASS=1, KL=False, DIVERGENCE=0), dict(PASS=2, KL=True, DIVERGENCE=0),
                  dict(PASS=2, KL=False, DIVERGENCE=0), dict(PASS=2, KL=False, DIVERGENCE=3)):
        yield {"kernel": "icon_symmetric_merge_kernel", "constexprs": codes, "tensors": {}, "ints": {}}
    yield from triangular_affinity_variants()


def _triangular_pair(target, kernel, dtype, chunked, block_d, codes):
    """The forward and backward keys of symmetric_kernels.py for one target code (0 Labels, 1
    Neighbors, 3 Dense: symmetric_kernels.side_target) and the passes' codes."""
    c = dict(KERNEL=kernel, TARGET=target, EXCLUDE_SELF=True, BLOCK_D=block_d, PRECISION="tf32x3",
             UPCAST=dtype == "float32", D_CHUNKED=chunked)
    tensors = {"X": [dtype, True], "LAB": ["int64", True], "CLAB": ["int64", True], "DENSE": ["float32", True]}
    yield {"kernel": "icon_symmetric_forward_kernel", "constexprs": dict(c, **codes), "tensors": tensors, "ints": {}}
    yield {"kernel": "icon_symmetric_backward_kernel",
           "constexprs": dict(c, HAS_BETA=codes["HAS_BETA"], DIVERGENCE=codes["DIVERGENCE"]), "tensors": tensors,
           "ints": {}}


def triangular_target_variants():
    """symmetric_kernels.py's kernels for a Dense target (TARGET 3: both sides' tiles of w, w_ij and
    the transposed w_ji, staged) and a Neighbors target (TARGET 1: the (N, k) lists read per row and
    per column in the tile, every divergence): the closed form at the heaviest shape (fp32 Student-t,
    d = 256) and on the wide bf16 tile (Dense), the second pass and backward of an f-divergence with
    beta (js, fp32 power at d = 256), chi2 with chunked d, tv in bf16 and kl at beta > 0 (Neighbors),
    and Dense's LSE pass (its forward reads no target). The merge kernels do not depend on the target."""
    closed_form = dict(PASS=0, HAS_BETA=False, DIVERGENCE=0)
    cases = [  # (TARGET, KERNEL, dtype, D_CHUNKED, BLOCK_D, the passes' codes)
        (3, 2, "float32", False, 256, closed_form), (3, 0, "bfloat16", False, 128, closed_form),
        (3, 4, "float32", False, 256, dict(PASS=2, HAS_BETA=True, DIVERGENCE=5)),
        (3, 1, "float16", True, 128, dict(PASS=2, HAS_BETA=False, DIVERGENCE=6)),
        (1, 2, "float32", False, 256, closed_form), (1, 0, "bfloat16", False, 128, dict(PASS=2, HAS_BETA=False,
                                                                                         DIVERGENCE=3)),
        (1, 1, "float16", False, 128, dict(PASS=2, HAS_BETA=True, DIVERGENCE=0)),
    ]
    for target, kernel, dtype, chunked, block_d, codes in cases:
        yield from _triangular_pair(target, kernel, dtype, chunked, block_d, codes)
    yield {"kernel": "icon_symmetric_forward_kernel",
           "tensors": {"X": ["float32", True], "LAB": ["int64", True], "CLAB": ["int64", True],
                       "DENSE": ["float32", True]},
           "constexprs": dict(KERNEL=2, TARGET=3, EXCLUDE_SELF=True, BLOCK_D=256, PRECISION="tf32x3", UPCAST=True,
                              D_CHUNKED=False, PASS=1, HAS_BETA=False, DIVERGENCE=0), "ints": {}}


def triangular_affinity_variants():
    """Self mode's triangular kernels of an Affinity target (symmetric_affinity_kernels.py). The
    closed form (SNE, t-SNE: kl, cross_entropy at alpha = beta = 0, PASS 0): t-SNE (Student-t
    learned, Gaussian target) in fp32 and native bf16 at d = dz = 128 (the benchmark's), SNE
    (Gaussian on Gaussian) in fp16 (upcast gradient dots), a dot kernel on a dot target with chunked
    d, and the heaviest that launchers.triangular_fits lets run, fp32 t-SNE at d = 256, dz = 64 (fp32
    at d = dz = 256 runs the plain kernels: the triangular backward's cubin needs 263 KB of shared
    memory); the target kernels whose column side is not a coefficient times the aux term (T_KERNEL,
    a constexpr: column_target_logits' other branches): a Student-t target under a Student-t kernel
    in fp32 and bf16 at d = dz = 128 (the t-SNE launches' shapes), a power target in fp16 and a
    log_dot target with chunked d; the forward with kl and cross_entropy, the merge with both. Two
    passes (an f-divergence, alpha or beta > 0): the LSE pass (PASS 1) at the heaviest shape, the
    second pass (PASS 2) of every f-divergence code (2..6) and of kl / cross_entropy (code 0, with
    and without beta) and the backward of each code that differs from the closed form's (every
    f-divergence, code 0 with beta; kl and cross_entropy at alpha > 0, beta = 0 take the closed
    form's backward), over kernels, target kernels, dtypes and the heaviest shape (js with beta at
    fp32 d = 256, dz = 64); the merge of the LSE pass and of the second pass with kl, cross_entropy
    and an f-divergence. compile_all compiles them at the launch's shape (launched_shapes)."""
    closed_form = dict(PASS=0, HAS_BETA=False, DIVERGENCE=0)
    cases = [  # (KERNEL, T_KERNEL, dtype, D_CHUNKED, BLOCK_D, BLOCK_DZ, KL, the passes' codes)
        (2, 1, "float32", False, 128, 128, True, closed_form), (2, 1, "bfloat16", False, 128, 128, False, closed_form),
        (1, 1, "float16", False, 64, 64, True, closed_form), (0, 0, "float32", True, 128, 32, False, closed_form),
        (2, 1, "float32", False, 256, 64, True, closed_form),
        (2, 2, "float32", False, 128, 128, True, closed_form), (2, 2, "bfloat16", False, 128, 128, False, closed_form),
        (1, 4, "float16", False, 64, 64, False, closed_form), (0, 3, "float32", True, 128, 32, True, closed_form),
        (2, 1, "float32", False, 256, 64, False, dict(PASS=1, HAS_BETA=False, DIVERGENCE=0)),
        (2, 1, "float32", False, 128, 128, False, dict(PASS=2, HAS_BETA=False, DIVERGENCE=2)),
        (2, 1, "bfloat16", False, 128, 128, False, dict(PASS=2, HAS_BETA=True, DIVERGENCE=3)),
        (1, 1, "float16", False, 64, 64, False, dict(PASS=2, HAS_BETA=False, DIVERGENCE=4)),
        (2, 1, "float32", False, 256, 64, False, dict(PASS=2, HAS_BETA=True, DIVERGENCE=5)),
        (0, 2, "float32", True, 128, 32, False, dict(PASS=2, HAS_BETA=False, DIVERGENCE=6)),
        (2, 2, "bfloat16", False, 128, 128, True, dict(PASS=2, HAS_BETA=True, DIVERGENCE=0)),
        (1, 4, "float16", False, 64, 64, False, dict(PASS=2, HAS_BETA=False, DIVERGENCE=0)),
    ]
    for kernel, t_kernel, dtype, chunked, block_d, block_dz, kl, codes in cases:
        c = dict(KERNEL=kernel, T_KERNEL=t_kernel, EXCLUDE_SELF=True, BLOCK_D=block_d, BLOCK_DZ=block_dz,
                 PRECISION="tf32x3", UPCAST=dtype == "float32", UPCAST_Z=dtype == "float32", D_CHUNKED=chunked)
        tensors = {"X": [dtype, True], "Z": [dtype, True]}
        yield {"kernel": "icon_symmetric_affinity_forward_kernel", "constexprs": dict(c, KL=kl, **codes),
               "tensors": tensors, "ints": {}}
        backward = dict(HAS_BETA=codes["HAS_BETA"], DIVERGENCE=codes["DIVERGENCE"])
        if codes["PASS"] == 0 or (codes["PASS"] == 2 and backward != dict(HAS_BETA=False, DIVERGENCE=0)):
            yield {"kernel": "icon_symmetric_affinity_backward_kernel", "constexprs": dict(c, **backward),
                   "tensors": tensors, "ints": {}}
    for codes in (dict(PASS=0, KL=True, DIVERGENCE=0), dict(PASS=0, KL=False, DIVERGENCE=0),
                  dict(PASS=1, KL=False, DIVERGENCE=0), dict(PASS=2, KL=True, DIVERGENCE=0),
                  dict(PASS=2, KL=False, DIVERGENCE=0), dict(PASS=2, KL=False, DIVERGENCE=3)):
        yield {"kernel": "icon_symmetric_affinity_merge_kernel", "constexprs": codes, "tensors": {}, "ints": {}}


def compile_all(archs, workers=2):
    """Every variant at DEFAULT_CONFIG, the triangular kernels (FIXED_SHAPE) at the one shape their
    launcher uses; a triangular kernel's line gives its shape, shared memory and, from the cubin,
    registers and stack per thread (tests/test_triton_gpu_compile.py checks the shared memory).
    The variants compile in ``workers`` spawned processes (each compile is one thread: on the 2-core
    VM two workers take about half the time), their lines printed in the variants' order."""
    jobs = [(key, arch) for arch in archs for key in variants()]
    if workers > 1:
        import multiprocessing
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for line in pool.imap(_compiled_line, jobs):
                print(line, flush=True)
    else:
        for job in jobs:
            print(_compiled_line(job), flush=True)
    return 0


def _compiled_line(job) -> str:
    """One variant compiled for one arch: its line (compile_all's), or an AssertionError."""
    key, arch = job
    fixed = key["kernel"] in FIXED_SHAPE
    shape = launched_shapes(key, False)[0] if fixed else DEFAULT_CONFIG
    compiled, _ = compile_key(key, shape, arch=arch)
    assert compiled.asm.get("cubin"), "no cubin produced"
    c = key["constexprs"]
    resources = ""
    if fixed:
        used = resource_usage(compiled)
        resources = (f" shape={'x'.join(map(str, shape))} d={c.get('BLOCK_D', '-')} "
                     f"dz={c.get('BLOCK_DZ', '-')} regs={used['regs']} stack={used['stack']} "
                     f"shared={used['shared']} "
                     f"(est {estimated_shared(key, shape)})")
    return (f"sm_{arch} {key['kernel']} {key['tensors'].get('X', ['-'])[0]} KERNEL={c.get('KERNEL', '-')} "
            f"T_KERNEL={c.get('T_KERNEL', '-')} TARGET={c.get('TARGET', '-')} "
            f"D_CHUNKED={c.get('D_CHUNKED', '-')} BIDIR={c.get('BIDIR', '-')} "
            f"DIVERGENCE={c.get('DIVERGENCE', '-')} PASS={c.get('PASS', '-')} "
            f"HAS_BETA={c.get('HAS_BETA', '-')}{resources}: ok")


def _measure(job):
    key, shape, arch = job
    compiled, seconds = compile_key(key, shape, arch)
    return {"key": key, "config": shape, "seconds": round(seconds, 2),
            "estimated_shared": estimated_shared(key, shape), **resource_usage(compiled)}


def compile_recorded(path, configs, arch, workers=1):
    """One JSON line per (key, shape launchers would compile): compile seconds, resources and the
    shared-memory estimate. ``configs``: "all" (autotuning) or "default" (autotune off)."""
    with open(path) as f:
        keys = json.load(f)["keys"]
    jobs = [(key, shape, arch) for key in keys for shape in launched_shapes(key, configs == "all")]
    if workers > 1:
        import multiprocessing
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            results = pool.imap(_measure, jobs)
            for r in results:
                print(json.dumps(r), flush=True)
    else:
        for job in jobs:
            print(json.dumps(_measure(job)), flush=True)
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("archs", nargs="*", type=int)
    p.add_argument("--keys")
    p.add_argument("--configs", choices=["default", "all"], default="default")
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--workers", type=int, default=None,
                   help="compile processes (default: 1 for --keys, min(2, CPUs) for every variant)")
    a = p.parse_args()
    sys.exit(compile_recorded(a.keys, a.configs, a.arch, a.workers or 1) if a.keys
             else compile_all(a.archs or [90], a.workers or min(2, os.cpu_count() or 1)))
