"""`stackelberg bench envs`: the neural environment's rounds through the framework against a plain-torch loop.

The framework side is what `stackelberg run neural/<variant>` does (Lightning Trainer, TensorBoard, metrics.jsonl,
checkpoints; progress bar off). The plain side is the same math written out below in ~40 lines of torch, with the
same initial RM and the same random draws, so both end at the same policy mean (the JSON reports the largest
difference). Both run in this process, one after the other, `--repeats` times; the fastest of each counts.

Run it:  stackelberg bench envs --rounds 200 --variant fpo-relaxed
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

import torch

from stackelberg.game import power_schedule


def plain_loop(variant: str, rounds: int, total_rounds: int, seed: int) -> Dict[str, Any]:
    """PAPER.md 4.2 in plain torch (no framework): returns the final policy mean and per-round metrics."""
    from .neural_rlhf import NeuralRLHF, reward_model

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
                error = (r - utility(y)) if variant == "fpo-relaxed" else torch.ones_like(r)
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


def framework_run(variant: str, rounds: int, seed: int, folder: Path) -> Dict[str, Any]:
    """`stackelberg run neural/<variant> rounds=<rounds>` into `folder`: fit time and final policy mean."""
    from stackelberg import runner
    from stackelberg.recipes import load_recipe

    recipe = load_recipe(f"neural/{variant}", [f"seed={seed}", f"rounds={rounds}", "trainer.progress_bar=false",
                                               f"output_dir={folder}"])
    summary = runner.execute(recipe, folder, quiet=True)  # its wall time is trainer.fit's, figures excluded
    final = summary["final"]
    theta = torch.tensor([final[f"policy/mean_{i}"] for i in range(10)])
    return {"theta": theta, "wall": summary["wall_time_s"]}


def envs(args: List[str]) -> Dict[str, Any]:
    """Time the framework against the plain loop on the neural environment; return the JSON record."""
    parser = argparse.ArgumentParser(prog="stackelberg bench envs")
    parser.add_argument("--variant", default="fpo-relaxed", choices=["rlhf", "fpo-practical", "fpo-relaxed"])
    parser.add_argument("--rounds", type=int, default=200, help="rounds played (T of the schedules)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2, help="the fastest of this many timings counts")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (small ops: 1 is fastest)")
    opts = parser.parse_args(args)
    torch.set_num_threads(opts.threads)
    from stackelberg.cli import _quiet_libraries

    _quiet_libraries()
    framework_times, plain_times = [], []
    for _ in range(opts.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            fw = framework_run(opts.variant, opts.rounds, opts.seed, Path(tmp) / "run")
        framework_times.append(fw["wall"])
        started = time.perf_counter()
        plain = plain_loop(opts.variant, opts.rounds, opts.rounds, opts.seed)
        plain_times.append(time.perf_counter() - started)
    framework_s, plain_s = min(framework_times), min(plain_times)
    return {
        "benchmark": "envs",
        "environment": f"neural/{opts.variant}",
        "rounds": opts.rounds,
        "leader_steps_per_round": 15,
        "threads": opts.threads,
        "framework_s": round(framework_s, 3),
        "plain_torch_s": round(plain_s, 3),
        "ratio": round(framework_s / plain_s, 3),
        "framework_ms_per_round": round(1e3 * framework_s / opts.rounds, 3),
        "plain_ms_per_round": round(1e3 * plain_s / opts.rounds, 3),
        "all_framework_s": [round(t, 3) for t in framework_times],
        "all_plain_s": [round(t, 3) for t in plain_times],
        "same_trajectory_max_abs_diff": float((fw["theta"] - plain["theta"]).abs().max()),
    }
