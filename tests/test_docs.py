"""The docs cannot rot: the tutorial's code runs as written, and the recipe reference matches the configs.

    pytest tests/test_docs.py
"""
from __future__ import annotations

import importlib
import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "docs"))

import make_reference  # noqa: E402

from stackelberg import EstimatorConfig, PlayerConfig, build_estimator  # noqa: E402


def tutorial_code() -> str:
    """The ```python blocks of docs/tutorial.md, in order (what the tutorial's awk line extracts)."""
    text = (REPO / "docs" / "tutorial.md").read_text()
    return "".join(re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M))


@pytest.fixture
def tutorial_module(tmp_path, monkeypatch):
    """docs/tutorial.md's game, written to tmp_path/tutorial_game.py and imported from there."""
    (tmp_path / "tutorial_game.py").write_text(tutorial_code())
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("tutorial_game", None)
    yield importlib.import_module("tutorial_game")
    sys.modules.pop("tutorial_game", None)


def test_every_config_key_has_help_and_every_game_imports():
    _, problems = make_reference.render()
    assert problems == []


def test_recipe_reference_is_up_to_date():
    text, _ = make_reference.render()
    current = (REPO / "docs" / "recipes.md").read_text()
    assert current == text, "docs/recipes.md is out of date: run `python docs/make_reference.py`"


def test_reference_flags_an_undocumented_key():
    from dataclasses import dataclass, field

    @dataclass
    class Inner:
        hidden: int = 3

    @dataclass
    class Config:
        documented: int = field(default=1, metadata={"help": "yes"})
        silent: int = 2
        section: Inner = field(default_factory=Inner, metadata={"help": "a nested section"})

    problems: list = []
    lines = make_reference.rows(Config, "game.", problems, "example")
    assert problems == ["example: key game.silent has no help text",
                        "example: key game.section.hidden has no help text"]
    assert sum("**undocumented**" in line for line in lines) == 2


def test_tutorial_is_at_most_80_lines():
    assert len(tutorial_code().strip().splitlines()) <= 80


def test_tutorial_game_plays_and_steering_helps(tutorial_module):
    results = {}
    for name in ("none", "implicit-cg"):
        torch.manual_seed(0)
        game = tutorial_module.Game(estimator=build_estimator(EstimatorConfig(name=name)),
                                    leader_config=PlayerConfig(lr=0.05),
                                    follower_config=PlayerConfig(lr=0.05, steps=10))
        before = [p.detach().clone() for p in game.parameters()]
        history = game.play(40)
        assert all(math.isfinite(v) for row in history for v in row.values())
        assert all(not torch.equal(b, p.detach()) for b, p in zip(before, game.parameters()))  # both players moved
        results[name] = history[-1]["student/error"]
    assert results["implicit-cg"] < 0.7 * results["none"]


def test_tutorial_game_runs_with_stackelberg_run(tutorial_module, tmp_path):
    from stackelberg.cli import main

    out = tmp_path / "run"
    assert main(["run", "tutorial/teaching", "rounds=5", f"output_dir={out}", "trainer.progress_bar=false"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 5 and math.isfinite(summary["final"]["student/error"])
    assert "tutorial_game:Game" in (out / "config.yaml").read_text()


def test_reference_reports_a_game_that_fails_to_import(tmp_path, monkeypatch):
    import games

    (tmp_path / "broken_game.py").write_text("raise ImportError('needs a package that is not installed')\n")
    monkeypatch.setattr(games, "__path__", [*games.__path__, str(tmp_path)])
    found, errors = make_reference.discover_games()
    sys.modules.pop("games.broken_game", None)
    assert errors == ["games.broken_game: cannot import (ImportError: needs a package that is not installed)"]
    assert "hpo" in dict(found)  # the other games are still listed
