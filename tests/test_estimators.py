"""Every steering estimator against an exact or finite-difference answer (the jaxopt habit).

The quadratic game (games/quadratic.py) has a closed-form best response and hypergradient; a tiny linear reward
model checks FPO against a one-step unroll; finite differences check the unrolled total derivative for SGD,
momentum and Adam followers.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from games.quadratic import QuadraticGame
from stackelberg import (
    FPO,
    ImplicitCG,
    ImplicitNeumann,
    LeaderFollowerGame,
    NoSteering,
    PlayerConfig,
    SolverFailure,
    Steering,
    Unrolled,
)
from stackelberg.game import detach_batch, leave_one_out

D = torch.float64


def quadratic(estimator, follower=None, **config) -> QuadraticGame:
    """A float64 quadratic game with a random leader and the follower at its exact best response."""
    game = QuadraticGame(QuadraticGame.Config(**config), estimator=estimator,
                         leader_config=PlayerConfig(lr=0.05),
                         follower_config=follower or PlayerConfig(optimizer="sgd", lr=0.09))
    with torch.no_grad():
        game.leader.value.copy_(torch.randn(game.config.leader_dim, dtype=D))
        game.follower.value.copy_(game.best_response(game.leader.value))
    return game


def total_derivative(game: LeaderFollowerGame) -> torch.Tensor:
    """The estimator's dJ/dtheta: plain gradient plus steering gradient."""
    plain, steer, _ = game.leader_gradients(game.label(game.leader_batch()))
    return plain + steer


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# ---------------------------------------------------------------------------------------------------------
# Exact hypergradient of the quadratic game
# ---------------------------------------------------------------------------------------------------------

def test_implicit_cg_matches_exact_hypergradient():
    game = quadratic(ImplicitCG(tol=1e-12, max_iter=100))
    exact = game.exact_hypergradient(game.leader.value.detach())
    assert rel_error(total_derivative(game), exact) < 1e-6
    # the myopic estimator misses the steering term entirely: the test above is not trivially satisfied
    myopic = quadratic(NoSteering())
    assert rel_error(total_derivative(myopic), exact) > 0.1


def test_implicit_cg_in_mixed_precision_matches_exact_hypergradient():
    game = quadratic(ImplicitCG(tol=1e-12, max_iter=200, mixed_precision=True))
    exact = game.exact_hypergradient(game.leader.value.detach())
    plain, steer, steering = game.leader_gradients(game.label(game.leader_batch()))
    assert steering.diagnostics["solver/float32_products"] > 0  # the products did run in float32 ...
    assert rel_error(plain + steer, exact) < 1e-9  # ... and the answer has float64's accuracy, not float32's
    # the float32 copies are taken only while the solve is linearised: the game keeps its float64 tensors
    assert all(t.dtype == D for t in game.state_dict().values() if t.is_floating_point())


def test_low_precision_copies_are_reused_until_the_tensor_changes():
    from stackelberg.hypergrad.precision import LowPrecisionCopies

    game = quadratic(NoSteering())
    copies = LowPrecisionCopies()
    with copies.swapped(game):
        first = game.B
        assert first.dtype == torch.float32
    with copies.swapped(game):
        assert game.B is first  # unchanged: the same copy
    with torch.no_grad():
        game.B.mul_(2.0)  # an in-place change bumps the tensor's version
    with copies.swapped(game):
        assert game.B is not first
        torch.testing.assert_close(game.B, 2.0 * first)
    assert game.B.dtype == D and isinstance(game.leader.value, torch.nn.Parameter)
    # a buffer replaced by another tensor gets a new copy; the originals return even when the body raises
    game.B = 3.0 * game.B
    with pytest.raises(RuntimeError, match="inside"):
        with copies.swapped(game):
            torch.testing.assert_close(game.B, (3.0 * 2.0 * first))
            raise RuntimeError("inside")
    assert game.B.dtype == D
    # a tensor shared by two modules (tied weights) reads as one copy in both
    shared = torch.nn.Parameter(torch.randn(3, 3, dtype=D))
    tied = torch.nn.Sequential(torch.nn.Linear(3, 3, dtype=D), torch.nn.Linear(3, 3, dtype=D))
    tied[0].weight = tied[1].weight = shared
    with copies.swapped(tied):
        assert tied[0].weight is tied[1].weight and tied[0].weight.dtype == torch.float32
    assert tied[0].weight is shared


