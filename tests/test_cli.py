"""The recipe CLI and the run folder: one-line errors, `list`, the files a run writes, exact resume."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from stackelberg import cli, runner


@pytest.mark.parametrize("args, names", [
    (["run", "quadratic/none", "estimator.bogus=1"], "estimator.bogus"),
    (["run", "quadratic/none", "rounds=many"], "rounds"),
    (["run", "no/such/recipe.yaml"], "no/such/recipe.yaml"),
], ids=["unknown-key", "wrong-type", "missing-file"])
def test_user_errors_are_one_line_naming_the_culprit(args, names, tmp_path):
    result = run_cli(*args, f"output_dir={tmp_path / 'run'}")
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert names in lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()  # nothing is started for a bad command


def test_game_key_errors_name_the_game_key():
    from stackelberg.recipes import UserError, load_recipe

    with pytest.raises(UserError, match="game.nosuch"):
        load_recipe("quadratic/none", ["game.nosuch=3"])
    with pytest.raises(UserError, match="game.samples"):
        load_recipe("quadratic/none", ["game.samples=lots"])


def test_list_shows_quadratic_recipes(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("quadratic/implicit-cg", "quadratic/implicit-neumann", "quadratic/none", "quadratic/unrolled",
                 "quadratic/noisy"):
        assert name in out
    line = next(line for line in out.splitlines() if line.startswith("quadratic/implicit-cg "))
    assert "closed-form" in line  # each recipe is shown with its description


def test_run_writes_the_run_folder(tmp_path):
    out = tmp_path / "run"
    summary = runner.run("quadratic/noisy", ["rounds=6", "trainer.rounds_per_epoch=3", "seed=7",
                                             f"output_dir={out}"], quiet=True)
    config = (out / "config.yaml").read_text()
    assert "noise: 0.3" in config and "rounds: 6" in config
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all("steering/norm" in r and "leader/objective" in r for r in rows)
    saved = json.loads((out / "summary.json").read_text())
    assert saved["seed"] == 7 and saved["rounds"] == 6 and saved["wall_time_s"] > 0
    assert "leader/objective" in saved["final"] and "leader/objective" in saved["best"]
    assert {"torch", "lightning", "python", "stackelberg"} <= set(saved["versions"])
    assert saved == summary
    assert list(out.glob("events.out.tfevents.*"))
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert list(out.glob("*.png"))


def _final_state(run_dir: Path) -> dict:
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    return checkpoint


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    """40 rounds in one go == 20 rounds, then `resume RUN rounds=40` (noisy actions: the RNG must resume too)."""
    common = ["trainer.rounds_per_epoch=20", "seed=3"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    runner.run("quadratic/noisy", [*common, "rounds=40", f"output_dir={straight}"], quiet=True)
    runner.run("quadratic/noisy", [*common, "rounds=20", f"output_dir={split}"], quiet=True)
    halfway = _final_state(split)
    assert halfway["stackelberg"]["round"] == 20
    assert halfway["stackelberg"]["estimator"]["previous"] is not None  # the CG warm start is checkpointed
    runner.resume(str(split), ["rounds=40"], quiet=True)

    a, b = _final_state(straight), _final_state(split)
    assert a["stackelberg"]["round"] == b["stackelberg"]["round"] == 40
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    assert torch.equal(a["stackelberg"]["rng_state"], b["stackelberg"]["rng_state"])
    for key in ("previous", "older"):  # the CG warm start
        assert torch.equal(a["stackelberg"]["estimator"][key], b["stackelberg"]["estimator"][key]), key
    assert (straight / "metrics.jsonl").read_text() == (split / "metrics.jsonl").read_text()
    # the leader actually moved, so the comparison is not between two untouched games
    start = runner.build_game(runner.load_recipe("quadratic/noisy", ["seed=3"]))
    assert not torch.equal(start.leader.value, a["state_dict"]["leader.value"])


def test_an_estimator_of_ones_own_reads_its_keys_from_estimator_options(tmp_path, monkeypatch, capsys):
    from stackelberg import NoSteering
    from stackelberg.hypergrad import REGISTRY

    seen = {}

    def build(config):
        unknown = set(config.options) - {"scale"}
        if unknown:
            raise ValueError(f"estimator.options: 'mine' has no key(s) {sorted(unknown)}")
        seen["scale"] = config.options["scale"]
        return NoSteering()

    monkeypatch.setitem(REGISTRY, "mine", build)  # removed after the test
    runner.run("quadratic/none", ["estimator.name=mine", "estimator.options.scale=2.5", "rounds=2",
                                  f"output_dir={tmp_path / 'a'}"], quiet=True)
    assert seen["scale"] == 2.5
    assert "scale: 2.5" in (tmp_path / "a" / "config.yaml").read_text()  # kept with the run
    # the factory's check reaches the command line as one line, and nothing is started
    capsys.readouterr()
    assert cli.main(["run", "quadratic/none", "estimator.name=mine", "estimator.options.scal=2",
                     f"output_dir={tmp_path / 'b'}"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "'scal'" in err[0]
    assert not (tmp_path / "b").exists()
    # and the failed command leaves nothing behind: the next run in this process writes where it is told
    runner.run("quadratic/none", ["rounds=1", f"output_dir={tmp_path / 'c'}"], quiet=True)
    assert (tmp_path / "c" / "summary.json").is_file()


def test_seed_statistics_exact():
    from stackelberg.callbacks import seed_statistics

    summaries = [{"seed": s, "final": {"u": u, "gone": float("nan")}, "best": {"u": {"value": u + 1, "round": 3}}}
                 for s, u in zip([0, 1, 2, 3], [1.0, 2.0, 3.0, 6.0])]
    stats = seed_statistics(summaries)
    assert stats["seeds"] == [0, 1, 2, 3] and "gone" not in stats["final"]
    u = stats["final"]["u"]
    sd = (14 / 3) ** 0.5  # squared deviations 4 + 1 + 0 + 9, over n - 1
    assert u["mean"] == 3.0 and u["min"] == 1.0 and u["max"] == 6.0 and u["n"] == 4
    assert abs(u["sd"] - sd) < 1e-12 and abs(u["se"] - sd / 2) < 1e-12
    assert stats["best"]["u"]["mean"] == 4.0


def test_figures_writes_statistics_over_seeds(tmp_path, capsys):
    dirs = [tmp_path / f"seed_{s}" for s in (1, 2)]
    finals = [runner.run("quadratic/noisy", ["rounds=3", f"seed={s}", f"output_dir={d}"], quiet=True)["final"]
              for s, d in zip((1, 2), dirs)]
    capsys.readouterr()
    cli.figures(dirs, tmp_path / "figures")
    table = json.loads((tmp_path / "figures" / "comparison.json").read_text())
    assert set(table["runs"]) == {str(d) for d in dirs}
    stats = table["variants"]["quadratic/noisy"]
    assert stats["seeds"] == [1, 2]
    key = "leader/objective"
    assert finals[0][key] != finals[1][key]
    assert abs(stats["final"][key]["mean"] - (finals[0][key] + finals[1][key]) / 2) < 1e-12
    assert "quadratic/noisy  n=2" in capsys.readouterr().out
