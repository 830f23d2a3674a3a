"""Hyperparameter optimisation as a Stackelberg game (the classic bilevel problem), on real data.

Leader:    theta, one log-penalty per input feature; the follower pays 1/2 sum_j exp(theta_j) ||W[:, j]||^2
Follower:  a softmax classifier (W, b) fitted on a training split by gradient descent on
           mean cross-entropy + that penalty
Objective: the leader maximises minus the cross-entropy on a separate validation split

The leader's objective does not depend on theta directly: theta acts only through the follower's best response.
So `none` (a leader that treats the follower as fixed) cannot move at all; every bit of progress comes from the
steering term, which makes this the natural test bench for `unrolled`, `implicit-cg` and `implicit-neumann`.
Pure-noise columns (`noise_features`) are appended to the data so that per-feature penalties have something to
find: a good leader penalises them hard.

Data: scikit-learn's bundled data sets (offline); install the extra with  pip install -e '.[hpo]'

Run it:   stackelberg run hpo/implicit-cg
Compare:  stackelberg compare hpo --seeds 0 1 2      (every estimator and seed, then prints the comparison table)
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Dict, List

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stackelberg import LeaderFollowerGame
from stackelberg.config import doc


class MissingExtra(ImportError, ValueError):
    """A package of an optional extra is missing (a ValueError too, so the CLI prints it as one line)."""


def load_dataset(name: str):
    """(features, labels) of one of scikit-learn's bundled data sets, as numpy arrays; no download."""
    try:
        from sklearn import datasets
    except ImportError:
        raise MissingExtra("game hpo needs scikit-learn for its data sets: pip install -e '.[hpo]'") from None
    loaders = {"digits": datasets.load_digits, "breast_cancer": datasets.load_breast_cancer,
               "wine": datasets.load_wine}
    if name not in loaders:
        raise ValueError(f"game.dataset must be one of {', '.join(loaders)}, got {name!r}")
    x, y = loaders[name](return_X_y=True)
    return x.astype(np.float64), y.astype(np.int64)


class LogPenalties(nn.Module):
    """The leader: one log-penalty per feature."""

    def __init__(self, features: int, init: float):
        super().__init__()
        self.log_reg = nn.Parameter(torch.full((features,), float(init)))

    def forward(self) -> Tensor:
        return self.log_reg


class Classifier(nn.Module):
    """The follower: a linear softmax classifier; given log-penalties it also returns its penalty."""

    def __init__(self, features: int, classes: int):
        super().__init__()
        self.linear = nn.Linear(features, classes)
        nn.init.zeros_(self.linear.weight)  # a convex problem: start from the same point whatever the seed
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: Tensor, log_reg: Tensor | None = None):
        logits = self.linear(x)
        if log_reg is None:
            return logits
        # per-feature L2: column j of W is every class's weight on feature j; the bias is not penalised
        penalty = 0.5 * (log_reg.exp() * (self.linear.weight ** 2).sum(0)).sum()
        return logits, penalty


