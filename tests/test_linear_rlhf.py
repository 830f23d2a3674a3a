"""The linear environment (games/linear_rlhf.py): exact first rounds, then the paper's figures at 300 rounds.

Run:  pytest tests/test_linear_rlhf.py -q
"""
import math

import numpy as np
import pytest
import torch

from stackelberg.recipes import list_recipes, load_recipe
from stackelberg.runner import build_game


def game_of(recipe, *overrides):
    return build_game(load_recipe(recipe, list(overrides)))


@pytest.fixture(scope="module")
def full_runs():
    """The three variants of the paper, 300 rounds each on the paper's seed (about a second each)."""
    return {v: game_of(f"linear/{v}").play(300) for v in ("rlhf", "fpo-practical", "fpo-relaxed")}


def test_initial_rm_is_the_reference_draw():
    game = game_of("linear/rlhf", "seed=7")  # the RM's init noise does not follow the run seed
    noise = np.random.RandomState(0).normal(0.0, 0.1, 50)
    expected = np.zeros(50)
    expected[:3] = 1.0
    np.testing.assert_allclose(game.follower.value.detach().numpy(), expected + noise, rtol=0, atol=1e-15)
    assert torch.equal(game.leader.value.detach(), torch.zeros(50, dtype=torch.float64))


def test_first_round_is_the_papers_update():
    game = game_of("linear/rlhf")
    w0 = game.follower.value.detach().clone()
    game.play(1)
    y1 = 0.02 * w0  # y0 = 0: the ascent direction of w . y - 0.1 ||y||^2 is w0
    assert torch.allclose(game.leader.value.detach(), y1, atol=1e-15)
    u = 10 * math.exp(-0.3 * float(((y1 - game.ideal) ** 2).sum()))
    # one SGD step on (u - w . y)^2 at the new action, with w <- w (1 - 1e-4) through weight decay
    w1 = w0 * (1 - 0.005 * 0.02) + 0.005 * 2 * (u - float(w0 @ y1)) * y1
    assert torch.allclose(game.follower.value.detach(), w1, atol=1e-15)


@pytest.mark.parametrize("variant", ["practical", "relaxed"])
def test_fpo_gradient_is_the_papers_penalty(variant):
    game = game_of(f"linear/fpo-{variant}")
    game.play(40)
    y = game.leader.value.detach().clone().requires_grad_(True)
    w = game.follower.value.detach()
    u = game.utility(y)
    penalty = 0.1 * ((w @ y - u) if variant == "relaxed" else 1.0) * (y ** 2).sum()
    objective = w @ y - penalty - 0.1 * (y ** 2).sum()
    (expected,) = torch.autograd.grad(objective, y)
    g_plain, g_steer, _ = game.leader_gradients(game.label(game.leader_batch()))
    assert torch.allclose(g_plain + g_steer, expected, rtol=1e-12, atol=1e-12)


def test_rlhf_collapses(full_runs):
    h = full_runs["rlhf"]
    utility = [r["true/utility"] for r in h]
    peak = int(np.argmax(utility))
    assert abs(utility[-1] - 3.93) <= 0.3
    assert abs(max(utility) - 5.97) <= 0.1 and 80 <= peak + 1 <= 120  # peaks near round 100, then falls
    assert h[-1]["noise/magnitude"] >= 1.4
    assert abs(h[-1]["signal/magnitude"] - 4.06) <= 0.1


def test_fpo_practical_final_utility(full_runs):
    h = full_runs["fpo-practical"]
    assert abs(h[-1]["true/utility"] - 5.53) <= 0.3
    assert abs(h[-1]["noise/magnitude"] - 1.39) <= 0.1


def test_fpo_relaxed_reaches_the_ideal(full_runs):
    h = full_runs["fpo-relaxed"]
    assert h[-1]["true/utility"] >= 9.5
    assert h[-1]["noise/magnitude"] <= 0.3
    assert abs(h[-1]["signal/magnitude"] - 3.3) <= 0.1


def test_implicit_cg_holds():
    h = game_of("linear/implicit-cg").play(300)
    assert h[-1]["true/utility"] >= 9.5 and h[-1]["noise/magnitude"] <= 0.3
    assert max(r["solver/failed"] for r in h) == 0.0


def test_recipes_load_and_share_the_environment():
    names = [n for n, _ in list_recipes() if n.startswith("linear/")]
    assert {"linear/rlhf", "linear/fpo-practical", "linear/fpo-relaxed", "linear/unrolled",
            "linear/implicit-cg", "linear/implicit-neumann"} <= set(names)
    for name in names:
        cfg = load_recipe(name).config
        assert cfg.rounds == 300 and cfg.leader.lr == 0.02 and cfg.follower.lr == 0.005
        assert math.isclose(cfg.follower.lr * cfg.follower.weight_decay, 1e-4)


def test_comparison_figures(full_runs):
    import matplotlib.pyplot as plt

    from games.linear_rlhf import LinearRLHF

    groups = {}
    for variant, rows in full_runs.items():
        history = {k: [r[k] for r in rows] for k in ("true/utility", "noise/magnitude", "signal/magnitude")}
        history["round"] = list(range(1, len(rows) + 1))
        groups[f"linear/{variant}"] = [history]
    figures = LinearRLHF.comparison_figures(groups)
    assert set(figures) == {"phase", "noise_magnitude", "true_utility"}
    phase = figures["phase"].axes[0]
    assert len([line for line in phase.lines if line.get_label().startswith("linear/")]) == 3
    for fig in figures.values():
        plt.close(fig)
