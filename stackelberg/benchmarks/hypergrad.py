"""`stackelberg bench hypergrad`: hypergradient accuracy and cost on ridge regression, against a closed form.

The bilevel problem (float64):

    follower  w*(theta) = argmin_w  1/(2n) ||X w - y||^2 + 1/2 sum_j exp(theta_j) w_j^2     (ridge, one weight
                                                                                              per feature)
    leader    maximise  J(theta) = -1/(2m) ||X_val w*(theta) - y_val||^2                     (validation fit)

With H = X^T X / n + diag(lam), lam = exp(theta) and g = dJ/dw = -X_val^T (X_val w - y_val) / m, differentiating
H w* = X^T y / n gives the exact hypergradient

    dJ/dtheta = -lam * w* * (H^-1 g)                                                          (elementwise)

Every estimator runs through the framework's own path: a `LeaderFollowerGame` (`RidgeGame` below) whose follower
sits at w*, `game.leader_gradients(batch)` (the estimator's `steer()` on a `SteeringProblem`, then the steering
gradient by autograd). Each time is a median over repeats and is also given as a multiple of one plain follower
gradient measured in the same run. When torchopt is installed, its implicit differentiation (`custom_root` with
`solve_cg` at the same tolerance) runs on the same loss, data and solution in the same run, the two timed in turn.

What to expect: on one cold solve, plain implicit-cg and TorchOpt run conjugate gradients on the same operator to
the same tolerance, each Hessian-vector product being two passes over X, so they need the same number of products
(give or take one) and take about the same time; the JSON counts the products of each. implicit-cg with
`mixed_precision` takes most products in float32 (half the bytes of X per pass) and checks the residual in float64
(iterative refinement, `linalg.mixed_precision_cg`): the same stopping test, so the same accuracy, at lower cost.
Its first call also casts the game's float64 tensors to float32 (`first_call_s`, which also holds any one-off
warm-up of the process); the copies are reused while the tensors are unchanged. Round
after round, `leader_trajectory` moves the leader a little each round and lets implicit-cg start from its previous
rounds' solutions (its default), while TorchOpt's adjoint solve starts from zero every time.

    stackelberg bench hypergrad                                 # 2,000 features, 4,000 + 4,000 rows
    stackelberg bench hypergrad --features 200 --train 400 --val 400 --repeats 3     # a quick run
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
import warnings
from typing import Any, Callable, Dict, List, Sequence

import torch
from torch import Tensor, nn

from stackelberg.game import LeaderFollowerGame
from stackelberg.hypergrad import FPO, Estimator, ImplicitCG, ImplicitNeumann, Unrolled
from stackelberg.config import PlayerConfig


class Vector(nn.Module):
    """A module that is one parameter vector."""

    def __init__(self, value: Tensor):
        super().__init__()
        self.value = nn.Parameter(value.clone())

    def forward(self) -> Tensor:
        return self.value


class RidgeGame(LeaderFollowerGame):
    """Leader: log regularisation weights theta (one per feature). Follower: the ridge weights w.

    The leader's "data" D(theta) is the vector of weights lam = exp(theta): that is how theta reaches the
    follower's loss, so the steering term grad_theta < grad_w L_F(w; lam(theta)), v > is the hypergradient.
    """

    def __init__(self, X: Tensor, y: Tensor, X_val: Tensor, y_val: Tensor, theta: Tensor, **kwargs: Any):
        super().__init__(**kwargs)
        self.register_buffer("X", X)
        self.register_buffer("y", y)
        self.register_buffer("X_val", X_val)
        self.register_buffer("y_val", y_val)
        self.leader = Vector(theta)
        self.follower = Vector(torch.zeros(X.shape[1], dtype=X.dtype))

    def leader_batch(self):
        return {"lam": torch.exp(self.leader())}

    def follower_losses(self, batch, phi):
        # one loss per training row; the regulariser is shared, so the mean is the ridge objective
        residual = self.X @ phi - self.y
        return 0.5 * residual ** 2 + 0.5 * (batch["lam"] * phi ** 2).sum()

    def leader_values(self, batch, phi):
        return -0.5 * (self.X_val @ phi - self.y_val) ** 2

    # --- closed forms ----------------------------------------------------------------------------------
    def hessian(self) -> Tensor:
        """H = X^T X / n + diag(lam): the follower's Hessian (the same at every w)."""
        lam = torch.exp(self.leader().detach())
        return self.X.T @ self.X / self.X.shape[0] + torch.diag(lam)

    def best_response(self) -> Tensor:
        """w*(theta), by a Cholesky solve."""
        chol = torch.linalg.cholesky(self.hessian())
        rhs = (self.X.T @ self.y / self.X.shape[0]).unsqueeze(-1)
        return torch.cholesky_solve(rhs, chol).squeeze(-1)

    def exact_hypergradient(self) -> Tensor:
        """dJ/dtheta at w*(theta) in closed form: -lam * w* * H^-1 g."""
        lam = torch.exp(self.leader().detach())
        chol = torch.linalg.cholesky(self.hessian())
        w = self.best_response()
        g = -self.X_val.T @ (self.X_val @ w - self.y_val) / self.X_val.shape[0]
        return -lam * w * torch.cholesky_solve(g.unsqueeze(-1), chol).squeeze(-1)


