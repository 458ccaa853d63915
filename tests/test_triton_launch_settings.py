"""The Triton launch settings that matter on a GPU, checked on the CPU: the fp32 dot precision,
Affinity targets in their own dtype, the autotune key and the pruning of configs that cannot fit,
and the interpreter / numpy compatibility check."""
import pytest
import torch
import triton

import icon_kernels as ik
from compile_keys import Recorder
from icon_kernels.backends import triton as triton_backend

pytestmark = pytest.mark.skipif("triton" not in ik.available_backends(),
                                reason=f"triton backend unavailable: {ik.available_backends(with_reasons=True)['triton']}")


def _launches(dtype, target="labels", **kw):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 16, generator=g).to(dtype).requires_grad_()
    if target == "affinity":
        t = ik.Affinity(torch.randn(40, 8, generator=g).to(dtype), kernel="gaussian", sigma=1.0)
    else:
        t = ik.Labels(torch.arange(40) // 2)
    recorder = Recorder().install()
    try:
        ik.icon_loss(x, target=t, kernel="student_t", dof=1.0, backend="triton", **kw).backward()
    finally:
        recorder.uninstall()
    return recorder.distinct()


def _precisions(keys) -> set:
    """The dot precisions of the launches that have dots (not the triangular schedule's merge)."""
    return {k["constexprs"]["PRECISION"] for k in keys if k["kernel"] != "icon_symmetric_merge_kernel"}


@pytest.mark.parametrize("symmetric", ["1", "0"])        # the triangular kernels and the plain ones
def test_fp32_dots_default_to_tf32x3_and_ieee_is_an_opt_in(monkeypatch, symmetric):
    monkeypatch.setenv("ICON_KERNELS_SYMMETRIC", symmetric)
    monkeypatch.delenv("ICON_KERNELS_TRITON_FP32", raising=False)
    assert _precisions(_launches(torch.float32)) == {"tf32x3"}
    monkeypatch.setenv("ICON_KERNELS_TRITON_FP32", "ieee")
    assert _precisions(_launches(torch.float32)) == {"ieee"}
    monkeypatch.setenv("ICON_KERNELS_TRITON_FP32", "fp32")
    with pytest.raises(ValueError, match="ICON_KERNELS_TRITON_FP32"):
        _launches(torch.float32)


@pytest.mark.parametrize("symmetric", ["1", "0"])        # the triangular kernels and the plain ones
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_affinity_target_features_stay_in_the_input_dtype(monkeypatch, dtype, symmetric):
    """No fp32 copy of z: a GPU then runs the target Gram on tensor cores too. (The triangular
    kernels read z alone, z_cols being z, and their merge kernel no target features.)"""
    monkeypatch.setenv("ICON_KERNELS_SYMMETRIC", symmetric)
    keys = _launches(dtype, target="affinity")
    name = str(dtype).replace("torch.", "")
    features = [k["tensors"][t][0] for k in keys for t in ("Z", "ZC") if t in k["tensors"]]
    assert len(features) >= 2 and set(features) == {name}
    assert any(k["kernel"].startswith("icon_symmetric_affinity") for k in keys) == (symmetric == "1")


def test_autotune_key_uses_power_of_two_buckets_of_n_and_m():
    from icon_kernels._triton import launchers

    assert "N" not in launchers._KEY and "M" not in launchers._KEY
    assert {"N_BUCKET", "M_BUCKET", "TARGET_GRAD", "UPCAST_Z"} <= set(launchers._KEY)
    assert [launchers._bucket(n) for n in (1, 16, 17, 4000, 4096, 4097)] == [16, 16, 32, 4096, 4096, 8192]


def _args(dtype, target, block_d, block_dz=16):
    return dict(X=torch.empty(0, dtype=dtype), Z=torch.empty(0, dtype=dtype),
                DENSE=torch.empty(0, dtype=dtype), BLOCK_D=block_d,
                BLOCK_DZ=block_dz, UPCAST=dtype not in (torch.float16, torch.bfloat16),
                UPCAST_Z=dtype not in (torch.float16, torch.bfloat16), TARGET=target)


def _shapes(configs):
    return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in configs]


def test_pruning_drops_configs_that_cannot_fit_and_keeps_one():
    from icon_kernels._triton import launchers

    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
               for bm, bn, w, s in launchers.AUTOTUNE_SHAPES]
    light = _args(torch.bfloat16, 0, 128)
    assert len(launchers._pruner("forward")(configs, None, **light)) == len(configs)
    medium = _args(torch.float32, 0, 128)              # fp32, d = 128: the 128-row tiles cannot fit
    kept = _shapes(launchers._pruner("backward")(configs, None, **medium))
    assert (64, 32, 4, 2) in kept and not any(bm == 128 for bm, *_ in kept)
    heavy = _args(torch.float32, 2, 256, 256)          # nothing is estimated to fit: the smallest
    assert _shapes(launchers._pruner("backward")(configs, None, **heavy)) == [(32, 32, 4, 2)]


