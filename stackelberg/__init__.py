"""stackelberg: two-player leader-follower games on PyTorch Lightning, with pluggable steering estimators."""
from stackelberg.config import EstimatorConfig, PlayerConfig, RunConfig, TrainerConfig
from stackelberg.game import LeaderFollowerGame, detach_batch, leave_one_out, power_schedule
from stackelberg.hypergrad import (
    FPO,
    Estimator,
    ImplicitCG,
    ImplicitNeumann,
    NoSteering,
    SolverFailure,
    Steering,
    SteeringProblem,
    Unrolled,
    build_estimator,
    register,
)

__version__ = "0.1.0"

__all__ = [
    "LeaderFollowerGame", "Estimator", "NoSteering", "FPO", "Unrolled", "ImplicitCG", "ImplicitNeumann",
    "SolverFailure", "Steering", "SteeringProblem", "build_estimator", "register", "EstimatorConfig",
    "PlayerConfig", "RunConfig", "TrainerConfig", "detach_batch", "leave_one_out", "power_schedule",
]
