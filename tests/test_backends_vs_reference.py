"""Every reference-checked backend (torch, cpu, triton, cuda) equals the float64 dense reference:
the loss and every gradient. Each check is written once; the tables below say, per backend, which
cases it runs, in which (dtype, tolerance) and at which shapes (n, m, d). A backend that is
unusable here skips with the reason (the ``backend`` fixture in conftest.py): without a GPU, cuda
skips and Triton runs under its interpreter on CPU tensors, where every case costs seconds, so
its tables are smaller. Test ids start with the backend, e.g. ``cpu-dot-labels-self-kl-mean-f64-
37x37x13`` (the shape is n x m x d as run: m = n unless the setting is rectangular).

What is specific to one backend lives in its own file: test_cpu_threads.py,
test_triton_feature_chunks.py (the register budget shrunk), test_cuda_shared_memory.py (launches
past 48 KB and past the device's limit), test_triton_gpu.py and test_torch_backend_cuda.py.
"""
import itertools

import pytest
import torch

import icon_kernels as ik
from cases import (KERNELS, PARAM_OF, SETTINGS, TARGETS, build, check_against_reference, clone_problem,
                   device_of, keeps_self_pair_at_zero, loss_and_grads, relative_error, seed_of, to_device)

F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16
DTYPE_ID = {F64: "f64", F32: "f32", F16: "f16", BF16: "bf16"}
SMALL = (37, 29, 13)      # n, m, d (the torch backend runs in ragged row chunks of 150 elements)
# (dtype, tolerance) against the float64 reference. Triton computes float64 in fp32, so it is
# checked in fp32 only; its scalar parameter grads are sums of per-row terms of both signs whose
# fp32 error reaches 3e-5 here (the reference itself in fp32: up to 8.5e-5 for dof).
EXACT = ((F64, 1e-9), (F32, 1e-5))
TRITON_F32 = ((F32, 5e-5),)


def at(shape, dtypes):
    """(dtype, tolerance, shape) for each of ``dtypes`` at ``shape``."""
    return [(dtype, tol, shape) for dtype, tol in dtypes]


def one_of(*shapes):
    """Each case runs at one of these shapes, picked by its seed (Triton: several ragged shapes
    without multiplying the interpreter's cases)."""
    return shapes


def shape_for(shape, seed):
    return shape[seed % len(shape)] if isinstance(shape[0], tuple) else shape


def shape_id(n, m, d, rect):
    return f"{n}x{m if rect else n}x{d}"


def params(table, expand):
    """pytest params ``(backend, *case)`` for every backend of ``table`` and every case that
    ``expand(backend, entry)`` yields as ``(id, values, *marks)``."""
    return [pytest.param(backend, *values, id=f"{backend}-{ident}", marks=marks)
            for backend, entry in table.items()
            for ident, values, *marks in expand(backend, entry)]


# --- every kernel x target x option setting ------------------------------------------------------

EVERY = {
    "torch": at(SMALL, EXACT),
    # and N = 150 rows: three row blocks of 64, the last one ragged
    "cpu": at(SMALL, EXACT) + at((150, 131, 13), EXACT[:1]),
    "triton": at(one_of((45, 38, 16), (70, 70, 33), (33, 61, 64)), TRITON_F32),
    "cuda": at((300, 270, 13), EXACT),
}


def _every(backend, variants):
    for (kernel, target_kind), setting in itertools.product(itertools.product(KERNELS, TARGETS), SETTINGS):
        if keeps_self_pair_at_zero(kernel, setting):      # checked by test_power_kernel_with_the_self_pair_is_finite
            continue
        seed = seed_of(kernel, target_kind, setting[0])
        for dtype, tol, shape in variants:
            n, m, d = shape_for(shape, seed)
            yield (f"{kernel}-{target_kind}-{setting[0]}-{DTYPE_ID[dtype]}-{shape_id(n, m, d, setting[1])}",
                   (kernel, target_kind, setting, dtype, tol, (n, m, d), seed))


@pytest.mark.parametrize("backend,kernel,target_kind,setting,dtype,tol,shape,seed", params(EVERY, _every),
                         indirect=["backend"])