class HPOGame(LeaderFollowerGame):
    """Hyperparameter optimisation: per-feature L2 penalties (leader) tuned on the validation loss of a softmax
    classifier (follower) fitted on a training split; scikit-learn's bundled data."""

    best_metrics = {"val/loss": "min", "test/accuracy": "max"}
    progress_metrics = ("val/loss", "test/accuracy")

    @dataclass
    class Config:
        dataset: str = doc("digits", "digits | breast_cancer | wine (scikit-learn's bundled data sets)")
        train_size: int = doc(150, "examples in the training split (the follower fits these)")
        val_size: int = doc(300, "examples in the validation split (the leader's objective)")
        test_size: int = doc(0, "examples in the test split; 0 takes all the rest")
        split_seed: int = doc(-1, "seed of the split and of the noise columns; -1 uses the run's seed, so that "
                                  "seeds compare different splits")
        noise_features: int = doc(32, "pure-noise N(0, 1) columns appended to the data")
        init_log_reg: float = doc(-6.0, "every log-penalty theta_j at round 0 (exp(-6) ~ 0.0025: weak)")
        warmup_iters: int = doc(200, "L-BFGS iterations that fit the follower to its best response before "
                                     "round 1 (0: start from zero weights)")
        dtype: str = doc("float64", "float64 | float32")

    def __init__(self, config: "HPOGame.Config" = None, **kwargs):
        super().__init__(**kwargs)
        self.config = config = config or HPOGame.Config()
        if config.dtype not in ("float64", "float32"):
            raise ValueError(f"game.dtype must be float64 or float32, got {config.dtype!r}")
        dtype = getattr(torch, config.dtype)
        x, y = load_dataset(config.dataset)
        rng = np.random.default_rng(self.seed if config.split_seed < 0 else config.split_seed)
        if config.noise_features > 0:
            x = np.concatenate([x, rng.standard_normal((x.shape[0], config.noise_features))], axis=1)
        order = rng.permutation(len(y))
        n_train, n_val = config.train_size, config.val_size
        n_test = config.test_size or len(y) - n_train - n_val
        if min(n_train, n_val, n_test) < 1 or n_train + n_val + n_test > len(y):
            raise ValueError(f"game.train_size + val_size + test_size must fit the {len(y)} examples of "
                             f"{config.dataset}, each at least 1")
        splits = np.split(order, [n_train, n_train + n_val, n_train + n_val + n_test])[:3]
        # standardise with the training split's statistics (constant pixels of digits keep scale 1)
        mean, std = x[splits[0]].mean(0), x[splits[0]].std(0)
        x = (x - mean) / np.where(std < 1e-8, 1.0, std)
        for name, idx in zip(("train", "val", "test"), splits):
            self.register_buffer(f"x_{name}", torch.tensor(x[idx], dtype=dtype))
            self.register_buffer(f"y_{name}", torch.tensor(y[idx]))
        features, classes = x.shape[1], int(y.max()) + 1
        self.real_features = features - config.noise_features
        self.leader = LogPenalties(features, config.init_log_reg).to(dtype)
        self.follower = Classifier(features, classes).to(dtype)
        if config.warmup_iters > 0:
            self.fit_follower(config.warmup_iters)
        self._round_started = (-1, 0.0)

    # --- the hooks -------------------------------------------------------------------------------------
    def leader_batch(self):
        if self._round_started[0] != self.round:  # the first call of a round starts its clock
            self._round_started = (self.round, time.perf_counter())
        # The leader's "data" is its hyperparameters themselves (with their graph to theta): the follower's
        # loss depends on them, so the steering term is grad_theta < grad_phi L_F(phi; theta), v >.
        return {"log_reg": self.leader()}

    def leader_values(self, batch, phi):
        return -F.cross_entropy(self.follower_call(phi, self.x_val), self.y_val, reduction="none")

    def follower_losses(self, batch, phi):
        logits, penalty = self.follower_call(phi, self.x_train, batch["log_reg"])
        # per-sample cross-entropy plus the (shared) penalty, so that the mean is the penalised training loss
        return F.cross_entropy(logits, self.y_train, reduction="none") + penalty

    def round_metrics(self):
        seconds = time.perf_counter() - self._round_started[1]
        metrics = {"time/round_s": seconds}
        with torch.no_grad():
            for split in ("train", "val", "test"):
                logits = self.follower(getattr(self, f"x_{split}"))
                labels = getattr(self, f"y_{split}")
                metrics[f"{split}/loss"] = F.cross_entropy(logits, labels).item()
                metrics[f"{split}/accuracy"] = (logits.argmax(-1) == labels).double().mean().item()
            theta = self.leader().detach()
            metrics["leader/log_reg_mean"] = theta.mean().item()
            metrics["leader/log_reg_min"] = theta.min().item()
            metrics["leader/log_reg_max"] = theta.max().item()
            if self.config.noise_features > 0:
                metrics["leader/log_reg_real_mean"] = theta[:self.real_features].mean().item()
                metrics["leader/log_reg_noise_mean"] = theta[self.real_features:].mean().item()
        metrics["follower/grad_norm"] = self.follower_grad_norm()
        return metrics

    # --- helpers ---------------------------------------------------------------------------------------
    def penalised_train_loss(self, phi: Tensor, log_reg: Tensor) -> Tensor:
        """The follower's objective L_F(phi; theta): mean training cross-entropy plus the penalty."""
        return self.follower_losses({"log_reg": log_reg}, phi).mean()

    def follower_grad_norm(self) -> float:
        """||grad_phi L_F|| at the current follower: how far it is from its best response (0 at it)."""
        phi = self.follower_flat().detach().requires_grad_(True)
        with torch.enable_grad():
            loss = self.penalised_train_loss(phi, self.leader().detach())
            (g,) = torch.autograd.grad(loss, phi)
        return g.norm().item()

    def fit_follower(self, max_iter: int = 200, tol: float = 1e-10) -> float:
        """Fit the follower to its best response to the current penalties by full-batch L-BFGS; returns the
        final gradient norm. Used before round 1 and by the finite-difference tests."""
        params = self.follower_parameters
        optimizer = torch.optim.LBFGS(params, lr=1, max_iter=max_iter, tolerance_grad=tol,
                                      tolerance_change=0.0, history_size=20, line_search_fn="strong_wolfe")
        log_reg = self.leader().detach()

        def closure():
            optimizer.zero_grad()
            loss = self.penalised_train_loss(self.follower_flat(), log_reg)
            loss.backward()
            return loss

        for _ in range(5):  # L-BFGS may stop on a tiny change in the loss before the gradient is small: restart
            with torch.enable_grad():
                optimizer.step(closure)
            for p in params:
                p.grad = None
            norm = self.follower_grad_norm()
            if norm <= tol:
                break
        return norm

    def validation_loss(self) -> float:
        """Mean cross-entropy of the current follower on the validation split (what the leader minimises)."""
        with torch.no_grad():
            return F.cross_entropy(self.follower(self.x_val), self.y_val).item()

    # --- comparison across estimators ------------------------------------------------------------------
    @classmethod
    def comparison_figures(cls, groups: Dict[str, List[Dict[str, List[float]]]]):
        """The default comparison figures, plus the estimators' table printed as markdown."""
        print(comparison_table(groups), flush=True)
        return super().comparison_figures(groups)