def test_implicit_neumann_converges_as_terms_grow():
    errors = []
    for terms in (5, 20, 80, 320):
        game = quadratic(ImplicitNeumann(terms=terms, alpha=0.09))
        errors.append(rel_error(total_derivative(game), game.exact_hypergradient(game.leader.value.detach())))
    assert all(later < earlier for earlier, later in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-6, errors


def test_unrolled_sgd_converges_as_steps_grow():
    errors = []
    for steps in (1, 5, 20, 80, 320):
        game = quadratic(Unrolled(steps=steps))
        errors.append(rel_error(total_derivative(game), game.exact_hypergradient(game.leader.value.detach())))
    assert all(later < earlier for earlier, later in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-6, errors


# ---------------------------------------------------------------------------------------------------------
# Finite differences of the look-ahead objective J(theta, phi_K(theta))
# ---------------------------------------------------------------------------------------------------------

def lookahead_objective(game: LeaderFollowerGame, theta: torch.Tensor, steps: int) -> float:
    """J(theta, phi_K(theta)): K real optimiser steps of a copy of the follower on D(theta), then J."""
    g = copy.deepcopy(game)
    with torch.no_grad():
        g.leader.value.copy_(theta)
        batch = g.leader_batch()
    for _ in range(steps):
        g.follower_step(detach_batch(batch))
    with torch.no_grad():
        return g.leader_values(batch, g.follower_flat()).mean().item()


@pytest.mark.parametrize("follower", [
    PlayerConfig(optimizer="sgd", lr=0.05),
    PlayerConfig(optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=0.01),
    PlayerConfig(optimizer="adam", lr=0.05),
    PlayerConfig(optimizer="adamw", lr=0.05, weight_decay=0.1),
], ids=["sgd", "momentum", "adam", "adamw"])
def test_unrolled_total_derivative_matches_finite_differences(follower):
    steps = 4
    game = quadratic(Unrolled(steps=steps), follower=follower, leader_dim=3, follower_dim=4)
    # move the follower off its best response and give the optimiser some state (momentum, Adam moments)
    with torch.no_grad():
        game.follower.value.add_(0.5 * torch.randn(4, dtype=D))
    for _ in range(2):
        game.follower_step(game.follower_batch())
    estimate = total_derivative(game)
    theta = game.leader.value.detach().clone()
    eps = 1e-6
    fd = torch.stack([
        torch.tensor((lookahead_objective(game, theta + eps * e, steps)
                      - lookahead_objective(game, theta - eps * e, steps)) / (2 * eps), dtype=D)
        for e in torch.eye(3, dtype=D)
    ])
    assert rel_error(estimate, fd) < 1e-6, (estimate, fd)


# ---------------------------------------------------------------------------------------------------------
# FPO-relaxed = one-step unroll for a linear reward model with squared loss (gamma = 2 eta)
# ---------------------------------------------------------------------------------------------------------

class LinearRM(LeaderFollowerGame):
    """Leader action y = theta; follower r_w(y) = w . y trained on (r - u(y))^2; the leader maximises r."""

    def __init__(self, dim: int = 4, **kwargs):
        super().__init__(**kwargs)
        self.leader = nn.Linear(dim, 1, bias=False).double()
        self.follower = nn.Linear(dim, 1, bias=False).double()
        self.register_buffer("a", torch.randn(dim, dtype=D))

    def leader_batch(self):
        return {"y": self.leader.weight.view(1, -1)}  # a batch of one sample

    def utility(self, y):
        return y @ self.a + torch.sin(y).sum(-1)

    def leader_values(self, batch, phi):
        return self.follower_call(phi, batch["y"]).view(-1)

    def follower_losses(self, batch, phi):
        return (self.follower_call(phi, batch["y"]).view(-1) - self.utility(batch["y"])) ** 2

    def follower_prediction(self, batch, phi):
        r = self.follower_call(phi, batch["y"]).view(-1)
        return r, r - self.utility(batch["y"])


def test_fpo_relaxed_equals_one_step_unrolled_for_linear_rm():
    eta = 0.03
    torch.manual_seed(1)
    fpo = LinearRM(estimator=FPO(variant="relaxed", weight=2 * eta),
                   follower_config=PlayerConfig(optimizer="sgd", lr=eta))
    unrolled = copy.deepcopy(fpo)
    unrolled.estimator = Unrolled(steps=1)
    a, b = total_derivative(fpo), total_derivative(unrolled)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # and the steering is not zero: the two derivations agree on a non-trivial number
    plain = fpo.leader_gradients(fpo.leader_batch())[0]
    assert rel_error(a, plain) > 1e-3


# ---------------------------------------------------------------------------------------------------------
# Score-function steering agrees with pathwise steering within Monte-Carlo error
# ---------------------------------------------------------------------------------------------------------

def test_score_function_steering_matches_pathwise_within_mc_error():
    n, noise = 20000, 0.5
    games = {}
    for path in ("pathwise", "score_function"):
        torch.manual_seed(0)
        games[path] = quadratic(ImplicitCG(tol=1e-12, max_iter=100), noise=noise, samples=n, path=path)
    torch.manual_seed(3)
    _, path_steer, _ = games["pathwise"].leader_gradients(games["pathwise"].leader_batch())
    torch.manual_seed(4)
    game = games["score_function"]
    batch = game.leader_batch()
    _, score_steer, steering = game.leader_gradients(batch)
    # the score-function estimate is the mean of per-sample terms LOO(s)_i * grad log p(y_i); its standard
    # error follows from their spread
    theta = game.leader.value.detach()
    s = game.steering_rewards(detach_batch(batch), steering)
    terms = leave_one_out(s).unsqueeze(1) * (batch["y"] - theta) / noise ** 2
    torch.testing.assert_close(terms.mean(0), score_steer, rtol=1e-10, atol=1e-12)
    standard_error = terms.std(0) / math.sqrt(n)
    # the pathwise estimate is exact here (s is linear in y), so 4 standard errors bound the difference
    assert ((score_steer - path_steer).abs() <= 4 * standard_error).all(), (score_steer, path_steer,
                                                                            standard_error)
    assert path_steer.norm() > 10 * standard_error.norm()  # a real signal, not two noises that agree


# ---------------------------------------------------------------------------------------------------------
# Warm start in checkpoints; solver failures; non-finite steering
# ---------------------------------------------------------------------------------------------------------

def test_implicit_warm_start_is_saved_and_restored():
    game = quadratic(ImplicitCG(tol=1e-10, warm_start=True))
    game.play(3)
    assert game.estimator.previous is not None
    checkpoint = {}
    game.on_save_checkpoint(checkpoint)
    path_state = copy.deepcopy(checkpoint)  # what torch.save/torch.load would carry
    fresh = quadratic(ImplicitCG(tol=1e-10, warm_start=True))
    assert fresh.estimator.previous is None
    fresh.on_load_checkpoint(path_state)
    torch.testing.assert_close(fresh.estimator.previous, game.estimator.previous, rtol=0, atol=0)
    torch.testing.assert_close(fresh.estimator.older, game.estimator.older, rtol=0, atol=0)
    assert fresh.round == 3


def test_implicit_warm_start_from_two_solutions_beats_the_last_one():
    """Along a smoothly changing system, the Galerkin start on {x1, x2} is closer than x1 (energy norm)."""
    Q, _ = torch.linalg.qr(torch.randn(40, 40, dtype=D))
    A = Q @ torch.diag(torch.logspace(0, 1, 40, dtype=D)) @ Q.T
    b0, db = torch.randn(40, dtype=D), torch.randn(40, dtype=D)
    cg = ImplicitCG(tol=1e-12, max_iter=200)
    iterations = []
    for t in range(4):
        result = cg.solve(lambda v: A @ v, b0 + 0.01 * t * db)
        iterations.append(result.iterations)
    b = b0 + 0.04 * db
    exact = torch.linalg.solve(A, b)
    x0, spent = cg.initial_guess(lambda v: A @ v, b)
    assert spent == 2  # the projection's two products (counted in the solve's iterations)

    def energy(e):
        return (e @ A @ e).sqrt().item()

    assert energy(x0 - exact) < 0.1 * energy(cg.previous - exact)  # linear in t: x0 is (almost) exact
    assert iterations[2] < iterations[1] < iterations[0], iterations
    # two (nearly) identical solutions: the projection is singular, the start falls back to the last one
    cg.older = cg.previous.clone()
    assert torch.equal(cg.initial_guess(lambda v: A @ v, b)[0], cg.previous)


def indefinite(game: QuadraticGame) -> QuadraticGame:
    """Give the follower an indefinite Hessian (half of A's eigenvalues negative)."""
    eig, q = torch.linalg.eigh(game.A)
    signs = torch.ones_like(eig)
    signs[::2] = -1
    game.A.copy_(q @ torch.diag(eig * signs) @ q.T)
    return game


def test_negative_curvature_skip_logs_failure_and_leaves_steering_out():
    game = indefinite(quadratic(ImplicitCG(tol=1e-12, max_iter=50, on_failure="skip")))
    before = game.leader.value.detach().clone()
    history = game.play(1)
    assert history[0]["solver/failed"] == 1.0
    assert history[0]["steering/norm"] == 0.0
    assert torch.isfinite(game.leader.value).all() and torch.isfinite(game.follower.value).all()
    assert not torch.equal(game.leader.value.detach(), before)  # the plain gradient was still applied
    assert game.estimator.previous is None  # a failed solve leaves no warm start behind


def test_negative_curvature_raise_raises_solver_failure():
    game = indefinite(quadratic(ImplicitCG(tol=1e-12, max_iter=50, on_failure="raise")))
    with pytest.raises(SolverFailure, match="negative curvature"):
        game.play(1)


def test_diverging_neumann_series_is_a_failed_solve():
    # alpha * lambda_max(A) = 0.5 * 10 > 2: the series diverges to huge but finite adjoints
    diverging = quadratic(ImplicitNeumann(terms=50, alpha=0.5))
    plain, steer, steering = diverging.leader_gradients(diverging.leader_batch())
    assert steering.diagnostics["solver/failed"] == 1.0 and steering.diagnostics["solver/residual"] > 1.0
    assert steering.is_zero and torch.count_nonzero(steer) == 0
    with pytest.raises(SolverFailure, match="diverged"):
        bad = quadratic(ImplicitNeumann(terms=50, alpha=0.5, on_failure="raise"))
        bad.leader_gradients(bad.leader_batch())


class NaNAdjoint(ImplicitCG):
    """An estimator whose adjoint is broken: every entry NaN."""

    name = "nan-adjoint"

    def steer(self, problem):
        return Steering(phi_eval=problem.phi, adjoints=[(problem.phi, torch.full_like(problem.phi, math.nan))])


def test_nonfinite_steering_never_reaches_parameters():
    broken = quadratic(NaNAdjoint())
    torch.manual_seed(5)
    reference = quadratic(NoSteering())
    reference.load_state_dict(broken.state_dict())
    history = broken.play(3)
    reference.play(3)
    assert all(row["steering/nonfinite"] == 1.0 for row in history)
    for p in broken.parameters():
        assert torch.isfinite(p).all()
    # the leader moved exactly as a myopic leader would: the broken term was dropped, nothing else
    torch.testing.assert_close(broken.leader.value, reference.leader.value, rtol=0, atol=0)
    # and a game with a non-finite parameter refuses to write a checkpoint
    with torch.no_grad():
        broken.follower.value[0] = math.nan
    with pytest.raises(RuntimeError, match="not finite"):
        broken.on_save_checkpoint({})


def test_bench_hypergrad_small_run_is_accurate():
    """`stackelberg bench hypergrad` on a small ridge problem: JSON-ready, every estimator near the closed form."""
    import json

    from stackelberg.benchmarks.hypergrad import main

    out = main(["--features", "30", "--train", "60", "--val", "60", "--repeats", "1", "--slow-repeats", "1",
                "--neumann-terms", "10", "300", "--unroll-steps", "2", "150", "--rounds", "2", "--no-torchopt"])
    json.dumps(out)
    est = out["estimators"]
    assert est["implicit-cg"]["rel_error"] < 1e-9
    mixed = est["implicit-cg/mixed_precision"]
    assert mixed["rel_error"] < 1e-9 and mixed["float32_hvps"] > mixed["float64_hvps"] >= 1
    assert est["implicit-neumann/terms=300"]["rel_error"] < 1e-6 < est["implicit-neumann/terms=10"]["rel_error"]
    assert est["unrolled/steps=150"]["rel_error"] < 1e-6 < est["unrolled/steps=2"]["rel_error"]
    assert out["leader_trajectory"]["implicit-cg (warm start)"]["max_rel_error"] < 1e-9
    assert out["leader_trajectory"]["implicit-cg (warm start, mixed precision)"]["max_rel_error"] < 1e-9


def test_nonfinite_steering_in_a_trainer_run_leaves_finite_checkpoints(tmp_path, monkeypatch):
    """Through the runner (Lightning Trainer, checkpoints every 2 rounds): logged, dropped, never saved."""
    import json

    from stackelberg import runner
    from stackelberg.hypergrad import REGISTRY

    monkeypatch.setitem(REGISTRY, "nan-adjoint", lambda config: NaNAdjoint())  # removed after the test
    out = tmp_path / "run"
    runner.run("quadratic/noisy", ["estimator.name=nan-adjoint", "rounds=4", "trainer.rounds_per_epoch=2",
                                   f"output_dir={out}"], quiet=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(r["steering/nonfinite"] == 1.0 for r in rows)
    checkpoint = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["stackelberg"]["round"] == 4
    for name, value in checkpoint["state_dict"].items():
        assert torch.isfinite(value).all(), name