def test_every_kernel_target_and_option(backend, kernel, target_kind, setting, dtype, tol, shape, seed):
    n, m, d = shape
    problem, upstream = build(kernel, target_kind, setting, dtype, seed=seed, n=n, m=m, d=d)
    check_against_reference(problem, upstream, dtype, tol, backend)


# --- learnable kernel parameters: one 0-d tensor, or one value per row ----------------------------

LEARNABLE = {    # backend: (settings, variants)
    "torch": (SETTINGS[:3], at(SMALL, EXACT)),
    "cpu": (SETTINGS[:3], at(SMALL, EXACT)),
    "triton": (SETTINGS[1:2], at((50, 50, 16), TRITON_F32)),
}


def _learnable(backend, entry):
    settings, variants = entry
    for kernel, setting, param_tensor in itertools.product(PARAM_OF, settings, ("scalar", "rows")):
        for dtype, tol, (n, m, d) in variants:
            yield (f"{kernel}-{setting[0]}-{param_tensor}-{DTYPE_ID[dtype]}-{shape_id(n, m, d, setting[1])}",
                   (kernel, setting, param_tensor, dtype, tol, (n, m, d)))


@pytest.mark.parametrize("backend,kernel,setting,param_tensor,dtype,tol,shape",
                         params(LEARNABLE, _learnable), indirect=["backend"])
def test_learnable_kernel_parameter(backend, kernel, setting, param_tensor, dtype, tol, shape):
    n, m, d = shape
    problem, upstream = build(kernel, "labels", setting, dtype, seed=7, param_tensor=param_tensor,
                              n=n, m=m, d=d)
    check_against_reference(problem, upstream, dtype, tol, backend)


# --- gradients of an Affinity target (features and sigma), for every target kernel ---------------

AFFINITY = {     # backend: (settings, variants, learned kernel's dof: float or per-row tensor)
    "torch": (SETTINGS, at(SMALL, EXACT), False),
    "cpu": (SETTINGS, at(SMALL, EXACT), False),
    "triton": (SETTINGS, at((40, 35, 16), TRITON_F32), False),
    "cuda": (SETTINGS[1:2], at(SMALL, EXACT[:1]), "rows"),
}


def _affinity(backend, entry):
    settings, variants, param_tensor = entry
    for t_kernel, setting in itertools.product(KERNELS, settings):
        if keeps_self_pair_at_zero("student_t", setting, t_kernel):
            continue
        for dtype, tol, (n, m, d) in variants:
            params = f"-{param_tensor}" if param_tensor else ""
            yield (f"{t_kernel}-{setting[0]}{params}-{DTYPE_ID[dtype]}-{shape_id(n, m, d, setting[1])}",
                   (t_kernel, setting, param_tensor, dtype, tol, (n, m, d)))


@pytest.mark.parametrize("backend,t_kernel,setting,param_tensor,dtype,tol,shape",
                         params(AFFINITY, _affinity), indirect=["backend"])
def test_affinity_target_gradients(backend, t_kernel, setting, param_tensor, dtype, tol, shape):
    n, m, d = shape
    problem, upstream = build("student_t", "affinity", setting, dtype, seed=11, target_grad=True,
                              t_kernel=t_kernel, param_tensor=param_tensor, n=n, m=m, d=d)
    check_against_reference(problem, upstream, dtype, tol, backend)


# --- the power kernel with its self pair kept: d² = 0, a finite loss (DESIGN.md §1) --------------

SELF_PAIR = {"reference": (F64, F32), "torch": (F64, F32), "cpu": (F64, F32), "triton": (F32,),
             "cuda": (F64, F32)}


def _self_pair(backend, dtypes):
    for dtype in dtypes:
        yield f"power-affinity-power-{SETTINGS[3][0]}-{DTYPE_ID[dtype]}-24x24x8", (dtype,)


