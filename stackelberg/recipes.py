"""Recipes: find a YAML file, merge its `base`, apply command-line overrides, validate every key.

Every mistake a user can make here (a missing file, an unknown key, a value of the wrong type, an unknown game)
becomes a `UserError` with one line that names it; the CLI prints that line instead of a traceback.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Sequence, Tuple, Type

from omegaconf import DictConfig, OmegaConf
from omegaconf import errors as oc_errors

from stackelberg.config import RunConfig

REPO_ROOT = Path(__file__).resolve().parent.parent


class UserError(Exception):
    """A mistake in a command or recipe: reported as one line, without a traceback."""


def recipe_roots() -> List[Path]:
    """Folders searched for recipes by name: $STACKELBERG_RECIPES, ./recipes, then the checkout's recipes/."""
    roots = [Path(p) for p in os.environ.get("STACKELBERG_RECIPES", "").split(os.pathsep) if p]
    roots += [Path.cwd() / "recipes", REPO_ROOT / "recipes"]
    unique: List[Path] = []
    for root in roots:
        if root.is_dir() and root.resolve() not in [u.resolve() for u in unique]:
            unique.append(root)
    return unique


def find_recipe(name: str) -> Tuple[Path, str]:
    """(path, recipe name) of a recipe given as a YAML path or as a name like 'linear/fpo-relaxed'."""
    as_path = Path(name)
    if as_path.suffix in (".yaml", ".yml"):
        if not as_path.is_file():
            raise UserError(f"recipe file not found: {name}")
        for root in recipe_roots():
            try:
                return as_path, str(as_path.resolve().relative_to(root.resolve()).with_suffix(""))
            except ValueError:
                continue
        return as_path, as_path.stem
    for root in recipe_roots():
        candidate = root / f"{name}.yaml"
        if candidate.is_file():
            return candidate, name
    raise UserError(f"recipe not found: {name!r} (try `stackelberg list`)")


def list_recipes() -> List[Tuple[str, str]]:
    """(name, description) of every recipe under the recipe folders."""
    seen = {}
    for root in recipe_roots():
        for path in sorted(root.rglob("*.yaml")):
            name = str(path.relative_to(root).with_suffix(""))
            if name.startswith("_") or "/_" in name or name in seen:
                continue
            try:
                description = str(OmegaConf.load(path).get("description", "") or "")
            except Exception as exc:  # a broken file is listed, not fatal
                description = f"(unreadable: {exc})"
            seen[name] = description
    return sorted(seen.items())


def _load_raw(path: Path, chain: Tuple[str, ...] = ()) -> DictConfig:
    try:
        raw = OmegaConf.load(path)
    except Exception as exc:
        raise UserError(f"cannot read recipe {path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, DictConfig):
        raise UserError(f"recipe {path} must be a mapping of keys to values")
    base = raw.get("base")
    if base:
        if base in chain:
            raise UserError(f"recipe {path} has a cycle of `base` recipes: {' -> '.join(chain + (base,))}")
        base_path, _ = find_recipe(str(base))
        raw = OmegaConf.merge(_load_raw(base_path, chain + (base,)), raw)
    return raw


@dataclass
class Recipe:
    """A validated recipe: the run's config, the game's config and the game class."""

    name: str
    config: DictConfig  # RunConfig-structured, `game` holding the game's validated keys plus `name`
    game_cls: Type
    game_config: Any  # an instance of game_cls.Config


def resolve_game(name: str) -> Type:
    """The game class that `game.name` names: a module under games/ (its `Game`), or 'module:Class'."""
    if not name:
        raise UserError("the recipe has no game.name")
    module_name, _, attr = name.partition(":")
    candidates = [module_name] if attr else [f"games.{module_name}", f"stackelberg_games.{module_name}",
                                             module_name]
    for candidate in candidates:
        try:
            module = importlib.import_module(candidate)
        except ModuleNotFoundError as exc:
            if exc.name and (candidate == exc.name or candidate.startswith(exc.name + ".")):
                continue
            raise
        found = getattr(module, attr or "Game", None)
        if found is None:
            raise UserError(f"game {name!r}: module {candidate} has no {attr or 'Game'}")
        return found
    raise UserError(f"unknown game {name!r}: no module games.{module_name} or {module_name}")


def _explain(exc: Exception) -> str:
    key = getattr(exc, "full_key", None)
    message = str(exc).splitlines()[0]
    if isinstance(exc, oc_errors.ConfigAttributeError) or isinstance(exc, oc_errors.ConfigKeyError):
        return f"unknown recipe key '{key}'" if key else message
    if isinstance(exc, oc_errors.ValidationError):
        return f"bad value for '{key}': {message}" if key else message
    return message


def load_recipe(name: str, overrides: Sequence[str] = ()) -> Recipe:
    """Load, merge and validate a recipe and its `key=value` overrides."""
    path, recipe_name = find_recipe(name)
    raw = _load_raw(path)
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r} is not of the form key=value")
    try:
        cli = OmegaConf.from_dotlist(list(overrides))
    except Exception as exc:
        raise UserError(f"cannot parse overrides: {str(exc).splitlines()[0]}") from None
    try:
        config = OmegaConf.merge(OmegaConf.structured(RunConfig), raw, cli)
        game_section = OmegaConf.to_container(config.game, resolve=True) or {}
    except Exception as exc:
        raise UserError(_explain(exc)) from None
    game_name = str(game_section.pop("name", "") or "")
    game_cls = resolve_game(game_name)
    schema = getattr(game_cls, "Config", None)
    try:
        if schema is None:
            if game_section:
                raise UserError(f"game {game_name!r} takes no keys, got: {', '.join(game_section)}")
            game_config = None
            validated = OmegaConf.create({})
        else:
            validated = OmegaConf.merge(OmegaConf.structured(schema), game_section)
            game_config = OmegaConf.to_object(validated)
    except UserError:
        raise
    except Exception as exc:
        message = _explain(exc)
        raise UserError(message.replace("'", "'game.", 1) if "'" in message else message) from None
    game_dict = OmegaConf.to_container(validated, resolve=True)
    config.game = {"name": game_name, **game_dict}
    return Recipe(recipe_name, config, game_cls, game_config)


def to_object(config: DictConfig) -> RunConfig:
    """The RunConfig dataclass of a validated config."""
    return OmegaConf.to_object(config)


def load_run_config(run_dir: Path, overrides: Sequence[str] = ()) -> Recipe:
    """Re-load the resolved config.yaml of a run folder (for `resume` and `figures`)."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise UserError(f"no config.yaml in {run_dir}: not a run folder")
    recipe = load_recipe(str(path), overrides)
    recipe.name = recipe.config.name or recipe.name
    return recipe
