"""Run a recipe: build the game and a Lightning Trainer, play, then write summary.json and the figures.

Run folder (runs/<recipe>/version_<n>/ or output_dir):
    config.yaml      the resolved recipe (re-runnable: `stackelberg run RUN_DIR/config.yaml`)
    metrics.jsonl    every round's metrics
    events.out.*     TensorBoard (scalars every round, figures, hparams with the final metrics)
    checkpoints/     last.ckpt, written every `trainer.rounds_per_epoch` rounds (`stackelberg resume RUN_DIR`)
    summary.json     final and best metrics, wall time, seed, versions
    *.png            the run's figures
"""
from __future__ import annotations

import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import OmegaConf

from stackelberg import plots
from stackelberg.callbacks import MetricsFile, history_of, read_metrics, summarize
from stackelberg.hypergrad import build_estimator
from stackelberg.recipes import Recipe, UserError, load_recipe, load_run_config, to_object

_RUN_DIR_ENV = "STACKELBERG_RUN_DIR"  # lets DDP's child processes write into the parent's run folder


def next_version(root: Path) -> Path:
    """runs/<recipe>/version_<n> with the first free n."""
    n = 0
    while (root / f"version_{n}").exists():
        n += 1
    return root / f"version_{n}"


def build_game(recipe: Recipe) -> L.LightningModule:
    """Seed, then construct the recipe's game with its estimator and player configs."""
    cfg = to_object(recipe.config)
    L.seed_everything(cfg.seed, verbose=False)
    try:
        estimator = build_estimator(cfg.estimator)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    kwargs: Dict[str, Any] = dict(estimator=estimator, leader_config=cfg.leader, follower_config=cfg.follower,
                                  rounds=cfg.rounds, seed=cfg.seed, log_every=cfg.trainer.log_every)
    try:
        if recipe.game_config is None:
            return recipe.game_cls(**kwargs)
        return recipe.game_cls(recipe.game_config, **kwargs)
    except ValueError as exc:  # games validate their own keys with ValueError
        raise UserError(str(exc)) from None


def _rounds_loader(rounds_per_epoch: int):
    return torch.utils.data.DataLoader(list(range(rounds_per_epoch)), batch_size=None)


def _versions() -> Dict[str, str]:
    import lightning
    import stackelberg

    return {"python": platform.python_version(), "torch": torch.__version__, "lightning": lightning.__version__,
            "stackelberg": stackelberg.__version__}


def execute(recipe: Recipe, run_dir: Path, ckpt_path: Optional[Path] = None, quiet: bool = False) -> Dict[str, Any]:
    """Play a validated recipe into `run_dir` (resuming from `ckpt_path` if given); return the summary."""
    cfg = to_object(recipe.config)
    run_dir = Path(os.environ.get(_RUN_DIR_ENV) or run_dir)
    os.environ[_RUN_DIR_ENV] = str(run_dir)  # DDP's other processes re-run the command and read it
    try:
        game, trainer, logger, wall = _fit(recipe, cfg, run_dir, ckpt_path, quiet)
    finally:  # also when the recipe fails to build: a later run in this process must not inherit the folder
        os.environ.pop(_RUN_DIR_ENV, None)
    if not trainer.is_global_zero:
        return {}
    return finish(recipe, game, run_dir, logger, wall)


def _fit(recipe: Recipe, cfg: Any, run_dir: Path, ckpt_path: Optional[Path], quiet: bool):
    """Build the game and its Trainer, fit; return (game, trainer, logger, wall seconds)."""
    tc = cfg.trainer
    if tc.threads > 0:
        torch.set_num_threads(tc.threads)
    game = build_game(recipe)
    run_dir.mkdir(parents=True, exist_ok=True)
    logger = TensorBoardLogger(save_dir=str(run_dir), name="", version="", default_hp_metric=False)
    checkpoint = ModelCheckpoint(dirpath=run_dir / "checkpoints", save_last=True, save_top_k=0,
                                 every_n_epochs=1, save_on_train_epoch_end=True)
    metrics_file = MetricsFile(run_dir)
    trainer = L.Trainer(
        accelerator=tc.accelerator, devices=tc.devices, strategy=tc.strategy, num_nodes=tc.num_nodes,
        max_epochs=math.ceil(cfg.rounds / tc.rounds_per_epoch), logger=logger,
        callbacks=[checkpoint, metrics_file], enable_progress_bar=tc.progress_bar and not quiet,
        enable_model_summary=False, log_every_n_steps=1, num_sanity_val_steps=0,
        use_distributed_sampler=False, default_root_dir=str(run_dir),
    )
    if trainer.is_global_zero:
        stored = recipe.config.copy()
        stored.name, stored.base = recipe.name, None
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(stored))
    started = time.time()
    trainer.fit(game, train_dataloaders=_rounds_loader(tc.rounds_per_epoch),
                ckpt_path=str(ckpt_path) if ckpt_path else None)
    return game, trainer, logger, time.time() - started


def finish(recipe: Recipe, game: Any, run_dir: Path, logger: Optional[TensorBoardLogger], wall: float) -> Dict:
    """Write summary.json and figures; log hparams with the final metrics."""
    cfg = to_object(recipe.config)
    rows = read_metrics(run_dir)
    summary = {
        "recipe": recipe.name,
        "game": recipe.config.game.name,
        "estimator": cfg.estimator.name,
        "seed": cfg.seed,
        "rounds": game.round,
        "wall_time_s": round(wall, 3),
        **summarize(rows, type(game).best_metrics),
        "versions": _versions(),
    }
    previous = run_dir / "summary.json"
    if previous.is_file():  # a resumed run adds the time of its earlier part
        try:
            summary["wall_time_s"] = round(wall + json.loads(previous.read_text()).get("wall_time_s", 0.0), 3)
        except json.JSONDecodeError:
            pass
    previous.write_text(json.dumps(summary, indent=2) + "\n")
    history = history_of(rows)
    if rows:
        plots.save(type(game).figures(history), run_dir, logger, step=game.round)
    if logger is not None:
        flat_hparams = {k: v for k, v in _flatten(OmegaConf.to_container(recipe.config, resolve=True)).items()
                        if isinstance(v, (int, float, str, bool))}
        final = {f"final/{k}": v for k, v in summary["final"].items()}
        logger.log_hyperparams(flat_hparams, metrics=final)
        logger.finalize("success")
    return summary


def _flatten(tree: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(tree, dict):
        out: Dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def run(name: str, overrides: Sequence[str] = (), quiet: bool = False) -> Dict[str, Any]:
    """`stackelberg run`: play recipe `name` with `key=value` overrides; return the summary."""
    recipe = load_recipe(name, overrides)
    output = recipe.config.output_dir
    run_dir = Path(output) if output else next_version(Path("runs") / recipe.name)
    return execute(recipe, run_dir, quiet=quiet)


def resume(run_dir: str, overrides: Sequence[str] = (), quiet: bool = False) -> Dict[str, Any]:
    """`stackelberg resume`: continue a run from its last checkpoint (overrides such as rounds=N allowed)."""
    folder = Path(run_dir)
    recipe = load_run_config(folder, overrides)
    ckpt = folder / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        raise UserError(f"no checkpoint to resume from: {ckpt} does not exist")
    return execute(recipe, folder, ckpt_path=ckpt, quiet=quiet)
