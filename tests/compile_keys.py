"""The Triton compile keys a run triggers, recorded under the interpreter (no GPU needed).

On a GPU every distinct (kernel, constexprs, argument dtypes, integer and pointer specialisation)
is one cold JIT compile of several seconds. ``bench/gpu_check.sh`` has a fixed time budget, so the
GPU test selection's compile work is counted here on the CPU: a hook on the interpreted kernels'
launch records what each launch would compile, while the interpreter runs the kernels as usual.

    python tests/compile_keys.py OUT.json [pytest args...]   # run pytest, write the distinct keys

``bench/gpu_check.sh --plan`` runs it on the GPU selection (tests/gpu_selection.py), and
tests/test_triton_resources.py compiles the benchmark's keys ahead of time for sm_90.
"""
from __future__ import annotations

import inspect
import json
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch                                                       # noqa: E402
from triton.runtime.interpreter import InterpretedFunction         # noqa: E402
import triton.language as tl                                       # noqa: E402

_CONFIG_META = {"BLOCK_M", "BLOCK_N"}            # the tile shape: one per key on the GPU
# the interpreter upcasts bf16 at load; a GPU keeps it native (launchers._upcast)
_NATIVE = {torch.float16, torch.bfloat16}


def _python_function(fn):
    while not inspect.isfunction(fn):
        fn = fn.fn
    return fn


def _constexpr_names(fn) -> set:
    params = inspect.signature(_python_function(fn)).parameters
    return {name for name, p in params.items() if p.annotation is tl.constexpr}


def launch_key(fn, kwargs: dict) -> dict:
    """What a GPU compiles for one launch: Triton specialises integers equal to 1 and multiples
    of 16, and pointers aligned to 16 bytes; floats are not specialised."""
    names = inspect.signature(_python_function(fn)).parameters
    constexprs = _constexpr_names(fn)
    key = {"kernel": _python_function(fn).__name__, "constexprs": {}, "tensors": {}, "ints": {}}
    for name in names:
        if name not in kwargs or name in _CONFIG_META:
            continue
        value = kwargs[name]
        if name in constexprs:
            key["constexprs"][name] = value
        elif isinstance(value, torch.Tensor):
            key["tensors"][name] = [str(value.dtype).replace("torch.", ""), value.data_ptr() % 16 == 0]
        elif isinstance(value, bool) or not isinstance(value, int):
            continue
        else:
            key["ints"][name] = [value == 1, value % 16 == 0]
    dtypes = {name: t[0] for name, t in key["tensors"].items()}
    for flag, tensor in (("UPCAST", "X"), ("UPCAST_Z", "Z")):      # as the GPU would set them
        if flag in key["constexprs"] and tensor in dtypes:
            key["constexprs"][flag] = getattr(torch, dtypes[tensor]) not in _NATIVE
    return key


class Recorder:
    """Records the launch key of every kernel launch while installed (under the interpreter)."""

    def __init__(self):
        self.keys: dict[str, dict] = {}
        self.enabled = True             # tests/conftest.py records only the GPU selection's tests
        self._run = None

    def install(self):
        self._run = InterpretedFunction.run
        recorder = self

        def run(kernel, *args, **kwargs):
            if recorder.enabled:
                key = launch_key(kernel, kwargs)
                recorder.keys.setdefault(json.dumps(key, sort_keys=True), key)
            return recorder._run(kernel, *args, **kwargs)

        InterpretedFunction.run = run
        return self

    def uninstall(self):
        InterpretedFunction.run = self._run

    def distinct(self) -> list[dict]:
        return [self.keys[k] for k in sorted(self.keys)]

    def write(self, out: str, pytest_exit: int) -> int:
        """Writes ``{"pytest_exit", "keys"}`` (what ``gpu_selection.budget_line`` reads)."""
        keys = self.distinct()
        with open(out, "w") as f:
            json.dump({"pytest_exit": int(pytest_exit), "keys": keys}, f, indent=1)
        return len(keys)


def main(argv):
    import pytest

    out, pytest_args = argv[0], argv[1:]
    recorder = Recorder().install()
    try:
        code = pytest.main(pytest_args)
    finally:
        recorder.uninstall()
    count = recorder.write(out, int(code))
    print(f"compile_keys: {count} distinct Triton compile keys, pytest exit {int(code)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
