"""The `stackelberg` command: run | resume | list | compare | figures | bench.

    stackelberg run linear/fpo-relaxed rounds=100 seed=1      play a recipe (a name under recipes/ or a YAML path)
    stackelberg resume runs/linear/fpo-relaxed/version_0       continue from the last checkpoint
    stackelberg list                                           the recipes, one line each
    stackelberg compare linear --seeds 0 1 2                   every recipe under recipes/linear/, each seed, then figures
    stackelberg figures RUN_DIR... --out DIR                   comparison figures from finished runs
    stackelberg bench hypergrad                                a benchmark; prints JSON
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from stackelberg.recipes import UserError

BENCHMARKS: Dict[str, str] = {
    "hypergrad": "stackelberg.benchmarks.hypergrad:main",
    "envs": "games.benchmarks:envs",
    "llm-step": "games.llm_rlhf.bench:main",
}


def _quiet_libraries() -> None:
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")


def expand_recipes(names: Sequence[str]) -> List[str]:
    """Recipe names, where a folder name (e.g. 'linear') stands for every recipe in it."""
    from stackelberg.recipes import list_recipes

    known = [n for n, _ in list_recipes()]
    out: List[str] = []
    for name in names:
        inside = [n for n in known if n.startswith(name.rstrip("/") + "/")]
        out.extend(inside if inside and name not in known else [name])
    return out


def compare(names: Sequence[str], seeds: Sequence[int], out: Path, overrides: Sequence[str]) -> List[Path]:
    """Run each recipe for each seed into out/<recipe>/seed_<s>, then draw the comparison figures into out/."""
    from stackelberg import runner
    from stackelberg.recipes import load_recipe

    recipes = expand_recipes(names)
    for name in recipes:  # validate everything before the first long run
        load_recipe(name, overrides)
    run_dirs = []
    total = len(recipes) * len(seeds)
    for i, name in enumerate(recipes):
        for j, seed in enumerate(seeds):
            run_dir = out / name.replace("/", "__") / f"seed_{seed}"
            print(f"[{i * len(seeds) + j + 1}/{total}] {name} seed={seed} -> {run_dir}", flush=True)
            summary = runner.run(name, [*overrides, f"seed={seed}", f"output_dir={run_dir}"], quiet=True)
            print("    " + _one_line(summary), flush=True)
            run_dirs.append(run_dir)
    figures(run_dirs, out)
    return run_dirs


def _one_line(summary: dict) -> str:
    final = summary.get("final", {})
    shown = [f"{k}={v:.4g}" for k, v in list(final.items()) if "/" in k and not k.startswith(("steering", "solver"))]
    return f"{summary.get('wall_time_s', 0):.1f}s  " + "  ".join(shown[:6])


def figures(run_dirs: Sequence[Path], out: Path) -> List[Path]:
    """Comparison figures (PNG and TensorBoard images) of finished runs, and comparison.json: for each variant
    the statistics of its runs' summaries over seeds (printed too), and each run's summary."""
    from omegaconf import OmegaConf
    from torch.utils.tensorboard import SummaryWriter

    from stackelberg import plots
    from stackelberg.callbacks import seed_statistics
    from stackelberg.recipes import resolve_game

    run_dirs = [Path(d) for d in run_dirs]
    for d in run_dirs:
        if not (d / "metrics.jsonl").is_file():
            raise UserError(f"{d} is not a finished run folder (no metrics.jsonl)")
    game_names = {str(OmegaConf.load(d / "config.yaml").game.name) for d in run_dirs}
    game_cls = resolve_game(sorted(game_names)[0]) if len(game_names) == 1 else None
    groups = plots.load_histories(run_dirs)
    if game_cls is not None:
        drawn = game_cls.comparison_figures(groups)
    else:
        drawn = plots.comparison(groups, sorted({k for runs in groups.values() for h in runs for k in h}))
    writer = SummaryWriter(str(out))  # the comparison figures in TensorBoard too (tensorboard --logdir OUT)
    paths = plots.save(drawn, out, writer)
    writer.close()
    runs, by_variant = {}, {}
    for d in run_dirs:
        summary_path = d / "summary.json"
        if summary_path.is_file():
            runs[str(d)] = summary = json.loads(summary_path.read_text())
            by_variant.setdefault(plots.variant_of(d), []).append(summary)
    variants = {label: seed_statistics(summaries) for label, summaries in by_variant.items()}
    (Path(out) / "comparison.json").write_text(json.dumps({"variants": variants, "runs": runs}, indent=2) + "\n")
    for p in paths:
        print(p)
    shown = list(dict.fromkeys([*getattr(game_cls, "best_metrics", {}), *getattr(game_cls, "progress_metrics", ())]))
    for label, stats in variants.items():
        final, keys = stats["final"], [k for k in (shown or list(stats["final"])[:3]) if k in stats["final"]]
        if len(stats["seeds"]) == 1:
            print(f"{label}  n=1  final: " + ", ".join(f"{k} {final[k]['mean']:.4g}" for k in keys))
            continue
        parts = [f"{k} {final[k]['mean']:.3g} +- {final[k]['se']:.2g} [{final[k]['min']:.3g}, {final[k]['max']:.3g}]"
                 for k in keys]
        print(f"{label}  n={len(stats['seeds'])}  final (mean +- standard error [min, max]): " + ", ".join(parts))
    return paths


def bench(name: str, args: Sequence[str]) -> None:
    if name not in BENCHMARKS:
        raise UserError(f"unknown benchmark {name!r}; choose one of: {', '.join(BENCHMARKS)}")
    module_name, _, func = BENCHMARKS[name].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:  # outside a checkout the games are installed as stackelberg_games
        if not module_name.startswith("games.") or exc.name not in ("games", module_name):
            raise
        module = importlib.import_module("stackelberg_games." + module_name[len("games."):])
    result = getattr(module, func)(list(args))
    print(json.dumps(result, indent=2))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="stackelberg", description="Leader-follower games on Lightning.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="play a recipe")
    p.add_argument("recipe", help="a name under recipes/ (e.g. linear/fpo-relaxed) or a YAML path")
    p.add_argument("overrides", nargs="*", help="key=value (OmegaConf dot-list)")
    p = sub.add_parser("resume", help="continue a run from its last checkpoint")
    p.add_argument("run_dir")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. rounds=600 to play longer")
    sub.add_parser("list", help="list the recipes")
    p = sub.add_parser("compare", help="run recipes over seeds and draw comparison figures")
    p.add_argument("recipes", nargs="+", help="recipe names, or a folder such as 'linear' for all in it; "
                                               "key=value overrides may follow")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--out", type=Path, default=None, help="default runs/compare/<first recipe>")
    p = sub.add_parser("figures", help="comparison figures from finished run folders")
    p.add_argument("run_dirs", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=Path("figures"))
    p = sub.add_parser("bench", help="run a benchmark and print JSON")
    p.add_argument("name", help=", ".join(BENCHMARKS))
    p.add_argument("args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)

    _quiet_libraries()
    try:
        if args.command == "run":
            from stackelberg import runner

            summary = runner.run(args.recipe, args.overrides)
            if summary:
                print(json.dumps({k: summary[k] for k in ("recipe", "rounds", "wall_time_s", "final", "best")},
                                 indent=2))
        elif args.command == "resume":
            from stackelberg import runner

            runner.resume(args.run_dir, args.overrides)
        elif args.command == "list":
            from stackelberg.recipes import list_recipes

            recipes = list_recipes()
            width = max((len(n) for n, _ in recipes), default=0)
            for name, description in recipes:
                print(f"{name:<{width}}  {description}")
        elif args.command == "compare":
            names = [r for r in args.recipes if "=" not in r]
            overrides = [r for r in args.recipes if "=" in r]
            out = args.out or Path("runs") / "compare" / names[0].replace("/", "__")
            compare(names, args.seeds, out, overrides)
        elif args.command == "figures":
            figures(args.run_dirs, args.out)
        elif args.command == "bench":
            bench(args.name, args.args)
    except UserError as exc:
        print(f"stackelberg: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stackelberg: interrupted (the last checkpoint can be resumed)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
