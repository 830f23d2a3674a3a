"""LeaderFollowerGame: a two-player Stackelberg game as a LightningModule. One training step is one round.

A round, in order (`training_step`):

1. for each of the leader's `steps`:
   a. the leader produces data D(theta)                      -> `leader_batch()`
   b. the environment labels it                               -> `label(batch)`
   c. the estimator computes the steering term                -> `estimator.steer(problem)`
   d. the leader ascends its objective J plus the steering    -> `leader_values(batch, phi)`
2. for each of the follower's `steps`:
   a. the follower's training data (fresh leader data by default) -> `follower_batch()`
   b. the follower descends its loss                          -> `follower_losses(batch, phi)`
3. the round's metrics are logged                            -> `round_metrics()`

A game author subclasses this class, assigns `self.leader` and `self.follower` (any nn.Modules) in `__init__`,
and overrides the hooks above. Follower parameters reach the hooks as one flat vector `phi`; call the follower
with `self.follower_call(phi, *inputs)`, so that every estimator can differentiate in phi with torch.func.

Two ways the steering reaches the leader (`steering_path`):

- "pathwise": the batch is a differentiable function of theta (actions, reparameterised samples); the leader's
  surrogate J + <grad_phi L_F(phi; D(theta)), v> is differentiated by autograd.
- "score_function": the batch holds discrete samples and their log-probabilities `batch["logp"]`; each sample's
  steering reward s_i = <grad_phi l_i, v> (one forward-mode JVP for the batch) is added to its reward in a
  policy-gradient estimator with a leave-one-out baseline.

Both players take gradients out of place (`torch.autograd.grad`), average them across processes with one
all-reduce of a flat buffer per player, and step their own optimiser: this is what runs under DDP, whose reducer
does not support the double backward that steering needs.

Example (runnable; a game with a closed-form answer lives in games/quadratic.py)::

    import torch
    from stackelberg import LeaderFollowerGame, PlayerConfig, build_estimator, EstimatorConfig

    class Tug(LeaderFollowerGame):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.leader = torch.nn.Linear(1, 1, bias=False)       # theta: where the leader stands
            self.follower = torch.nn.Linear(1, 1, bias=False)     # phi: the follower's estimate of it
        def leader_batch(self):
            return {"x": self.leader.weight.view(1)}
        def leader_values(self, batch, phi):                      # the leader wants the follower near 1
            return -(self.follower_call(phi, torch.ones(1, 1)).view(1) - 1) ** 2 - 0.1 * batch["x"] ** 2
        def follower_losses(self, batch, phi):                    # the follower tracks the leader
            return (self.follower_call(phi, torch.ones(1, 1)).view(1) - batch["x"]) ** 2

    game = Tug(estimator=build_estimator(EstimatorConfig(name="implicit-cg")),
               leader_config=PlayerConfig(lr=0.1), follower_config=PlayerConfig(lr=0.5))
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

import lightning as L
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.func import functional_call

from stackelberg.config import PlayerConfig
from stackelberg.hypergrad import linalg
from stackelberg.hypergrad.base import Estimator, NoSteering, Steering, SteeringProblem

Batch = Dict[str, Any]


def detach_batch(batch: Batch) -> Batch:
    """The same batch with every tensor cut from the graph."""
    return {k: v.detach() if isinstance(v, Tensor) else v for k, v in batch.items()}


def leave_one_out(values: Tensor, groups: Optional[Tensor] = None) -> Tensor:
    """values_i minus the mean of the other samples (RLOO's baseline).

    With `groups` (one integer id per sample, e.g. the prompt an answer was sampled for), the baseline is the mean
    of the other samples of the same group. A sample with no other sample to compare with keeps its value.
    """
    if groups is None:
        n = values.shape[0]
        if n < 2:
            return values
        return values - (values.sum() - values) / (n - 1)
    ids = torch.unique(groups, return_inverse=True)[1]
    size = int(ids.max()) + 1
    sums = torch.zeros(size, dtype=values.dtype, device=values.device).index_add(0, ids, values)
    others = torch.bincount(ids, minlength=size).to(values.dtype)[ids] - 1
    baseline = (sums[ids] - values) / others.clamp(min=1)
    return values - torch.where(others > 0, baseline, torch.zeros_like(values))


class LeaderFollowerGame(L.LightningModule):
    """A leader-follower (Stackelberg) game; subclass it and override the hooks of the round."""

    steering_path: str = "pathwise"
    #: metrics summarised as "best" in summary.json, with whether higher ("max") or lower ("min") is better
    best_metrics: Dict[str, str] = {}
    #: metrics shown in the progress bar
    progress_metrics: Tuple[str, ...] = ()

    def __init__(
        self,
        estimator: Optional[Estimator] = None,
        leader_config: Optional[PlayerConfig] = None,
        follower_config: Optional[PlayerConfig] = None,
        rounds: int = 1,
        seed: int = 0,
        log_every: int = 1,
    ):
        super().__init__()
        self.automatic_optimization = False
        self.estimator = estimator if estimator is not None else NoSteering()
        self.leader_config = leader_config or PlayerConfig()
        self.follower_config = follower_config or PlayerConfig()
        self.rounds = rounds
        self.seed = seed
        self.log_every = log_every
        self.round = 0  # rounds completed; saved in checkpoints
        self._rng_state: Optional[Tensor] = None
        self._last: Dict[str, float] = {}

    # ----------------------------------------------------------------------------------------------------
    # Hooks a game overrides
    # ----------------------------------------------------------------------------------------------------

    def leader_batch(self) -> Batch:
        """The leader's data D(theta) for one leader step, with its graph to the leader's parameters."""
        raise NotImplementedError

    def label(self, batch: Batch) -> Batch:
        """Add the environment's labels (true utility, oracle scores) to a batch. Default: none."""
        return batch

    def leader_values(self, batch: Batch, phi: Tensor) -> Tensor:
        """Per-sample objective j_i that the leader maximises, given follower parameters `phi`. Shape [n]."""
        raise NotImplementedError

    def follower_losses(self, batch: Batch, phi: Tensor) -> Tensor:
        """Per-sample loss l_i that the follower minimises. Shape [n]."""
        raise NotImplementedError

    def follower_prediction(self, batch: Batch, phi: Tensor) -> Tuple[Tensor, Tensor]:
        """(o_i, e_i): the follower's prediction and its error, with grad_phi l_i proportional to e_i grad_phi o_i.

        Needed by the `fpo` estimator only: for a regression follower o = r(y), e = r(y) - u(y); for a pairwise
        (Bradley-Terry) follower o = r(y) - r(y_ref), e = sigmoid(o) - p*.
        """
        raise NotImplementedError(f"{type(self).__name__} does not define follower_prediction, which fpo needs")

    def follower_batch(self) -> Batch:
        """The data the follower trains on in this round. Default: a fresh, labelled leader batch."""
        with torch.no_grad():
            return detach_batch(self.label(self.leader_batch()))

    def leader_regularizer(self, batch: Batch) -> Tensor:
        """A differentiable term added to the leader's objective on the score-function path (e.g. -KL)."""
        return torch.zeros((), device=self.device)

    def round_metrics(self) -> Dict[str, float]:
        """The game's own metrics after a round (true utility, proxy reward, ...)."""
        return {}

    @classmethod
    def figures(cls, history: Dict[str, List[float]]) -> Dict[str, Any]:
        """A finished run's figures (name -> matplotlib Figure). Default: every metric against the round."""
        from stackelberg import plots

        return {"metrics": plots.metric_grid(history, title=cls.__name__)}

    @classmethod
    def comparison_figures(cls, groups: Dict[str, List[Dict[str, List[float]]]]) -> Dict[str, Any]:
        """Figures comparing runs: `groups` maps a variant's name to its runs' histories (one per seed)."""
        from stackelberg import plots

        keys = list(dict.fromkeys([*cls.best_metrics, *cls.progress_metrics]))
        return plots.comparison(groups, keys)

    def extra_state(self) -> Dict[str, Any]:
        """Game state beyond parameters and buffers that a checkpoint must keep (e.g. a replay buffer)."""
        return {}

    def load_extra_state(self, state: Dict[str, Any]) -> None:
        """Restore what `extra_state` returned."""

    # ----------------------------------------------------------------------------------------------------
    # The round
    # ----------------------------------------------------------------------------------------------------

    def training_step(self, batch: Any, batch_idx: int) -> None:
        steering_logs: Dict[str, float] = {}
        with self._game_random_stream():
            steps = self.leader_config.steps
            self._phi_during_leader_steps = self.follower_flat().detach()  # the follower waits for the leader
            try:
                nonfinite = 0.0
                for i in range(steps):  # diagnostics cost a second backward pass: only on the round's last step
                    logs = self.leader_step(self.label(self.leader_batch()), diagnose=i == steps - 1)
                    nonfinite = max(nonfinite, logs.get("steering/nonfinite", 0.0))
                    steering_logs = logs or steering_logs
                if nonfinite:  # a broken steering term on any of the round's steps shows in its metrics
                    steering_logs["steering/nonfinite"] = nonfinite
            finally:
                self._phi_during_leader_steps = None
            for _ in range(self.follower_config.steps):
                self.follower_step(self.follower_batch())
            for scheduler in self._schedulers():
                scheduler.step()
            self.round += 1
            metrics = {**steering_logs, **self.round_metrics()}
        self._last = {k: float(v) for k, v in metrics.items()}
        if self._distributed():
            self._last = self._mean_over_processes(self._last)
        self._log_round()

    def _log_round(self) -> None:
        """Write the round's metrics to the logger (every `log_every` rounds) and refresh the progress bar.

        Scalars go straight to the logger: Lightning's self.log costs about a millisecond per metric and
        round, more than a round of a small game. The progress metrics go through self.log every 10 rounds, when
        a progress bar shows them or a callback (early stopping, a checkpoint) monitors a metric.
        """
        trainer = self._trainer
        if trainer is None:
            return
        if self.logger is not None and (self.round % self.log_every == 0 or self.round == self.rounds):
            self.logger.log_metrics(self._last, step=self.round)
        if self.round % 10 == 0 or self.round == self.rounds:
            monitored = any(getattr(cb, "monitor", None) for cb in trainer.callbacks)
            if trainer.progress_bar_callback is None and not monitored:
                return
            shown = {k: v for k, v in self._last.items() if k in self.progress_metrics}
            if shown:
                self.log_dict(shown, prog_bar=True, logger=False, on_step=True, on_epoch=False, batch_size=1)

    def _mean_over_processes(self, metrics: Dict[str, float]) -> Dict[str, float]:
        """Average each metric across processes in one collective (every rank logs the same keys)."""
        keys = sorted(metrics)
        values = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=self.device)
        return dict(zip(keys, self.all_reduce_mean(values).tolist()))

    def leader_gradients(self, batch: Batch) -> Tuple[Tensor, Tensor, Steering]:
        """(plain gradient, steering gradient, the estimator's answer) of the leader's objective, flat, ascent.

        The plain gradient holds the follower fixed; their sum is the estimator's total derivative dJ/dtheta.
        """
        steering, plain, steer = self._objectives(batch)
        params = self.leader_parameters
        g_plain = self._grad(plain, params, retain_graph=steer is not None)
        g_steer = self._grad(steer, params) if steer is not None else torch.zeros_like(g_plain)
        if self._distributed():
            g_plain, g_steer = self.all_reduce_mean(torch.stack([g_plain, g_steer])).unbind(0)
        return g_plain, g_steer, steering

    def leader_step(self, batch: Batch, diagnose: bool = True) -> Dict[str, float]:
        """One leader update on its objective plus the steering term; returns the steering diagnostics.

        With `diagnose` the plain and steering gradients are taken apart (steering/norm, steering/cos_policy_grad);
        without it, in one backward pass through their sum, taken apart only if the sum is not finite. Either
        way a non-finite steering term never reaches the parameters.
        """
        if diagnose:
            g_plain, g_steer, steering = self.leader_gradients(batch)
        else:
            steering, plain, steer = self._objectives(batch)
            total = plain if steer is None else plain + steer
            g_total = self.all_reduce_mean(self._grad(total, self.leader_parameters, retain_graph=steer is not None))
            if linalg.all_finite(g_total):
                self.apply_gradient("leader", -g_total, averaged=True, finite=True)
                return {}
            g_plain = self.all_reduce_mean(self._grad(plain, self.leader_parameters))
            g_steer = torch.full_like(g_plain, float("nan")) if steer is not None else torch.zeros_like(g_plain)
        logs = {k: float(v) for k, v in steering.diagnostics.items()}
        logs["steering/nonfinite"] = 0.0
        if not linalg.all_finite(g_steer):  # never let a broken steering term reach the parameters
            logs["steering/nonfinite"] = 1.0
            g_steer = torch.zeros_like(g_steer)
        if linalg.all_finite(g_plain):
            logs["steering/norm"] = g_steer.norm().item()
            logs["steering/cos_policy_grad"] = linalg.cosine(g_steer, g_plain)
            logs["leader/grad_norm"] = g_plain.norm().item()
        self.apply_gradient("leader", -(g_plain + g_steer), averaged=True)
        return logs

    def follower_step(self, batch: Batch) -> None:
        """One follower update on its mean loss."""
        loss = self.follower_losses(batch, self.follower_flat()).mean()
        self.apply_gradient("follower", self._grad(loss, self.follower_parameters))

    def apply_gradient(self, player: str, flat_grad: Tensor, averaged: bool = False, finite: bool = False) -> bool:
        """Step `player`'s ("leader" or "follower") optimiser along a flat descent gradient.

        The gradient is averaged across processes (unless `averaged`), skipped if not finite (returns False;
        `finite` says the caller has checked), clipped as the player's config says, then applied. Custom leader
        updates (e.g. best-of-n) call this too.
        """
        if player == "leader":
            optimizer, params, config = self.leader_optimizer, self.leader_parameters, self.leader_config
        elif player == "follower":
            optimizer, params, config = self.follower_optimizer, self.follower_parameters, self.follower_config
        else:
            raise ValueError(f"player must be 'leader' or 'follower', not {player!r}")
        if not averaged:
            flat_grad = self.all_reduce_mean(flat_grad)
        if not finite and not linalg.all_finite(flat_grad):
            return False
        if config.clip_value is not None:
            flat_grad = flat_grad.clamp(-config.clip_value, config.clip_value)
        if config.clip_norm is not None:
            norm = flat_grad.norm()
            if norm > config.clip_norm:
                flat_grad = flat_grad * (config.clip_norm / norm)
        flat_grad = flat_grad.detach()
        if len(params) == 1:  # a small game's leader is often one tensor: no split
            grads = [flat_grad.view_as(params[0])]
        else:
            grads = [g.view_as(p) for p, g in zip(params, torch.split(flat_grad, [p.numel() for p in params]))]
        group = optimizer.param_groups[0]
        if (type(optimizer) is torch.optim.SGD and len(optimizer.param_groups) == 1 and not group["momentum"]
                and not group["weight_decay"] and not group["maximize"]):
            # plain SGD is one fused update; optimizer.step's bookkeeping costs more than a small game's step
            with torch.no_grad():
                torch._foreach_add_(params, grads, alpha=-group["lr"])
            optimizer._opt_called = True  # what optimizer.step() marks for its LR scheduler (no false warning)
            return True
        for p, g in zip(params, grads):
            p.grad = g
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return True

    def _objectives(self, batch: Batch) -> Tuple[Steering, Tensor, Optional[Tensor]]:
        """The estimator's answer for this batch, then the leader's plain objective and steering term."""
        detached = detach_batch(batch)
        steering = self.estimator.steer(SteeringProblem(self, batch, detached, self._current_phi()))
        return (steering, *self._surrogates(batch, detached, steering))

    def _surrogates(self, batch: Batch, detached: Batch, steering: Steering) -> Tuple[Tensor, Optional[Tensor]]:
        """The leader's plain objective and its steering term, each a scalar whose theta-gradient is wanted."""
        if self.steering_path == "pathwise":
            plain = self.leader_values(batch, steering.phi_eval).mean()
            if self._has_regularizer():
                plain = plain + self.leader_regularizer(batch)
            if steering.is_zero:
                return plain, None
            terms = [self._steering_inner(batch, phi_k, v_k) for phi_k, v_k in steering.adjoints]
            if steering.penalty is not None:
                terms.append(-steering.penalty.mean())
            return plain, sum(terms[1:], terms[0])
        if self.steering_path != "score_function":
            raise ValueError(f"steering_path must be 'pathwise' or 'score_function', not {self.steering_path!r}")
        logp = batch["logp"]
        rewards = self.leader_values(detached, steering.phi_eval).detach()
        groups = batch.get("group")  # RLOO's baseline within each group (e.g. the answers to one prompt)
        plain = (leave_one_out(rewards, groups) * logp).mean() + self.leader_regularizer(batch)
        if steering.is_zero:
            return plain, None
        s = self.steering_rewards(detached, steering)
        return plain, (leave_one_out(s, groups) * logp).mean()

    def _has_regularizer(self) -> bool:
        return type(self).leader_regularizer is not LeaderFollowerGame.leader_regularizer

    def steering_rewards(self, detached: Batch, steering: Steering) -> Tensor:
        """Each sample's steering reward s_i = sum_k < grad_phi l_i(phi_k), v_k > - penalty_i (no graph).

        What the steering adds to a sample's reward on the score-function path, or to its score in a
        best-of-n selection. One forward-mode JVP per adjoint pair for the whole batch.
        """
        s = torch.zeros((), device=self.device)
        for phi_k, v_k in steering.adjoints:
            s = s + self._steering_rewards(detached, phi_k, v_k).detach()
        if steering.penalty is not None:
            s = s - steering.penalty.detach()
        return s

    def _steering_inner(self, batch: Batch, phi: Tensor, v: Tensor) -> Tensor:
        """< grad_phi L_F(phi; D(theta)), v > with its graph to theta: the batch mean of the steering rewards.

        The pathwise path needs only this mean, so it takes one reverse-mode gradient of the mean loss instead
        of the per-sample JVP: the same number, and far cheaper when the loss multiplies phi by a fixed matrix
        (forward mode through a matrix-vector product materialises a zero tangent and copies the matrix).
        """
        g = torch.func.grad(lambda p: self.follower_losses(batch, p).mean())(phi)
        return (g * v).sum()

    def _steering_rewards(self, batch: Batch, phi: Tensor, v: Tensor) -> Tensor:
        """s_i = < grad_phi l_i(phi), v > for every sample, by one JVP."""
        return linalg.per_sample_directional(lambda p: self.follower_losses(batch, p), phi, v)

    # ----------------------------------------------------------------------------------------------------
    # Follower parameters as a flat vector, for torch.func
    # ----------------------------------------------------------------------------------------------------

    @property
    def leader_parameters(self) -> List[nn.Parameter]:
        """The leader's trainable parameters, in a fixed order (listed once; `forget_parameters` re-lists)."""
        if getattr(self, "_leader_params", None) is None:
            self._leader_params = [p for p in self.leader.parameters() if p.requires_grad]
        return self._leader_params

    @property
    def follower_parameters(self) -> List[nn.Parameter]:
        """The follower's trainable parameters, in the order of `follower_flat`."""
        return [p for _, p in self._follower_named()]

    def _follower_named(self) -> List[Tuple[str, nn.Parameter]]:
        if getattr(self, "_follower_params", None) is None:
            self._follower_params = [(n, p) for n, p in self.follower.named_parameters() if p.requires_grad]
        return self._follower_params

    def forget_parameters(self) -> None:
        """Re-list the players' trainable parameters on next use (after freezing or replacing some)."""
        self._leader_params = self._follower_params = self._follower_map = None

    @property
    def follower_map(self) -> linalg.FlatParams:
        """The map between the follower's trainable parameters and the flat vector phi."""
        if getattr(self, "_follower_map", None) is None:
            self._follower_map = linalg.FlatParams(dict(self._follower_named()))
        return self._follower_map

    def follower_flat(self) -> Tensor:
        """The follower's trainable parameters as one flat vector (differentiable to the parameters)."""
        return torch.cat([p.reshape(-1) for p in self.follower_parameters])

    def _current_phi(self) -> Tensor:
        """phi, detached: listed once for all the leader's steps of a round (the follower does not move then)."""
        phi = getattr(self, "_phi_during_leader_steps", None)
        return phi if phi is not None else self.follower_flat().detach()

    def follower_call(self, phi: Tensor, *args: Any, **kwargs: Any) -> Any:
        """Run the follower module with its trainable parameters replaced by the flat vector `phi`."""
        return functional_call(self.follower, self.follower_map.unflatten(phi), args, kwargs)

    def per_sample_grads(self, values: Callable[[Tensor], Tensor], phi: Tensor) -> Tensor:
        """Rows grad_phi values_i(phi), shape [n, P]. Override with a closed form where one exists."""
        return linalg.per_sample_grads(values, phi)

    # ----------------------------------------------------------------------------------------------------
    # Optimisers, gradients, processes
    # ----------------------------------------------------------------------------------------------------

    def configure_optimizers(self):
        leader = _build_optimizer(self.leader_parameters, self.leader_config)
        follower = _build_optimizer(self.follower_parameters, self.follower_config)
        schedulers = [_build_schedule(leader, self.leader_config, self.rounds),
                      _build_schedule(follower, self.follower_config, self.rounds)]
        return [leader, follower], [s for s in schedulers if s is not None]

    @property
    def leader_optimizer(self) -> torch.optim.Optimizer:
        return self._optimizers()[0]

    @property
    def follower_optimizer(self) -> torch.optim.Optimizer:
        return self._optimizers()[1]

    def _optimizers(self) -> List[torch.optim.Optimizer]:
        if self._trainer is None:  # used outside a Trainer (tests, notebooks): build once and keep
            if getattr(self, "_standalone_optimizers", None) is None:
                optimizers, schedulers = self.configure_optimizers()
                self._standalone_optimizers, self._standalone_schedulers = optimizers, schedulers
            return self._standalone_optimizers
        return [o.optimizer if hasattr(o, "optimizer") else o for o in self.optimizers()]

    def _schedulers(self) -> List[Any]:
        if self._trainer is None:
            self._optimizers()
            return self._standalone_schedulers
        schedulers = self.lr_schedulers()
        if schedulers is None:
            return []
        return schedulers if isinstance(schedulers, list) else [schedulers]

    @staticmethod
    def _grad(scalar: Tensor, params: List[nn.Parameter], retain_graph: bool = False) -> Tensor:
        if not scalar.requires_grad:  # an objective that reaches theta only through the follower (e.g. HPO)
            return torch.cat([torch.zeros_like(p).reshape(-1) for p in params])
        grads = torch.autograd.grad(scalar, params, retain_graph=retain_graph, allow_unused=True)
        flat = [(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)]
        # one tensor needs no cat; contiguous() copies only a broadcast gradient (e.g. of p.sum()), so the caller
        # gets a tensor of its own that it may change in place, as cat's result was
        return flat[0].contiguous() if len(flat) == 1 else torch.cat(flat)

    def _distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def all_reduce_mean(self, t: Tensor) -> Tensor:
        """Average a tensor over processes (one collective call); identity on a single process."""
        if not self._distributed():
            return t
        t = t.detach().clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t / dist.get_world_size()

    # ----------------------------------------------------------------------------------------------------
    # The game's own random stream: a round draws the same numbers whatever Lightning does between rounds,
    # so a resumed run follows the trajectory of an uninterrupted one. Each process gets its own stream.
    # ----------------------------------------------------------------------------------------------------

    def on_fit_start(self) -> None:
        self.forget_parameters()
        if self._rng_state is None:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.global_rank)
            self._rng_state = generator.get_state()

    def _game_random_stream(self):
        game = self

        class _Stream:
            def __enter__(self):
                self.outside = torch.get_rng_state()
                if game._rng_state is None:
                    game.on_fit_start()
                torch.set_rng_state(game._rng_state)

            def __exit__(self, *exc):
                game._rng_state = torch.get_rng_state()
                torch.set_rng_state(self.outside)

        return _Stream()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> Optional[int]:
        if self.round >= self.rounds:
            return -1  # the last epoch may be partial
        return None

    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        for name, p in self.named_parameters():
            if not torch.isfinite(p).all():
                raise RuntimeError(f"refusing to write a checkpoint: parameter {name} is not finite")
        checkpoint["stackelberg"] = {
            "round": self.round,
            "rng_state": self._rng_state,
            "estimator": self.estimator.state_dict(),
            "game": self.extra_state(),
            "last_metrics": self._last,
        }

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        state = checkpoint["stackelberg"]
        self.round = state["round"]
        self._rng_state = state["rng_state"]
        self.estimator.load_state_dict(state["estimator"])
        self.load_extra_state(state["game"])
        self._last = state.get("last_metrics", {})

    @property
    def last_metrics(self) -> Dict[str, float]:
        """The metrics of the latest round."""
        return dict(self._last)

    def play(self, rounds: int) -> List[Dict[str, float]]:
        """Play `rounds` rounds without a Trainer (for tests and notebooks); returns each round's metrics."""
        history = []
        for _ in range(rounds):
            self.training_step(None, self.round)
            history.append(dict(self._last))
        return history



def _build_optimizer(params: List[nn.Parameter], config: PlayerConfig) -> torch.optim.Optimizer:
    name = config.optimizer.lower()
    if name == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if name in ("adam", "adamw"):
        cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
        return cls(params, lr=config.lr, betas=tuple(config.betas), eps=config.eps,
                   weight_decay=config.weight_decay)
    raise ValueError(f"unknown optimizer {config.optimizer!r}; choose sgd, adam or adamw")


def power_schedule(start: float, final: float, power: float, t: int, total: int) -> float:
    """v_t = final + (start - final) * (1 - (t / total)^power): the paper's decay of lr and sigma."""
    frac = min(max(t / max(total, 1), 0.0), 1.0)
    return final + (start - final) * (1.0 - frac ** power)


def _build_schedule(optimizer: torch.optim.Optimizer, config: PlayerConfig, rounds: int):
    if config.schedule == "constant":
        return None
    if config.schedule == "power":
        base = config.lr
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda t: power_schedule(base, config.lr_final, config.power, t, rounds) / base)
    raise ValueError(f"unknown schedule {config.schedule!r}; choose constant or power")

