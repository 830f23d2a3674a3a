"""Shared test settings: float64 answers, a fixed seed, the repository root, and a subprocess helper."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `import games` from the checkout (installed, it is `stackelberg_games`)
    sys.path.insert(0, str(REPO))


# The test games are tiny: one thread avoids thread start-up and oversubscription costs that dominate them
# (on a loaded two-core machine, 2 threads made a quadratic-game round about 8x slower).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same random state."""
    torch.manual_seed(0)
    yield


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 120, env: dict | None = None):
    """Run `python -m stackelberg ARGS` in a fresh process; returns the CompletedProcess (text mode)."""
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                **(env or {})}
    full_env.pop("STACKELBERG_RUN_DIR", None)
    return subprocess.run([sys.executable, "-m", "stackelberg", *args], cwd=str(cwd or REPO), env=full_env,
                          capture_output=True, text=True, timeout=timeout)