@pytest.mark.parametrize("backend,dtype", params(SELF_PAIR, _self_pair), indirect=["backend"])
def test_power_kernel_with_the_self_pair_is_finite(backend, dtype):
    """y = x with exclude_self=False: s_ii = -(n/2) log(d²_ii + eps), the learned and the target
    side, a learnable exponent on both. The value there rests on each backend's rounding of
    d²_ii (cases.keeps_self_pair_at_zero), so this checks what eps promises: a finite loss and
    finite gradients (with eps = 0, a d²_ii that rounds to 0 gives +inf logits and NaN)."""
    setting = SETTINGS[3]
    assert keeps_self_pair_at_zero("power", setting) and setting[5] == "kl"
    problem, upstream = build("power", "affinity", setting, dtype, seed=9, param_tensor="scalar",
                              target_grad=True, t_kernel="power", n=24, d=8)
    device = device_of(backend)
    loss, grads = loss_and_grads(*to_device(problem, device), backend, upstream.to(device))
    assert torch.isfinite(loss).all() and float(loss) >= 0      # a KL of two distributions
    assert len(grads) == 5         # x, the exponent, z, the target's sigma (unused) and exponent
    for i, g in enumerate(grads):
        assert torch.isfinite(g).all(), f"gradient {i} is not finite"


# --- ragged and tiny shapes: N = 1, d = 1, d > 128, more rows than one block ---------------------

TINY = [(1, 1, 3), (2, 5, 1), (5, 3, 130), (64, 17, 8), (200, 17, 8)]
RAGGED = {"torch": TINY, "cpu": TINY}


def _ragged(backend, shapes):
    for (n, m, d), rect in itertools.product(shapes, (False, True)):
        yield f"{'rect' if rect else 'square'}-{shape_id(n, m, d, rect)}", ((n, m, d), rect)


@pytest.mark.parametrize("backend,shape,rect", params(RAGGED, _ragged), indirect=["backend"])
def test_ragged_and_tiny_shapes(backend, shape, rect):
    n, m, d = shape
    setting = SETTINGS[2] if rect else SETTINGS[0]
    problem, upstream = build("gaussian", "affinity", setting, F64, seed=3, n=n, m=m, d=d)
    check_against_reference(problem, upstream, F64, 1e-9, backend)


# --- wide features: d = 300 (Triton loops over chunks of d) --------------------------------------

WIDE = {"torch": at((36, 36, 300), EXACT), "cpu": at((36, 36, 300), EXACT),
        "triton": at((36, 36, 300), TRITON_F32)}


def _wide(backend, variants):
    for dtype, tol, (n, m, d) in variants:
        yield f"cosine-labels-{DTYPE_ID[dtype]}-{shape_id(n, m, d, False)}", (dtype, tol, (n, m, d))


@pytest.mark.parametrize("backend,dtype,tol,shape", params(WIDE, _wide), indirect=["backend"])
def test_wide_feature_dim(backend, dtype, tol, shape):
    n, m, d = shape
    problem, upstream = build("cosine", "labels", SETTINGS[0], dtype, seed=4, n=n, m=m, d=d)
    check_against_reference(problem, upstream, dtype, tol, backend)


# --- low temperature and huge logits -------------------------------------------------------------

# The cpu backend's fp32 gradient was far less accurate here than naive PyTorch's fp32 until its
# backward renormalised q per row (relative error 7e-3 at tau = 0.01, scale 30; csrc/cpu_label_rows.h
# renormalise_label_row): this check, written for torch and triton, found it once run on every backend.
HUGE = {         # backend: (n, [(temperature, scale)], [(dtype, tolerance)], {dtype: [marks]})
    "torch": (40, list(itertools.product((0.01, 0.05), (1.0, 30.0))), EXACT, {}),
    "cpu": (40, list(itertools.product((0.01, 0.05), (1.0, 30.0))), EXACT, {}),
    "triton": (64, [(0.01, 30.0)], ((F32, 1e-5),), {}),
}


def _huge(backend, entry):
    n, temperatures_and_scales, dtypes, marks = entry
    for (temperature, scale), (dtype, tol) in itertools.product(temperatures_and_scales, dtypes):
        yield (f"tau{temperature:g}-scale{scale:g}-{DTYPE_ID[dtype]}-{n}x{n}x16",
               (temperature, scale, dtype, tol, n), *marks.get(dtype, ()))


