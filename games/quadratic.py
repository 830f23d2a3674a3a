"""A quadratic game with a closed-form best response and an exact hypergradient: the framework's ground truth.

Follower:  l(phi; y) = 1/2 phi^T A phi - phi^T B y            best response phi*(theta) = A^-1 B theta
Leader:    j(y, phi) = -1/2 ||phi - c||^2 - lam/2 ||y||^2     wants the follower to land on c

The leader's action is y = theta + noise * eps (pathwise) or y ~ N(theta, noise^2 I) with log-probabilities
(score function); with noise 0 the action is theta itself. The exact total derivative at the best response is

    dJ/dtheta = -lam theta - (A^-1 B)^T (phi* - c)

Run it:  stackelberg run quadratic/implicit-cg
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from stackelberg import LeaderFollowerGame
from stackelberg.config import doc


class Vector(nn.Module):
    """A module that is one parameter vector."""

    def __init__(self, size: int, dtype: torch.dtype, init: Tensor | None = None):
        super().__init__()
        self.value = nn.Parameter(torch.zeros(size, dtype=dtype) if init is None else init.to(dtype))

    def forward(self) -> Tensor:
        return self.value


class QuadraticGame(LeaderFollowerGame):
    """The closed-form game above; `exact_hypergradient` and `best_response` give the true answers."""

    best_metrics = {"leader/objective": "max"}
    progress_metrics = ("leader/objective", "hypergrad/rel_error")

    @dataclass
    class Config:
        leader_dim: int = doc(5, "dimension of theta")
        follower_dim: int = doc(8, "dimension of phi")
        condition: float = doc(10.0, "condition number of A (eigenvalues spread from 1 to this)")
        lam: float = doc(0.1, "leader's cost lam/2 ||y||^2")
        noise: float = doc(0.0, "standard deviation of the leader's action around theta")
        samples: int = doc(1, "actions per leader step")
        path: str = doc("pathwise", "pathwise | score_function: how the steering reaches theta")
        matrix_seed: int = doc(0, "seed of A, B, c (fixed apart from the run's seed)")
        dtype: str = doc("float64", "float64 | float32")

    def __init__(self, config: "QuadraticGame.Config" = None, **kwargs):
        super().__init__(**kwargs)
        self.config = config = config or QuadraticGame.Config()
        if config.path not in ("pathwise", "score_function"):
            raise ValueError(f"game.path must be 'pathwise' or 'score_function', got {config.path!r}")
        if config.path == "score_function" and config.noise <= 0:
            raise ValueError("game.path=score_function needs game.noise > 0")
        self.steering_path = config.path
        dtype = getattr(torch, config.dtype)
        g = torch.Generator().manual_seed(config.matrix_seed)
        q, _ = torch.linalg.qr(torch.randn(config.follower_dim, config.follower_dim, generator=g, dtype=dtype))
        eigenvalues = torch.logspace(0, torch.log10(torch.tensor(config.condition)).item(), config.follower_dim,
                                     dtype=dtype)
        self.register_buffer("A", q @ torch.diag(eigenvalues) @ q.T)
        self.register_buffer("B", torch.randn(config.follower_dim, config.leader_dim, generator=g, dtype=dtype))
        self.register_buffer("c", torch.randn(config.follower_dim, generator=g, dtype=dtype))
        self.leader = Vector(config.leader_dim, dtype)
        self.follower = Vector(config.follower_dim, dtype)

    # --- the hooks -------------------------------------------------------------------------------------
    def leader_batch(self):
        theta = self.leader()
        n, noise = self.config.samples, self.config.noise
        eps = torch.randn(n, theta.shape[0], dtype=theta.dtype, device=theta.device)
        if self.steering_path == "pathwise":
            return {"y": theta + noise * eps}
        y = (theta + noise * eps).detach()
        return {"y": y, "logp": -((y - theta) ** 2).sum(-1) / (2 * noise ** 2)}

    def leader_values(self, batch, phi):
        y = batch["y"]
        return -0.5 * ((self.follower_call(phi) - self.c) ** 2).sum() - 0.5 * self.config.lam * (y ** 2).sum(-1)

    def follower_losses(self, batch, phi):
        return 0.5 * phi @ self.A @ phi - (batch["y"] @ self.B.T) @ phi

    def follower_prediction(self, batch, phi):
        # grad_phi l = A phi - B y: a linear "prediction" A phi - B y with unit error factor per coordinate is
        # not a scalar; FPO is defined here on the residual norm so that the estimator can be exercised.
        residual = self.A @ phi - batch["y"] @ self.B.T
        return 0.5 * (residual ** 2).sum(-1), torch.ones(batch["y"].shape[0], dtype=phi.dtype)

    def round_metrics(self):
        theta = self.leader().detach()
        with torch.no_grad():
            phi_star = self.best_response(theta)
            objective = -0.5 * ((phi_star - self.c) ** 2).sum() - 0.5 * self.config.lam * (theta ** 2).sum()
            exact = self.exact_hypergradient(theta)
        return {
            "leader/objective": objective.item(),
            "follower/distance_to_best_response": (self.follower() - phi_star).norm().item(),
            "hypergrad/exact_norm": exact.norm().item(),
        }

    # --- closed forms ----------------------------------------------------------------------------------
    def best_response(self, theta: Tensor) -> Tensor:
        """phi*(theta) = A^-1 B theta."""
        return torch.linalg.solve(self.A, self.B @ theta)

    def exact_hypergradient(self, theta: Tensor) -> Tensor:
        """d/dtheta of J(theta, phi*(theta)) for a noiseless action."""
        response = torch.linalg.solve(self.A, self.B)
        return -self.config.lam * theta - response.T @ (self.best_response(theta) - self.c)


Game = QuadraticGame
