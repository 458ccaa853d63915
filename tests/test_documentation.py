"""The documented contract says what issue 13's documentation items ask for (16-19), in the
places a user reads: the docstrings of icon_loss / ICon and the README."""
import pathlib
import warnings

import pytest
import torch

import icon_kernels as ik
from icon_kernels.backends import registry as backends

README = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_reduction_none_with_weight_is_documented():
    for doc in (ik.icon_loss.__doc__, ik.ICon.__doc__):
        assert "w_i L_i" in doc
    assert "w_i·L_i" in README


def test_explicit_y_equal_x_keeps_self_pairs_is_documented():
    for doc in (ik.icon_loss.__doc__, ik.ICon.__doc__):
        assert "y=x" in doc and "keep" in doc
    assert "Passing `y=x` explicitly keeps them" in README


def test_triton_float64_is_documented_and_warned_once():
    assert "float64 inputs are computed in fp32" in README
    if "triton" not in ik.available_backends() or torch.cuda.is_available():
        pytest.skip("the warning is checked on CPU tensors through the interpreter")
    backends._WARNED_TRITON_FLOAT64.clear()
    x = torch.randn(6, 3, dtype=torch.float64)
    target = ik.Labels(torch.arange(6) // 2)
    with pytest.warns(UserWarning, match="float64 inputs in fp32") as caught:
        ik.icon_loss(x, target=target, backend="triton")
    assert caught[0].filename == __file__            # the user's line, not the package's
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        ik.icon_loss(x, target=target, backend="triton")         # once per process


def test_distributed_timeout_is_documented():
    assert "init_process_group(timeout=" in README
