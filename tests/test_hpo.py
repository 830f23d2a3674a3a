"""The HPO game (games/hpo.py): its hypergradient against finite differences, and what each estimator does.

    pytest tests/test_hpo.py
"""
from __future__ import annotations

import json
import math
import sys

import pytest
import torch

pytest.importorskip("sklearn")

from games.hpo import HPOGame, MissingExtra, comparison_table, load_dataset  # noqa: E402
from stackelberg import EstimatorConfig, ImplicitCG, PlayerConfig, build_estimator  # noqa: E402


def tiny(estimator, **config) -> HPOGame:
    """A small float64 game on a subset of breast_cancer, fitted to its best response."""
    settings = dict(dataset="breast_cancer", train_size=40, val_size=40, test_size=40, noise_features=3,
                    init_log_reg=-2.0, split_seed=0, warmup_iters=500)
    settings.update(config)
    return HPOGame(HPOGame.Config(**settings), estimator=estimator,
                   leader_config=PlayerConfig(optimizer="adam", lr=0.1),
                   follower_config=PlayerConfig(optimizer="sgd", lr=1.0, momentum=0.9, steps=20))


def polish(game: HPOGame, steps: int = 10) -> float:
    """Newton steps on the follower's loss (a dense Hessian: the tiny game has 68 parameters); the gradient norm
    after them. Finite differences need the best response to near machine precision, which L-BFGS stops short of."""
    log_reg = game.leader().detach()
    loss = lambda p: game.penalised_train_loss(p, log_reg)  # noqa: E731
    phi = game.follower_flat().detach()
    for _ in range(steps):
        g = torch.func.grad(loss)(phi)
        if g.norm() < 1e-15:
            break
        h = torch.func.hessian(loss)(phi)
        phi = phi - torch.linalg.lstsq(h, g.unsqueeze(1)).solution.squeeze(1)  # lstsq: the bias shift is flat
    with torch.no_grad():
        for p, new in zip(game.follower_parameters, torch.split(phi, [p.numel() for p in game.follower_parameters])):
            p.copy_(new.view_as(p))
    return game.follower_grad_norm()


def test_implicit_cg_matches_finite_differences_at_the_best_response():
    game = tiny(ImplicitCG(tol=1e-12, max_iter=500))
    game.fit_follower(500)
    assert polish(game) < 1e-12  # at the best response, as the implicit estimator assumes
    g_plain, g_steer, steering = game.leader_gradients(game.label(game.leader_batch()))
    assert steering.diagnostics["solver/residual"] < 1e-8
    assert torch.all(g_plain == 0)  # the validation loss does not depend on the penalties directly
    hypergrad = g_plain + g_steer  # ascent direction of J = -validation loss

    theta0, phi0 = game.leader.log_reg.detach().clone(), [p.detach().clone() for p in game.follower_parameters]
    eps = 1e-3  # central differences: truncation error ~1e-7 relative here, far above the fits' rounding

    def validation_loss_at(theta):
        with torch.no_grad():
            game.leader.log_reg.copy_(theta)
            for p, p0 in zip(game.follower_parameters, phi0):
                p.copy_(p0)
        game.fit_follower(500)
        assert polish(game) < 1e-13
        return game.validation_loss()

    coordinates = [0, 5, 17, 30, 32]  # real features and noise columns (30 real + 3 noise)
    finite = []
    for j in coordinates:
        e = torch.zeros_like(theta0)
        e[j] = eps
        finite.append(-(validation_loss_at(theta0 + e) - validation_loss_at(theta0 - e)) / (2 * eps))
    finite = torch.tensor(finite, dtype=hypergrad.dtype)
    estimate = hypergrad[coordinates]
    assert torch.linalg.norm(estimate - finite) <= 1e-6 * torch.linalg.norm(finite), (estimate, finite)


def test_none_cannot_move_the_leader():
    game = tiny(build_estimator(EstimatorConfig(name="none")))
    before = game.leader.log_reg.detach().clone()
    history = game.play(3)
    assert torch.equal(game.leader.log_reg.detach(), before)
    assert all(math.isfinite(row["val/loss"]) for row in history)
    assert history[-1]["val/loss"] == pytest.approx(history[0]["val/loss"], rel=1e-6)  # already at its response


@pytest.mark.parametrize("name", ["implicit-cg", "unrolled"])
def test_steering_lowers_the_validation_loss(name):
    game = tiny(build_estimator(EstimatorConfig(name=name, tol=1e-4, steps=10)), init_log_reg=-6.0)
    start = game.validation_loss()
    before = game.leader.log_reg.detach().clone()
    history = game.play(15)
    assert not torch.equal(game.leader.log_reg.detach(), before)
    assert all(math.isfinite(v) for row in history for v in row.values())
    assert history[-1]["val/loss"] < 0.95 * start
    assert history[-1]["follower/grad_norm"] < 1e-2  # the follower keeps near its best response


def test_recipe_runs_and_table_prints(tmp_path, capsys):
    from stackelberg.cli import figures, main

    out = tmp_path / "run"
    assert main(["run", "hpo/implicit-cg", "rounds=3", f"output_dir={out}", "trainer.progress_bar=false",
                 "game.dataset=breast_cancer", "game.train_size=40", "game.val_size=40", "game.test_size=40"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    for key in ("val/loss", "test/accuracy", "train/loss", "leader/log_reg_mean", "time/round_s"):
        assert math.isfinite(summary["final"][key]), key
    capsys.readouterr()
    figures([out], tmp_path / "figures")
    printed = capsys.readouterr().out
    assert "| hpo/implicit-cg | 1 | 3 |" in printed and "final val/loss" in printed


def test_comparison_table_averages_seeds():
    runs = [{"val/loss": [1.0, 0.5], "test/accuracy": [0.8, 0.9], "time/round_s": [0.01, 0.03]},
            {"val/loss": [1.0, 0.7], "test/accuracy": [0.8, 0.7], "time/round_s": [0.02, 0.02]}]
    table = comparison_table({"hpo/x": runs})
    assert "| hpo/x | 2 | 2 | 0.6000 ± 0.1000 | 0.8000 ± 0.1000 | 20.0 ± 0.0 |" in table


def test_missing_scikit_learn_is_one_clear_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # makes `import sklearn` fail
    with pytest.raises(MissingExtra, match=r"pip install -e '\.\[hpo\]'"):
        load_dataset("digits")
    assert issubclass(MissingExtra, ValueError)  # so `stackelberg run` prints it as one line


def test_bad_split_sizes_are_rejected():
    with pytest.raises(ValueError, match="train_size"):
        HPOGame(HPOGame.Config(dataset="wine", train_size=100, val_size=100, warmup_iters=0))
