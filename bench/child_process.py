"""Running one benchmark job (a JSON spec) in a process of its own, with a timeout.

``run_forked``: a fresh child of a process that has imported torch and icon_kernels but never run
an operator (CPU only), which saves the ~2 s interpreter start per job. ``run_spawned``: a fresh
interpreter, ``python bench/worker.py '<json spec>'`` (CUDA jobs, ``--spawn``). A child that dies
without a result is reported as "OOM" (SIGKILL, likely the OOM killer) or "failed".
"""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time

from worker import run_job

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "worker.py")


def _dead(code_or_signal, tail):
    """Result for a child that printed no result: the OOM killer's SIGKILL, or a crash."""
    if code_or_signal in (-signal.SIGKILL, 137):
        return {"ok": False, "status": "OOM", "message": "killed (SIGKILL, likely the OOM killer)"}
    return {"ok": False, "status": "failed", "message": f"exit {code_or_signal}: {tail[-300:]}"}


def run_forked(spec, timeout):
    """Run ``spec`` in a forked child (CPU only: the parent must never have run a torch operator)."""
    sys.stdout.flush()
    sys.stderr.flush()
    r, w = os.pipe()
    log = tempfile.TemporaryFile()
    pid = os.fork()
    if pid == 0:      # child
        code = 0
        try:
            os.close(r)
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            data = json.dumps(run_job(spec)).encode()
            while data:
                data = data[os.write(w, data):]
        except BaseException:  # noqa: BLE001
            code = 3
        finally:
            os._exit(code)
    os.close(w)
    chunks, end, timed_out = [], time.time() + timeout, False
    try:
        while True:
            left = end - time.time()
            if left <= 0:
                timed_out = True
                break
            ready, _, _ = select.select([r], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(r, 1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
    except BaseException:       # Ctrl-C: leave no orphan behind
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise
    if timed_out:
        os.kill(pid, signal.SIGKILL)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    if timed_out:
        log.close()
        return {"ok": False, "status": "timeout", "message": f"no result after {timeout:.0f} s"}
    try:
        return json.loads(b"".join(chunks))
    except ValueError:
        log.seek(0)
        tail = log.read().decode(errors="replace").strip()
        log.close()
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        return _dead(code, tail)


def run_spawned(spec, timeout):
    """Run ``spec`` in a fresh interpreter (``python worker.py <spec>``)."""
    cmd = [sys.executable, WORKER, json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "status": "timeout", "message": f"no result after {timeout:.0f} s"}
    for line in reversed(proc.stdout.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return _dead(proc.returncode, proc.stderr.strip())
