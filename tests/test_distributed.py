"""ik.distributed.icon_loss on gloo (CPU): world sizes 2 and 3 with uneven shards, every target
type, gather mode (torch and cpu backends) and ring mode; loss and local gradients equal the single-process reference on the
concatenated batch to 1e-9. Workers are spawned with a time limit, so a hang fails the test."""
import os
import sys
import time

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import distributed_worker  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")


@pytest.mark.parametrize("world", [2, 3])
def test_gather_and_ring_modes_match_single_process(tmp_path, world):
    ctx = mp.start_processes(distributed_worker.run, args=(world, str(tmp_path / "init"), str(tmp_path)),
                             nprocs=world, join=False, start_method="spawn")
    deadline = time.time() + 300
    try:
        while not ctx.join(timeout=5):
            if time.time() > deadline:
                for p in ctx.processes:
                    p.kill()
                pytest.fail("distributed workers did not finish within 300 s (hang?)")
    except mp.ProcessExitedException as exc:
        traces = {r: (tmp_path / f"trace{r}.txt").read_text() for r in range(world)
                  if (tmp_path / f"trace{r}.txt").exists()}
        pytest.fail(f"{exc}; progress per rank: {traces}")
    for rank in range(world):
        lines = (tmp_path / f"rank{rank}.txt").read_text().splitlines()
        assert len(lines) >= 40, lines
        assert sum(line.startswith("ring auto ") for line in lines) == 16, lines
        assert sum(line.startswith("ring auto block_rows=1 ") for line in lines) == 8, lines
        assert sum(line.startswith("ring torch ") for line in lines) == 8, lines
        assert sum("ring_block_rows" in line for line in lines) == 6, lines
        assert sum(" on rank 1 check: " in line for line in lines) == 5, lines
        assert sum(line.endswith(("empty shard on rank 0 check: ok", "target type differs check: ok"))
                   for line in lines) == 4, lines
        bad = [line for line in lines if not line.endswith("ok")]
        assert not bad, f"rank {rank}: {bad}"


def test_without_an_initialised_group_raises_naming_process_group():
    import torch
    import icon_kernels as ik
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(ValueError, match="process_group"):
        ik.distributed.icon_loss(torch.randn(4, 3), target=ik.Labels(torch.arange(4) // 2))