def _final(history: Dict[str, List[float]], key: str) -> float:
    values = [v for v in history.get(key, []) if math.isfinite(v)]
    return values[-1] if values else math.nan


def comparison_table(groups: Dict[str, List[Dict[str, List[float]]]]) -> str:
    """A markdown table of every variant: final validation loss, test accuracy and the median time per round,
    each as the mean (and standard deviation) over seeds."""
    def cell(values: List[float], fmt: str) -> str:
        values = [v for v in values if math.isfinite(v)]
        if not values:
            return "-"
        mean = float(np.mean(values))
        return f"{mean:{fmt}}" + (f" ± {float(np.std(values)):{fmt}}" if len(values) > 1 else "")

    lines = ["| variant | seeds | rounds | final val/loss | final test/accuracy | time/round (ms) |",
             "|---|---|---|---|---|---|"]
    for label, runs in groups.items():
        if not runs:
            continue
        rounds = max(len(h.get("val/loss", [])) for h in runs)
        times = [1000 * float(np.median(h["time/round_s"])) for h in runs if h.get("time/round_s")]
        lines.append(f"| {label} | {len(runs)} | {rounds} | {cell([_final(h, 'val/loss') for h in runs], '.4f')} | "
                     f"{cell([_final(h, 'test/accuracy') for h in runs], '.4f')} | {cell(times, '.1f')} |")
    return "\n".join(lines)


Game = HPOGame
