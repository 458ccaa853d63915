"""Options of the pytest-benchmark suite (bench/bench_*.py); see ``make bench-pytest``.

    pytest bench -o python_files='bench_*.py' --benchmark-only --icon-sizes 1024 4096 \
        --icon-configs infonce --icon-contenders naive cpu
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

# the CPU jobs of the suite's memory measurements run in fresh interpreters; keep the parent
# from initialising the CUDA driver through torch.cuda.is_available()
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")


def pytest_addoption(parser):
    g = parser.getgroup("icon_kernels benchmark")
    g.addoption("--icon-device", default="cpu", choices=["cpu", "cuda"], help="device (default cpu)")
    g.addoption("--icon-configs", nargs="+", default=None, help="configurations (default: all)")
    g.addoption("--icon-sizes", nargs="+", type=int, default=None,
                help="N values (default per configuration: CPU 1024 and 2048-4096, CUDA 16384 and 65536)")
    g.addoption("--icon-dtype", default=None, help="dtype (default float32 on CPU, bfloat16 on CUDA)")
    g.addoption("--icon-contenders", nargs="+", default=None,
                help="contenders (default: naive, compiled, every fused backend of the device, installed peers)")
    g.addoption("--icon-rounds", type=int, default=3, help="timed rounds per benchmark (after one warm-up)")
    g.addoption("--icon-no-memory", action="store_true",
                help="skip the peak-memory measurement (a fresh process per benchmark)")
    g.addoption("--icon-d", type=int, default=128)


DEFAULT_SIZES = {("cpu", "infonce"): (1024, 4096), ("cpu", "tsne"): (1024, 2048),
                 ("cpu", "clip"): (2048, 4096)}


def pytest_generate_tests(metafunc):
    if "icon_case" not in metafunc.fixturenames:
        return
    from workloads import CONFIGS, contenders_for

    opt = metafunc.config.getoption
    device = opt("--icon-device")
    dtype = opt("--icon-dtype") or ("float32" if device == "cpu" else "bfloat16")
    cases, ids = [], []
    for cname in opt("--icon-configs") or list(CONFIGS):
        cfg = CONFIGS[cname]
        names = [n for n, why in contenders_for(cfg, device, opt("--icon-contenders")).items() if not why]
        for n in opt("--icon-sizes") or DEFAULT_SIZES.get((device, cname), (16384, 65536)):
            # the GEMM floor first, then naive: later benchmarks of the group report ratios to them
            for name in ["floor"] + names:
                cases.append((cname, dtype, n, name))
                ids.append(f"{cname}-{dtype}-N{n}-{name}")
    metafunc.parametrize("icon_case", cases, ids=ids)
