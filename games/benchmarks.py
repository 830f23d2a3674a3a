"""`stackelberg bench envs`: the neural environment's rounds through the framework against a plain-torch loop.

The framework side is what `stackelberg run neural/<variant>` does (Lightning Trainer, TensorBoard, metrics.jsonl,
checkpoints; progress bar off). The plain side is the same math written out below in ~40 lines of torch, with the
same initial RM and the same random draws, so both end at the same policy mean (the JSON reports the largest
difference). Both run in this process, one after the other, `--repeats` times; the fastest of each counts.

Run it:  stackelberg bench envs --rounds 200 --variant fpo-relaxed
         stackelberg bench envs --costs neural --rounds 20     (CPU ms per round of every neural recipe)
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

import torch

from stackelberg.game import power_schedule

from .neural_rlhf import NeuralRLHF, reward_model


def plain_loop(variant: str, rounds: int, total_rounds: int, seed: int,
               label_gradient: bool = False) -> Dict[str, Any]:
    """The neural-network environment in plain torch (no framework): returns the final policy mean and per-round metrics.

    `label_gradient` as the game's key of that name: whether FPO-relaxed's error factor differentiates u(y).
    """
    c = NeuralRLHF.Config()
    torch.manual_seed(seed)  # as the runner seeds before it builds the game
    net = reward_model(c.dim, c.hidden, c.init_std)
    theta = torch.zeros(c.dim, requires_grad=True)
    ideal = torch.zeros(c.dim)
    ideal[: c.signal_dims] = c.ideal
    rm_opt = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=1e-3)
    params = list(net.parameters())
    generator = torch.Generator().manual_seed(seed * 100_003)  # the framework's per-run stream
    outside = torch.get_rng_state()
    torch.set_rng_state(generator.get_state())
    buffer_y, buffer_u = torch.zeros(0, c.dim), torch.zeros(0)
    weight = 0.005
    history: List[Dict[str, float]] = []

    def utility(y):
        return c.utility_scale * torch.exp(-c.utility_width * ((y - ideal) ** 2).sum(-1))

    for t in range(rounds):
        sigma = power_schedule(c.sigma, c.sigma_final, c.sigma_power, t, total_rounds)
        lr = power_schedule(0.05, 0.001, 4.0, t, total_rounds)
        for _ in range(15):
            y = theta + sigma * torch.randn(1, c.dim)
            r = net(y).squeeze(-1)
            objective = (r - c.action_cost * (y ** 2).sum(-1)).mean()
            if variant.startswith("fpo"):
                g = torch.autograd.grad(r.sum(), params, create_graph=True)
                plasticity = sum((gi ** 2).sum() for gi in g)
                u = utility(y) if label_gradient else utility(y).detach()
                error = (r - u) if variant == "fpo-relaxed" else torch.ones_like(r)
                objective = objective - (weight * error * plasticity).mean()
            (grad,) = torch.autograd.grad(objective, theta)
            with torch.no_grad():
                theta += lr * grad.clamp(-1.0, 1.0)
        with torch.no_grad():
            y = theta + sigma * torch.randn(c.labels_per_round, c.dim)
            buffer_y = torch.cat([buffer_y, y])[-c.buffer_size:]
            buffer_u = torch.cat([buffer_u, utility(y)])[-c.buffer_size:]
        loss = ((net(buffer_y).squeeze(-1) - buffer_u) ** 2).mean()
        rm_opt.zero_grad(set_to_none=True)
        loss.backward()
        rm_opt.step()
        with torch.no_grad():  # the same per-round metrics the game logs
            mean = theta.detach()
            u, r = utility(mean), net(mean.unsqueeze(0)).squeeze()
            row = {"true/utility": u.item(), "proxy/reward": r.item(), "rm/error_on_policy": (r - u).item(),
                   "noise/magnitude": mean[c.signal_dims:].norm().item()}
            row.update({f"policy/mean_{i}": v for i, v in enumerate(mean.tolist())})
            history.append(row)
    torch.set_rng_state(outside)
    return {"theta": theta.detach().clone(), "history": history}


class TimedNeuralRLHF(NeuralRLHF):
    """The neural game, timing its own fit (wall and this process's CPU time) and drawing no figures."""

    timings: Dict[str, float] = {}

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self._started = (time.perf_counter(), time.process_time())

    def on_fit_end(self) -> None:
        wall, cpu = self._started
        TimedNeuralRLHF.timings = {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}

    @classmethod
    def figures(cls, history):
        return {}


def framework_run(variant: str, rounds: int, seed: int, folder: Path) -> Dict[str, Any]:
    """`stackelberg run neural/<variant> rounds=<rounds>` into `folder`: fit time and final policy mean."""
    from stackelberg import runner
    from stackelberg.recipes import load_recipe

    recipe = load_recipe(f"neural/{variant}", [f"seed={seed}", f"rounds={rounds}", "trainer.progress_bar=false",
                                               f"output_dir={folder}", f"game.name={__name__}:TimedNeuralRLHF"])
    summary = runner.execute(recipe, folder, quiet=True)
    final = summary["final"]
    theta = torch.tensor([final[f"policy/mean_{i}"] for i in range(10)])
    return {"theta": theta, **TimedNeuralRLHF.timings}


def estimator_costs(env: str, rounds: int, skip: int) -> Dict[str, Any]:
    """CPU time per round of every recipe of `env` (game.play, after `skip` warm-up rounds), and relative to
    fpo-relaxed: what an exact steering estimator costs beside the first-order one."""
    from stackelberg.recipes import list_recipes, load_recipe
    from stackelberg.runner import build_game

    costs = {}
    for name, _ in list_recipes():
        if not name.startswith(env + "/"):
            continue
        game = build_game(load_recipe(name))
        game.play(skip)
        started = time.process_time()
        game.play(rounds)
        costs[name.split("/", 1)[1]] = 1e3 * (time.process_time() - started) / rounds
    base = costs.get("fpo-relaxed") or 1.0
    return {
        "benchmark": "envs --costs",
        "environment": env,
        "rounds_timed": rounds,
        "after_rounds": skip,
        "cpu_ms_per_round": {k: round(v, 3) for k, v in costs.items()},
        "relative_to_fpo_relaxed": {k: round(v / base, 2) for k, v in costs.items()},
    }


def envs(args: List[str]) -> Dict[str, Any]:
    """Time the framework against the plain loop on the neural environment; return the JSON record.

    With --costs linear|neural: the CPU cost per round of each of that environment's recipes instead.
    """
    parser = argparse.ArgumentParser(prog="stackelberg bench envs")
    parser.add_argument("--costs", choices=["linear", "neural"], default=None,
                        help="time every recipe of this environment per round instead (CPU time, game.play)")
    parser.add_argument("--skip", type=int, default=100, help="--costs: warm-up rounds before timing")
    parser.add_argument("--variant", default="fpo-relaxed", choices=["rlhf", "fpo-practical", "fpo-relaxed"])
    parser.add_argument("--rounds", type=int, default=200, help="rounds played (T of the schedules)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2, help="the fastest of this many timings counts")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (small ops: 1 is fastest)")
    opts = parser.parse_args(args)
    torch.set_num_threads(opts.threads)
    from stackelberg.cli import _quiet_libraries

    _quiet_libraries()
    if opts.costs:
        return estimator_costs(opts.costs, opts.rounds, opts.skip)
    from stackelberg.recipes import load_recipe

    label_gradient = bool(load_recipe(f"neural/{opts.variant}").config.game.label_gradient)
    fw_wall, fw_cpu, plain_wall, plain_cpu = [], [], [], []
    for _ in range(opts.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            fw = framework_run(opts.variant, opts.rounds, opts.seed, Path(tmp) / "run")
        fw_wall.append(fw["wall"])
        fw_cpu.append(fw["cpu"])
        wall, cpu = time.perf_counter(), time.process_time()
        plain = plain_loop(opts.variant, opts.rounds, opts.rounds, opts.seed, label_gradient)
        plain_wall.append(time.perf_counter() - wall)
        plain_cpu.append(time.process_time() - cpu)
    return {
        "benchmark": "envs",
        "environment": f"neural/{opts.variant}",
        "rounds": opts.rounds,
        "leader_steps_per_round": 15,
        "threads": opts.threads,
        "framework_s": round(min(fw_wall), 3),
        "plain_torch_s": round(min(plain_wall), 3),
        "ratio": round(min(fw_wall) / min(plain_wall), 3),
        "framework_cpu_s": round(min(fw_cpu), 3),
        "plain_torch_cpu_s": round(min(plain_cpu), 3),
        "cpu_ratio": round(min(fw_cpu) / min(plain_cpu), 3),
        "framework_ms_per_round": round(1e3 * min(fw_wall) / opts.rounds, 3),
        "plain_ms_per_round": round(1e3 * min(plain_wall) / opts.rounds, 3),
        "all_framework_s": [round(t, 3) for t in fw_wall],
        "all_plain_s": [round(t, 3) for t in plain_wall],
        "same_trajectory_max_abs_diff": float((fw["theta"] - plain["theta"]).abs().max()),
    }
