"""The family tables (icon_kernels/families.py) are the one source of the names and codes: the
Triton launchers and the C++ enums hold the same numbers, and every backend's dispatch rejects a
code it does not know instead of computing the last kernel in its switch."""
import re
from pathlib import Path

import pytest
import torch

import icon_kernels as ik
from icon_kernels import families, validation
from icon_kernels.backends import reference, tile_math

ROOT = Path(__file__).resolve().parents[1]


def _cpp_enum(name, header="tile_math.h"):
    text = (ROOT / "csrc" / header).read_text()
    body = re.search(rf"enum {name} : int {{([^}}]*)}}", text).group(1)
    return {k.strip(): int(v) for k, v in (item.split("=") for item in body.split(","))}


def _cpp_name(name):
    return "k" + "".join(part.title() for part in name.split("_"))


def test_python_and_cpp_divergence_codes_agree():
    codes = {_cpp_name(d.name): d.code for d in families.DIVERGENCES.values()}
    assert codes == _cpp_enum("Divergence", "divergence_math.h")
    assert set(families.F_DIVERGENCE_CODES) == {d.code for d in families.DIVERGENCES.values()} - {0, 1}


def test_python_and_cpp_codes_agree():
    assert {_cpp_name(k): c for k, c in families.KERNEL_CODES.items()} == _cpp_enum("Kernel")
    assert {_cpp_name(t): c for t, c in families.TARGET_CODES.items()} == _cpp_enum("Target")
    assert len(set(families.KERNEL_CODES.values())) == len(families.KERNEL_CODES)
    # the op entry's name -> code map (csrc/op_codes.h) and the distance kernels (tile_math.h)
    op_codes = (ROOT / "csrc" / "op_codes.h").read_text()
    names = dict(re.findall(r'if \((?:k|t) == "(\w+)"\) return (k\w+);', op_codes))
    assert names == {**{k: _cpp_name(k) for k in families.KERNEL_CODES},
                     **{t: _cpp_name(t) for t in families.TARGET_CODES}}
    distance = re.search(r"bool is_distance\(int kernel\) \{ return ([^;]*);", (ROOT / "csrc" / "tile_math.h").read_text())
    assert set(re.findall(r"kernel == (k\w+)", distance.group(1))) == {
        _cpp_name(k) for k in families.KERNEL_CODES if families.LEARNED_KERNELS[k].distance}


def test_the_power_kernels_epsilon_is_one_constant():
    """families.POWER_EPS is a library constant (not an op argument); the C++ and Triton kernels
    hold copies."""
    assert families.POWER_EPS == 1e-12
    text = (ROOT / "csrc" / "tile_math.h").read_text()
    assert float(re.search(r"constexpr double kPowerEps = ([^;]+);", text).group(1)) == families.POWER_EPS
    text = (ROOT / "triton" / "tile_helpers.py").read_text()
    assert float(re.search(r"^POWER_EPS = tl\.constexpr\(([^)]+)\)$", text, re.M).group(1)) == families.POWER_EPS


def test_python_and_triton_codes_agree():
    pytest.importorskip("triton")
    from icon_kernels._triton import launchers

    assert launchers.KERNEL_CODES == families.KERNEL_CODES
    assert launchers.TARGET_CODES == families.TARGET_CODES
    # the Triton kernels compute kl and cross_entropy; their codes are the table's
    assert launchers.DIVERGENCE_CODES == {k: families.DIVERGENCES[k].code for k in launchers.DIVERGENCE_CODES}
    # the backward's distance-kernel tests (dx -= sum_j W_ij x_i), learned and target side
    text = (ROOT / "triton" / "backward_kernels.py").read_text()
    tests = re.findall(r"if ((T_)?KERNEL == \d[^:]*):", text)
    assert len(tests) == 4
    distance = {r.code for r in families.LEARNED_KERNELS.values() if r.distance}
    for condition, prefix in tests:
        assert {int(c) for c in re.findall(rf"\b{prefix}KERNEL == (\d)", condition)} == distance, condition
        assert len(re.findall(r"KERNEL", condition)) == len(distance), condition


def test_validation_and_the_public_docs_read_the_table():
    assert validation.KERNELS == tuple(families.LEARNED_KERNELS)
    assert validation.KERNEL_PARAM == {k: r.param for k, r in families.LEARNED_KERNELS.items()}
    assert validation.DIVERGENCES == tuple(families.DIVERGENCES)
    assert {t.cls for t in families.TARGET_TYPES_BY_NAME.values()} == set(ik.targets.TARGET_TYPES)


