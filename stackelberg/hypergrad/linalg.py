"""The shared linear algebra of every steering estimator, on torch.func.

A follower's parameters travel through this module as one flat vector; `FlatParams` maps that vector to the
named tensors that `torch.func.functional_call` expects and back. Everything here is a pure function of
tensors, so each piece is tested against an exact answer in tests/test_linalg.py.

- `hvp_operator`  linearises grad L once and returns v -> H v (reverse-over-reverse, reused for every product).
- `per_sample_grads`  the per-sample gradients of per-sample losses, batched with vmap.
- `per_sample_directional`  < grad_phi l_i, v > for every sample i in one forward-mode JVP.
- `conjugate_gradient`, `neumann_series`  solvers for (H + damping I) x = b (`damped` adds the damping).
- `mixed_precision_cg`  the same solve to float64's tolerance with most products in float32 (refinement).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Mapping

import torch
from torch import Tensor
from torch.func import grad, jvp, vjp

TensorDict = Dict[str, Tensor]


class FlatParams:
    """Maps a module's named parameters to one flat vector and back (shapes and order fixed at creation)."""

    def __init__(self, named: Mapping[str, Tensor]):
        self.names = list(named.keys())
        self.shapes = [tuple(t.shape) for t in named.values()]
        self.numels = [t.numel() for t in named.values()]
        self.size = sum(self.numels)

    def flatten(self, named: Mapping[str, Tensor]) -> Tensor:
        """Concatenate the tensors of `named` (in this map's order) into one vector."""
        return torch.cat([named[n].reshape(-1) for n in self.names])

    def unflatten(self, flat: Tensor) -> TensorDict:
        """Split `flat` into named views with the original shapes (differentiable)."""
        parts = flat.split_with_sizes(self.numels)  # torch.split's Python dispatch costs more than the split
        return {n: p.view(s) for n, p, s in zip(self.names, parts, self.shapes)}


def all_finite(t: Tensor) -> bool:
    """Whether every entry of `t` is finite, as a Python bool.

    t - t is exactly 0 for a finite entry and NaN for an infinite or NaN one (it cannot overflow), so one
    subtraction and one sum answer it: about half the cost of isfinite(t).all() on a small gradient, checked at
    every leader step, and a small fraction of it on a large one.
    """
    if not (t.is_floating_point() or t.is_complex()):
        return True  # integers and booleans are always finite
    t = t.detach()
    return t.sub(t).sum().item() == 0


def hvp_operator(loss: Callable[[Tensor], Tensor], phi: Tensor) -> Callable[[Tensor], Tensor]:
    """Return `v -> H v`, H the Hessian of the scalar `loss` at `phi`, linearised once.

    grad L is traced once; each product is then one vector-Jacobian product through that trace. H is symmetric,
    so the VJP is the HVP. A solver that calls it k times pays about k gradient evaluations, not 3k.
    """
    _, vjp_fn = vjp(grad(loss), phi)

    def hvp(v: Tensor) -> Tensor:
        return vjp_fn(v)[0]

    return hvp


def per_sample_grads(losses: Callable[[Tensor], Tensor], phi: Tensor) -> Tensor:
    """Jacobian of the per-sample losses `losses(phi)` (shape [n]) in phi: one row per sample, shape [n, P].

    One forward pass, then the n backward passes batched over the same graph (autograd's vmap over the
    backward, `is_grads_batched`); a single sample takes a plain backward. The rows keep their graph to
    anything the samples depend on (leader parameters on the pathwise path), so a penalty built from them
    can be differentiated again.
    """
    p = phi.detach().requires_grad_(True)
    with torch.enable_grad():
        values = losses(p).reshape(-1)
        n = values.shape[0]
        create_graph = values.requires_grad
        if n == 1:
            (rows,) = torch.autograd.grad(values.sum(), p, create_graph=create_graph, allow_unused=True)
            rows = torch.zeros_like(p) if rows is None else rows
            return rows.unsqueeze(0)
        eye = torch.eye(n, dtype=values.dtype, device=values.device)
        (rows,) = torch.autograd.grad(values, p, eye, is_grads_batched=True, create_graph=create_graph,
                                      allow_unused=True)
    return torch.zeros(n, p.numel(), dtype=p.dtype, device=p.device) if rows is None else rows


