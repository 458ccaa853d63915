"""Without a GPU, prove that the Triton kernels compile for one: every kernel and code path is
lowered ahead of time to a Hopper (sm_90) cubin by Triton's real compiler, in a subprocess
without TRITON_INTERPRET (which would replace the kernels by the interpreter)."""
import importlib.util
import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "triton_aot_compile.py")
SHARED_LIMIT = 232448          # bytes of shared memory per block on sm_90


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
    # (triangular_variants(): 5 closed-form and 7 two-pass Labels variants and 9 closed-form
    # Affinity variants x forward and backward, the Labels LSE pass's forward, the Labels merge
    # kernel in 6 variants (closed form kl and cross_entropy, the LSE pass, the second pass of kl,
    # cross_entropy and an f-divergence); triangular_affinity_variants(): the Affinity LSE pass's
    # forward, 7 second-pass forwards (codes 0 with and without beta, 2..6) and 6 backwards (the
    # codes but 0 without beta, the closed form's), the Affinity merge in the same 6 variants as
    # the Labels one; the Affinity variants over every target kernel, T_KERNEL; triangular_target_variants():
    # symmetric_kernels.py's forward and backward for 4 Dense and 3 Neighbors variants, and Dense's LSE pass)
    assert len(compiled) == 131, proc.stdout
    assert sum("BIDIR=True" in line for line in compiled) == 2, proc.stdout
    assert sum("icon_symmetric_" in line for line in compiled) == 84, proc.stdout
    # symmetric_kernels.py's forward and backward for Labels (0), Neighbors (1) and Dense (3) targets
    targets = [line.split("TARGET=")[1][0] for line in compiled if "icon_symmetric_" in line
               and "_affinity_" not in line and "_merge_" not in line]
    assert (targets.count("0"), targets.count("1"), targets.count("3")) == (25, 6, 9), proc.stdout
    affinity = [line for line in compiled if "icon_symmetric_affinity_" in line]
    assert len(affinity) == 38, proc.stdout
    assert {line.split("T_KERNEL=")[1][0] for line in affinity if "_merge_" not in line} == set("01234")
    # the Affinity and the Labels triangular kernels: every pass, and the second pass and the
    # backward of every f-divergence code and of kl / cross_entropy at beta > 0 (code 0 with HAS_BETA)
    for kernels in (affinity, [line for line in compiled if "icon_symmetric_" in line and "_affinity_" not in line]):
        forward = [line for line in kernels if "_forward_" in line]
        backward = [line for line in kernels if "_backward_" in line]
        assert {line.split("PASS=")[1][0] for line in forward + [line for line in kernels if "_merge_" in line]} \
            == set("012")
        second = {line.split("DIVERGENCE=")[1][0] for line in forward if "PASS=2" in line}
        assert second == {line.split("DIVERGENCE=")[1][0] for line in backward if "HAS_BETA=True" in line
                          or "DIVERGENCE=0" not in line} == set("023456"), proc.stdout
        assert any("PASS=2" in line and "DIVERGENCE=0" in line and "HAS_BETA=True" in line for line in forward)
    assert {line.split("DIVERGENCE=")[1][0] for line in compiled} == set("-023456")
    # the triangular kernels, compiled at their launch's shape, fit in sm_90's shared memory, and
    # launchers' estimate (which decides triangular_fits) is above what each cubin needs
    fixed = [line for line in compiled if "icon_symmetric_" in line]
    print("\n".join(fixed))
    for line in fixed:
        shared = int(line.split(" shared=")[1].split()[0])
        estimate = int(line.split("(est ")[1].split(")")[0])
        assert shared <= SHARED_LIMIT and shared <= estimate, line
