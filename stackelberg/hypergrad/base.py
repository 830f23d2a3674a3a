"""The steering interface: what every estimator receives and what it returns.

A leader's true objective is J(theta, phi+(theta)), where phi+ is the follower after it learns from the data
D(theta) that the leader produces. Its total gradient is the plain policy gradient plus the steering term

    (d phi+ / d theta)^T grad_phi J  =  grad_theta < grad_phi L_F(phi; D(theta)), v >   (v held constant)

Every estimator answers the same question, "which adjoint v?", in one of two forms:

- batch adjoints: a list of pairs (phi_k, v_k); the steering is sum_k grad_theta < grad_phi L_F(phi_k; D), v_k >.
  One pair at phi for the implicit estimators, one pair per unrolled step for `unrolled`, none for `none`.
- a per-sample penalty (FPO): the diagonal, first-order adjoint v_i = -eta grad_phi r(y_i), one per sample,
  folded into a penalty that the game differentiates as the paper does.

`phi_eval` says at which follower parameters the leader's own objective is evaluated (phi, or phi_K after a
K-step look-ahead).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    from stackelberg.game import LeaderFollowerGame


@dataclass
class SteeringProblem:
    """One leader step's view of the game, as functions of the follower's flat parameters.

    `batch` is the leader's data with its graph to theta; `detached` is the same data cut from it. Estimators
    compute adjoints on `detached` (v is a constant for the leader) and FPO penalties on `batch`.
    """

    game: "LeaderFollowerGame"
    batch: Dict[str, Any]
    detached: Dict[str, Any]
    phi: Tensor

    def leader_value(self, phi: Tensor) -> Tensor:
        """J(phi): the leader's mean objective on the detached batch (a scalar, differentiable in phi)."""
        return self.game.leader_values(self.detached, phi).mean()

    def follower_loss(self, phi: Tensor) -> Tensor:
        """L_F(phi; D): the follower's mean loss on the detached batch."""
        return self.game.follower_losses(self.detached, phi).mean()

    def reduce(self, t: Tensor) -> Tensor:
        """Average a follower-space vector across processes (a no-op on one process)."""
        return self.game.all_reduce_mean(t)


@dataclass
class Steering:
    """An estimator's answer: where to evaluate J, the batch adjoints, an optional per-sample penalty."""

    phi_eval: Tensor
    adjoints: List[Tuple[Tensor, Tensor]] = field(default_factory=list)
    penalty: Optional[Tensor] = None
    diagnostics: Dict[str, Any] = field(default_factory=dict)  # floats or 0-d tensors (read when logged)

    @property
    def is_zero(self) -> bool:
        return not self.adjoints and self.penalty is None


class Estimator:
    """Base class of the steering estimators. Subclasses implement `steer`.

    An estimator may keep state across rounds (a warm start); `state_dict` and `load_state_dict` carry it
    through checkpoints.
    """

    name = "base"

    def steer(self, problem: SteeringProblem) -> Steering:
        raise NotImplementedError

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass


class NoSteering(Estimator):
    """`none`: standard (myopic) iterative RLHF. The follower is treated as fixed: v = 0."""

    name = "none"

    def steer(self, problem: SteeringProblem) -> Steering:
        return Steering(phi_eval=problem.phi)


def leader_gradient_of(problem: SteeringProblem) -> Tensor:
    """grad_phi J at phi, averaged across processes: the right-hand side of every adjoint system."""
    from torch.func import grad

    return problem.reduce(grad(problem.leader_value)(problem.phi))


_Factory = Callable[..., Estimator]
REGISTRY: Dict[str, _Factory] = {}


def register(name: str) -> Callable[[_Factory], _Factory]:
    """Register an estimator factory under `name` (the value of `estimator.name` in a recipe)."""

    def wrap(factory: _Factory) -> _Factory:
        REGISTRY[name] = factory
        return factory

    return wrap


register("none")(lambda config: NoSteering())
