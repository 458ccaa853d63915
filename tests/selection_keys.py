"""The GPU selection's Triton compile keys, recorded while its tests run in an ordinary session.

``bench/gpu_check.sh --plan`` counts the compiles of the GPU selection (tests/gpu_selection.py) by
running the selection under the interpreter with tests/compile_keys.py: about 150 s on the 2-core
VM. ``make test`` runs every one of those tests anyway, so tests/conftest.py records their keys
as they run (the recorder is on only during a selected test), and tests/test_gpu_check.py's plan
test, moved to the end of the session, hands them to the script instead of running the selection a
second time. A session that did not run the whole selection (``-k``, one file) is detected by the
count, and the plan test then lets the script run it.
"""
from __future__ import annotations

import os

import gpu_selection

PLAN_TEST = "test_gpu_check.py::test_plan_fits_the_budget_and_counts_tests_and_compiles"


class SelectionRecord:
    """The keys the selected tests launched, and which of them ran and which failed."""

    def __init__(self, recorder):
        self.recorder = recorder
        self.ran: set[str] = set()
        self.failed: set[str] = set()

    def start(self, nodeid: str) -> None:
        self.recorder.enabled = gpu_selection.selected(nodeid)

    def stop(self) -> None:
        self.recorder.enabled = False

    def report(self, report) -> None:
        if gpu_selection.selected(report.nodeid):
            self.ran.add(report.nodeid)
            if report.failed:
                self.failed.add(report.nodeid)

    def write(self, path: str) -> int:
        """The keys file ``bench/gpu_check.sh --plan KEYS.json`` reads; returns the tests counted."""
        self.recorder.write(path, 1 if self.failed else 0)
        return len(self.ran)


def start_recording():
    """A record with its launch hook installed (and off), or None where kernels are not
    interpreted: on a GPU the kernels compile for real and nothing is counted."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return None
    try:
        import compile_keys
    except Exception:                    # no usable Triton (any error, as backends/triton.py's
        return None                      # check): its tests skip, nothing to count
    recorder = compile_keys.Recorder().install()
    recorder.enabled = False
    return SelectionRecord(recorder)


def plan_test_last(items: list) -> None:
    """Moves the plan test behind every selected test it reads the keys of."""
    plan = [item for item in items if item.nodeid.endswith(PLAN_TEST)]
    items[:] = [item for item in items if item not in plan] + plan
