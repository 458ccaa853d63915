import os

import torch

# The Triton kernels run on CPU tensors through the interpreter when there is no GPU. This must
# be set before icon_kernels (and so the kernels) is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

import gpu_selection
import selection_keys
from icon_kernels.backends import blockwise as torch_backend

_selection_record = None       # selection_keys.SelectionRecord of this session, or None


def pytest_report_header(config):
    """Say once why the Triton tests skip, e.g. an interpreter that breaks with this numpy."""
    import icon_kernels as ik

    why = ik.available_backends(with_reasons=True)["triton"]
    return [f"icon_kernels: triton backend unavailable: {why}"] if why else []


def pytest_configure(config):
    global _selection_record
    _selection_record = selection_keys.start_recording()


def pytest_unconfigure(config):
    if _selection_record is not None:
        _selection_record.recorder.uninstall()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """The GPU selection's compile keys are recorded while its tests run (selection_keys.py)."""
    record = _selection_record
    if record is not None:
        record.start(item.nodeid)
    try:
        yield
    finally:
        if record is not None:
            record.stop()


def pytest_runtest_logreport(report):
    if _selection_record is not None:
        _selection_record.report(report)


@pytest.fixture
def selection_record(request):
    """What this session recorded of the GPU selection (selection_keys.SelectionRecord), or None."""
    return _selection_record


def pytest_collection_modifyitems(config, items):
    """The plan test of bench/gpu_check.sh runs last (selection_keys.py). And
    ICON_KERNELS_GPU_SELECTION=1: keep only the GPU selection (bench/gpu_check.sh)."""
    selection_keys.plan_test_last(items)
    if os.environ.get(gpu_selection.ENV) != "1":
        return
    keep = [item for item in items if gpu_selection.selected(item.nodeid)]
    config.hook.pytest_deselected(items=[item for item in items if item not in keep])
    items[:] = keep


@pytest.fixture
def small_chunks(monkeypatch):
    """Forces the torch backend into many ragged row chunks on tiny problems."""
    monkeypatch.setattr(torch_backend, "CHUNK_ELEMENTS", 150)


@pytest.fixture
def backend(request, monkeypatch):
    """The backend named by indirect parametrisation (``parametrize("backend", [...],
    indirect=True)``), skipped with ``ik.available_backends``' reason where it is unusable. The
    torch backend runs in many ragged row chunks (as ``small_chunks``). A test that parametrises
    ``backend`` directly gets the plain name instead."""
    import icon_kernels as ik

    name = request.param
    why = ik.available_backends(with_reasons=True)[name]
    if why is not None:
        pytest.skip(f"{name} backend unavailable: {why}")
    if name == "torch":
        monkeypatch.setattr(torch_backend, "CHUNK_ELEMENTS", 150)
    return name
