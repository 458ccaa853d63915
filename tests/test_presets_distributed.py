"""Every preset with distributed=True (gloo, world size 2, uneven shards, gather and ring modes)
equals the same preset in one process on the whole batch: loss and gradients
(tests/preset_distributed_worker.py)."""
import os
import sys
import time

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import preset_distributed_worker  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")


def test_distributed_presets_match_single_process(tmp_path):
    world = 2
    ctx = mp.start_processes(preset_distributed_worker.run,
                             args=(world, str(tmp_path / "init"), str(tmp_path), "torch"),
                             nprocs=world, join=False, start_method="spawn")
    deadline = time.time() + 240
    while not ctx.join(timeout=5):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("preset workers did not finish within 240 s (hang?)")
    for rank in range(world):
        lines = (tmp_path / f"rank{rank}.txt").read_text().splitlines()
        for mode in ("gather", "ring"):
            assert len([line for line in lines if f" {mode} " in line]) == 12, lines
        bad = [line for line in lines if not line.endswith("ok")]
        assert not bad, f"rank {rank}: {bad}"
