"""Compare finished LLM runs: pairwise win rates between their final policies, and a table over seeds.

    stackelberg compare llm/rlhf llm/fpo-practical llm/fpo-relaxed --seeds 0 1 2 --out runs/compare/llm
    python -m games.llm_rlhf.compare runs/compare/llm            # -> win_rates.json, win_rates.png, a table

Each run writes final_answers.jsonl at its end: its final policy's answers to the held-out prompts, each with the
score the run's judge gave it. Variant A beats variant B on a held-out answer slot (same prompt, same sample
index) when A's answer scores higher; ties count half. Every seed of A meets every seed of B. `--judge` re-scores
the stored answers with another scorer (anything `game.judge` accepts that needs no model: `synthetic` or
`package.module:function`).
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from .oracle import build_scorer, win_rate

TABLE_KEYS = ("eval/gold", "eval/proxy_margin", "eval/gap", "eval/kl_to_ref", "eval/win_rate_vs_ref",
              "task/bad_words")


def find_runs(paths: Sequence[Path]) -> List[Path]:
    """Run folders (those holding final_answers.jsonl) at or below `paths`."""
    runs: List[Path] = []
    for path in paths:
        path = Path(path)
        found = [path] if (path / "final_answers.jsonl").is_file() else sorted(
            p.parent for p in path.rglob("final_answers.jsonl"))
        runs.extend(p for p in found if p not in runs)
    return runs


def _variant(run: Path) -> str:
    from omegaconf import OmegaConf

    config = run / "config.yaml"
    return str(OmegaConf.load(config).get("name") or run.parent.name) if config.is_file() else run.parent.name


def _scores(run: Path, judge: Optional[str]) -> torch.Tensor:
    rows = [json.loads(line) for line in (run / "final_answers.jsonl").read_text().splitlines() if line.strip()]
    if judge:
        return build_scorer(judge)([r["prompt"] for r in rows], [r["answer"] for r in rows]).float()
    return torch.tensor([r["judge"] for r in rows], dtype=torch.float32)


def win_rates(run_dirs: Sequence[Path], judge: Optional[str] = None) -> Dict[str, object]:
    """{'variants': per-variant mean/std over seeds of the final metrics, 'win_rates': {'A vs B': rate}}."""
    groups: Dict[str, List[Path]] = {}
    for run in find_runs(run_dirs):
        groups.setdefault(_variant(run), []).append(run)
    scores = {name: [_scores(r, judge) for r in runs] for name, runs in groups.items()}
    rates: Dict[str, float] = {}
    names = list(groups)
    for a in names:
        for b in names:
            if a == b:
                continue
            pairs = [win_rate(x[: min(len(x), len(y))], y[: min(len(x), len(y))])
                     for x in scores[a] for y in scores[b]]
            rates[f"{a} vs {b}"] = sum(pairs) / len(pairs)
    variants: Dict[str, Dict[str, object]] = {}
    for name, runs in groups.items():
        summaries = [json.loads((r / "summary.json").read_text()) for r in runs if (r / "summary.json").is_file()]
        row: Dict[str, object] = {"seeds": [s.get("seed") for s in summaries]}
        for key in TABLE_KEYS:
            values = [s["final"][key] for s in summaries if key in s.get("final", {})]
            if values:
                row[key] = {"mean": statistics.fmean(values),
                            "std": statistics.stdev(values) if len(values) > 1 else 0.0}
        best = [s["best"]["true/utility"]["value"] for s in summaries if "true/utility" in s.get("best", {})]
        if best:
            row["best true/utility"] = {"mean": statistics.fmean(best),
                                        "std": statistics.stdev(best) if len(best) > 1 else 0.0}
        curves = [_eval_curve(r) for r in runs]
        curves = [c for c in curves if c]
        if curves:
            row["first eval/gold"] = _stats([c[0][1] for c in curves])
            row["peak eval/gold"] = _stats([max(v for _, v in c) for c in curves])
            row["peak round"] = _stats([max(c, key=lambda rv: rv[1])[0] for c in curves])
        row["wall_time_s"] = [s.get("wall_time_s") for s in summaries]
        variants[name] = row
    return {"variants": variants, "win_rates": rates}


def _stats(values: List[float]) -> Dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def _eval_curve(run: Path) -> List[tuple]:
    """(round, eval/gold) at every evaluation of a run."""
    from stackelberg.callbacks import read_metrics

    return [(row["round"], row["eval/gold"]) for row in read_metrics(run) if "eval/gold" in row]


def markdown(result: Dict[str, object]) -> str:
    """The comparison as two markdown tables."""
    variants = result["variants"]
    keys = ["first eval/gold", "peak eval/gold", "peak round", *TABLE_KEYS, "best true/utility"]
    lines = ["| variant | seeds | " + " | ".join(keys) + " | longest run (s) |", "|---" * (len(keys) + 3) + "|"]
    for name, row in variants.items():
        cells = []
        for key in keys:
            cell = row.get(key)
            cells.append(f"{cell['mean']:.2f} ± {cell['std']:.2f}" if isinstance(cell, dict) else "")
        wall = max((w for w in row["wall_time_s"] if w is not None), default=float("nan"))
        lines.append(f"| {name} | {len(row['seeds'])} | " + " | ".join(cells) + f" | {wall:.0f} |")
    names = list(variants)
    lines += ["", "| win rate of row vs column | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for a in names:
        cells = ["-" if a == b else f"{result['win_rates'][f'{a} vs {b}']:.2f}" for b in names]
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figure(result: Dict[str, object]):
    """A heatmap of the pairwise win rates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["variants"])
    grid = [[0.5 if a == b else result["win_rates"][f"{a} vs {b}"] for b in names] for a in names]
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2, 1.2 * len(names) + 1.5))
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdBu")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, "-" if i == j else f"{grid[i][j]:.2f}", ha="center", va="center", fontsize=9)
    ax.set_title("win rate of row vs column (judge)")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return fig


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """Command line: win rates and the table for run folders (or folders that contain them)."""
    parser = argparse.ArgumentParser(prog="python -m games.llm_rlhf.compare", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="default: the first path")
    parser.add_argument("--judge", default=None, help="re-score the answers with this scorer")
    args = parser.parse_args(argv)
    result = win_rates(args.paths, args.judge)
    if not result["variants"]:
        raise SystemExit("no run folders with final_answers.jsonl found")
    out = args.out or args.paths[0]
    out.mkdir(parents=True, exist_ok=True)
    (out / "win_rates.json").write_text(json.dumps(result, indent=2) + "\n")
    fig = figure(result)
    fig.savefig(out / "win_rates.png", dpi=110)
    print(markdown(result))
    print(f"\nwrote {out / 'win_rates.json'} and {out / 'win_rates.png'}")
    return result


if __name__ == "__main__":
    main()