@pytest.mark.parametrize("backend,temperature,scale,dtype,tol,n", params(HUGE, _huge), indirect=["backend"])
def test_low_temperature_and_huge_logits(backend, temperature, scale, dtype, tol, n):
    """tau = 0.01 on un-normalised dot-kernel features of norm ~ 30*sqrt(d): logits in the 1e5
    range, every row with one positive."""
    gen = torch.Generator().manual_seed(5)
    x = (scale * torch.randn(n, 16, generator=gen, dtype=F64)).to(dtype).requires_grad_()
    problem = (x, None, ik.Labels(torch.arange(n) // 2), dict(kernel="dot", temperature=temperature))
    upstream = torch.tensor(1.3, dtype=F64)
    want_loss, want_grads = loss_and_grads(*clone_problem(*problem, F64), "reference", upstream)
    device = device_of(backend)
    got_loss, got_grads = loss_and_grads(*to_device(problem, device), backend, upstream.to(device))
    got_loss, got_grad = got_loss.cpu(), got_grads[0].cpu()
    assert torch.isfinite(got_loss) and torch.isfinite(got_grad).all()
    assert got_loss.dtype == dtype
    assert relative_error(got_loss, want_loss) <= tol
    assert relative_error(got_grad, want_grads[0]) <= tol


# --- half precision: error against the exact result <= 2x naive PyTorch's same-dtype error -------

HALF = {         # backend: (kernel x target pairs, shape, seed or None (per case), reference device)
    "torch": ([("cosine", "labels")], (64, 64, 32), 5, "cpu"),
    "cpu": ([("cosine", "labels")], (64, 64, 32), 5, "cpu"),
    # with the fp32 rows of test_every_kernel_target_and_option this is every kernel x target x
    # dtype once: the GPU selection (tests/gpu_selection.py) runs it on the device. Under the
    # interpreter fp16 runs the native tensor-core path; bf16 is upcast right after loading.
    "triton": (list(itertools.product(KERNELS, TARGETS)), (64, 64, 32), None, "cpu"),
    "cuda": ([("cosine", "labels")], (512, 512, 64), 5, "cuda"),
}


def _half(backend, entry):
    pairs, (n, m, d), seed, reference_device = entry
    for (kernel, target_kind), dtype in itertools.product(pairs, (F16, BF16)):
        case_seed = seed_of(kernel, target_kind, dtype) if seed is None else seed
        yield (f"{kernel}-{target_kind}-{DTYPE_ID[dtype]}-{shape_id(n, m, d, False)}",
               (kernel, target_kind, dtype, (n, m, d), case_seed, reference_device))


@pytest.mark.parametrize("backend,kernel,target_kind,dtype,shape,seed,reference_device",
                         params(HALF, _half), indirect=["backend"])
def test_half_precision_error_within_twice_pytorchs_own(backend, kernel, target_kind, dtype, shape, seed,
                                                         reference_device):
    """DESIGN §5. fp16/bf16 inputs; the fused backends accumulate in fp32. ``reference_device``:
    where the exact (float64) and naive (same-dtype) reference run."""
    n, m, d = shape
    problem, upstream = build(kernel, target_kind, SETTINGS[0], dtype, seed=seed, n=n, m=m, d=d)
    up_ref, device = upstream.to(reference_device), device_of(backend)
    exact = loss_and_grads(*to_device(clone_problem(*problem, F64), reference_device), "reference", up_ref)
    naive = loss_and_grads(*to_device(problem, reference_device), "reference", up_ref)
    ours = loss_and_grads(*to_device(problem, device), backend, upstream.to(device))
    assert ours[0].dtype == dtype
    floor = 1e-4
    for mine, theirs, want in zip([ours[0], *ours[1]], [naive[0], *naive[1]], [exact[0], *exact[1]]):
        mine, theirs, want = mine.cpu(), theirs.cpu(), want.cpu()
        assert relative_error(mine, want) <= 2 * relative_error(theirs, want) + floor
