"""The paper's neural-network environment: a Gaussian policy in R^10 against an MLP reward model.

Leader:    a Gaussian policy N(theta, sigma_t^2 I), theta starting at 0; 15 SGD steps per round, each on one
           reparameterised sample y = theta + sigma_t eps, objective r_phi(y) - 0.01 ||y||^2 (minus FPO's penalty),
           gradient clipped element-wise to [-1, 1], learning rate 0.05 -> 0.001 (the recipe's power schedule)
Follower:  an MLP RM 10 -> 32 -> 32 -> 1 (Softplus), weights N(0, 0.1^2), biases 0; each round 5 fresh policy
           samples labelled with u join a FIFO buffer of 50, then one Adam step (lr 1e-3, weight decay 1e-3) on
           the buffer's mean squared error
Truth:     u(y) = 10 exp(-0.2 ||y - y*||^2), y* = (2.5, 2.5, 0, ..., 0)

sigma_t = 0.001 + (0.1 - 0.001) (1 - (t / T)^4), t the round, T the number of rounds.

Run it:  stackelberg compare neural --seeds 0 1 2 3 4
         stackelberg run neural/fpo-relaxed rounds=1000
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from stackelberg import LeaderFollowerGame, power_schedule
from stackelberg.config import doc


class Mean(nn.Module):
    """The policy's mean theta (the leader's only parameter)."""

    def __init__(self, dim: int):
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(dim))

    def forward(self) -> Tensor:
        return self.theta


def reward_model(dim: int, hidden: int, init_std: float) -> nn.Sequential:
    """MLP dim -> hidden -> hidden -> 1 with Softplus; weights N(0, init_std^2), biases 0 (drawn from torch's RNG)."""
    net = nn.Sequential(nn.Linear(dim, hidden), nn.Softplus(), nn.Linear(hidden, hidden), nn.Softplus(),
                        nn.Linear(hidden, 1))
    for layer in net:
        if isinstance(layer, nn.Linear):
            nn.init.normal_(layer.weight, 0.0, init_std)
            nn.init.zeros_(layer.bias)
    return net


class NeuralRLHF(LeaderFollowerGame):
    """The paper's neural-network environment. Metrics of the policy are taken at its mean theta."""

    best_metrics = {"true/utility": "max", "proxy/reward": "max"}
    progress_metrics = ("true/utility", "noise/magnitude")

    @dataclass
    class Config:
        dim: int = doc(10, "dimension of the action y")
        signal_dims: int = doc(2, "the first this many dimensions carry the true utility")
        ideal: float = doc(2.5, "y* on the signal dimensions (0 elsewhere)")
        utility_scale: float = doc(10.0, "u(y) = utility_scale * exp(-utility_width * ||y - y*||^2)")
        utility_width: float = doc(0.2, "see utility_scale")
        action_cost: float = doc(0.01, "the leader pays action_cost * ||y||^2")
        hidden: int = doc(32, "width of the RM's two hidden layers")
        init_std: float = doc(0.1, "standard deviation of the RM's initial weights (biases start at 0)")
        sigma: float = doc(0.1, "the policy's standard deviation at round 0")
        sigma_final: float = doc(0.001, "the policy's standard deviation at the last round")
        sigma_power: float = doc(4.0, "exponent of sigma's schedule sigma_final + (sigma - sigma_final)(1 - (t/T)^p)")
        labels_per_round: int = doc(5, "fresh labelled policy samples added to the RM's buffer each round")
        buffer_size: int = doc(50, "the RM trains on the last this many labelled samples (FIFO)")
        label_gradient: bool = doc(True, "let the leader's gradient flow through the label u(y) (it reaches the "
                                         "policy only through FPO-relaxed's error factor r - u); false treats "
                                         "u(y) as a constant, as an oracle's score would be")

    def __init__(self, config: "NeuralRLHF.Config" = None, **kwargs):
        super().__init__(**kwargs)
        self.config = c = config or NeuralRLHF.Config()
        if not 0 < c.signal_dims <= c.dim:
            raise ValueError(f"game.signal_dims must be in 1..game.dim, got {c.signal_dims}")
        if c.labels_per_round < 1 or c.buffer_size < c.labels_per_round:
            raise ValueError("game.buffer_size must be at least game.labels_per_round >= 1")
        ideal = torch.zeros(c.dim)
        ideal[: c.signal_dims] = c.ideal
        self.register_buffer("ideal", ideal)
        self.leader = Mean(c.dim)
        self.follower = reward_model(c.dim, c.hidden, c.init_std)  # the runner seeds torch first
        self.buffer_y = torch.zeros(0, c.dim)
        self.buffer_u = torch.zeros(0)

    # --- the environment -------------------------------------------------------------------------------
    def utility(self, y: Tensor) -> Tensor:
        """True utility u(y) of actions y [..., dim]."""
        c = self.config
        return c.utility_scale * torch.exp(-c.utility_width * ((y - self.ideal) ** 2).sum(-1))

    def sigma(self) -> float:
        """The policy's standard deviation at the current round."""
        c = self.config
        return power_schedule(c.sigma, c.sigma_final, c.sigma_power, self.round, self.rounds)

    def reward(self, phi: Tensor, y: Tensor) -> Tensor:
        """r_phi(y) for actions y [n, dim], shape [n]: the follower MLP computed from the flat vector phi.

        The same function as self.follower_call(phi, y), written out: functional_call swaps the module's
        parameters in and out on every call, which costs more than this small network's arithmetic
        (tests/test_neural_rlhf.py checks that both agree).
        """
        cache = self._step_cache  # within a leader step, r at the same (phi, y) is computed once
        key = ("reward", id(phi), id(y))
        if cache is not None and key in cache:
            return cache[key][2]
        p = self.follower_map.unflatten(phi)
        h = F.softplus(F.linear(y, p["0.weight"], p["0.bias"]))
        h = F.softplus(F.linear(h, p["2.weight"], p["2.bias"]))
        r = F.linear(h, p["4.weight"], p["4.bias"]).squeeze(-1)
        if cache is not None:
            cache[key] = (phi, y, r)  # holding phi and y keeps their ids from being reused within the step
        return r

    # --- the hooks -------------------------------------------------------------------------------------
    def leader_batch(self):
        theta = self.leader()
        return {"y": theta + self.sigma() * torch.randn(1, theta.shape[0])}  # reparameterised: keeps the graph

    def label(self, batch):
        if self.config.label_gradient:
            return {**batch, "u": self.utility(batch["y"])}
        with torch.no_grad():  # an oracle's score: no graph to build
            return {**batch, "u": self.utility(batch["y"])}

    def leader_values(self, batch, phi):
        y = batch["y"]
        return self.reward(phi, y) - self.config.action_cost * (y ** 2).sum(-1)

    def follower_prediction(self, batch, phi):
        # o = r(y), e = r(y) - u(y); grad_phi j = grad_phi r, so fpo's penalty is weight * e * ||grad_phi r||^2
        # (relaxed) or weight * ||grad_phi r||^2 (practical), kept differentiable in y: the paper's create_graph.
        o = self.reward(phi, batch["y"])
        return o, o - batch["u"]

    def per_sample_grads(self, values, phi):
        """grad_phi of per-sample values, by one create_graph backward pass when the batch is one sample.

        The fpo estimator asks for grad_phi j and grad_phi o in each leader step. Here both are grad_phi r(y)
        (the action cost does not depend on phi), so the first answer serves the whole step; and for the
        one-sample leader batch a plain backward pass replaces jacrev's vmap. `phi` is the step's own detached
        copy of the follower's parameters, so marking it as requiring grad lets the forward pass made here serve
        the step's other uses of r(y) too (see `reward`). tests/test_neural_rlhf.py checks the results against
        the generic Jacobian.
        """
        cache = self._step_cache
        if cache is None or not phi.is_leaf:
            return super().per_sample_grads(values, phi)
        key = ("grad", id(phi))
        if key in cache:
            return cache[key][1]
        phi.requires_grad_(True)
        with torch.enable_grad():
            out = values(phi)
            if out.shape[0] != 1:
                return super().per_sample_grads(values, phi)
            rows = torch.autograd.grad(out.sum(), phi, create_graph=True)[0].unsqueeze(0)
        cache[key] = (phi, rows)  # holding phi keeps its id from being reused within the step
        return rows

    _step_cache = None

    def leader_step(self, batch, diagnose=True):
        self._step_cache = {}  # lives for one leader step: the follower's phi does not change within it
        try:
            return super().leader_step(batch, diagnose)
        finally:
            self._step_cache = None

    def follower_batch(self):
        """5 fresh labelled policy samples join the FIFO buffer; the RM trains on the whole buffer."""
        c = self.config
        with torch.no_grad():
            theta = self.leader()
            y = theta + self.sigma() * torch.randn(c.labels_per_round, theta.shape[0])
            self.buffer_y = torch.cat([self.buffer_y.to(y), y])[-c.buffer_size:]
            self.buffer_u = torch.cat([self.buffer_u.to(y), self.utility(y)])[-c.buffer_size:]
        return {"y": self.buffer_y, "u": self.buffer_u}

    def follower_losses(self, batch, phi):
        return (self.reward(phi, batch["y"]) - batch["u"]) ** 2

    def round_metrics(self) -> Dict[str, float]:
        with torch.no_grad():
            theta = self.leader().detach()
            u = self.utility(theta)
            r = self.follower(theta.unsqueeze(0)).squeeze()
        metrics = {
            "true/utility": u.item(),
            "proxy/reward": r.item(),
            "rm/error_on_policy": (r - u).item(),
            "signal/magnitude": theta[: self.config.signal_dims].norm().item(),
            "noise/magnitude": theta[self.config.signal_dims:].norm().item(),
            "policy/sigma": self.sigma(),
        }
        for i, v in enumerate(theta.tolist()):
            metrics[f"policy/mean_{i}"] = v
        return metrics

    def extra_state(self) -> Dict[str, Any]:
        return {"buffer_y": self.buffer_y.clone(), "buffer_u": self.buffer_u.clone()}

    def load_extra_state(self, state: Dict[str, Any]) -> None:
        self.buffer_y, self.buffer_u = state["buffer_y"].clone(), state["buffer_u"].clone()

    # --- figures ---------------------------------------------------------------------------------------
    @classmethod
    def figures(cls, history):
        return cls.comparison_figures({"run": [history]})

    @classmethod
    def comparison_figures(cls, groups: Dict[str, List[Dict[str, List[float]]]]):
        """The paper's neural figures: true utility per round (first seed of each variant), the PCA phase plot
        of the policy mean (first seed), and the all-seed utility plot (mean and min-max band per variant);
        with several seeds, each seed's final true utility too."""
        import matplotlib.pyplot as plt

        from .linear_rlhf import _colors, ordered
        from stackelberg import plots

        c = cls.Config()
        groups = ordered(groups)
        colors = _colors(groups)
        figures = {}

        fig, ax = plt.subplots(figsize=(6, 3.8))
        for label, runs in groups.items():
            h = runs[0]
            ax.plot(h["round"], h["true/utility"], color=colors[label], lw=1.2, label=label)
        ax.axhline(c.utility_scale, color="k", ls="--", lw=1, label="ideal")
        ax.set_xlabel("round")
        ax.set_ylabel("true utility of the mean")
        ax.set_title("Neural environment: true utility (first seed)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        figures["true_utility"] = fig

        means = {label: _mean_path(runs[0], c.dim) for label, runs in groups.items()}
        means = {k: v for k, v in means.items() if v is not None}
        if means:
            figures["phase_pca"] = _pca_figure(means, colors, c)

        fig, ax = plt.subplots(figsize=(6, 3.8))
        for label, runs in groups.items():
            plots.mean_band(ax, runs, "true/utility", label, color=colors[label])
        ax.axhline(c.utility_scale, color="k", ls="--", lw=1, label="ideal")
        seeds = max(len(runs) for runs in groups.values())
        ax.set_xlabel("round")
        ax.set_ylabel("true utility of the mean")
        ax.set_title(f"Neural environment: {seeds} seeds (mean, min-max band)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        figures["true_utility_seeds"] = fig

        if max(len(runs) for runs in groups.values()) > 1:
            figures["final_utility_seeds"] = _final_strip(groups, colors, c)
        return figures


def _final_strip(groups, colors, c: "NeuralRLHF.Config"):
    """Each seed's final true utility, one column per variant, the mean as a bar: where a mean over a few seeds
    hides two outcomes (a run holds near the ideal or collapses), this shows them."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(groups), 3.8))
    for i, (label, runs) in enumerate(groups.items()):
        finals = np.array([_last_finite(h["true/utility"]) for h in runs], dtype=float)
        offsets = np.linspace(-0.18, 0.18, len(finals)) if len(finals) > 1 else np.zeros(1)
        ax.plot(i + offsets, finals, "o", color=colors[label], ms=4, alpha=0.8)
        ax.plot([i - 0.3, i + 0.3], [np.nanmean(finals)] * 2, color="k", lw=2)
    ax.axhline(c.utility_scale, color="k", ls="--", lw=1)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([label.split("/")[-1] for label in groups], rotation=20, fontsize=8)
    ax.set_ylabel("final true utility")
    ax.set_title("Final true utility per seed (bar: mean)", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig


def _last_finite(values: List[float]) -> float:
    """The last finite value (what summary.json reports as final), NaN if there is none."""
    return next((v for v in reversed(values) if np.isfinite(v)), float("nan"))


def _mean_path(history: Dict[str, List[float]], dim: int):
    keys = [f"policy/mean_{i}" for i in range(dim)]
    if not all(k in history for k in keys):
        return None
    return np.stack([np.asarray(history[k], dtype=float) for k in keys], axis=1)


def _pca_figure(paths: Dict[str, np.ndarray], colors: Dict[str, str], c: "NeuralRLHF.Config"):
    """Trajectories of the policy mean projected on the first two principal components of all of them, over
    the true utility on that plane; start (0) and ideal (y*) marked."""
    import matplotlib.pyplot as plt

    ideal = np.zeros(c.dim)
    ideal[: c.signal_dims] = c.ideal
    points = np.concatenate([np.zeros((1, c.dim)), ideal[None], *paths.values()])
    center = points.mean(0)
    _, _, vt = np.linalg.svd(points - center, full_matrices=False)
    basis = vt[:2]

    def project(x):
        return (x - center) @ basis.T

    projected = project(points)
    lo, hi = projected.min(0), projected.max(0)
    pad = 0.15 * (hi - lo) + 0.1
    a, b = np.meshgrid(np.linspace(lo[0] - pad[0], hi[0] + pad[0], 150),
                       np.linspace(lo[1] - pad[1], hi[1] + pad[1], 150))
    plane = center + a[..., None] * basis[0] + b[..., None] * basis[1]
    u = c.utility_scale * np.exp(-c.utility_width * ((plane - ideal) ** 2).sum(-1))
    fig, ax = plt.subplots(figsize=(6, 4.8))
    contour = ax.contourf(a, b, u, levels=20, cmap="Greys", alpha=0.6)
    fig.colorbar(contour, ax=ax, label="true utility on the PCA plane")
    for label, path in paths.items():
        p = project(path)
        ax.plot(p[:, 0], p[:, 1], color=colors[label], lw=1.4, label=label)
        ax.plot(p[-1, 0], p[-1, 1], "o", color=colors[label], ms=5)
    start, goal = project(np.zeros(c.dim)), project(ideal)
    ax.plot(start[0], start[1], "ks", ms=7, label="start")
    ax.plot(goal[0], goal[1], "*", color="gold", mec="k", ms=14, label="human ideal")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title("Neural environment: policy mean (PCA, first seed)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


Game = NeuralRLHF
