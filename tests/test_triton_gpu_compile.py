"""Without a GPU, prove that the Triton kernels compile for one: every kernel and code path is
lowered ahead of time to a Hopper (sm_90) cubin by Triton's real compiler, in a subprocess
without TRITON_INTERPRET (which would replace the kernels by the interpreter)."""
import importlib.util
import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "triton_aot_compile.py")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, SCRIPT, "90"], capture_output=True, text=True,
                          timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    compiled = [line for line in proc.stdout.splitlines() if line.endswith(": ok")]
    # variants(): 6 kl variants x 5 kernels, 5 f-divergence variants x 3 (the second pass and the
    # two backward kernels; their first pass is kl's two-pass forward), the bidirectional
    # backward (BIDIR) of the Labels variant: 2 kernels, and self mode's triangular kernels
    # (triangular_variants(): 5 variants x forward and backward, the merge with kl and cross_entropy)
    assert len(compiled) == 59, proc.stdout
    assert sum("BIDIR=True" in line for line in compiled) == 2, proc.stdout
    assert sum("icon_symmetric_" in line for line in compiled) == 12, proc.stdout
    assert {line.split("DIVERGENCE=")[1][0] for line in compiled} == set("-023456")
