"""The benchmark CLI (bench/run_bench.py, what `make bench` runs) on tiny sizes.

Runs ``--quick`` with an override of the sizes (N = 256, 384) into a temporary results directory
and checks the files and their columns: the CSV and JSON, the PNG plots when matplotlib is
installed, the table printed, finite ratios, and the largest-N probe. Nothing here asserts a
timing: the machine may be busy.
"""
import csv
import glob
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(ROOT, "bench", "run_bench.py")
SIZES = (256, 384)
REQUIRED = ["kind", "host", "timestamp", "device", "cpu", "python", "torch", "triton", "dtype",
            "config", "n", "m", "d", "contender", "status", "median_s", "min_s", "max_s", "runs",
            "floor_s", "x_naive", "x_floor", "peak_mib", "x_naive_mem", "max_err", "note"]


def _finite(v):
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    pytest.importorskip("icon_kernels")
    out = tmp_path_factory.mktemp("bench")
    # torch.compile is left to test_compiled_contender: a cold inductor cache costs ~10 s a graph
    cmd = [sys.executable, RUN, "--quick", "--device", "cpu", "--configs", "infonce", "clip",
           "--sizes", *map(str, SIZES), "--contenders", "naive", "torch", "cpu",
           "--results-dir", str(out), "--deadline", "0", "--budget", "60", "--probe-mem", "0.0625",
           "--probe-max-n", "1024", "--probe-steps", "3", "--probe-step-s", "20"]
    return out, _run(cmd)


def _run(cmd):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"     # tiny problems: one thread is not slowed down by a busy machine
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _rows(out):
    paths = glob.glob(str(out / "*.csv"))
    assert len(paths) == 1, paths
    with open(paths[0], newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def test_writes_csv_json_and_plots(quick_run):
    out, stdout = quick_run
    header, rows = _rows(out)
    missing = [c for c in REQUIRED if c not in header]
    assert not missing, f"CSV lacks columns {missing}"
    stem = glob.glob(str(out / "*.csv"))[0][:-4]
    assert os.path.basename(stem).count("-") >= 2            # <host>-<date>-<time>
    with open(stem + ".json") as f:
        payload = json.load(f)
    assert payload["machine"]["torch"]
    assert len(payload["records"]) == len(rows)
    if importlib.util.find_spec("matplotlib") is not None:
        pngs = glob.glob(stem + "-cpu-*.png")
        assert {os.path.basename(p).rsplit("-", 2)[1] for p in pngs} >= {"infonce", "clip"}, pngs
        assert all(os.path.getsize(p) > 1000 for p in pngs)
    for text in ("median s", "x naive", "x floor", "peak MiB", "GEMM floor", "Largest N", "wrote"):
        assert text in stdout, text


def test_every_row_has_machine_versions_and_dtype(quick_run):
    _, rows = _rows(quick_run[0])
    sweep = [r for r in rows if r["kind"] == "sweep"]
    assert {(r["config"], int(r["n"])) for r in sweep} == {(c, n) for c in ("infonce", "clip") for n in SIZES}
    for r in rows:
        for col in ("host", "cpu", "python", "torch", "dtype", "device"):
            assert r[col], (col, r)
        assert r["dtype"] == "float32"
    assert all(int(r["m"]) == int(r["n"]) // 2 for r in sweep if r["config"] == "clip")


def test_ratios_are_finite(quick_run):
    _, rows = _rows(quick_run[0])
    ok = [r for r in rows if r["kind"] == "sweep" and r["status"] == "ok"]
    contenders = {r["contender"] for r in ok}
    assert {"naive", "torch", "GEMM floor"} <= contenders, contenders
    for r in ok:
        for col in ("median_s", "min_s", "max_s", "x_naive", "x_floor"):
            assert _finite(r[col]) and float(r[col]) > 0, (col, r)
        assert float(r["min_s"]) <= float(r["median_s"]) <= float(r["max_s"])
        assert int(r["runs"]) >= 1
        if r["contender"] != "GEMM floor":
            assert _finite(r["peak_mib"]) and float(r["peak_mib"]) >= 0, r
            assert _finite(r["max_err"]) and float(r["max_err"]) < 1e-3, r
        if r["contender"] == "naive":
            assert float(r["x_naive"]) == pytest.approx(1.0)
        if r["contender"] == "GEMM floor":
            assert float(r["x_floor"]) == pytest.approx(1.0)


def test_cells_report_a_status_instead_of_crashing(quick_run):
    _, rows = _rows(quick_run[0])
    allowed = ("ok", "OOM", "skipped", "failed", "compile failed", "n/a")
    for r in rows:
        if r["kind"] == "sweep":
            assert r["status"] in allowed, r
            if r["status"] != "ok":
                assert r["note"], r


def test_largest_n_probe(quick_run):
    _, rows = _rows(quick_run[0])
    probe = {r["contender"]: r for r in rows if r["kind"] == "probe"}
    assert "naive" in probe and "torch" in probe, sorted(probe)
    for r in probe.values():
        assert r["limited_by"], r
        if r["status"] == "ok":
            assert 256 <= int(r["n"]) <= 1024, r
            assert float(r["peak_mib"]) <= 64, r


def test_compiled_contender(tmp_path):
    """Naive PyTorch under torch.compile: timed, or reported as "compile failed: <reason>"."""
    pytest.importorskip("icon_kernels")
    _run([sys.executable, RUN, "--quick", "--device", "cpu", "--configs", "infonce", "--sizes", "320",
          "--contenders", "naive", "compiled", "--results-dir", str(tmp_path), "--deadline", "0",
          "--budget", "60", "--no-probe", "--no-plots"])
    _, rows = _rows(tmp_path)
    compiled = [r for r in rows if r["contender"] == "naive+compile"]
    assert len(compiled) == 1
    r = compiled[0]
    if r["status"] == "compile failed":
        assert r["note"].startswith("compile failed: "), r
    else:
        assert r["status"] == "ok", r
        for col in ("median_s", "x_naive", "x_floor", "peak_mib", "max_err"):
            assert _finite(r[col]), (col, r)
        assert float(r["max_err"]) < 1e-3, r


def test_cpu_memory_figure_is_reproducible():
    """bench/measure.py pins glibc's mmap threshold for a CPU memory figure (its docstring): three
    fresh processes measuring the same run agree within a few MiB. With malloc's defaults the torch
    backend's figure here moved by up to ~26 MiB (48-74 MiB); pinned, by under 1 MiB."""
    pytest.importorskip("icon_kernels")
    import platform
    spec = {"job": "memory", "config": "infonce", "contender": "torch", "n": 2048, "d": 128,
            "dtype": "float32", "device": "cpu", "warm_n": 320}
    env = {k: v for k, v in os.environ.items() if k != "ICON_KERNELS_TORCH_CHUNK_ELEMENTS"}
    peaks = []
    for _ in range(3):
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "measure.py"), json.dumps(spec)],
                              capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        assert r["ok"], r
        peaks.append(r["peak_mib"])
    if platform.libc_ver()[0] != "glibc":
        pytest.skip(f"no glibc: the allocator is not pinned ({r['memory_counter']})")
    assert "pinned" in r["memory_counter"], r
    assert max(peaks) - min(peaks) <= 4.0, peaks


