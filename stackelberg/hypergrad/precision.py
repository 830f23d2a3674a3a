"""A game's follower loss in a lower precision, for solvers that take most of their products in float32.

`LowPrecisionCopies.follower_loss(problem)` returns L_F(phi; D) as a function of a float32 phi: the game's float64
parameters and buffers are swapped for float32 copies while the loss is traced, and the batch's float64 tensors
are cast. The copies of the game's own tensors are kept and reused for as long as the originals are unchanged
(same tensor, storage, shape and in-place version), so data that a game holds as a buffer is cast once, not once
per solve; a tensor shared by several modules (tied weights) gets one copy. Writes through `.data` are not seen.
Only tensors that the loss reaches through the game (its modules' parameters and buffers, and the batch) are
cast. A loss that reads float64 tensors kept elsewhere either fails in torch with a dtype mismatch (matrix
products) or is promoted back to float64 (elementwise arithmetic): right, but no faster.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, Tuple

import torch
from torch import Tensor, nn

from stackelberg.hypergrad.base import SteeringProblem


class LowPrecisionCopies:
    """Float32 (or `low`) copies of a game's float64 (or `high`) tensors, made on demand and cached."""

    def __init__(self, low: torch.dtype = torch.float32, high: torch.dtype = torch.float64):
        self.low, self.high = low, high
        self._cache: Dict[int, Tuple[Tensor, Tuple[Any, ...], Tensor]] = {}  # id -> (original, signature, copy)

    def follower_loss(self, problem: SteeringProblem) -> Callable[[Tensor], Tensor]:
        """L_F(phi; D) on low-precision copies; call it (or trace it) only inside `self.swapped(problem.game)`."""
        batch = self.cast(problem.detached)
        game = problem.game
        return lambda phi: game.follower_losses(batch, phi).mean()

    def cast(self, value: Any) -> Any:
        """`value` with every `high` tensor (in nested dicts, lists and tuples) cast to `low`, detached."""
        if isinstance(value, Tensor):
            return value.detach().to(self.low) if value.dtype == self.high else value
        if isinstance(value, dict):
            return {k: self.cast(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self.cast(v) for v in value)
        return value

    def _copy(self, t: Tensor, seen: Dict[int, Tuple[Tensor, Tuple[Any, ...], Tensor]]) -> Tensor:
        """The low copy of `t`: from this swap (tied tensors), from earlier swaps if `t` is unchanged, or new."""
        key = id(t)
        if key not in seen:
            try:
                version = t._version
            except RuntimeError:  # an inference-mode tensor keeps no version: copy it anew at every solve
                version = None
            signature = (version, t.data_ptr(), t.device, t.shape)
            hit = self._cache.get(key)
            if hit is None or version is None or hit[1] != signature:
                hit = (t, signature, t.detach().to(self.low))  # holding t keeps its id from being reused
            seen[key] = hit
        return seen[key][2]

    @contextmanager
    def swapped(self, module: nn.Module) -> Iterator[None]:
        """Inside, every `high` parameter and buffer of `module` (and its submodules) reads as a `low` copy."""
        replaced = []
        seen: Dict[int, Tuple[Tensor, Tuple[Any, ...], Tensor]] = {}
        try:
            for sub in module.modules():
                for table in (sub._parameters, sub._buffers):
                    for name, t in table.items():
                        if t is not None and t.dtype == self.high:
                            replaced.append((table, name, t))
                            table[name] = self._copy(t, seen)
            self._cache = seen  # copies of tensors the module no longer holds are let go
            yield
        finally:
            for table, name, t in reversed(replaced):
                table[name] = t
