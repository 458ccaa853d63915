"""pytest-benchmark suite of the I-Con loss: one benchmark per (configuration, N, contender).

Groups are "<configuration>-<dtype>-N<N>"; each group holds the GEMM floor (four N x M x d matmuls,
two more for an Affinity target's Gram), naive PyTorch (backend "reference"), naive under
torch.compile, every fused backend of the device and the installed peers. ``extra_info`` carries
the peak memory (CPU: increase of the peak RSS in a fresh process, as in run_bench.py; CUDA:
max_memory_allocated), the ratios to naive and to the
floor of the same group (time and memory), N, M, d, dtype and the machine's torch / triton
versions. Unlike run_bench.py, pytest-benchmark times one benchmark after the other, not in
alternating order.

    make bench-pytest                                  # runs this suite, saves JSON (autosave)
    make bench-pytest BENCH_ARGS=--benchmark-compare   # and compares with the previous saved run
"""
import gc
import platform

import pytest
import torch

import icon_kernels as ik
from measure import classify, run_spawned
from workloads import (CONFIGS, FLOOR, NAIVE, build, config_floor, cuda_peak_mib, floor_operands, fwd_bwd,
                       label)

_SEEN = {}        # group -> {"floor": median s, "naive": median s, "naive_mem": MiB}


def _versions():
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # noqa: BLE001
        triton_version = None
    return {"torch": torch.__version__, "triton": triton_version, "icon_kernels": ik.__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads()}


def _peak_mib(cname, name, n, d, dtype, device, fn, inp):
    if device == "cuda":
        return cuda_peak_mib(fn, inp)[0], "cuda max_memory_allocated"
    r = run_spawned({"job": "memory", "config": cname, "contender": name, "n": n, "d": d,
                     "dtype": dtype, "device": device, "warm_n": 320}, timeout=600)
    return (r.get("peak_mib"), r.get("memory_counter")) if r.get("ok") else (None, r.get("status"))


def test_icon_loss(benchmark, icon_case, request):
    cname, dtype, n, name = icon_case
    opt = request.config.getoption
    device, d, rounds = opt("--icon-device"), opt("--icon-d"), opt("--icon-rounds")
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    cfg = CONFIGS[cname]
    group = f"{cname}-{dtype}-N{n}"
    benchmark.group = group
    benchmark.name = label(name) if name != "floor" else FLOOR
    seen = _SEEN.setdefault(group, {})
    gc.collect()
    inp = cfg.make(n, d, getattr(torch, dtype), device)
    if name == "floor":
        floor_ops = floor_operands(cfg, inp)

        def run():
            config_floor(floor_ops, device)
    else:
        fn = build(name, cfg, inp)

        def run():
            fwd_bwd(fn, inp, device)
    try:
        benchmark.pedantic(run, rounds=rounds, warmup_rounds=1, iterations=1)
    except Exception as exc:  # noqa: BLE001 - OOM or a compile failure is a result, not an error
        status, msg = classify(exc, name)
        pytest.skip(f"{status}: {msg}")
    if benchmark.disabled:
        return      # --benchmark-disable: the run above was a smoke test; there are no timings
    median = benchmark.stats.stats.median
    info = {"config": cname, "contender": benchmark.name, "n": n, "m": cfg.m_of_n(n), "d": d,
            "dtype": dtype, "device": device, **_versions()}
    if device == "cuda":
        info["device_name"] = torch.cuda.get_device_name()
    if name == "floor":
        seen["floor"] = median
    else:
        if name == NAIVE:
            seen["naive"] = median
        if not opt("--icon-no-memory"):
            peak, counter = _peak_mib(cname, name, n, d, dtype, device, fn, inp)
            info.update(peak_mib=peak, memory_counter=counter)
            if name == NAIVE:
                seen["naive_mem"] = peak
            if peak is not None and seen.get("naive_mem"):
                info["x_naive_mem"] = peak / seen["naive_mem"]
    if seen.get("naive"):
        info["x_naive"] = median / seen["naive"]
    if seen.get("floor"):
        info["x_floor"] = median / seen["floor"]
    info["tflops"] = 8 * n * cfg.m_of_n(n) * d / median / 1e12
    benchmark.extra_info.update(info)
