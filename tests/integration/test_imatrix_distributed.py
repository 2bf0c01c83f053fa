"""The importance matrix across two real processes (gloo, CPU): the cross-rank sum.

The test runs this file as a script (``python test_imatrix_distributed.py OUT``), which
spawns two workers. Each records its half of the sequences, sums the state across ranks
with :meth:`ImportanceMatrix.all_reduce` and writes it to ``OUT/rank<r>.pt``; the test
compares both with one process that recorded every sequence.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sw_hooks.export.imatrix import ImportanceMatrix
from sw_hooks.testing import planted_llama

SEQUENCES = 8
SUPER = "model.layers.1.mlp.down_proj"


def sequences() -> torch.Tensor:
    planted = planted_llama()
    return torch.cat([planted.calibration_ids(32, seed=i) for i in range(SEQUENCES)])


def recorded(model: torch.nn.Module, batch: torch.Tensor) -> ImportanceMatrix:
    with ImportanceMatrix(model) as imatrix, torch.no_grad():
        for sequence in batch:
            model(sequence[None])
    return imatrix


@pytest.mark.slow
@pytest.mark.distributed
def test_cross_rank_sum_equals_one_process(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [sys.executable, __file__, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    model, batch = planted_llama().model, sequences()
    one_process = recorded(model, batch).state_dict()
    # The same two halves summed in one process: the same additions, so equal to the bit.
    halves = recorded(model, batch[0::2])
    halves.merge(recorded(model, batch[1::2]))
    for rank in ranks:
        assert set(rank) == set(one_process)
        for key, expected in halves.state_dict().items():
            assert torch.equal(rank[key], expected), key
        for key, expected in one_process.items():
            torch.testing.assert_close(rank[key], expected, rtol=1e-12, atol=0)
        assert int(rank[f"{SUPER}.counts"]) == SEQUENCES * 32


def worker(rank: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=2)
    try:
        imatrix = recorded(planted_llama().model, sequences()[rank::2])
        imatrix.all_reduce()
        torch.save(imatrix.state_dict(), Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    import torch.multiprocessing as mp

    torch.set_num_threads(1)
    mp.spawn(worker, args=(sys.argv[1],), nprocs=2, join=True)
