"""The paper's linear environment: a deterministic action y in R^50 against a linear reward model.

Leader:    the action y itself (starts at 0); objective r_w(y) - 0.1 ||y||^2 (minus the FPO penalty, if any)
Follower:  a linear RM r_w(y) = w . y, w0 = w_true + N(0, 0.1^2), trained by SGD on (u(y) - w . y)^2 at the
           action the leader has just taken
Truth:     u(y) = 10 exp(-0.3 ||y - y*||^2), y* = 2 on the 3 signal dimensions, 0 on the 47 noise dimensions

Standard iterative RLHF drifts into the noise dimensions, where w0's small errors reward it and where the RM only
learns slowly; FPO penalises the drift (for a linear RM grad_w r = y, so the penalty is gamma (r - u) ||y||^2
relaxed, gamma ||y||^2 practical).

Run it:  stackelberg compare linear --seeds 0        (every variant, then the paper's three figures)
         stackelberg run linear/fpo-relaxed
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List

import numpy as np
import torch
from torch import Tensor, nn

from stackelberg import LeaderFollowerGame
from stackelberg.config import doc


class Vector(nn.Module):
    """One parameter vector; called with actions y it returns y @ value (a linear model without bias)."""

    def __init__(self, init: Tensor):
        super().__init__()
        self.value = nn.Parameter(init.clone())

    def forward(self, y: Tensor | None = None) -> Tensor:
        return self.value if y is None else y @ self.value


class LinearRLHF(LeaderFollowerGame):
    """The paper's linear environment. The leader's parameter is the action; the follower's is the RM's weight vector."""

    best_metrics = {"true/utility": "max", "proxy/reward": "max"}
    progress_metrics = ("true/utility", "noise/magnitude")

    @dataclass
    class Config:
        dim: int = doc(50, "dimension of the action y")
        signal_dims: int = doc(3, "the first this many dimensions carry the true utility")
        ideal: float = doc(2.0, "y* on the signal dimensions (0 elsewhere)")
        utility_scale: float = doc(10.0, "u(y) = utility_scale * exp(-utility_width * ||y - y*||^2)")
        utility_width: float = doc(0.3, "see utility_scale")
        action_cost: float = doc(0.1, "the leader pays action_cost * ||y||^2")
        rm_true_weight: float = doc(1.0, "w_true on the signal dimensions (0 elsewhere)")
        rm_init_noise: float = doc(0.1, "w0 = w_true + N(0, rm_init_noise^2) per coordinate")
        rm_init_seed: int = doc(0, "numpy seed of w0's noise (the reference run used 0 whatever the run seed); "
                                   "-1 draws it from the run's seed instead")
        dtype: str = doc("float64", "float64 | float32")

    def __init__(self, config: "LinearRLHF.Config" = None, **kwargs):
        super().__init__(**kwargs)
        self.config = c = config or LinearRLHF.Config()
        if not 0 < c.signal_dims <= c.dim:
            raise ValueError(f"game.signal_dims must be in 1..game.dim, got {c.signal_dims}")
        dtype = getattr(torch, c.dtype)
        ideal = torch.zeros(c.dim, dtype=dtype)
        ideal[: c.signal_dims] = c.ideal
        self.register_buffer("ideal", ideal)
        w_true = torch.zeros(c.dim, dtype=dtype)
        w_true[: c.signal_dims] = c.rm_true_weight
        # The reference run drew w0's noise with numpy seed 0 (np.random.seed(0); np.random.normal(0, 0.1, 50)),
        # before anything else: the same legacy generator reproduces its w0 bit for bit.
        seed = c.rm_init_seed if c.rm_init_seed >= 0 else self.seed
        noise = np.random.RandomState(seed).normal(0.0, c.rm_init_noise, c.dim)
        self.leader = Vector(torch.zeros(c.dim, dtype=dtype))
        self.follower = Vector(w_true + torch.as_tensor(noise, dtype=dtype))

    # --- the environment -------------------------------------------------------------------------------
    def utility(self, y: Tensor) -> Tensor:
        """True utility u(y) of actions y [..., dim]."""
        c = self.config
        return c.utility_scale * torch.exp(-c.utility_width * ((y - self.ideal) ** 2).sum(-1))

    # --- the hooks -------------------------------------------------------------------------------------
    def leader_batch(self):
        return {"y": self.leader().unsqueeze(0)}  # one deterministic action, kept differentiable

    def label(self, batch):
        return {**batch, "u": self.utility(batch["y"])}

    def leader_values(self, batch, phi):
        y = batch["y"]
        return self.follower_call(phi, y) - self.config.action_cost * (y ** 2).sum(-1)

    def follower_losses(self, batch, phi):
        return (batch["u"] - self.follower_call(phi, batch["y"])) ** 2

    def follower_prediction(self, batch, phi):
        # o = w . y and e = w . y - u(y): grad_w l = 2 e y = 2 e grad_w o. With grad_w j = y too, the fpo
        # estimator's penalty is gamma e ||y||^2 (relaxed) or gamma ||y||^2 (practical): the paper's, exactly.
        o = self.follower_call(phi, batch["y"])
        return o, o - batch["u"]

    def round_metrics(self) -> Dict[str, float]:
        s = self.config.signal_dims
        with torch.no_grad():
            y = self.leader().detach()
            u = self.utility(y)
            r = self.follower(y)
        return {
            "true/utility": u.item(),
            "proxy/reward": r.item(),
            "rm/error_on_policy": (r - u).item(),
            "signal/magnitude": y[:s].norm().item(),
            "noise/magnitude": y[s:].norm().item(),
        }

    # --- figures ---------------------------------------------------------------------------------------
    @classmethod
    def figures(cls, history):
        return cls.comparison_figures({"run": [history]})

    @classmethod
    def comparison_figures(cls, groups: Dict[str, List[Dict[str, List[float]]]]):
        """The paper's three linear figures: phase plot, noise magnitude per round, true utility per round.

        One trajectory per variant (its first seed) in the phase plot; the per-round plots show the mean over
        seeds with a min-max band when there are several.
        """
        import matplotlib.pyplot as plt

        from stackelberg import plots

        c = cls.Config()
        groups = ordered(groups)
        colors = _colors(groups)
        widths = {label: 3.2 if label.endswith("rlhf") else 1.6 for label in groups}  # fpo-practical runs on
        figures = {}                                                                     # rlhf's ray

        # Phase plot over the best utility reachable at each (noise, signal) magnitude: the signal part aligned
        # with y*, so ||y - y*||^2 = (s - ||y*||)^2 + n^2.
        fig, ax = plt.subplots(figsize=(6, 4.6))
        ideal_signal = c.ideal * math.sqrt(c.signal_dims)
        top_n = max([1.0] + [max(h["noise/magnitude"]) for runs in groups.values() for h in runs[:1]])
        top_s = max([ideal_signal + 1] + [max(h["signal/magnitude"]) for runs in groups.values() for h in runs[:1]])
        n_grid, s_grid = np.meshgrid(np.linspace(0, top_n * 1.1, 200), np.linspace(0, top_s * 1.1, 200))
        u_grid = c.utility_scale * np.exp(-c.utility_width * ((s_grid - ideal_signal) ** 2 + n_grid ** 2))
        contour = ax.contourf(n_grid, s_grid, u_grid, levels=20, cmap="Greys", alpha=0.6)
        fig.colorbar(contour, ax=ax, label="true utility (best at this magnitude)")
        for label, runs in groups.items():
            h = runs[0]
            ax.plot(h["noise/magnitude"], h["signal/magnitude"], color=colors[label], lw=widths[label], label=label)
            ax.plot(h["noise/magnitude"][-1], h["signal/magnitude"][-1], "o", color=colors[label], ms=5)
        ax.plot(0, 0, "ks", ms=7, label="start")
        ax.plot(0, ideal_signal, "*", color="gold", mec="k", ms=14, label="human ideal")
        ax.set_xlabel("noise magnitude ||y[3:]||")
        ax.set_ylabel("signal magnitude ||y[:3]||")
        ax.set_title("Linear environment: policy trajectories")
        ax.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        figures["phase"] = fig

        for key, name, title in (("noise/magnitude", "noise_magnitude", "Noise magnitude ||y[3:]||"),
                                 ("true/utility", "true_utility", "True utility u(y)")):
            fig, ax = plt.subplots(figsize=(6, 3.8))
            for label, runs in groups.items():
                plots.mean_band(ax, runs, key, label, color=colors[label])
            if key == "true/utility":
                ax.axhline(c.utility_scale, color="k", ls="--", lw=1, label="ideal")
            ax.set_xlabel("round")
            ax.set_ylabel(key)
            ax.set_title(title)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            fig.tight_layout()
            figures[name] = fig
        return figures


VARIANTS = ("rlhf", "fpo-practical", "fpo-relaxed", "unrolled", "implicit-cg", "implicit-neumann")


def ordered(groups: Dict[str, list]) -> Dict[str, list]:
    """The groups in the paper's order (rlhf, fpo-practical, fpo-relaxed, then the exact estimators)."""
    rank = {v: i for i, v in enumerate(VARIANTS)}
    return dict(sorted(groups.items(), key=lambda kv: (rank.get(kv[0].split("/")[-1], len(rank)), kv[0])))


def _colors(groups) -> Dict[str, str]:
    """A fixed colour per variant name (rlhf red, fpo blue/green, exact estimators in other hues)."""
    fixed = {"rlhf": "tab:red", "fpo-practical": "tab:blue", "fpo-relaxed": "tab:green", "unrolled": "tab:purple",
             "implicit-cg": "tab:orange", "implicit-neumann": "tab:brown"}
    spare = iter(["tab:pink", "tab:olive", "tab:cyan", "tab:gray"] * 10)
    return {label: fixed.get(label.split("/")[-1]) or next(spare) for label in groups}


Game = LinearRLHF
