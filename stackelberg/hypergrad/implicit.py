"""`implicit-cg` and `implicit-neumann`: the steering of a follower that has fully converged.

If phi* minimises L_F(phi; D(theta)), the implicit function theorem gives
d phi*/d theta = -H^-1 d^2 L_F / d phi d theta, with H the Hessian of L_F in phi. So the adjoint is

    v = -(H + damping I)^-1 grad_phi J

solved with conjugate gradients (to a tolerance, warm-started from the last two rounds' solutions, which are kept
in checkpoints; for a float64 follower, optionally with most products in float32) or with a truncated Neumann
series. H is linearised once per solve (linalg.hvp_operator). The current phi stands in for phi*: the closer the
follower is to its best response, the closer this is to exact.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

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
from stackelberg.hypergrad.precision import LowPrecisionCopies


class SolverFailure(RuntimeError):
    """Raised when an implicit solve fails and the configured fallback is `raise`."""


class _Implicit(Estimator):
    """Shared logic: build the HVP operator, solve, apply the fallback on failure."""

    low_precision: Optional[LowPrecisionCopies] = None  # set by estimators that solve in mixed precision

    def __init__(self, damping: float = 0.0, on_failure: str = "skip"):
        if on_failure not in ("skip", "raise"):
            raise ValueError(f"estimator.on_failure must be 'skip' or 'raise', got {on_failure!r}")
        self.damping = damping
        self.on_failure = on_failure

    def solve(self, hvp, rhs: Tensor, problem: Optional[SteeringProblem] = None) -> linalg.SolveResult:
        raise NotImplementedError

    def steer(self, problem: SteeringProblem) -> Steering:
        rhs = leader_gradient_of(problem)
        local_hvp = linalg.hvp_operator(problem.follower_loss, problem.phi)
        result = self.solve(lambda v: problem.reduce(local_hvp(v)), rhs, problem)
        diagnostics = {
            "solver/residual": result.residual,
            "solver/iterations": float(result.iterations),
            "solver/failed": 0.0,
        }
        if self.low_precision is not None and rhs.dtype == self.low_precision.high:  # the mixed path ran
            diagnostics["solver/float32_products"] = float(result.low_precision_products)
        # A residual above 1 means the answer is worse than none at all (a Neumann series with alpha too large
        # for H diverges: huge but finite adjoints that would throw the leader away).
        diverged = not result.residual <= 1.0
        if result.negative_curvature or diverged or not torch.isfinite(result.x).all():
            if result.negative_curvature:
                why = "met negative curvature"
            elif not torch.isfinite(result.x).all():
                why = "returned a non-finite solution"
            else:
                why = f"diverged (relative residual {result.residual:.3g} > 1; lower estimator.alpha)"
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
                 warm_start: bool = True, on_failure: str = "skip", mixed_precision: bool = False):
        super().__init__(damping, on_failure)
        self.tol, self.max_iter, self.warm_start = tol, max_iter, warm_start
        self.previous: Optional[Tensor] = None  # the last round's solution
        self.older: Optional[Tensor] = None  # the one before it
        # float64 followers only: products in float32, residuals in float64 (linalg.mixed_precision_cg)
        self.low_precision = LowPrecisionCopies() if mixed_precision else None

    def solve(self, hvp, rhs: Tensor, problem: Optional[SteeringProblem] = None) -> linalg.SolveResult:
        """Solve (H + damping I) x = rhs; `problem` is needed only to take products in float32."""
        x0, guess_products = self.initial_guess(hvp, rhs) if self.warm_start else (None, 0)
        budget = max(self.max_iter - guess_products, 0)  # max_iter counts every product of the solve
        copies = self.low_precision
        if copies is not None and problem is not None and rhs.dtype == copies.high:
            low_hvp = None

            def low_product(v: Tensor) -> Tensor:
                nonlocal low_hvp
                if low_hvp is None:  # linearised on the float32 copies once per solve, if the solve needs it
                    with copies.swapped(problem.game):
                        low_hvp = linalg.hvp_operator(copies.follower_loss(problem),
                                                      problem.phi.detach().to(copies.low))
                return problem.reduce(low_hvp(v))

            result = linalg.mixed_precision_cg(hvp, low_product, rhs, x0=x0, damping=self.damping, tol=self.tol,
                                               max_iter=budget, low_dtype=copies.low)
        else:
            result = linalg.conjugate_gradient(hvp, rhs, x0=x0, damping=self.damping, tol=self.tol,
                                               max_iter=budget)
        result.iterations += guess_products
        if self.warm_start and not result.negative_curvature:
            self.older, self.previous = self.previous, result.x.detach()
        return result

    def initial_guess(self, hvp, rhs: Tensor) -> Tuple[Optional[Tensor], int]:
        """Where CG starts (the last solution, or the best combination of the last two) and the products spent.

        With two previous solutions x1, x2 the start is their combination closest to the new answer in the
        energy norm (a Galerkin projection on span{x1, x2}, two extra products). Along a leader that moves
        smoothly this holds the extrapolation 2 x1 - x2, whose error is second order in the leader's step, and it
        is never worse than x1 itself; a nearly singular projection falls back to x1.
        """
        usable = [x.to(rhs.device) for x in (self.previous, self.older)
                  if x is not None and x.shape == rhs.shape and x.dtype == rhs.dtype]
        if len(usable) < 2 or self.max_iter < 3:  # the projection's two products need a budget to come from
            return (usable[0] if usable else None), 0
        # the 2x2 system by hand, from dot products: tiny matrix calls can cost more than a product here
        x1, x2 = usable
        A = linalg.damped(hvp, self.damping)
        a1, a2 = A(x1), A(x2)
        g11, g22, g12 = x1.dot(a1), x2.dot(a2), 0.5 * (x1.dot(a2) + x2.dot(a1))
        b1, b2 = x1.dot(rhs), x2.dot(rhs)
        det = g11 * g22 - g12 * g12
        if not (torch.isfinite(det) and g11 > 0 and g22 > 0
                and det > torch.finfo(rhs.dtype).eps ** 0.5 * g11 * g22):
            return x1, 2
        x0 = ((g22 * b1 - g12 * b2) / det) * x1 + ((g11 * b2 - g12 * b1) / det) * x2
        return (x0 if torch.isfinite(x0).all() else x1), 2

    def forget(self) -> None:
        self.previous = self.older = None

    def state_dict(self) -> Dict[str, Any]:
        return {"previous": None if self.previous is None else self.previous.cpu(),
                "older": None if self.older is None else self.older.cpu()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.previous = state.get("previous")
        self.older = state.get("older")


class ImplicitNeumann(_Implicit):
    """Truncated Neumann series: x = alpha * sum_{j<terms} (I - alpha (H + damping I))^j grad_phi J."""

    name = "implicit-neumann"

    def __init__(self, terms: int = 20, alpha: float = 0.1, damping: float = 0.0, on_failure: str = "skip"):
        super().__init__(damping, on_failure)
        self.terms, self.alpha = terms, alpha

    def solve(self, hvp, rhs: Tensor, problem: Optional[SteeringProblem] = None) -> linalg.SolveResult:
        return linalg.neumann_series(hvp, rhs, terms=self.terms, alpha=self.alpha, damping=self.damping)


@register("implicit-cg")
def _build_cg(config) -> ImplicitCG:
    return ImplicitCG(tol=config.tol, max_iter=config.max_iter, damping=config.damping,
                      warm_start=config.warm_start, on_failure=config.on_failure,
                      mixed_precision=config.mixed_precision)


@register("implicit-neumann")
def _build_neumann(config) -> ImplicitNeumann:
    return ImplicitNeumann(terms=config.terms, alpha=config.alpha, damping=config.damping,
                           on_failure=config.on_failure)
