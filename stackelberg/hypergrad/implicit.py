"""`implicit-cg` and `implicit-neumann`: the steering of a follower that has fully converged.

If phi* minimises L_F(phi; D(theta)), the implicit function theorem gives
d phi*/d theta = -H^-1 d^2 L_F / d phi d theta, with H the Hessian of L_F in phi. So the adjoint is

    v = -(H + damping I)^-1 grad_phi J

solved with conjugate gradients (to a tolerance, warm-started from the previous round's solution, which is kept in
checkpoints) or with a truncated Neumann series. H is linearised once per solve (linalg.hvp_operator). The
current phi stands in for phi*: the closer the follower is to its best response, the closer this is to exact.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import Tensor

from stackelberg.hypergrad import linalg
from stackelberg.hypergrad.base import (
    Estimator,
    Steering,
    SteeringProblem,
    leader_gradient_of,
    register,
)


class SolverFailure(RuntimeError):
    """Raised when an implicit solve fails and the configured fallback is `raise`."""


class _Implicit(Estimator):
    """Shared logic: build the HVP operator, solve, apply the fallback on failure."""

    def __init__(self, damping: float = 0.0, on_failure: str = "skip"):
        if on_failure not in ("skip", "raise"):
            raise ValueError(f"estimator.on_failure must be 'skip' or 'raise', got {on_failure!r}")
        self.damping = damping
        self.on_failure = on_failure

    def solve(self, hvp, rhs: Tensor) -> linalg.SolveResult:
        raise NotImplementedError

    def steer(self, problem: SteeringProblem) -> Steering:
        rhs = leader_gradient_of(problem)
        local_hvp = linalg.hvp_operator(problem.follower_loss, problem.phi)
        result = self.solve(lambda v: problem.reduce(local_hvp(v)), rhs)
        diagnostics = {
            "solver/residual": result.residual,
            "solver/iterations": float(result.iterations),
            "solver/failed": 0.0,
        }
        if result.negative_curvature or not torch.isfinite(result.x).all():
            why = "met negative curvature" if result.negative_curvature else "returned a non-finite solution"
            if self.on_failure == "raise":
                raise SolverFailure(
                    f"{self.name} {why}; raise estimator.damping or set estimator.on_failure=skip"
                )
            self.forget()
            diagnostics["solver/failed"] = 1.0
            return Steering(phi_eval=problem.phi, diagnostics=diagnostics)
        return Steering(phi_eval=problem.phi, adjoints=[(problem.phi, -result.x)], diagnostics=diagnostics)

    def forget(self) -> None:
        """Drop any warm start (after a failed solve)."""


class ImplicitCG(_Implicit):
    """Conjugate gradients on (H + damping I) x = grad_phi J, warm-started across rounds."""

    name = "implicit-cg"

    def __init__(self, tol: float = 1e-6, max_iter: int = 50, damping: float = 0.0,
                 warm_start: bool = True, on_failure: str = "skip"):
        super().__init__(damping, on_failure)
        self.tol, self.max_iter, self.warm_start = tol, max_iter, warm_start
        self.previous: Optional[Tensor] = None

    def solve(self, hvp, rhs: Tensor) -> linalg.SolveResult:
        x0 = self.previous if self.warm_start and self.previous is not None else None
        if x0 is not None and (x0.shape != rhs.shape or x0.dtype != rhs.dtype):
            x0 = None
        if x0 is not None:
            x0 = x0.to(rhs.device)
        result = linalg.conjugate_gradient(hvp, rhs, x0=x0, damping=self.damping,
                                           tol=self.tol, max_iter=self.max_iter)
        if self.warm_start and not result.negative_curvature:
            self.previous = result.x.detach()
        return result

    def forget(self) -> None:
        self.previous = None

    def state_dict(self) -> Dict[str, Any]:
        return {"previous": None if self.previous is None else self.previous.cpu()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.previous = state.get("previous")


class ImplicitNeumann(_Implicit):
    """Truncated Neumann series: x = alpha * sum_{j<terms} (I - alpha (H + damping I))^j grad_phi J."""

    name = "implicit-neumann"

    def __init__(self, terms: int = 20, alpha: float = 0.1, damping: float = 0.0, on_failure: str = "skip"):
        super().__init__(damping, on_failure)
        self.terms, self.alpha = terms, alpha

    def solve(self, hvp, rhs: Tensor) -> linalg.SolveResult:
        return linalg.neumann_series(hvp, rhs, terms=self.terms, alpha=self.alpha, damping=self.damping)


@register("implicit-cg")
def _build_cg(config) -> ImplicitCG:
    return ImplicitCG(tol=config.tol, max_iter=config.max_iter, damping=config.damping,
                      warm_start=config.warm_start, on_failure=config.on_failure)


@register("implicit-neumann")
def _build_neumann(config) -> ImplicitNeumann:
    return ImplicitNeumann(terms=config.terms, alpha=config.alpha, damping=config.damping,
                           on_failure=config.on_failure)
