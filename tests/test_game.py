"""The round of LeaderFollowerGame: who moves, by how much, in which order, and what it logs."""
from __future__ import annotations

import math
import textwrap

import pytest
import torch

import stackelberg.game as game_module
from games.quadratic import QuadraticGame
from stackelberg import ImplicitCG, NoSteering, PlayerConfig, Unrolled, leave_one_out, power_schedule
from stackelberg.game import detach_batch

D = torch.float64


def quadratic(estimator=None, leader=None, follower=None, **config) -> QuadraticGame:
    return QuadraticGame(QuadraticGame.Config(**config), estimator=estimator or ImplicitCG(tol=1e-10),
                         leader_config=leader or PlayerConfig(lr=0.05),
                         follower_config=follower or PlayerConfig(lr=0.09, steps=20))


def test_round_moves_both_players_and_logs_finite_diagnostics():
    game = quadratic(noise=0.3, samples=8)
    leader0, follower0 = game.leader.value.detach().clone(), game.follower.value.detach().clone()
    history = game.play(3)
    assert game.round == 3 and len(history) == 3
    assert not torch.equal(game.leader.value, leader0) and not torch.equal(game.follower.value, follower0)
    for key in ("steering/norm", "steering/cos_policy_grad", "solver/residual", "solver/iterations",
                "leader/objective", "follower/distance_to_best_response"):
        assert key in history[-1], key
    assert all(math.isfinite(v) for row in history for v in row.values())


def test_leader_gradients_do_not_step():
    game = quadratic()
    game.play(1)
    state = {k: v.clone() for k, v in game.state_dict().items()}
    game.leader_gradients(game.leader_batch())
    for k, v in game.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_leader_step_ascends_plain_plus_steering():
    game = quadratic(leader=PlayerConfig(optimizer="sgd", lr=0.05))
    game.play(2)
    theta = game.leader.value.detach().clone()
    plain, steer, _ = game.leader_gradients(game.leader_batch())
    game.leader_step(game.leader_batch())
    torch.testing.assert_close(game.leader.value.detach(), theta + 0.05 * (plain + steer), rtol=1e-12, atol=1e-14)


def test_two_timescales_count_updates():
    game = quadratic(leader=PlayerConfig(optimizer="adam", lr=0.01, steps=2),
                     follower=PlayerConfig(optimizer="adam", lr=0.01, steps=5))
    game.play(3)
    leader_steps = game.leader_optimizer.state[game.leader.value]["step"]
    follower_steps = game.follower_optimizer.state[game.follower.value]["step"]
    assert int(leader_steps) == 6 and int(follower_steps) == 15


def test_exact_steering_reaches_the_stackelberg_point_where_myopic_does_not():
    """With implicit steering the leader stops where the true hypergradient vanishes; a myopic one does not."""
    results = {}
    for name, estimator in (("implicit", ImplicitCG(tol=1e-10)), ("myopic", NoSteering())):
        game = quadratic(estimator, leader=PlayerConfig(lr=0.3))
        game.play(150)
        theta = game.leader.value.detach()
        results[name] = game.exact_hypergradient(theta).norm().item()
        assert game.last_metrics["follower/distance_to_best_response"] < 1e-3
    assert results["implicit"] < 1e-3, results  # about 5e-5 after 150 rounds; 2.0 for the myopic leader
    assert results["myopic"] > 0.1, results


def test_apply_gradient_clips_and_skips_nonfinite():
    game = quadratic(leader=PlayerConfig(optimizer="sgd", lr=1.0, clip_value=0.5))
    theta = game.leader.value.detach().clone()
    assert game.apply_gradient("leader", torch.tensor([2.0, -2.0, 0.1, 0.0, 0.0], dtype=D))
    torch.testing.assert_close(game.leader.value.detach() - theta,
                               -torch.tensor([0.5, -0.5, 0.1, 0.0, 0.0], dtype=D))
    game = quadratic(follower=PlayerConfig(optimizer="sgd", lr=1.0, clip_norm=1.0))
    assert game.apply_gradient("follower", torch.full((8,), 3.0, dtype=D))
    assert abs(game.follower.value.detach().norm().item() - 1.0) < 1e-12
    before = game.follower.value.detach().clone()
    assert not game.apply_gradient("follower", torch.full((8,), math.nan, dtype=D))
    assert torch.equal(game.follower.value.detach(), before)
    with pytest.raises(ValueError, match="player"):
        game.apply_gradient("referee", torch.zeros(8, dtype=D))


