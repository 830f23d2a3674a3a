"""Figures: each run's own, and comparisons across runs (variants as colours, seeds as a band)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from stackelberg.callbacks import history_of, read_metrics  # noqa: E402

Figures = Dict[str, "plt.Figure"]


def metric_grid(history: Dict[str, List[float]], keys: Sequence[str] | None = None, title: str = "") -> "plt.Figure":
    """One small panel per metric against the round."""
    rounds = history.get("round", [])
    keys = [k for k in (keys or history) if k != "round" and any(math.isfinite(v) for v in history.get(k, []))]
    cols = min(3, max(1, len(keys)))
    rows = max(1, math.ceil(len(keys) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        ax.plot(rounds, history[key], lw=1)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("round", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def mean_band(ax, runs: List[Dict[str, List[float]]], key: str, label: str, color=None) -> None:
    """Plot the mean over runs of `key` against the round, with a min-max band when there are several runs."""
    curves = [np.asarray(h[key], dtype=float) for h in runs if key in h]
    if not curves:
        return
    length = min(len(c) for c in curves)
    stacked = np.stack([c[:length] for c in curves])
    rounds = np.asarray(runs[0].get("round", range(1, length + 1)), dtype=float)[:length]
    mean = np.nanmean(stacked, axis=0)
    line, = ax.plot(rounds, mean, label=f"{label} (n={len(curves)})" if len(curves) > 1 else label,
                    color=color, lw=1.3)
    if len(curves) > 1:
        ax.fill_between(rounds, np.nanmin(stacked, axis=0), np.nanmax(stacked, axis=0),
                        color=line.get_color(), alpha=0.2, lw=0)


def comparison(groups: Dict[str, List[Dict[str, List[float]]]], keys: Sequence[str]) -> Figures:
    """One figure per metric: every group's mean curve and seed band."""
    figures: Figures = {}
    for key in keys:
        if not any(key in h for runs in groups.values() for h in runs):
            continue
        fig, ax = plt.subplots(figsize=(6, 3.8))
        for label, runs in groups.items():
            mean_band(ax, runs, key, label)
        ax.set_xlabel("round")
        ax.set_ylabel(key)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        figures[key.replace("/", "_")] = fig
    return figures


def variant_of(run_dir: Path) -> str:
    """A run folder's variant: its recipe's name (from config.yaml), else the folder's name. Seeds share it."""
    from omegaconf import OmegaConf

    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if config_path.is_file():
        return str(OmegaConf.load(config_path).get("name") or run_dir.name)
    return run_dir.name


def load_histories(run_dirs: Sequence[Path]) -> Dict[str, List[Dict[str, List[float]]]]:
    """Group run folders by their variant (the recipe name, without seed) and load their metric histories."""
    groups: Dict[str, List[Dict[str, List[float]]]] = {}
    for run_dir in run_dirs:
        rows = read_metrics(Path(run_dir))
        if rows:
            groups.setdefault(variant_of(run_dir), []).append(history_of(rows))
    return groups


def save(figures: Figures, folder: Path, logger=None, step: int = 0) -> List[Path]:
    """Write figures as PNG (and to TensorBoard as images when a logger or SummaryWriter is given); close them."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fig in figures.items():
        path = folder / f"{name}.png"
        fig.savefig(path, dpi=110)
        paths.append(path)
        if logger is not None:  # a Lightning logger or a SummaryWriter
            getattr(logger, "experiment", logger).add_figure(f"figures/{name}", fig, global_step=step)
        plt.close(fig)
    return paths
