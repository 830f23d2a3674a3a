"""Two CPU processes under Lightning's DDP end with identical leader and follower parameters.

`stackelberg run ... trainer.strategy=ddp trainer.devices=2 trainer.accelerator=cpu` starts rank 0; Lightning
re-executes the same command for rank 1. Each rank's game (`DumpingGame` below, named in the run's overrides as
`test_ddp:DumpingGame`) writes its final parameters and its first local batch to $STACKELBERG_TEST_DUMP, so the
test can compare the two processes without any change to the framework.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from games.quadratic import QuadraticGame

HERE = Path(__file__).resolve().parent
DUMP_ENV = "STACKELBERG_TEST_DUMP"


class DumpingGame(QuadraticGame):
    """The quadratic game, plus a dump of this process's final parameters and first batch."""

    def leader_batch(self):
        batch = super().leader_batch()
        if not hasattr(self, "_first_actions"):
            self._first_actions = batch["y"].detach().clone()
        return batch

    def on_train_end(self) -> None:
        folder = os.environ.get(DUMP_ENV)
        if folder:
            torch.save({"leader": self.leader.value.detach().clone(),
                        "follower": self.follower.value.detach().clone(),
                        "first_actions": self._first_actions, "round": self.round,
                        "world_size": self.trainer.world_size},
                       Path(folder) / f"rank{self.global_rank}.pt")


@pytest.mark.parametrize("recipe, extra", [("quadratic/noisy", []),
                                           ("quadratic/score-function", ["estimator.mixed_precision=true"])])
def test_ddp_two_processes_end_identical(recipe, extra, tmp_path):
    """Pathwise (noisy actions) and score-function (sampled actions, per-sample steering rewards) under DDP; the
    second with CG's products in float32, each reduced across the processes as the float64 ones are."""
    from conftest import REPO, run_cli

    dump = tmp_path / "dump"
    dump.mkdir()
    env = {DUMP_ENV: str(dump), "PYTHONPATH": os.pathsep.join([str(HERE), str(REPO),
                                                                os.environ.get("PYTHONPATH", "")])}
    result = run_cli("run", recipe, "game.name=test_ddp:DumpingGame", "rounds=12",
                     "trainer.rounds_per_epoch=6", "trainer.strategy=ddp", "trainer.devices=2",
                     "trainer.accelerator=cpu", "trainer.progress_bar=false", f"output_dir={tmp_path / 'run'}",
                     *extra, env=env, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(dump / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert all(r["world_size"] == 2 and r["round"] == 12 for r in ranks)
    # both processes really ran on their own samples ...
    assert not torch.equal(ranks[0]["first_actions"], ranks[1]["first_actions"])
    # ... and ended bit-identical, having moved from the start
    assert torch.equal(ranks[0]["leader"], ranks[1]["leader"])
    assert torch.equal(ranks[0]["follower"], ranks[1]["follower"])
    assert ranks[0]["leader"].abs().sum() > 0
    assert (tmp_path / "run" / "summary.json").is_file()
    if extra:  # the solves did run in float32 (logged per round by rank 0)
        import json

        rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
        assert all(row["solver/float32_products"] > 0 for row in rows)