_MMAP_CHECK = r"""
import ctypes, sys
sys.path.insert(0, sys.argv[1])
class Info(ctypes.Structure):
    _fields_ = [(f, ctypes.c_size_t) for f in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
if sys.argv[2] == "pin":
    import measure
    assert measure.pin_malloc()
p = libc.malloc(8 << 20)     # an mmapped block; its free raises a dynamic threshold to 8 MiB
libc.free(p)
before = libc.mallinfo2().hblks
q = libc.malloc(1 << 20)
print("mmapped" if libc.mallinfo2().hblks == before + 1 else "heap")
libc.free(q)
"""


@pytest.mark.parametrize("mode, where", [("pin", "mmapped"), ("default", "heap")])
def test_pin_malloc_makes_the_mmap_threshold_static(mode, where):
    """The mechanism behind the reproducible figure: once pinned, a 1 MiB block is its own mapping
    even after an 8 MiB mapping was freed; with glibc's dynamic threshold it comes from the heap
    (the "default" case shows that this check can tell the two apart)."""
    import platform
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")
    pytest.importorskip("icon_kernels")
    proc = subprocess.run([sys.executable, "-c", _MMAP_CHECK, os.path.join(ROOT, "bench"), mode],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    if "mallinfo2" in proc.stderr:
        pytest.skip("glibc < 2.33: no mallinfo2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == where, proc.stdout


@pytest.mark.parametrize("script,args,rows", [
    ("schedule_ab.py", ["--configs", "tsne-js", "--sizes", "64", "--rounds", "1"],
     ["| tsne-js | 64 | cpu |", "| tsne-js | 64 | cpu-plain |"]),
    ("floor_ratio.py", ["--backend", "cpu-plain", "--configs", "tsne-js", "--sizes", "64", "--rounds", "1"],
     ["| tsne-js | 64 |"]),
])
def test_schedule_scripts_print_their_rows(script, args, rows):
    """bench/schedule_ab.py (both cpu schedules, forward and backward apart) and floor_ratio.py with
    the plain schedule run end to end on a tiny size and print a row per schedule."""
    import icon_kernels as ik
    if "cpu" not in ik.available_backends():
        pytest.skip("the cpu backend is not built")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", script), *args], capture_output=True,
                         text=True, timeout=600, check=True).stdout
    for row in rows:
        assert row in out, out
