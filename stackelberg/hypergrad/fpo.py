"""`fpo`: foresighted policy optimisation, the paper's first-order, per-sample look-ahead.

One follower SGD step of size eta on sample y moves phi by -eta grad_phi l(phi; y). For a loss whose gradient is
e(y) * grad_phi o(y) (e the prediction error, o the follower's prediction: r(y) for regression, r(y) - r(y_ref)
for a pairwise loss), the leader's reward at y then changes, to first order, by

    -eta * e(y) * < grad_phi o(y), grad_phi j(y) >

So each sample's adjoint is v_i = -eta grad_phi j(y_i) (diagonal in the samples), and the leader maximises
j - penalty with

    relaxed:   penalty_i = weight * e_i * < grad_phi o_i, grad_phi j_i >
    practical: penalty_i = weight *       < grad_phi o_i, grad_phi j_i >    (e unknown at decision time)

`weight` is the paper's gamma (2 * eta for one step of a squared loss, whose gradient is 2 (r - u) grad r).
The penalty keeps its graph to the leader: in the pathwise case the game differentiates it, as the paper does.
"""
from __future__ import annotations

from stackelberg.hypergrad.base import Estimator, Steering, SteeringProblem, register


class FPO(Estimator):
    """Per-sample first-order steering penalty (the paper, section on FPO)."""

    name = "fpo"

    def __init__(self, variant: str = "practical", weight: float = 0.1):
        if variant not in ("practical", "relaxed"):
            raise ValueError(f"estimator.variant must be 'practical' or 'relaxed', got {variant!r}")
        self.variant = variant
        self.weight = weight

    def steer(self, problem: SteeringProblem) -> Steering:
        game, batch, phi = problem.game, problem.batch, problem.phi
        grad_j = game.per_sample_grads(lambda p: game.leader_values(batch, p), phi)
        grad_o = game.per_sample_grads(lambda p: game.follower_prediction(batch, p)[0], phi)
        alignment = (grad_o * grad_j).sum(-1)
        if self.variant == "relaxed":
            alignment = alignment * game.follower_prediction(batch, phi)[1]
        penalty = self.weight * alignment
        return Steering(
            phi_eval=phi,
            penalty=penalty,
            diagnostics={"fpo/penalty": penalty.detach().mean()},  # a tensor: read only when logged
        )


@register("fpo")
def _build(config) -> FPO:
    return FPO(variant=config.variant, weight=config.weight)