def per_sample_directional(losses: Callable[[Tensor], Tensor], phi: Tensor, v: Tensor) -> Tensor:
    """s_i = < grad_phi l_i(phi), v > for all samples in one forward-mode JVP of the per-sample losses."""
    _, tangent = jvp(losses, (phi,), (v,))
    return tangent


@dataclass
class SolveResult:
    """A linear solve's answer with the diagnostics that the game logs (solver/residual, solver/iterations)."""

    x: Tensor
    iterations: int
    residual: float  # relative residual ||b - A x|| / ||b||
    negative_curvature: bool = False
    low_precision_products: int = 0  # of `iterations`, the products taken in a lower precision
    too_ill_conditioned: bool = False  # stopped by `max_condition`


def damped(matvec: Callable[[Tensor], Tensor], damping: float) -> Callable[[Tensor], Tensor]:
    """v -> (A + damping I) v, for a product v -> A v."""
    if not damping:
        return matvec
    return lambda v: matvec(v) + damping * v


def conjugate_gradient(
    matvec: Callable[[Tensor], Tensor],
    b: Tensor,
    x0: Tensor | None = None,
    damping: float = 0.0,
    tol: float = 1e-10,
    max_iter: int = 100,
    r0: Tensor | None = None,
    max_condition: float | None = None,
) -> SolveResult:
    """Solve (A + damping I) x = b for symmetric positive-definite A by conjugate gradients.

    Stops when ||r|| <= tol * ||b|| or after max_iter products (the residual of a start x0 counts as one, unless
    the caller passes it as r0). A direction with p^T A p <= 0 means the follower's loss is not locally convex
    there: the solve stops and reports `negative_curvature` so that the caller can apply its configured fallback
    instead of returning a meaningless answer. With `max_condition`, the solve also stops (`too_ill_conditioned`)
    once the Rayleigh quotients p^T A p / p^T p of its directions, which lie between A's smallest and largest
    eigenvalues, span more than that ratio: a lower bound on cond(A) has passed it.
    """
    A = damped(matvec, damping)
    b_norm = b.norm()
    if b_norm == 0:
        return SolveResult(torch.zeros_like(b), 0, 0.0)
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    it = 0
    if x0 is None:
        r = b.clone()
    elif r0 is not None:
        r = r0.clone()
    else:
        r = b - A(x)
        it = 1
    p = r.clone()
    rs = r.dot(r)
    threshold = (tol * b_norm) ** 2
    lowest = highest = None  # Rayleigh quotients seen, for max_condition
    while it < max_iter and rs > threshold:
        Ap = A(p)
        curvature = p.dot(Ap)
        it += 1
        if not curvature > 0:  # also catches NaN
            return SolveResult(x, it, (rs.sqrt() / b_norm).item(), negative_curvature=True)
        if max_condition is not None:
            rayleigh = curvature / p.dot(p)
            lowest = rayleigh if lowest is None else torch.minimum(lowest, rayleigh)
            highest = rayleigh if highest is None else torch.maximum(highest, rayleigh)
            if highest > max_condition * lowest:
                return SolveResult(x, it, (rs.sqrt() / b_norm).item(), too_ill_conditioned=True)
        alpha = rs / curvature
        x = x + alpha * p
        r = r - alpha * Ap
        rs_new = r.dot(r)
        p = r + (rs_new / rs) * p
        rs = rs_new
    return SolveResult(x, it, (rs.sqrt() / b_norm).item())


