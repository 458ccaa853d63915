"""The Triton kernels loop over the feature dimension in chunks when d is beyond their register
budget. The budget is shrunk here so that d = 50 takes 4 ragged chunks of 16 (cheap under the
interpreter); test_backends_vs_reference.py::test_wide_feature_dim runs d = 300 at the real one."""
import pytest
import torch

from cases import SETTINGS, build, check_against_reference

TOL = 5e-5     # fp32 against the float64 reference, as in test_backends_vs_reference.py


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
@pytest.mark.parametrize("kernel,target_kind", [("dot", "labels"), ("gaussian", "neighbors"),
                                                ("student_t", "affinity"), ("log_dot", "dense")])
@pytest.mark.parametrize("setting", SETTINGS[1:3], ids=[s[0] for s in SETTINGS[1:3]])
def test_feature_dim_chunked(monkeypatch, backend, kernel, target_kind, setting):
    from icon_kernels._triton import launchers
    monkeypatch.setattr(launchers, "MAX_BLOCK_D", 32)
    monkeypatch.setattr(launchers, "D_CHUNK", 16)
    problem, upstream = build(kernel, target_kind, setting, torch.float32, seed=9, n=40, m=37,
                              d=50, target_grad=target_kind == "affinity",
                              param_tensor=kernel != "log_dot" and "rows")
    check_against_reference(problem, upstream, torch.float32, TOL, backend)
