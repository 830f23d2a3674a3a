"""Oracles (the labels that stand in for humans) and judges (who wins a pairwise comparison), both pluggable.

    python -c "from games.llm_rlhf.oracle import build_scorer; print(build_scorer('synthetic')([''], ['g0 b1 g2']))"

A scorer maps (prompts, answers) as text to one float per answer. Choices for `game.oracle` / `game.judge`:

- `synthetic`: the synthetic task's gold utility (good words minus bad words, games/llm_rlhf/task.py);
- `ref-loglik`: the paper's oracle, the frozen reference model's mean token log-likelihood of prompt + answer,
  plus `shift` (5), clipped to [-15, 5] (needs the game's reference model; built by the game);
- `package.module:function`: any function (prompts, answers) -> Tensor.
"""
from __future__ import annotations

import importlib
from typing import Callable, List, Sequence

import torch
from torch import Tensor

from .task import gold_utility

Scorer = Callable[[Sequence[str], Sequence[str]], Tensor]


def build_scorer(name: str, reference_loglik: Callable[[Sequence[str], Sequence[str]], Tensor] | None = None,
                 shift: float = 5.0, low: float = -15.0, high: float = 5.0) -> Scorer:
    """The scorer that `name` names (see the module docstring)."""
    if name == "synthetic":
        return lambda prompts, answers: gold_utility(answers)
    if name == "ref-loglik":
        if reference_loglik is None:
            raise ValueError("oracle 'ref-loglik' needs the reference model")
        return lambda prompts, answers: (reference_loglik(prompts, answers) + shift).clamp(low, high)
    if ":" in name:
        module, _, attr = name.partition(":")
        return getattr(importlib.import_module(module), attr)
    raise ValueError(f"unknown scorer {name!r}: choose synthetic, ref-loglik or package.module:function")


def win_rate(a: Tensor, b: Tensor) -> float:
    """How often answer a beats answer b on the judge's scores (ties count half)."""
    return float(((a > b).float() + 0.5 * (a == b).float()).mean())


def pairwise_win_rates(scores: dict) -> dict:
    """{'A vs B': win rate of A} for every ordered pair of variants; scores[name] aligned over the same prompts."""
    names: List[str] = list(scores)
    out = {}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            n = min(len(scores[a]), len(scores[b]))
            out[f"{a} vs {b}"] = win_rate(torch.as_tensor(scores[a][:n]), torch.as_tensor(scores[b][:n]))
    return out
