"""Callbacks that keep a run's record on disk (every round's metrics as JSON lines, then summary.json), and the
statistics of several runs' summaries."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List

import lightning as L


def read_metrics(run_dir: Path) -> List[Dict[str, float]]:
    """Every round's metrics of a run folder (metrics.jsonl), in order."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def history_of(rows: List[Dict[str, float]]) -> Dict[str, List[float]]:
    """Column view of metrics rows: metric -> values per round (NaN where a round did not log it)."""
    keys: List[str] = []
    for row in rows:
        keys.extend(k for k in row if k not in keys)
    return {k: [float(row.get(k, math.nan)) for row in rows] for k in keys}


class MetricsFile(L.Callback):
    """Appends the game's metrics after each round to metrics.jsonl (rank 0), flushed at every checkpoint.

    On resume, rows past the checkpoint's round are dropped first, so the file matches the trajectory.
    """

    def __init__(self, run_dir: Path, flush_every: int = 50):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.flush_every = flush_every
        self.pending: List[str] = []

    def on_fit_start(self, trainer: L.Trainer, game: Any) -> None:
        if trainer.is_global_zero and self.path.exists():
            kept = [row for row in read_metrics(self.path.parent) if row.get("round", 0) <= game.round]
            self.path.write_text("".join(json.dumps(row) + "\n" for row in kept))

    def on_train_batch_end(self, trainer: L.Trainer, game: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not trainer.is_global_zero:
            return
        row = {"round": game.round, **game.last_metrics}
        self.pending.append(json.dumps(row) + "\n")
        if len(self.pending) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            with self.path.open("a") as f:
                f.writelines(self.pending)
            self.pending.clear()

    def on_train_epoch_end(self, trainer: L.Trainer, game: Any) -> None:
        self.flush()

    def on_save_checkpoint(self, trainer: L.Trainer, game: Any, checkpoint: Dict[str, Any]) -> None:
        self.flush()

    def on_fit_end(self, trainer: L.Trainer, game: Any) -> None:
        self.flush()

    def on_exception(self, trainer: L.Trainer, game: Any, exception: BaseException) -> None:
        self.flush()  # nothing measured is lost on a crash


def summarize(rows: List[Dict[str, float]], best_metrics: Dict[str, str]) -> Dict[str, Any]:
    """Final value of every metric, and the best value and its round for the metrics a game declares."""
    if not rows:
        return {"final": {}, "best": {}}
    history = history_of(rows)
    rounds = history.pop("round")
    final = {}
    for key, values in history.items():
        finite = [v for v in values if math.isfinite(v)]
        if finite:
            final[key] = finite[-1]
    best = {}
    for key, mode in best_metrics.items():
        values = history.get(key)
        if not values:
            continue
        pairs = [(v, int(r)) for v, r in zip(values, rounds) if math.isfinite(v)]
        if pairs:
            value, at = (max if mode == "max" else min)(pairs, key=lambda p: p[0])
            best[key] = {"value": value, "round": at}
    return {"final": final, "best": best}


def seed_statistics(summaries: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Across runs of one variant (its seeds): mean, standard deviation, standard error of the mean, min and max
    of every final metric and of every best value in their summary.json, with the seeds they come from."""

    def stats(values: List[float]) -> Dict[str, float]:
        n = len(values)
        mean = sum(values) / n
        sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
        return {"mean": mean, "sd": sd, "se": sd / math.sqrt(n), "min": min(values), "max": max(values), "n": n}

    def collect(pick) -> Dict[str, Dict[str, float]]:
        keys: List[str] = []
        for s in summaries:
            keys.extend(k for k in pick(s) if k not in keys)
        out = {}
        for key in keys:
            values = [float(pick(s)[key]) for s in summaries if key in pick(s)]
            values = [v for v in values if math.isfinite(v)]
            if values:
                out[key] = stats(values)
        return out

    return {
        "seeds": [s.get("seed") for s in summaries],
        "final": collect(lambda s: s.get("final", {})),
        "best": collect(lambda s: {k: b["value"] for k, b in s.get("best", {}).items()}),
    }
