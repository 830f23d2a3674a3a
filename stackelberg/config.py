"""Structured configs: every recipe key, its type, default and meaning, validated by OmegaConf.

A recipe is a YAML file with the sections below. `game:` holds `name` plus the game's own keys, which the game
declares in its nested `Config` dataclass. Each field's `help` metadata is the documentation of that key
(docs/recipes.md is generated from it, and a test fails when a key has none).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


def doc(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field with a default and its documentation."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


@dataclass
class EstimatorConfig:
    """How the leader's steering term is computed."""

    name: str = doc("none", "none | fpo | unrolled | implicit-cg | implicit-neumann")
    variant: str = doc("practical", "fpo: 'relaxed' keeps the follower's error factor, 'practical' drops it")
    weight: float = doc(0.1, "fpo: the penalty weight gamma (2 * eta for one squared-loss step)")
    steps: int = doc(1, "unrolled: number K of differentiable follower steps")
    tol: float = doc(1e-6, "implicit-cg: relative residual at which CG stops")
    max_iter: int = doc(50, "implicit-cg: most Hessian-vector products per solve")
    damping: float = doc(0.0, "implicit-*: solve (H + damping I) v = grad_phi J")
    warm_start: bool = doc(True, "implicit-cg: start each solve from the best combination of the last two solutions")
    mixed_precision: bool = doc(False, "implicit-cg, float64 followers: take the Hessian-vector products in "
                                       "float32 and the residuals in float64 (iterative refinement): the same "
                                       "tolerance at about half the cost per product where products are "
                                       "memory-bound")
    terms: int = doc(20, "implicit-neumann: number of series terms")
    alpha: float = doc(0.1, "implicit-neumann: step alpha of the series; needs alpha * lambda_max(H) < 2")
    on_failure: str = doc("skip", "implicit-*: on negative curvature or a non-finite solve, 'skip' the "
                                  "steering this step (logged) or 'raise'")
    options: Dict[str, Any] = doc({}, "keys of an estimator of your own (registered with stackelberg.register), "
                                      "e.g. estimator.options.scale=2; its factory reads and checks them (the "
                                      "built-in estimators take none)")


@dataclass
class PlayerConfig:
    """One player's optimiser, schedule and number of updates per round."""

    optimizer: str = doc("sgd", "sgd | adam | adamw")
    lr: float = doc(1e-3, "learning rate at round 0")
    momentum: float = doc(0.0, "sgd momentum")
    betas: List[float] = doc([0.9, 0.999], "adam/adamw betas")
    eps: float = doc(1e-8, "adam/adamw epsilon")
    weight_decay: float = doc(0.0, "weight decay (decoupled for adamw)")
    steps: int = doc(1, "updates of this player per round")
    clip_value: Optional[float] = doc(None, "clip each gradient element to [-clip_value, clip_value]")
    clip_norm: Optional[float] = doc(None, "rescale the gradient to at most this L2 norm")
    schedule: str = doc("constant", "constant | power: lr_t = lr_final + (lr - lr_final) * (1 - (t/T)^power)")
    lr_final: float = doc(0.0, "power schedule: learning rate at the last round")
    power: float = doc(1.0, "power schedule: exponent")


@dataclass
class TrainerConfig:
    """Lightning Trainer settings that a recipe may change."""

    accelerator: str = doc("cpu", "cpu | gpu | auto")
    devices: Any = doc(1, "number of devices (or a list of ids)")
    strategy: str = doc("auto", "auto | ddp | ddp_spawn | ... (see docs/scaling.md)")
    num_nodes: int = doc(1, "number of machines")
    rounds_per_epoch: int = doc(100, "rounds between checkpoints (one Lightning epoch)")
    progress_bar: bool = doc(True, "show Lightning's progress bar")
    log_every: int = doc(1, "log metrics to TensorBoard every this many rounds")
    threads: int = doc(0, "torch CPU threads for the run (torch.set_num_threads); 0 keeps torch's default. "
                          "Games of small tensors run fastest with 1")


@dataclass
class RunConfig:
    """A whole recipe."""

    game: Any = doc({}, "the game: `name` (a module under games/ or 'package.module:Class') and its own keys")
    estimator: EstimatorConfig = field(default_factory=EstimatorConfig, metadata={"help": "steering estimator"})
    leader: PlayerConfig = field(default_factory=PlayerConfig, metadata={"help": "the leader's optimiser"})
    follower: PlayerConfig = field(default_factory=PlayerConfig, metadata={"help": "the follower's optimiser"})
    trainer: TrainerConfig = field(default_factory=TrainerConfig, metadata={"help": "Lightning Trainer"})
    rounds: int = doc(100, "number of rounds (training steps) to play")
    seed: int = doc(0, "random seed (parameters and the game's random stream)")
    output_dir: Optional[str] = doc(None, "run folder; default runs/<recipe>/version_<n>")
    name: str = doc("", "the recipe's name (set from its path; names the run folder)")
    description: str = doc("", "one line shown by `stackelberg list`")
    base: Optional[str] = doc(None, "another recipe whose keys this one starts from")
