"""Measurement jobs of the benchmark, each run in a process of its own (see ``run_job``).

- ``memory`` (memory_job.py): one contender, one forward + backward at size N, in a fresh process;
  the increase of the peak RSS over the RSS before the call, under an address-space limit.
- ``timing`` (timing_job.py): every contender of one row (configuration, dtype, N) in the same
  process, on the same inputs, in alternating order with the GEMM floor (and, on CUDA, each
  contender's peak memory).
- ``probe`` (probe_job.py): a largest-N search for one contender within a memory budget,
  in-process on CUDA. On CPU the orchestrator runs one ``memory`` job per step instead
  (largest_n_probe.py).

``python bench/worker.py '<json spec>'`` runs one job and prints one JSON line. The CPU
orchestrator forks instead (``run_forked`` in child_process.py): a fresh child of a process that
has imported torch and icon_kernels but never run an operator, which saves the ~2 s interpreter
start per job.
"""
from __future__ import annotations

import json
import os
import sys
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from failure_status import classify  # noqa: E402
from memory_job import memory_job  # noqa: E402
from probe_job import probe_job  # noqa: E402
from timing_job import timing_job  # noqa: E402

JOBS = {"memory": memory_job, "timing": timing_job, "probe": probe_job}


def run_job(spec):
    try:
        return JOBS[spec["job"]](spec)
    except Exception as exc:  # noqa: BLE001 - the parent reports it
        status, msg = classify(exc, spec.get("contender"))
        return {"ok": False, "status": status, "message": msg, "traceback": traceback.format_exc()[-2000:]}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    out = run_job(json.loads(argv[0]))
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
