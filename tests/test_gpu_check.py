"""bench/gpu_check.sh without a GPU: its plan fits the 540 s budget (steps, GPU tests, Triton
compiles) and, without CUDA, it prints a clean skip and exits 0. The plan test runs last in a
session (tests/selection_keys.py): when the session ran the whole GPU selection, the compile keys
recorded meanwhile go to the script; otherwise the script runs the selection itself."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "gpu_check.sh")


def _run(*args, **env):
    full = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OUT")}
    full.update(PYTHON=sys.executable, **env)
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, timeout=900,
                          env=full, cwd=ROOT)


def _plan(record, tmp_path):
    """The script's plan, from the keys this session recorded when it ran the whole selection."""
    if record is not None:
        keys = str(tmp_path / "keys.json")
        ran = record.write(keys)
        proc = _run("--plan", keys)
        out = proc.stdout + proc.stderr
        collected = re.search(r"GPU tests\s+(\d+) collected", out)
        if collected and int(collected.group(1)) == ran:
            return proc, out
    proc = _run("--plan")
    return proc, proc.stdout + proc.stderr


def test_plan_fits_the_budget_and_counts_tests_and_compiles(selection_record, tmp_path):
    proc, out = _plan(selection_record, tmp_path)
    print(out)                                   # the plan, in pytest -rP and junit reports
    assert proc.returncode == 0, out
    limits = [int(s) for s in re.findall(r"step \S+\s+limit\s+(\d+) s", out)]
    assert len(limits) == 5 and sum(limits) <= 540, out
    assert re.search(rf"total\s+{sum(limits)} s \(budget 540 s; no step runs past 575 s\)", out), out
    tests = int(re.search(r"GPU tests\s+(\d+) collected", out).group(1))
    assert 200 <= tests <= 1000, out
    keys, seconds, limit = map(float, re.search(
        r"Triton compiles\s+(\d+) distinct keys, about (\d+) s on 8 workers \(budget 150 s: at most (\d+) keys",
        out).groups())
    assert 0 < keys <= limit and seconds <= 150, out


def test_without_cuda_it_skips_cleanly():
    proc = _run(CUDA_VISIBLE_DEVICES="")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "gpu_check: SKIPPED - torch sees no CUDA device" in proc.stdout
    assert "=== gpu_check step" not in proc.stdout          # nothing was built or run