def mixed_precision_cg(
    matvec: Callable[[Tensor], Tensor],
    low_matvec: Callable[[Tensor], Tensor],
    b: Tensor,
    x0: Tensor | None = None,
    damping: float = 0.0,
    tol: float = 1e-10,
    max_iter: int = 100,
    low_dtype: torch.dtype = torch.float32,
    inner_tol: float = 1e-5,
) -> SolveResult:
    """Solve (A + damping I) x = b to `tol` in b's precision, taking most products in `low_dtype`.

    Iterative refinement: the residual r = b - (A + damping I) x is computed with `matvec` in b's precision, a
    correction d with (A + damping I) d = r is solved by CG with `low_matvec` (the same operator in `low_dtype`)
    to `inner_tol` relative to r, and x += d. The stopping test is `conjugate_gradient`'s, on a residual computed
    in b's precision, so the answer is as accurate; but where a product is memory-bound a float32 one costs about
    half a float64 one. Each refinement gains about -log10(inner_tol) digits while cond(A) times float32's
    rounding (6e-8) stays well below inner_tol. The float64 residuals and the restart of each refinement cost a
    few products more than plain CG would take: give `max_iter` some room.

    If float32 cannot help, the correction is dropped and plain CG in b's precision finishes from the last good x:
    when the float32 solve finds cond(A) above 1e-3 / (float32's machine epsilon), about 8.4e3 (`max_condition` in
    `conjugate_gradient`), when its correction fails to halve the residual, or when rounding makes A look
    indefinite or overflows. A negative curvature that float64 confirms is reported as `conjugate_gradient`
    reports it. `iterations` counts every product (at most max_iter), `low_precision_products` the float32 ones.
    """
    max_condition = 1e-3 / torch.finfo(low_dtype).eps
    A = damped(matvec, damping)
    b_norm = b.norm()
    if b_norm == 0:
        return SolveResult(torch.zeros_like(b), 0, 0.0)
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r = b - A(x) if x0 is not None else b.clone()
    products = 0 if x0 is None else 1
    low_products = 0
    r_norm = r.norm()
    while r_norm > tol * b_norm and products + 2 <= max_iter:  # room for a correction and its float64 residual
        # solve for r / ||r||: a residual near 1e-12 ||b|| would otherwise sit close to float32's smallest numbers;
        # the last refinement needs only the digits still missing (halved, for the float32 rounding it adds)
        needed = min(max(inner_tol, 0.5 * (tol * b_norm / r_norm).item()), 0.5)
        inner = conjugate_gradient(low_matvec, (r / r_norm).to(low_dtype), damping=damping, tol=needed,
                                   max_iter=max_iter - products - 1, max_condition=max_condition)
        products += inner.iterations
        low_products += inner.iterations
        refined = x + r_norm * inner.x.to(b.dtype)
        helped = not (inner.negative_curvature or inner.too_ill_conditioned) and bool(torch.isfinite(refined).all())
        if helped:
            refined_r = b - A(refined)
            products += 1
            refined_norm = refined_r.norm()
            helped = bool(refined_norm < 0.5 * r_norm)  # False for NaN too
        if not helped:  # finish in b's precision from the last good x, whose residual is known
            rest = conjugate_gradient(matvec, b, x0=x, r0=r, damping=damping, tol=tol, max_iter=max_iter - products)
            return SolveResult(rest.x, products + rest.iterations, rest.residual, rest.negative_curvature,
                               low_products)
        x, r, r_norm = refined, refined_r, refined_norm
    return SolveResult(x, products, (r_norm / b_norm).item(), low_precision_products=low_products)


def neumann_series(
    matvec: Callable[[Tensor], Tensor],
    b: Tensor,
    terms: int = 20,
    alpha: float = 0.1,
    damping: float = 0.0,
) -> SolveResult:
    """Approximate (A + damping I)^-1 b by alpha * sum_{j<terms} (I - alpha (A + damping I))^j b.

    Converges when alpha * lambda_max(A + damping I) < 2 and A + damping I is positive definite; the result's
    residual says how far it got.
    """
    A = damped(matvec, damping)
    term = b.clone()
    total = b.clone()
    for _ in range(terms - 1):
        term = term - alpha * A(term)
        total = total + term
    x = alpha * total
    b_norm = b.norm()
    residual = ((b - A(x)).norm() / b_norm).item() if b_norm > 0 else 0.0
    return SolveResult(x, terms, residual)


def cosine(a: Tensor, b: Tensor) -> float:
    """Cosine similarity of two flat vectors (0 when either is zero)."""
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        return 0.0
    value = (a.dot(b) / (na * nb)).item()
    return value if math.isfinite(value) else float("nan")