def _op_args(kernel, n=6, d=3):
    """The forward op's 20 arguments for a small Labels problem with ``kernel``."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    labels = torch.arange(n) // 2
    return (x, x, torch.ones(n), kernel, "labels", labels, labels, None, None, None, None, None,
            "gaussian", None, 0.0, 0.0, True, 0, "conditional", False)


PLANTED = "planted"          # a kernel name the backends were never taught


def test_torch_backend_rejects_an_unknown_kernel():
    with pytest.raises(ValueError, match="unknown kernel 'planted'"):
        torch.ops.icon_kernels.torch_forward(*_op_args(PLANTED))
    with pytest.raises(ValueError, match="unknown kernel"):
        tile_math.chain(PLANTED, torch.zeros(2, 2), torch.zeros(2, 3), torch.zeros(2, 3),
                        torch.zeros(2, 2), torch.ones(2, 1), torch.zeros(2))


@pytest.mark.skipif("cpu" not in ik.available_backends(), reason="C++ extension not built")
def test_cpp_kernels_reject_an_unknown_kernel():
    with pytest.raises(RuntimeError, match="unknown kernel planted"):
        torch.ops.icon_kernels.cpu_forward(*_op_args(PLANTED))


@pytest.mark.skipif("triton" not in ik.available_backends(),
                    reason=f"triton backend unavailable: {ik.available_backends(with_reasons=True)['triton']}")
def test_triton_kernels_reject_an_unknown_kernel_code(monkeypatch):
    """A code the launcher passes but the kernels' switches do not list fails at compile time
    (tl.static_assert) instead of computing student_t."""
    from icon_kernels._triton import launchers

    monkeypatch.setitem(launchers.KERNEL_CODES, PLANTED, 9)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in _op_args(PLANTED))
    with pytest.raises(Exception, match="unknown kernel code"):
        torch.ops.icon_kernels.triton_forward(*args)


def test_the_torch_paths_compute_each_kernel_from_its_row():
    """Every learned kernel's table row gives the reference's logits (the oracle keeps its own
    formulas)."""
    g = torch.Generator().manual_seed(1)
    a = torch.rand(5, 4, generator=g, dtype=torch.float64) + 0.1
    b = torch.rand(7, 4, generator=g, dtype=torch.float64) + 0.1
    prm = torch.full((5, 1), 0.7, dtype=torch.float64)
    for name, row in families.KERNEL_CODES.items():
        s, _ = tile_math.logits(name, a, b, prm)
        want = reference.pairwise_logits(name, a, b, prm[:, 0])
        torch.testing.assert_close(s, want)


def test_log_dot_weight_is_zero_where_the_gradient_is():
    """Padding and pairs with a.b = 0 carry G = 0: their weight is 0, not 0/0, in the torch paths
    as in the C++, CUDA and Triton kernels (the dense reference gives NaN there)."""
    weight = families.LEARNED_KERNELS["log_dot"].weight
    w = weight(torch.tensor([[0.0, 1.0, -2.0]]), torch.tensor([[0.0, 2.0, 4.0]]), None)
    assert w.tolist() == [[0.0, 0.5, -0.5]]


def test_every_target_type_has_its_adapter():
    from icon_kernels.target_adapters import adapter_for
    for name, row in families.TARGET_TYPES_BY_NAME.items():
        fields = {f: None for f in row.cls.__dataclass_fields__}
        assert adapter_for(row.cls(**fields)).name == name

    class NotATarget:
        pass
    with pytest.raises(TypeError, match="target must be ik.Labels"):
        adapter_for(NotATarget())


def test_target_arguments_are_the_op_schemas_target_slots():
    # dispatch.TargetArguments names the op schema's arguments between kernel and alpha, in order
    from icon_kernels.backends.blockwise import Problem
    from icon_kernels.backends.dispatch import TargetArguments
    from icon_kernels.backends.ops import ARGS
    names = [a.strip().split(" ")[-1] for a in ARGS.split(",")]
    assert list(Problem._fields) == names          # the torch backend's names of the op's arguments
    assert list(TargetArguments._fields) == names[names.index("kernel") + 1:names.index("alpha")]
