"""Steering estimators: each one computes the adjoint v of the framework's one idea. See base.py."""
from stackelberg.hypergrad import fpo, implicit, unrolled  # noqa: F401  (register the estimators)
from stackelberg.hypergrad.base import REGISTRY, Estimator, NoSteering, Steering, SteeringProblem, register
from stackelberg.hypergrad.fpo import FPO
from stackelberg.hypergrad.implicit import ImplicitCG, ImplicitNeumann, SolverFailure
from stackelberg.hypergrad.unrolled import Unrolled


def build_estimator(config) -> Estimator:
    """Build the estimator that `config.name` names (an EstimatorConfig or anything with its fields)."""
    try:
        factory = REGISTRY[config.name]
    except KeyError:
        known = ", ".join(sorted(REGISTRY))
        raise ValueError(f"unknown estimator.name {config.name!r}; choose one of: {known}") from None
    return factory(config)


__all__ = ["Estimator", "NoSteering", "FPO", "Unrolled", "ImplicitCG", "ImplicitNeumann", "SolverFailure",
           "Steering", "SteeringProblem", "REGISTRY", "register", "build_estimator"]