def test_power_schedule_sets_learning_rates():
    rounds = 10
    game = QuadraticGame(QuadraticGame.Config(), rounds=rounds,
                         leader_config=PlayerConfig(lr=0.1, schedule="power", lr_final=0.01, power=2.0))
    for t in range(4):
        expected = power_schedule(0.1, 0.01, 2.0, t, rounds)
        assert abs(game.leader_optimizer.param_groups[0]["lr"] - expected) < 1e-12
        game.play(1)
    assert power_schedule(0.1, 0.01, 2.0, rounds, rounds) == pytest.approx(0.01)


def test_unrolled_follower_state_is_not_touched_by_the_lookahead():
    game = quadratic(Unrolled(steps=5), follower=PlayerConfig(optimizer="adam", lr=0.01, steps=2))
    game.play(2)
    state = {k: v.clone() for k, v in game.follower_optimizer.state[game.follower.value].items()}
    game.leader_gradients(game.leader_batch())
    for k, v in game.follower_optimizer.state[game.follower.value].items():
        assert torch.equal(v, state[k]), k


def test_leave_one_out_and_detach_batch():
    values = torch.tensor([1.0, 2.0, 6.0])
    torch.testing.assert_close(leave_one_out(values), torch.tensor([1 - 4.0, 2 - 3.5, 6 - 1.5]))
    torch.testing.assert_close(leave_one_out(torch.tensor([3.0])), torch.tensor([3.0]))
    # per group (two prompts with three and two answers, and one answer alone): against its own group only
    values = torch.tensor([1.0, 2.0, 6.0, 10.0, 20.0, 7.0])
    groups = torch.tensor([5, 5, 5, 2, 2, 9])
    expected = torch.tensor([1 - 4.0, 2 - 3.5, 6 - 1.5, 10 - 20.0, 20 - 10.0, 7.0])
    torch.testing.assert_close(leave_one_out(values, groups), expected)
    # one group holding everything is the plain leave-one-out
    torch.testing.assert_close(leave_one_out(values, torch.zeros(6, dtype=torch.long)), leave_one_out(values))
    x = torch.ones(2, requires_grad=True)
    batch = detach_batch({"x": x * 2, "tag": "a"})
    assert not batch["x"].requires_grad and batch["tag"] == "a"


def test_docstring_example_plays():
    """The runnable example at the top of stackelberg/game.py constructs a game that plays."""
    doc = game_module.__doc__
    code = textwrap.dedent(doc.split("::", 1)[1].split('"""')[0])
    namespace: dict = {}
    exec(compile(code, "game.py docstring", "exec"), namespace)
    game = namespace["game"]
    history = game.play(5)
    assert all(math.isfinite(v) for row in history for v in row.values())


def test_pathwise_steering_inner_equals_mean_of_per_sample_rewards():
    """The pathwise surrogate (one reverse-mode gradient) and the per-sample JVP rewards: same value and theta-grad."""
    game = quadratic(noise=0.3, samples=6)
    game.play(1)
    phi = game.follower_flat().detach()
    v = torch.randn_like(phi)
    batch = game.leader_batch()
    inner = game._steering_inner(batch, phi, v)
    rewards = game._steering_rewards(batch, phi, v).mean()
    torch.testing.assert_close(inner, rewards, rtol=1e-12, atol=1e-14)
    (g_inner,) = torch.autograd.grad(inner, game.leader_parameters, retain_graph=True)
    (g_rewards,) = torch.autograd.grad(rewards, game.leader_parameters)
    torch.testing.assert_close(g_inner, g_rewards, rtol=1e-12, atol=1e-14)


def test_a_one_tensor_gradient_is_a_tensor_of_its_own():
    p = torch.nn.Parameter(torch.randn(4))
    g = game_module.LeaderFollowerGame._grad(p.sum(), [p])  # autograd returns a broadcast (stride 0) gradient here
    g.mul_(2)  # a caller may change it in place
    assert g.is_contiguous() and torch.equal(g, torch.full((4,), 2.0))


@pytest.mark.parametrize("bar, monitored, logged", [(False, False, False), (False, True, True), (True, False, True)])
def test_progress_metrics_reach_lightning_when_a_bar_or_a_callback_wants_them(bar, monitored, logged, tmp_path):
    import lightning as L

    from stackelberg.runner import _rounds_loader

    game = QuadraticGame(rounds=10)
    callbacks = [L.pytorch.callbacks.EarlyStopping(monitor="leader/objective", mode="max", patience=100,
                                                   check_on_train_epoch_end=True)] if monitored else []
    trainer = L.Trainer(max_epochs=1, enable_progress_bar=bar, enable_checkpointing=False, logger=False,
                        enable_model_summary=False, callbacks=callbacks, default_root_dir=tmp_path)
    trainer.fit(game, _rounds_loader(10))
    assert game.round == 10
    assert ("leader/objective" in trainer.callback_metrics) == logged  # self.log costs time: only when wanted
