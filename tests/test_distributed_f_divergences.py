"""Ring mode of ik.distributed.icon_loss computes the f-divergences (DESIGN.md §1.1): gloo on
the CPU, worlds 2 and 3 with uneven shards; every divergence against every target type, the loss
and every gradient (x, y, the kernel parameter, Neighbors weights, Dense p, an Affinity target's
z, z_cols and parameter) equal to the single-process reference on the concatenated batch to 1e-9
in float64 (tests/distributed_f_worker.py). Workers are spawned with a deadline, so a hang fails
the test."""
import os
import sys
import time

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import distributed_f_worker  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
DEADLINE_S = 240


@pytest.mark.parametrize("world", [2, 3])
def test_ring_mode_f_divergences_match_single_process(tmp_path, world):
    ctx = mp.start_processes(distributed_f_worker.run, args=(world, str(tmp_path / "init"), str(tmp_path)),
                             nprocs=world, join=False, start_method="spawn")
    deadline = time.time() + DEADLINE_S
    try:
        while not ctx.join(timeout=2):
            if time.time() > deadline:
                for p in ctx.processes:
                    p.kill()
                pytest.fail(f"workers did not finish within {DEADLINE_S} s (hang?)")
    except mp.ProcessExitedException as exc:
        pytest.fail(f"a worker died: {exc}")
    n_cases = len(distributed_f_worker.DIVERGENCES) * len(distributed_f_worker.TARGETS)
    for rank in range(world):
        lines = (tmp_path / f"rank{rank}.txt").read_text().splitlines()
        assert len(lines) == n_cases, lines
        for divergence in distributed_f_worker.DIVERGENCES:
            assert sum(f" {divergence} " in line for line in lines) == len(distributed_f_worker.TARGETS), lines
        bad = [line for line in lines if not line.endswith(": ok")]
        assert not bad, f"rank {rank}: {bad}"
