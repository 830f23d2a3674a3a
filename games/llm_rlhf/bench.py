"""`stackelberg bench llm-step`: what the FPO penalty costs in the LLM game, measured in one run (JSON).

    stackelberg bench llm-step                     # defaults: 40 rounds per variant, n = 8
    stackelberg bench llm-step --rounds 20 --repeats 200

1. step_time_ratio: a full round (sampling, RM scoring, best-of-n, SFT step, RM step) with the FPO-relaxed
   penalty over the same round without it (estimator none), head-only RM, synthetic task. The two games play
   alternately, round by round, from the same state and random stream; medians of the per-round times.
2. penalty_speedup: the batched FPO penalty of n = 8 candidates (closed form on the head's features, which the
   baseline computes anyway to score the candidates) against the obvious alternative, a Python loop that calls
   torch.autograd.grad for each candidate's reward and its reference's reward after one RM forward with graph.
   Both give the same penalties (checked; max_abs_diff). Also reported: the same loop started from the cached
   features (no RM forward), the kindest loop there is.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F

from stackelberg import EstimatorConfig, PlayerConfig, build_estimator
from stackelberg.game import detach_batch
from stackelberg.hypergrad.base import SteeringProblem

from .game import LLMRLHFGame


def _game(estimator: str, args, seed: int = 0) -> LLMRLHFGame:
    torch.manual_seed(seed)
    config = LLMRLHFGame.Config(synthetic_dir=args.synthetic_dir, candidates=args.n, prompts_per_round=1,
                                eval_every=10 ** 9)
    return LLMRLHFGame(config, estimator=build_estimator(EstimatorConfig(name=estimator, variant="relaxed",
                                                                         weight=10.0)),
                       leader_config=PlayerConfig(optimizer="adam", lr=1e-3),
                       follower_config=PlayerConfig(optimizer="sgd", lr=0.05), rounds=10 ** 9, seed=seed)


def _median_ms(times: List[float]) -> float:
    return 1e3 * statistics.median(times)


def step_times(args) -> Dict[str, float]:
    """Median round time of the baseline and of FPO, interleaved so that machine load hits both alike."""
    base, fpo = _game("none", args), _game("fpo", args)
    for game in (base, fpo):
        game.play(3)  # warm-up
    times = {"none": [], "fpo": []}
    for _ in range(args.rounds):
        for name, game in (("none", base), ("fpo", fpo)):
            start = time.perf_counter()
            game.play(1)
            times[name].append(time.perf_counter() - start)
    return {"baseline_round_ms": _median_ms(times["none"]), "fpo_round_ms": _median_ms(times["fpo"]),
            "step_time_ratio": statistics.median(times["fpo"]) / statistics.median(times["none"])}


def loop_penalty(game: LLMRLHFGame, batch: Dict, gamma: float, cached: bool = False) -> torch.Tensor:
    """FPO-relaxed penalties with one autograd.grad per candidate (and per reference answer): the slow way.

    `cached`: start from the features the batch already holds instead of a fresh RM forward (a kinder loop).
    """
    phi = game.follower_flat().detach().requires_grad_(True)
    w, b = game.head.weight, game.head.bias
    out = []
    if cached:
        feats_y, feats_ref = batch["y_feats"][:, : w.shape[1]], batch["ref_feats"][:, : w.shape[1]]
    else:
        feats_y, feats_ref = _full_features(game, batch, "y"), _full_features(game, batch, "ref")
    r = F.linear(feats_y, phi[: w.numel()].view_as(w), None if b is None else phi[w.numel():]).view(-1)
    r_ref = F.linear(feats_ref, phi[: w.numel()].view_as(w), None if b is None else phi[w.numel():]).view(-1)
    for i in range(r.shape[0]):
        g_y, = torch.autograd.grad(r[i], phi, retain_graph=True)
        g_ref, = torch.autograd.grad(r_ref[i], phi, retain_graph=True)
        error = torch.sigmoid(r[i] - r_ref[i]) - batch["target"][i]
        out.append(gamma * error.detach() * torch.dot(g_y, g_y - g_ref))
    return torch.stack(out)


def _full_features(game: LLMRLHFGame, batch: Dict, which: str) -> torch.Tensor:
    """The head's input for every answer by a fresh RM forward (what the loop needs for its graph)."""
    from . import models

    enc = models.rm_inputs(game.rm_tokenizer, batch["prompt_text"], batch["text" if which == "y" else "ref_text"],
                           game.config.rm_max_length)
    return models.head_features(game.follower, game.head, enc["input_ids"], enc["attention_mask"])


def penalty_times(args) -> Dict[str, float]:
    """Batched (closed-form) FPO penalty against the per-candidate autograd.grad loop at n candidates."""
    game = _game("fpo", args)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        batch = game.label(game.leader_batch())
    detached = detach_batch(batch)
    phi = game.follower_flat().detach()

    def batched():
        return game.estimator.steer(SteeringProblem(game, batch, detached, phi)).penalty

    def looped():
        return loop_penalty(game, detached, game.estimator.weight)

    def looped_cached():
        return loop_penalty(game, detached, game.estimator.weight, cached=True)

    diff = max((batched() - f()).abs().max().item() for f in (looped, looped_cached))
    times = {"batched": [], "loop": [], "loop_cached": []}
    for _ in range(args.repeats):
        for name, fn in (("batched", batched), ("loop", looped), ("loop_cached", looped_cached)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {"batched_penalty_ms": _median_ms(times["batched"]), "loop_penalty_ms": _median_ms(times["loop"]),
            "penalty_speedup": statistics.median(times["loop"]) / statistics.median(times["batched"]),
            "loop_on_cached_features_ms": _median_ms(times["loop_cached"]),
            "penalty_speedup_vs_loop_on_cached_features":
                statistics.median(times["loop_cached"]) / statistics.median(times["batched"]),
            "penalty_max_abs_diff": diff}


def main(args: Sequence[str]) -> Dict[str, object]:
    """Run both measurements and return them with their targets."""
    parser = argparse.ArgumentParser(prog="stackelberg bench llm-step")
    parser.add_argument("--rounds", type=int, default=40, help="timed rounds per variant")
    parser.add_argument("--repeats", type=int, default=100, help="timed penalty computations per method")
    parser.add_argument("--n", type=int, default=8, help="candidates per prompt")
    parser.add_argument("--synthetic-dir", default="runs/llm_synthetic/init")
    parsed = parser.parse_args(list(args))
    torch.set_num_threads(1)
    result: Dict[str, object] = {"candidates": parsed.n, "rm_train": "head", "task": "synthetic"}
    result.update(step_times(parsed))
    result.update(penalty_times(parsed))
    result["targets"] = {"step_time_ratio": "<= 1.15", "penalty_speedup": ">= 3"}
    result["met"] = {"step_time_ratio": result["step_time_ratio"] <= 1.15,
                     "penalty_speedup": result["penalty_speedup"] >= 3.0}
    return result