def test_without_autotuning_one_shape_per_variant():
    from icon_kernels._triton import launchers

    assert launchers.fixed_shape(_args(torch.bfloat16, 0, 128), "forward") == (64, 64, 4, 2)
    assert launchers.fixed_shape(_args(torch.float32, 0, 128), "backward") == (64, 32, 4, 2)
    assert launchers.fixed_shape(_args(torch.bfloat16, 2, 128, 128), "backward") == (64, 32, 4, 2)
    assert launchers.fixed_shape(_args(torch.float32, 2, 256, 256), "backward") == (32, 32, 4, 2)
    # self mode's triangular kernels: the same tiles with twice the warps (they spill less so)
    assert launchers.triangular_shape(_args(torch.float32, 0, 128), "backward") == (64, 32, 8, 2)
    assert launchers.triangular_shape(_args(torch.bfloat16, 0, 128), "forward") == (64, 64, 8, 2)
    # ... an Affinity target's (t-SNE in bf16): never the wide tile; both stages take the backward's
    # launch (fp32 at d = dz = 256: the smallest tile), warps and stages too
    assert launchers.triangular_launch(_args(torch.bfloat16, 2, 128, 128), "forward") == (64, 32, 8, 2)
    assert launchers.triangular_launch(_args(torch.float32, 2, 256, 256), "forward") == (32, 32, 8, 2)
    for args in (_args(torch.float32, 0, 128), _args(torch.bfloat16, 0, 128), _args(torch.float32, 2, 256, 256),
                 _args(torch.bfloat16, 2, 128, 128)):
        assert launchers.triangular_launch(args, "forward") == launchers.triangular_launch(args, "backward")


def test_the_triangular_backward_fits_where_the_launcher_takes_it():
    """triangular_fits (the forward's choice, outside the interpreter, which has no shared memory):
    fp32 t-SNE at d = dz = 256 runs the plain kernels (its triangular backward's cubin needs 263 KB
    of the 227), at d = 256 and dz = 64 the triangular ones; a Labels target always fits."""
    from icon_kernels._triton import launchers

    assert not launchers.triangular_fits(_args(torch.float32, 2, 256, 256))
    assert launchers.triangular_fits(_args(torch.float32, 2, 256, 64))
    assert launchers.triangular_fits(_args(torch.bfloat16, 2, 128, 128))
    for dtype in (torch.float32, torch.bfloat16):
        assert launchers.triangular_fits(_args(dtype, 0, 256))


@pytest.mark.parametrize("target", [0, 1, 2, 3])
def test_the_triangular_tile_of_every_target_outside_the_interpreter(monkeypatch, target):
    """_triangular_tile as a GPU launch reads it (INTERPRET off) for every target code: what the
    launcher hands the shape estimate must hold every entry the estimate reads (a Dense launch's
    estimate reads DENSE). The backward asks only for a problem with the triangular structure, but
    the launch arguments must not depend on that."""
    from icon_kernels._triton import launchers
    monkeypatch.setattr(launchers, "INTERPRET", False)
    dtype = torch.float32
    tensors = dict(X=torch.empty(0, dtype=dtype), Z=torch.empty(0, dtype=dtype), DENSE=torch.empty(0, dtype=dtype))
    flags = dict(UPCAST=True, UPCAST_Z=True, BLOCK_D=128, BLOCK_DZ=16, TARGET=target)
    bm, bn = launchers._triangular_tile(tensors, flags)
    assert bm % bn == 0 and bn >= 16
    # an f-divergence's second pass and backward: 64 x 32 in bf16 too (kl and cross_entropy: 64 x 64)
    for code, shape in ((0, (64, 64, 4, 2)), (1, (64, 64, 4, 2)), (3, (64, 32, 4, 2))):
        assert launchers.fixed_shape({**_args(torch.bfloat16, 0, 128), "DIVERGENCE": code}, "forward") == shape


@pytest.mark.parametrize("triton_version,numpy_version,breaks", [
    ("3.6.0", "2.5.0", True), ("3.6.0", "2.4.1", True), ("3.6.0", "2.3.5", False),
    ("3.7.0", "2.5.0", False), ("3.8.0", "2.5.0", False), ("3.5.1", "2.4.0rc1", True)])
def test_interpreter_numpy_compatibility(triton_version, numpy_version, breaks):
    assert triton_backend.interpreter_breaks(triton_version, numpy_version) is breaks


def test_a_broken_interpreter_stack_makes_triton_unavailable_with_its_reason(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton_backend, "_REASON", triton_backend._REASON)   # restored afterwards
    monkeypatch.setattr(triton_backend, "interpreter_breaks", lambda *_: True)
    triton_backend.register()
    assert "numpy<2.4 or triton>=3.7" in triton_backend.unavailable_reason()


def test_the_triton_folder_imports_nothing_from_the_package():
    """triton/ holds kernels and launchers only; the package hands in what they need."""
    import ast
    from pathlib import Path

    for path in (Path(__file__).resolve().parents[1] / "triton").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] == "icon_kernels" for n in names), f"{path.name} imports {names}"