def make_problem(features: int, train: int, val: int, seed: int = 0, dtype=torch.float64) -> RidgeGame:
    """A random ridge problem: y = X w_true + noise, regularisation weights around 0.5.

    cond(H) is about 9 at the default size (2,000 features, 4,000 rows)."""
    g = torch.Generator().manual_seed(seed)
    w_true = torch.randn(features, generator=g, dtype=dtype) / math.sqrt(features)
    X = torch.randn(train, features, generator=g, dtype=dtype)
    X_val = torch.randn(val, features, generator=g, dtype=dtype)
    y = X @ w_true + 0.5 * torch.randn(train, generator=g, dtype=dtype)
    y_val = X_val @ w_true + 0.5 * torch.randn(val, generator=g, dtype=dtype)
    theta = math.log(0.5) + 0.5 * torch.randn(features, generator=g, dtype=dtype)
    return RidgeGame(X, y, X_val, y_val, theta)


def _median_time(fn: Callable[[], Any], repeats: int) -> tuple:
    """(median seconds, last result) of `repeats` calls after one warm-up call."""
    result = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def _paired_median_times(fns: Sequence[Callable[[], Any]], repeats: int) -> tuple:
    """Median seconds of each function and their last results, the calls interleaved repeat by repeat.

    Interleaving puts both sides of a comparison under the same machine load (other processes come and go).
    """
    results = [fn() for fn in fns]
    times: List[List[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            results[i] = fn()
            times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times], results


def _relative_error(estimate: Tensor, exact: Tensor) -> float:
    return ((estimate - exact).norm() / exact.norm()).item()


def _framework_estimate(game: RidgeGame, estimator: Estimator, cold: bool = True) -> Callable[[], Dict[str, Any]]:
    """One hypergradient through the framework: steer() on the game's SteeringProblem, then its gradient.

    `cold`: drop the CG warm start before each call, so that repeats of one problem do not start at its answer.
    """

    def run() -> Dict[str, Any]:
        if cold and isinstance(estimator, ImplicitCG):
            estimator.forget()
        game.estimator = estimator
        plain, steer, steering = game.leader_gradients(game.leader_batch())
        return {"gradient": plain + steer, "diagnostics": steering.diagnostics}

    return run


def _torchopt_estimate(game: RidgeGame, w_star: Tensor, tol: float, max_iter: int) -> Callable[[], Tensor]:
    """TorchOpt's implicit differentiation of the same problem: custom_root over grad_w of the same loss."""
    import torchopt

    X, y, X_val, y_val = game.X, game.y, game.X_val, game.y_val

    def inner_loss(w: Tensor, theta: Tensor) -> Tensor:
        return 0.5 * ((X @ w - y) ** 2).mean() + 0.5 * (torch.exp(theta) * w ** 2).sum()

    def optimality(w: Tensor, theta: Tensor) -> Tensor:
        return torch.func.grad(inner_loss)(w, theta)

    cg = torchopt.linear_solve.solve_cg(rtol=tol, maxiter=max_iter)
    products = [0]

    def counted_cg(matvec: Callable[[Tensor], Tensor], b: Tensor) -> Tensor:
        """TorchOpt's solve_cg, counting its Hessian-vector products (for the report only)."""

        def counted(v):
            products[0] += 1
            return matvec(v)

        return cg(counted, b)

    @torchopt.diff.implicit.custom_root(optimality, argnums=1, solve=counted_cg)
    def ridge_solution(w_init: Tensor, theta: Tensor) -> Tensor:
        return w_star.clone()  # the follower has already converged, as in the framework's measurement

    theta0 = game.leader().detach()

    def run() -> Tensor:
        products[0] = 0
        theta = theta0.clone().requires_grad_(True)
        w = ridge_solution(torch.zeros_like(w_star), theta)
        J = -0.5 * ((X_val @ w - y_val) ** 2).mean()
        gradient = torch.autograd.grad(J, theta)[0]
        run.hvps = products[0]
        return gradient

    run.hvps = 0
    return run


def _rounds(game: RidgeGame, opts: argparse.Namespace, follower_gradient: Callable[[], Tensor]) -> Dict[str, Any]:
    """Hypergradients along a leader trajectory, as the framework meets them round after round.

    Each round the leader takes an ascent step along the exact hypergradient, scaled so that every
    regularisation weight changes by at most `--round-step` (relative), and the follower is re-solved (not
    timed). implicit-cg keeps its warm start from the previous rounds (the framework's default: the best
    combination of the last two solutions); TorchOpt's `solve_cg` starts from zero (its default, and its
    custom_root keeps no adjoint between calls). Same tolerance; each round's calls are repeated
    `--round-repeats` times, interleaved, ours always from the same warm start; the first round, cold for
    all, is not counted.
    """
    solvers = {"implicit-cg (warm start)": ImplicitCG(tol=opts.tol, max_iter=opts.max_iter, warm_start=True),
               "implicit-cg (warm start, mixed precision)": ImplicitCG(tol=opts.tol, max_iter=opts.max_iter,
                                                                       warm_start=True, mixed_precision=True)}
    solver_list = list(solvers.values())
    ours_count = len(solver_list)
    times: List[List[float]] = [[] for _ in range(ours_count + 2)]  # follower gradient, ours..., TorchOpt
    errors: List[List[float]] = [[] for _ in range(ours_count + 1)]
    iterations: List[List[int]] = [[] for _ in range(ours_count)]
    for r in range(opts.rounds + 1):
        with torch.no_grad():
            if r > 0:
                hyper = game.exact_hypergradient()
                game.leader.value.add_(opts.round_step * hyper / hyper.abs().max())
            w_star = game.best_response()
            game.follower.value.copy_(w_star)
            exact = game.exact_hypergradient()
        ours = [_framework_estimate(game, cg, cold=False) for cg in solver_list]
        fns = [follower_gradient, *ours]
        if opts.torchopt_available:
            fns.append(_torchopt_estimate(game, w_star, opts.tol, opts.max_iter))
        # repeat each round's calls (interleaved), every repeat of ours starting from the same warm start
        warm = [cg.state_dict() for cg in solver_list]
        repeats = 1 if r == 0 else opts.round_repeats
        round_times: List[List[float]] = [[] for _ in fns]
        outs: List[Any] = [None] * len(fns)
        for _ in range(repeats):
            for i, fn in enumerate(fns):
                if 1 <= i <= ours_count:
                    solver_list[i - 1].load_state_dict(warm[i - 1])
                start = time.perf_counter()
                outs[i] = fn()
                round_times[i].append(time.perf_counter() - start)
        if r == 0:
            continue  # cold for all: not counted
        for i, t in enumerate(round_times):
            times[i].append(statistics.median(t))
        for k in range(ours_count):
            iterations[k].append(int(outs[1 + k]["diagnostics"]["solver/iterations"]))
            errors[k].append(_relative_error(outs[1 + k]["gradient"], exact))
        if opts.torchopt_available:
            errors[ours_count].append(_relative_error(outs[-1], exact))
    grad_time = statistics.median(times[0])
    result: Dict[str, Any] = {"rounds": opts.rounds, "round_step": opts.round_step,
                              "follower_grad_median_s": round(grad_time, 6)}
    for k, name in enumerate(solvers):
        result[name] = {
            "max_rel_error": max(errors[k]), "median_time_s": round(statistics.median(times[1 + k]), 5),
            "time_in_follower_grads": round(statistics.median(times[1 + k]) / grad_time, 2),
            "hvps_per_round": iterations[k],
        }
    if opts.torchopt_available:
        theirs = statistics.median(times[-1])
        result["torchopt (cold, its default)"] = {
            "max_rel_error": max(errors[-1]), "median_time_s": round(theirs, 5),
            "time_in_follower_grads": round(theirs / grad_time, 2),
        }
        for k, name in enumerate(solvers):
            result[f"{name}_over_torchopt_time"] = round(statistics.median(times[1 + k]) / theirs, 3)
            result[f"{name}_at_least_as_accurate"] = max(errors[k]) <= 1.01 * max(errors[-1])
    return result


def main(args: List[str]) -> Dict[str, Any]:
    """Run the benchmark with command-line `args` and return its JSON-ready result."""
    parser = argparse.ArgumentParser(prog="stackelberg bench hypergrad", description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=int, default=2000)
    parser.add_argument("--train", type=int, default=4000)
    parser.add_argument("--val", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats of the fast estimators")
    parser.add_argument("--slow-repeats", type=int, default=3, help="timed repeats of long unrolls and series")
    parser.add_argument("--tol", type=float, default=1e-12, help="CG relative tolerance (ours and TorchOpt's)")
    parser.add_argument("--max-iter", type=int, default=1000)
    parser.add_argument("--neumann-terms", type=int, nargs="+", default=[50, 200])
    parser.add_argument("--unroll-steps", type=int, nargs="+", default=[10, 50, 200])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-torchopt", action="store_true", help="skip TorchOpt even if it is installed")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of the leader-trajectory comparison (0: skip)")
    parser.add_argument("--round-repeats", type=int, default=3, help="timed repeats of each trajectory round")
    parser.add_argument("--round-step", type=float, default=0.01,
                        help="each round, the largest relative change of a regularisation weight")
    opts = parser.parse_args(args)

    # TorchOpt 0.7.3 calls functorch.vjp, which warns of its deprecation on every call
    warnings.filterwarnings("ignore", message=".*functorch.vjp.*")
    torch.manual_seed(opts.seed)
    game = make_problem(opts.features, opts.train, opts.val, seed=opts.seed)
    with torch.no_grad():
        w_star = game.best_response()
        game.follower.value.copy_(w_star)
        exact = game.exact_hypergradient()
        eigenvalues = torch.linalg.eigvalsh(game.hessian())
    lam_max = eigenvalues[-1].item()
    step = 1.0 / lam_max  # Neumann alpha and unrolled SGD learning rate: the largest safe, well-damped step

    # One plain follower gradient: the unit of cost.
    batch = game.leader_batch()

    def follower_gradient() -> Tensor:
        return game._grad(game.follower_losses(batch, game.follower_flat()).mean(), game.follower_parameters)

    def entry(seconds: float, estimate: Tensor, **extra: Any) -> Dict[str, Any]:
        return {"rel_error": _relative_error(estimate, exact), "median_time_s": round(seconds, 5),
                "time_in_follower_grads": round(seconds / grad_time, 2), **extra}

    torchopt = None
    if not opts.no_torchopt:
        try:
            import torchopt
        except ImportError:
            pass

    # implicit-cg, timed interleaved with TorchOpt's implicit CG on the same problem when it is installed
    results: Dict[str, Any] = {}
    cg = ImplicitCG(tol=opts.tol, max_iter=opts.max_iter, warm_start=False)
    mixed = ImplicitCG(tol=opts.tol, max_iter=opts.max_iter, warm_start=False, mixed_precision=True)
    mixed_estimate = _framework_estimate(game, mixed)
    start = time.perf_counter()
    mixed_estimate()  # the first call also makes the float32 copy of X, kept for later solves
    mixed_first_call = time.perf_counter() - start
    fns = [follower_gradient, _framework_estimate(game, cg), mixed_estimate]
    if torchopt is not None:
        theirs = _torchopt_estimate(game, w_star, opts.tol, opts.max_iter)
        fns.append(theirs)
    cg_seconds, cg_outs = _paired_median_times(fns, opts.repeats)
    grad_time, cg_seconds, cg_outs = cg_seconds[0], cg_seconds[1:], cg_outs[1:]
    for name, seconds, out in zip(("implicit-cg", "implicit-cg/mixed_precision"), cg_seconds, cg_outs):
        diagnostics = out["diagnostics"]
        float32 = int(diagnostics.get("solver/float32_products", 0))
        results[name] = entry(seconds, out["gradient"], tol=opts.tol, hvps=int(diagnostics["solver/iterations"]),
                              residual=diagnostics["solver/residual"])
        if name.endswith("mixed_precision"):
            results[name].update({"float32_hvps": float32, "float64_hvps": results[name]["hvps"] - float32,
                                  "first_call_s": round(mixed_first_call, 5)})
    for terms in opts.neumann_terms:
        neumann = ImplicitNeumann(terms=terms, alpha=step)
        seconds, out = _median_time(_framework_estimate(game, neumann), opts.slow_repeats)
        results[f"implicit-neumann/terms={terms}"] = entry(seconds, out["gradient"], alpha=round(step, 6))
    game.follower_config = PlayerConfig(optimizer="sgd", lr=step)
    game._standalone_optimizers = None  # rebuild the follower's optimiser with this learning rate
    for steps in opts.unroll_steps:
        seconds, out = _median_time(_framework_estimate(game, Unrolled(steps=steps)), opts.slow_repeats)
        results[f"unrolled/steps={steps}"] = entry(seconds, out["gradient"], lr=round(step, 6))
    results["fpo"] = {
        "applicable": False,
        "why": "FPO's look-ahead is per sample: it needs the leader's values and the follower's losses on the "
               "same samples (an RM and the policy's outputs). Here the leader's data is the regulariser, "
               "not samples, so there is no per-sample adjoint to take.",
    }
    _ = FPO  # named above for the reader: the estimator exists, the problem does not fit it

    peer: Dict[str, Any] = {"installed": torchopt is not None}
    if torchopt is not None:
        peer.update({"version": torchopt.__version__,
                     "method": "torchopt.diff.implicit.custom_root + linear_solve.solve_cg, timed interleaved "
                               "with implicit-cg",
                     **entry(cg_seconds[2], cg_outs[2], tol=opts.tol, hvps=theirs.hvps)})
        # errors near 1e-13 are rounding: equal to within 1% counts as "as accurate"
        for name, seconds in zip(("implicit-cg", "implicit-cg/mixed_precision"), cg_seconds):
            peer[f"{name}_over_torchopt_time"] = round(seconds / cg_seconds[2], 3)
            peer[f"{name}_at_least_as_accurate"] = results[name]["rel_error"] <= 1.01 * peer["rel_error"]

    opts.torchopt_available = torchopt is not None
    trajectory = _rounds(game, opts, follower_gradient) if opts.rounds > 0 else None

    return {
        "problem": {"kind": "ridge regression, one regularisation weight per feature (leader)",
                    "features": opts.features, "train_rows": opts.train, "val_rows": opts.val,
                    "dtype": "float64", "hessian_condition": round(lam_max / eigenvalues[0].item(), 2),
                    "threads": torch.get_num_threads(), "torch": torch.__version__},
        "follower_grad_median_s": round(grad_time, 6),
        "estimators": results,
        "torchopt": peer,
        "leader_trajectory": trajectory,
    }
