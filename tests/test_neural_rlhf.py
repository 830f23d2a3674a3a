"""The neural-network environment (games/neural_rlhf.py): its mechanics, exactly; a short run of each variant.

Run:  pytest tests/test_neural_rlhf.py -q
"""
import math

import pytest
import torch

from stackelberg.game import detach_batch, power_schedule
from stackelberg.hypergrad import linalg
from stackelberg.hypergrad.base import SteeringProblem
from stackelberg.recipes import load_recipe
from stackelberg.runner import build_game


def game_of(recipe, *overrides):
    return build_game(load_recipe(recipe, list(overrides)))


def test_reward_model_init_and_direct_forward():
    game = game_of("neural/rlhf")
    linears = [m for m in game.follower if isinstance(m, torch.nn.Linear)]
    assert [tuple(m.weight.shape) for m in linears] == [(32, 10), (32, 32), (1, 32)]
    assert all(torch.count_nonzero(m.bias) == 0 for m in linears)
    weights = torch.cat([m.weight.detach().reshape(-1) for m in linears])
    assert abs(weights.std().item() - 0.1) < 0.01 and abs(weights.mean().item()) < 0.01
    phi = game.follower_flat().detach()
    y = torch.randn(7, 10)
    assert torch.allclose(game.reward(phi, y), game.follower_call(phi, y).squeeze(-1), atol=1e-6)


def test_sigma_and_leader_lr_follow_the_power_schedule():
    game = game_of("neural/rlhf", "rounds=8")
    assert game.sigma() == pytest.approx(0.1)
    lrs, sigmas = [], []
    for _ in range(8):
        lrs.append(game.leader_optimizer.param_groups[0]["lr"])
        sigmas.append(game.sigma())
        game.play(1)
    for t in range(8):
        assert lrs[t] == pytest.approx(0.001 + 0.049 * (1 - (t / 8) ** 4))
        assert sigmas[t] == pytest.approx(0.001 + 0.099 * (1 - (t / 8) ** 4))
    assert game.sigma() == pytest.approx(0.001)  # t = T
    assert power_schedule(0.1, 0.001, 4, 4, 8) == pytest.approx(0.001 + 0.099 * (1 - 0.5 ** 4))


def test_buffer_is_a_fifo_of_the_last_50_labelled_samples():
    game = game_of("neural/rlhf")
    seen = []
    for k in range(1, 14):
        batch = game.follower_batch()
        seen.append(batch["y"][-5:].clone())
        assert batch["y"].shape == (min(5 * k, 50), 10)
        assert torch.allclose(batch["u"], game.utility(batch["y"]))
    assert torch.equal(game.buffer_y, torch.cat(seen)[-50:])  # oldest out first
    state = game.extra_state()
    other = game_of("neural/rlhf")
    other.load_extra_state(state)
    assert torch.equal(other.buffer_y, game.buffer_y) and torch.equal(other.buffer_u, game.buffer_u)


@pytest.mark.parametrize("variant", ["practical", "relaxed"])
def test_fpo_penalty_is_differentiated_through(variant):
    game = game_of(f"neural/fpo-{variant}")
    game.play(2)
    torch.manual_seed(3)
    batch = game.label(game.leader_batch())
    phi = game.follower_flat().detach()
    # the paper's penalty with create_graph, written out
    p = phi.clone().requires_grad_(True)
    r = game.reward(p, batch["y"])
    (g,) = torch.autograd.grad(r.sum(), p, create_graph=True)
    error = (r - batch["u"]) if variant == "relaxed" else 1.0
    expected = 0.005 * error * (g ** 2).sum()
    (expected_grad,) = torch.autograd.grad(expected.sum(), game.leader_parameters, retain_graph=True)
    # the estimator's, through the game's fast per-sample gradients, and through the generic Jacobian
    game._step_cache = {}
    steering = game.estimator.steer(SteeringProblem(game, batch, detach_batch(batch), phi))
    game._step_cache = None
    (grad,) = torch.autograd.grad(steering.penalty.sum(), game.leader_parameters, retain_graph=True)
    jac = linalg.per_sample_grads(lambda q: game.leader_values(batch, q), phi.detach())
    assert torch.allclose(jac, g.detach().unsqueeze(0), atol=1e-6)
    assert torch.allclose(steering.penalty, expected, rtol=1e-5)
    assert torch.allclose(grad, expected_grad, rtol=1e-4, atol=1e-7)
    assert grad.abs().max() > 0


@pytest.mark.parametrize("recipe", ["neural/rlhf", "neural/fpo-relaxed", "neural/implicit-cg", "neural/unrolled"])
def test_short_run_moves_both_players_and_stays_finite(recipe):
    game = game_of(recipe, "rounds=4000")
    theta0 = game.leader().detach().clone()
    phi0 = game.follower_flat().detach().clone()
    history = game.play(3)
    assert not torch.equal(game.leader().detach(), theta0)
    assert not torch.equal(game.follower_flat().detach(), phi0)
    for row in history:
        assert all(math.isfinite(v) for v in row.values())
    last = history[-1]
    for key in ("true/utility", "proxy/reward", "rm/error_on_policy", "noise/magnitude", "policy/mean_9"):
        assert key in last
    theta = game.leader().detach()
    assert last["noise/magnitude"] == pytest.approx(theta[2:].norm().item(), rel=1e-6)
    assert last["true/utility"] == pytest.approx(10 * math.exp(-0.2 * ((theta - game.ideal) ** 2).sum().item()))
    assert len(game.buffer_u) == 15 and game.round == 3


def test_comparison_figures():
    import matplotlib.pyplot as plt

    from games.neural_rlhf import NeuralRLHF

    def fake(scale):
        rounds = list(range(1, 21))
        h = {"round": rounds, "true/utility": [scale * t / 20 for t in rounds]}
        for i in range(10):
            h[f"policy/mean_{i}"] = [(2.5 if i < 2 else 0.3 * scale) * t / 20 for t in rounds]
        return h

    figures = NeuralRLHF.comparison_figures({"neural/rlhf": [fake(1), fake(2)], "neural/fpo-relaxed": [fake(3)]})
    assert set(figures) == {"true_utility", "phase_pca", "true_utility_seeds", "final_utility_seeds"}
    strip = figures["final_utility_seeds"].axes[0]
    dots = sorted(sorted(line.get_ydata()) for line in strip.lines if line.get_marker() == "o")
    assert dots == [[1.0, 2.0], [3.0]]  # each seed's final utility, one column per variant
    bars = sorted(line.get_ydata()[0] for line in strip.lines if line.get_marker() != "o")
    assert bars == [1.5, 3.0, 10.0]  # the means, and the ideal's dashed line
    for fig in figures.values():
        plt.close(fig)
    single = NeuralRLHF.comparison_figures({"neural/rlhf": [fake(1)]})
    assert "final_utility_seeds" not in single
    for fig in single.values():
        plt.close(fig)


def test_label_gradient_switch():
    for flag, has_graph in (("true", True), ("false", False)):
        game = game_of("neural/fpo-relaxed", f"game.label_gradient={flag}")
        batch = game.label(game.leader_batch())
        assert batch["u"].requires_grad == has_graph
        assert batch["y"].requires_grad
