"""Two real processes (gloo, CPU): the monitor under Lightning DDP, masks/monitor/guard under FSDP2.

Each test runs this file as a script (``python test_distributed.py ddp|fsdp OUT``): Lightning's
DDP launcher re-runs the script for rank 1, and the FSDP2 part spawns two workers. Every
rank writes what it saw to ``OUT/rank<r>.pt``; the tests compare the ranks with each other
and with one process over the same data.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sw_hooks.core.record import record, stats_from_state_dict, stats_to_state_dict
from sw_hooks.testing import planted_llama, planted_moe

SUPER = ("model.layers.1.mlp.down_proj", 5, 17)
DECOY = ("model.layers.3.mlp.down_proj", 9, 33)
ON_RANK_1 = ("model.layers.0.mlp.down_proj", 40, 3)  # rows 32..63 live on rank 1's shard
SEQUENCES = 8


def planted(kind: str = "dense"):
    return planted_moe("mixtral") if kind == "moe" else planted_llama()


def sequences(kind: str = "dense") -> torch.Tensor:
    fixture = planted(kind)
    return torch.cat([fixture.calibration_ids(32, seed=i) for i in range(SEQUENCES)])


def run_script(mode: str, out: Path) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [sys.executable, __file__, mode, str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


# -- Lightning DDP -----------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_monitor_reduces_maxima_like_one_process(tmp_path) -> None:
    ranks = run_script("ddp", tmp_path)
    assert ranks[0]["tracker"] == ranks[1]["tracker"]  # every rank reached the same verdicts
    found = [
        (e["kind"], e["module"], e["row"], e["col"], e["verdict"])
        for e in ranks[0]["tracker"]["events"]
    ]
    assert found == [
        ("found", "net." + SUPER[0], 5, 17, "super"),
        ("found", "net." + DECOY[0], 9, 33, "candidate"),
    ]
    # Rank zero measured both candidates once, on its first validation batch; rank one
    # measured nothing and holds the same impacts.
    assert [rank["measured"] for rank in ranks] == [[[SUPER[0], DECOY[0]]], []]
    assert ranks[0]["tracker"]["events"][0]["impact"] > 2.0
    planted = planted_llama()
    with record(planted.model, locations=True) as reference, torch.no_grad():
        for sequence in sequences():
            planted.model(sequence[None])
    for rank in ranks:
        reduced = stats_from_state_dict(rank["val_stats"])
        assert set(reduced) == {"net." + name for name in reference.stats}
        for name, expected in reference.stats.items():
            got = reduced["net." + name]
            assert got.calls == expected.calls == SEQUENCES
            for side in ("input", "output"):
                for field in ("abs_max", "value", "token"):  # batch index is per call
                    want = getattr(getattr(expected, side), field)
                    assert torch.equal(getattr(getattr(got, side), field), want), (name, field)
    assert ranks[0]["logged"] and not ranks[1]["logged"]  # rank zero logs alone


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_monitor_reduces_expert_maxima_and_routing_like_one_process(tmp_path) -> None:
    ranks = run_script("ddp-moe", tmp_path)
    assert ranks[0]["tracker"] == ranks[1]["tracker"]
    found = [
        (e["kind"], e["module"], e["expert"], e["row"], e["col"])
        for e in ranks[0]["tracker"]["events"]
    ]
    assert found == [("found", "net.model.layers.1.mlp.experts.down_proj", 3, 5, 17)]
    fixture = planted("moe")
    with record(fixture.model, locations=True) as reference, torch.no_grad():
        for sequence in sequences("moe"):
            fixture.model(sequence[None])
    for rank in ranks:
        reduced = stats_from_state_dict(rank["val_stats"])
        assert set(reduced) == {"net." + name for name in reference.expert_stats}
        for name, expected in reference.expert_stats.items():
            got = reduced["net." + name]
            assert torch.equal(got.tokens, expected.tokens), name  # routing counts summed
            for side in ("input", "output"):
                mine, theirs = getattr(got, side), getattr(expected, side)
                # The ranks run one thread, this process several: grouped matmuls may round
                # differently in the last bits; where each maximum happened may not.
                torch.testing.assert_close(mine.abs_max, theirs.abs_max, rtol=1e-5, atol=1e-7)
                torch.testing.assert_close(mine.value, theirs.value, rtol=1e-5, atol=1e-7)
                assert torch.equal(mine.token, theirs.token), (name, side)


def ddp_main(out: Path, kind: str = "dense") -> None:
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger
    from torch.utils.data import DataLoader

    from sw_hooks.training import verification
    from sw_hooks.training.lightning import SuperWeightMonitor

    measured: list[list[str]] = []
    real = verification.measure_impacts

    def counting(model, candidates, ids, settings):
        measured.append([c.module for c in candidates])
        return real(model, candidates, ids, settings)

    verification.measure_impacts = counting

    class CausalLM(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = planted(kind).model

        def training_step(self, batch, batch_idx):
            return self.net(input_ids=batch, labels=batch).loss

        def validation_step(self, batch, batch_idx):
            self.log("val_loss", self.net(input_ids=batch, labels=batch).loss, sync_dist=True)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=0.0)  # weights stay put

    monitor = SuperWeightMonitor(every_n_steps=1, record_locations=True)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=1,
        num_sanity_val_steps=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=CSVLogger(out, name="ddp"),
        callbacks=[monitor],
    )
    data = sequences(kind)
    trainer.fit(CausalLM(), DataLoader(data[:4], batch_size=1), DataLoader(data, batch_size=1))
    torch.save(
        {
            "tracker": monitor.tracker.state_dict(),
            "val_stats": stats_to_state_dict(monitor.last_stats),
            "logged": trainer.is_global_zero and any(out.glob("ddp/version_*/metrics.csv")),
            "measured": measured,
        },
        out / f"rank{trainer.global_rank}.pt",
    )


# -- FSDP2 -------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp2_masks_monitor_and_guard(tmp_path) -> None:
    ranks = run_script("fsdp", tmp_path)
    for rank in ranks:
        assert rank["weights_are_full_in_forward_hook"]
        assert rank["ablated_values"] == [0.0, 0.0, 0.0]
        assert rank["preserved_after_edit"]
        assert rank["bit_identical_after_masks"]
        assert rank["found"] == [SUPER, DECOY]
        assert rank["found_values"] == [8.0, 8.0]
        for mode in ("restore", "freeze"):
            assert rank[mode]["guarded_bit_identical"], mode
            assert rank[mode]["neighbours_moved"], mode
        assert rank["unguarded_moved"]
    assert ranks[0]["tracker"] == ranks[1]["tracker"]
    assert ranks[0]["reduced"].keys() == ranks[1]["reduced"].keys()
    assert all(
        torch.equal(ranks[0]["reduced"][k], ranks[1]["reduced"][k]) for k in ranks[0]["reduced"]
    )


def sharded_planted(rank: int):
    from torch.distributed.fsdp import fully_shard

    planted = planted_llama()
    for layer in planted.model.model.layers:
        fully_shard(layer)
    fully_shard(planted.model)
    return planted


def full_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.full_tensor().clone() for name, p in model.named_parameters()}


def fsdp_worker(rank: int, out: str) -> None:
    import torch.distributed as dist

    from sw_hooks.core.access import WeightElement
    from sw_hooks.core.masks import ablate, preserve
    from sw_hooks.training.metrics import ChannelMax
    from sw_hooks.training.monitor import SpikeTracker

    torch.manual_seed(0)
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=2)
    result: dict = {}
    planted = sharded_planted(rank)
    model, weights = planted.model, [SUPER, DECOY, ON_RANK_1]
    original = full_parameters(model)

    # masks: ablate, and preserve around an edit of the same weights (each rank its shard)
    with ablate(model, weights):
        result["ablated_values"] = [WeightElement.resolve(model, w).read_float() for w in weights]
        with preserve(model, weights):
            for w in weights:
                WeightElement.resolve(model, w).write(torch.tensor(123.0))
        down = model.model.layers[0].mlp.down_proj.weight.full_tensor()
        result["preserved_after_edit"] = float(down[40, 3]) == 0.0
    result["bit_identical_after_masks"] = all(
        torch.equal(original[n], t) for n, t in full_parameters(model).items()
    )

    # monitor: record (weights full inside the hook), reduce across ranks, decide
    seen_full = []
    hook = model.model.layers[1].mlp.down_proj.register_forward_hook(
        lambda m, a, o: seen_full.append(type(m.weight).__name__ != "DTensor")
    )
    metric, tracker = ChannelMax.for_model(model), SpikeTracker()
    with record(model) as rec, torch.no_grad():
        model(planted.calibration_ids(32, seed=rank))  # each rank its own data
    hook.remove()
    result["weights_are_full_in_forward_hook"] = bool(seen_full) and all(seen_full)
    metric.update(rec)
    reduced = metric.compute_stats()
    events = tracker.update(model, reduced, step=0)
    result["found"] = [(e.module, e.row, e.col) for e in events]
    result["found_values"] = [e.value for e in events]
    result["tracker"] = tracker.state_dict()
    result["reduced"] = stats_to_state_dict(reduced)

    # guard: three AdamW steps on the sharded model
    for mode, decay in (("restore", 0.01), ("freeze", 0.0)):
        result[mode] = guarded_training(sharded_planted(rank), weights, mode, decay)
    unguarded = sharded_planted(rank)
    before = full_parameters(unguarded.model)
    train_steps(unguarded, torch.optim.AdamW(unguarded.model.parameters(), lr=1e-2))
    after = full_parameters(unguarded.model)["model.layers.1.mlp.down_proj.weight"]
    result["unguarded_moved"] = bool(
        after[5, 17] != before["model.layers.1.mlp.down_proj.weight"][5, 17]
    )
    torch.save(result, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def guarded_training(planted, weights, mode: str, weight_decay: float) -> dict[str, bool]:
    from sw_hooks.training.guard import WeightGuard

    model = planted.model
    before = full_parameters(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=weight_decay)
    with WeightGuard(model, weights, mode).attach(optimizer):
        train_steps(planted, optimizer)
    after = full_parameters(model)
    same = [
        torch.equal(after[f"{m}.weight"][r, c], before[f"{m}.weight"][r, c]) for m, r, c in weights
    ]
    down = "model.layers.1.mlp.down_proj.weight"
    return {
        "guarded_bit_identical": all(same),
        "neighbours_moved": bool((after[down] != before[down]).float().mean() > 0.5),
    }


def train_steps(planted, optimizer, steps: int = 3) -> None:
    model = planted.model.train()
    for seed in range(steps):
        ids = planted.calibration_ids(32, seed)
        optimizer.zero_grad()
        model(ids, labels=ids).loss.backward()
        optimizer.step()


def fsdp_main(out: Path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(fsdp_worker, args=(str(out),), nprocs=2, join=True)


if __name__ == "__main__":
    mode, target = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    runs = {"ddp": ddp_main, "ddp-moe": lambda out: ddp_main(out, "moe"), "fsdp": fsdp_main}
    runs[mode](target)
