"""Draw the figures of docs/tensorboard.md from finished runs (the same scalars TensorBoard shows).

    stackelberg compare hpo --seeds 0 1 2                                            # -> runs/compare/hpo
    stackelberg compare linear/rlhf linear/fpo-relaxed linear/implicit-cg --seeds 0 --out runs/compare/linear-tb
    python docs/figures/make_figures.py runs/compare/hpo runs/compare/linear-tb

Reads each run's metrics.jsonl (one row per round, the values logged to TensorBoard) and writes three PNGs next
to this file: exploitation.png, solver.png, steering.png.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent


def history(run_dir: Path) -> dict:
    """metric -> list of (round, value) of one run folder."""
    out: dict = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        for key, value in row.items():
            out.setdefault(key, []).append((row["round"], value))
    return out


def plot(ax, runs: dict, key: str, log: bool = False, absolute: bool = False) -> None:
    """One line per labelled run for metric `key`."""
    for label, h in runs.items():
        if key in h:
            rounds, values = zip(*h[key])
            values = [abs(v) for v in values] if absolute else values
            ax.plot(rounds, values, label=label, lw=1.2)
    ax.set_title(key + (" (absolute)" if absolute else ""), fontsize=9)
    ax.set_xlabel("round", fontsize=8)
    ax.tick_params(labelsize=7)
    if log:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)


def save(fig, name: str) -> None:
    fig.tight_layout()
    path = HERE / name
    fig.savefig(path, dpi=90)
    plt.close(fig)
    print(f"{path} ({path.stat().st_size // 1024} KB)")


def main(hpo_dir: str, linear_dir: str) -> None:
    hpo = {name: history(Path(hpo_dir) / f"hpo__{name}" / "seed_0")
           for name in ("none", "unrolled", "implicit-cg", "implicit-neumann")}
    linear = {name: history(Path(linear_dir) / f"linear__{name}" / "seed_0")
              for name in ("rlhf", "fpo-relaxed", "implicit-cg")}

    # Is the policy exploiting the reward model? (the paper's linear environment)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for ax, key in zip(axes, ("true/utility", "proxy/reward", "rm/error_on_policy")):
        plot(ax, linear, key)
    axes[0].legend(fontsize=8)
    save(fig, "exploitation.png")

    # Is the solver converged? (HPO, seed 0)
    solvers = {k: hpo[k] for k in ("implicit-cg", "implicit-neumann")}
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    plot(axes[0], solvers, "solver/residual", log=True)
    plot(axes[1], solvers, "solver/iterations")
    plot(axes[2], hpo, "follower/grad_norm", log=True)
    axes[0].legend(fontsize=8)
    axes[2].legend(fontsize=8)
    save(fig, "solver.png")

    # Is the steering doing anything? (HPO: the only force on the leader; linear: against the policy gradient)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    plot(axes[0], hpo, "steering/norm")
    plot(axes[1], hpo, "val/loss")
    plot(axes[2], {k: linear[k] for k in ("fpo-relaxed", "implicit-cg")}, "steering/cos_policy_grad")
    axes[0].set_title("steering/norm (HPO)", fontsize=9)
    axes[1].set_title("val/loss (HPO)", fontsize=9)
    axes[2].set_title("steering/cos_policy_grad (linear)", fontsize=9)
    axes[1].legend(fontsize=8)
    axes[2].legend(fontsize=8)
    save(fig, "steering.png")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
