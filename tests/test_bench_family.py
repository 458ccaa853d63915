"""The benchmark's family sweep and its floor (DESIGN.md §5): every configuration of
``run_bench.py --family`` computes the same loss on every CPU backend, and the GEMM floor counts
an Affinity target's Gram."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import workloads  # noqa: E402

import icon_kernels as ik  # noqa: E402

BACKENDS = [b for b in ("torch", "cpu") if b in ik.available_backends()]


@pytest.mark.parametrize("name", workloads.FAMILY)
def test_every_family_configuration_agrees_with_naive(name):
    cfg = workloads.CONFIGS[name]
    inp = cfg.make(96, 16, torch.float64, "cpu")
    want_loss = cfg.loss(inp, "reference")
    want = torch.autograd.grad(want_loss, [inp[k] for k in cfg.leaves])
    for backend in BACKENDS:
        loss = cfg.loss(inp, backend)
        got = torch.autograd.grad(loss, [inp[k] for k in cfg.leaves])
        torch.testing.assert_close(loss, want_loss, rtol=1e-9, atol=0)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


def test_the_floor_counts_an_affinity_targets_gram():
    tsne, infonce = workloads.CONFIGS["tsne"], workloads.CONFIGS["infonce"]
    inp = tsne.make(64, 8, torch.float32, "cpu")
    assert [(a.shape, gemms) for a, _, gemms in workloads.floor_operands(tsne, inp)] == \
        [((64, 8), 4), ((64, 8), 2)]
    assert [gemms for *_, gemms in workloads.floor_operands(infonce, infonce.make(64, 8, torch.float32, "cpu"))] \
        == [4]
    for name in ("sne", "tsne-tv", "jointtsne"):
        assert workloads.CONFIGS[name].target_grams == ("z",), name
    with pytest.raises(ValueError, match="gemms"):
        workloads.gemm_floor(inp["z"], inp["z"], "cpu", gemms=3)


def test_the_family_plan_covers_every_member_at_4096_and_8192():
    plan = workloads.MODES[("cpu", "family")].plan
    assert [entry[0] for entry in plan] == list(workloads.FAMILY)
    assert all(entry[2] == (4096, 8192) and entry[3] == () for entry in plan)   # every contender


def test_clip_both_directions_agree_on_every_schedule(monkeypatch):
    """The clip-both row: naive, torch, cpu and cpu-plain (two calls under ICON_KERNELS_SYMMETRIC=0)
    compute the same loss and gradients; its floor is one direction's four GEMMs."""
    cfg = workloads.CONFIGS["clip-both"]
    inp = cfg.make(80, 16, torch.float64, "cpu")
    assert [gemms for *_, gemms in workloads.floor_operands(cfg, inp)] == [4]
    want_loss = workloads.build("naive", cfg, inp)()
    want = torch.autograd.grad(want_loss, [inp[k] for k in cfg.leaves])
    names = ["torch"] + (["cpu", "cpu-plain"] if "cpu" in ik.available_backends() else [])
    monkeypatch.setenv(workloads.SCHEDULE_SWITCH, "1")     # build's cpu contenders set it per call
    for name in names:
        loss = workloads.build(name, cfg, inp)()
        got = torch.autograd.grad(loss, [inp[k] for k in cfg.leaves])
        torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=0)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)
