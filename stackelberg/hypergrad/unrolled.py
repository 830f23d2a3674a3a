"""`unrolled`: differentiate through K steps of a functional copy of the follower's own optimizer.

phi_0 = phi, phi_{k+1} = step(phi_k, g_k), g_k = grad_phi L_F(phi_k; D), and the leader's look-ahead objective is
J(theta, phi_K). Reverse mode through the K steps gives one adjoint per step,

    v_k = dJ(phi_K) / d g_k,

so the steering is sum_k grad_theta < grad_phi L_F(phi_k; D(theta)), v_k > and J is evaluated at phi_K. The v_k
are found in one backward pass by adding a zero "probe" to each g_k and differentiating J with respect to the
probes. The optimizer copy reads hyper-parameters and state (momentum, Adam moments, step count) from the
follower's real optimizer, so the look-ahead takes the same steps the follower would. Memory grows with K.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Tuple

import torch
from torch import Tensor
from torch.func import grad

from stackelberg.hypergrad.base import Estimator, Steering, SteeringProblem, register

State = Dict[str, Tensor]
Step = Callable[[Tensor, Tensor, State], Tuple[Tensor, State]]


def functional_step(optimizer: torch.optim.Optimizer, params: List[torch.nn.Parameter]) -> Tuple[Step, State]:
    """A differentiable copy of `optimizer`'s update on a flat vector, with its current state flattened.

    Supports SGD (momentum, weight decay), Adam and AdamW: the optimizers this framework builds. `params` is the
    follower's trainable parameters in flat order.
    """
    if len(optimizer.param_groups) != 1:
        raise ValueError("unrolled steering needs a follower optimizer with one parameter group")
    group = optimizer.param_groups[0]
    lr, wd = float(group["lr"]), float(group.get("weight_decay", 0.0))

    def flat_state(key: str) -> Tensor | None:
        parts = [optimizer.state.get(p, {}).get(key) for p in params]
        if any(t is None for t in parts):
            return None
        return torch.cat([t.detach().reshape(-1) for t in parts])

    if isinstance(optimizer, torch.optim.SGD):
        momentum, dampening, nesterov = group["momentum"], group["dampening"], group["nesterov"]
        buf = flat_state("momentum_buffer")
        state: State = {} if buf is None else {"buf": buf}

        def step(phi: Tensor, g: Tensor, state: State) -> Tuple[Tensor, State]:
            if wd:
                g = g + wd * phi
            if momentum:
                buf = g if "buf" not in state else momentum * state["buf"] + (1 - dampening) * g
                state = {"buf": buf}
                g = g + momentum * buf if nesterov else buf
            return phi - lr * g, state

        return step, state

    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        decoupled = isinstance(optimizer, torch.optim.AdamW)
        (b1, b2), eps = group["betas"], group["eps"]
        m, v = flat_state("exp_avg"), flat_state("exp_avg_sq")
        steps = [optimizer.state.get(p, {}).get("step") for p in params]
        t0 = float(steps[0]) if steps[0] is not None else 0.0
        if m is None:
            ref = torch.cat([p.detach().reshape(-1) for p in params])
            m, v = torch.zeros_like(ref), torch.zeros_like(ref)
        state = {"m": m, "v": v, "t": torch.tensor(t0)}

        def step(phi: Tensor, g: Tensor, state: State) -> Tuple[Tensor, State]:
            t = state["t"] + 1
            if wd and decoupled:
                phi = phi * (1 - lr * wd)
            elif wd:
                g = g + wd * phi
            m = b1 * state["m"] + (1 - b1) * g
            v = b2 * state["v"] + (1 - b2) * g * g
            bc1, bc2 = 1 - b1 ** t.item(), 1 - b2 ** t.item()
            # sqrt has an infinite derivative at 0; the tiny shift keeps the backward pass finite.
            denom = torch.sqrt(v + 1e-30) / math.sqrt(bc2) + eps
            return phi - (lr / bc1) * m / denom, {"m": m, "v": v, "t": t}

        return step, state

    raise ValueError(f"unrolled steering supports SGD, Adam and AdamW followers, not {type(optimizer).__name__}")


class Unrolled(Estimator):
    """K differentiable follower steps; one adjoint per step."""

    name = "unrolled"

    def __init__(self, steps: int = 1):
        if steps < 1:
            raise ValueError(f"estimator.steps must be >= 1, got {steps}")
        self.steps = steps

    def steer(self, problem: SteeringProblem) -> Steering:
        game = problem.game
        step, state = functional_step(game.follower_optimizer, game.follower_parameters)
        phi = problem.phi
        points, probes = [], []
        with torch.enable_grad():
            for _ in range(self.steps):
                points.append(phi.detach())
                g = grad(problem.follower_loss)(phi)
                probe = torch.zeros_like(g, requires_grad=True)
                probes.append(probe)
                phi, state = step(phi, g + probe, state)
            adjoints = torch.autograd.grad(problem.leader_value(phi), probes, allow_unused=True)
        vs = [problem.reduce(torch.zeros_like(p) if v is None else v) for p, v in zip(probes, adjoints)]
        phi_k = phi.detach()
        return Steering(
            phi_eval=phi_k,
            adjoints=list(zip(points, vs)),
            diagnostics={"unrolled/lookahead_shift": (phi_k - problem.phi).norm().item()},
        )


@register("unrolled")
def _build(config) -> Unrolled:
    return Unrolled(steps=config.steps)
