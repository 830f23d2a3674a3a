"""The shared linear algebra (stackelberg/hypergrad/linalg.py), each piece against an exact answer."""
from __future__ import annotations

import torch

from stackelberg.hypergrad import linalg

D = torch.float64


def _loss(A: torch.Tensor, b: torch.Tensor):
    """A smooth non-quadratic scalar loss whose Hessian varies with phi."""
    return lambda phi: 0.5 * phi @ A @ phi - b @ phi + 0.25 * (phi ** 4).sum() + torch.sin(phi).sum()


def test_hvp_operator_matches_explicit_hessian():
    A = torch.randn(6, 6, dtype=D)
    A = A @ A.T
    b = torch.randn(6, dtype=D)
    phi = torch.randn(6, dtype=D)
    loss = _loss(A, b)
    H = torch.autograd.functional.hessian(loss, phi)
    hvp = linalg.hvp_operator(loss, phi)
    for _ in range(3):  # linearised once, reused for several products
        v = torch.randn(6, dtype=D)
        torch.testing.assert_close(hvp(v), H @ v, rtol=1e-12, atol=1e-12)


def test_per_sample_grads_matches_autograd_loop():
    X = torch.randn(5, 4, dtype=D)
    y = torch.randn(5, dtype=D)
    phi = torch.randn(4, dtype=D)

    def losses(p):
        return (torch.tanh(X @ p) - y) ** 2

    rows = linalg.per_sample_grads(losses, phi)
    expected = []
    for i in range(5):
        p = phi.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(losses(p)[i], p)
        expected.append(g)
    torch.testing.assert_close(rows, torch.stack(expected), rtol=1e-12, atol=1e-12)
    # a single sample takes the plain-backward branch
    one = linalg.per_sample_grads(lambda p: losses(p)[:1], phi)
    torch.testing.assert_close(one, torch.stack(expected[:1]), rtol=1e-12, atol=1e-12)


def test_per_sample_grads_keep_graph_to_leader():
    """Rows depend on leader data: their derivative in that data matches finite differences."""
    X = torch.randn(3, 4, dtype=D)
    phi = torch.randn(4, dtype=D)
    theta = torch.randn(3, dtype=D, requires_grad=True)

    def total(t):
        rows = linalg.per_sample_grads(lambda p: (X @ p - t) ** 2, phi)
        return (rows ** 2).sum()

    (g,) = torch.autograd.grad(total(theta), theta)
    eps = 1e-6
    fd = torch.stack([(total(theta.detach() + eps * e) - total(theta.detach() - eps * e)) / (2 * eps)
                      for e in torch.eye(3, dtype=D)])
    torch.testing.assert_close(g, fd, rtol=1e-6, atol=1e-8)


def test_per_sample_directional_matches_dot_products():
    X = torch.randn(7, 4, dtype=D)
    y = torch.randn(7, dtype=D)
    phi, v = torch.randn(4, dtype=D), torch.randn(4, dtype=D)

    def losses(p):
        return torch.log1p(torch.exp(X @ p)) - y * (X @ p)

    s = linalg.per_sample_directional(losses, phi, v)
    rows = torch.autograd.functional.jacobian(losses, phi)
    torch.testing.assert_close(s, rows @ v, rtol=1e-12, atol=1e-12)


def test_conjugate_gradient_solves_spd_system():
    Q, _ = torch.linalg.qr(torch.randn(30, 30, dtype=D))
    A = Q @ torch.diag(torch.logspace(0, 2, 30, dtype=D)) @ Q.T
    b = torch.randn(30, dtype=D)
    result = linalg.conjugate_gradient(lambda v: A @ v, b, tol=1e-12, max_iter=200)
    exact = torch.linalg.solve(A, b)
    assert not result.negative_curvature
    assert result.residual <= 1e-12
    assert ((result.x - exact).norm() / exact.norm()).item() < 1e-10
    # damping solves (A + d I) x = b
    damped = linalg.conjugate_gradient(lambda v: A @ v, b, damping=0.5, tol=1e-12, max_iter=200)
    torch.testing.assert_close(damped.x, torch.linalg.solve(A + 0.5 * torch.eye(30, dtype=D), b),
                               rtol=1e-10, atol=1e-10)
    # a warm start at the answer needs (almost) no iterations
    warm = linalg.conjugate_gradient(lambda v: A @ v, b, x0=exact, tol=1e-10, max_iter=200)
    assert warm.iterations <= 1


def test_conjugate_gradient_reports_negative_curvature():
    A = torch.diag(torch.tensor([1.0, 2.0, -3.0, 4.0], dtype=D))
    b = torch.ones(4, dtype=D)
    result = linalg.conjugate_gradient(lambda v: A @ v, b, tol=1e-12, max_iter=50)
    assert result.negative_curvature
    assert torch.isfinite(result.x).all()


def test_mixed_precision_cg_reaches_float64_accuracy_with_float32_products():
    Q, _ = torch.linalg.qr(torch.randn(200, 200, dtype=D))
    A = Q @ torch.diag(torch.logspace(0, 1, 200, dtype=D)) @ Q.T
    A32 = A.float()
    b = torch.randn(200, dtype=D)
    exact = torch.linalg.solve(A + 0.5 * torch.eye(200, dtype=D), b)
    result = linalg.mixed_precision_cg(lambda v: A @ v, lambda v: A32 @ v, b, damping=0.5, tol=1e-12, max_iter=200)
    assert not result.negative_curvature and result.residual <= 1e-12
    assert ((result.x - exact).norm() / exact.norm()).item() < 1e-11  # far below float32's 6e-8
    assert result.x.dtype == D
    float64_products = result.iterations - result.low_precision_products
    assert result.low_precision_products > 5 * float64_products >= 5  # a few float64 residuals, the rest float32
    assert result.iterations <= 200
    # a warm start from the answer stops after its one float64 residual
    warm = linalg.mixed_precision_cg(lambda v: A @ v, lambda v: A32 @ v, b, x0=exact, damping=0.5, tol=1e-10)
    assert warm.iterations == 1 and warm.low_precision_products == 0


def test_mixed_precision_cg_finishes_in_float64_when_float32_cannot_help():
    def system(eigenvalues, seed):
        torch.manual_seed(seed)
        Q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), dtype=D))
        return Q @ torch.diag(eigenvalues.to(D)) @ Q.T, Q

    # cond(A) = 1e9: float32 products are too coarse to refine with, so float64 CG finishes the solve
    A, _ = system(torch.logspace(0, 9, 40), 0)
    b = torch.randn(40, dtype=D)
    plain = linalg.conjugate_gradient(lambda v: A @ v, b, tol=1e-10, max_iter=2000)
    result = linalg.mixed_precision_cg(lambda v: A @ v, lambda v: A.float() @ v, b, tol=1e-10, max_iter=2000)
    assert plain.residual <= 1e-10 and result.residual <= 1e-10 and result.iterations <= 2000
    assert result.iterations - result.low_precision_products >= plain.iterations  # float64 did the work
    assert ((result.x - plain.x).norm() / plain.x.norm()).item() < 1e-6
    # positive definite with eigenvalues near 0: float32's rounding makes it look indefinite, float64 does not
    A, Q = system(torch.cat([torch.full((10,), 1e-9), torch.linspace(0.5, 1.0, 50)]), 1)
    b = Q[:, :10] @ torch.randn(10, dtype=D) + 1e-3 * torch.randn(60, dtype=D)
    plain = linalg.conjugate_gradient(lambda v: A @ v, b, tol=1e-6, max_iter=400)
    result = linalg.mixed_precision_cg(lambda v: A @ v, lambda v: A.float() @ v, b, tol=1e-6, max_iter=400)
    assert not plain.negative_curvature and not result.negative_curvature and result.residual <= 1e-6
    # a truly indefinite system is reported as plain CG reports it
    indefinite = torch.diag(torch.tensor([1.0, 2.0, -3.0, 4.0], dtype=D))
    bad = linalg.mixed_precision_cg(lambda v: indefinite @ v, lambda v: indefinite.float() @ v,
                                    torch.ones(4, dtype=D), tol=1e-12, max_iter=50)
    assert bad.negative_curvature and torch.isfinite(bad.x).all()


def test_conjugate_gradient_stops_when_its_directions_show_a_larger_condition_number():
    A = torch.diag(torch.logspace(0, 6, 50, dtype=D))
    b = torch.ones(50, dtype=D)
    stopped = linalg.conjugate_gradient(lambda v: A @ v, b, tol=1e-12, max_iter=500, max_condition=1e3)
    assert stopped.too_ill_conditioned and stopped.residual > 1e-12
    # the Rayleigh quotients never exceed the true condition number: with a limit above it, CG runs to the end
    full = linalg.conjugate_gradient(lambda v: A @ v, b, tol=1e-8, max_iter=500, max_condition=1.01e6)
    assert not full.too_ill_conditioned and full.residual <= 1e-8


def test_solvers_stay_within_their_budget():
    Q, _ = torch.linalg.qr(torch.randn(300, 300, dtype=D))
    A = Q @ torch.diag(torch.linspace(1, 50, 300, dtype=D)) @ Q.T
    b = torch.randn(300, dtype=D)
    for budget in (2, 7, 50):
        for x0 in (None, torch.randn(300, dtype=D)):
            plain = linalg.conjugate_gradient(lambda v: A @ v, b, x0=x0, tol=1e-14, max_iter=budget)
            mixed = linalg.mixed_precision_cg(lambda v: A @ v, lambda v: A.float() @ v, b, x0=x0, tol=1e-14,
                                              max_iter=budget)
            assert plain.iterations == budget and mixed.iterations <= budget


def test_neumann_converges_to_solve_as_terms_grow():
    Q, _ = torch.linalg.qr(torch.randn(10, 10, dtype=D))
    A = Q @ torch.diag(torch.linspace(0.5, 2.0, 10, dtype=D)) @ Q.T
    b = torch.randn(10, dtype=D)
    exact = torch.linalg.solve(A, b)
    errors = []
    for terms in (2, 5, 10, 20, 50, 100):
        result = linalg.neumann_series(lambda v: A @ v, b, terms=terms, alpha=0.4)
        errors.append(((result.x - exact).norm() / exact.norm()).item())
    assert all(later < earlier for earlier, later in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-10


def test_flat_params_round_trip():
    named = {"w": torch.randn(3, 4, dtype=D), "b": torch.randn(4, dtype=D), "s": torch.randn((), dtype=D)}
    fp = linalg.FlatParams(named)
    flat = fp.flatten(named)
    assert flat.shape == (17,) and fp.size == 17
    back = fp.unflatten(flat)
    assert list(back) == ["w", "b", "s"]
    for k in named:
        assert back[k].shape == named[k].shape
        torch.testing.assert_close(back[k], named[k], rtol=0, atol=0)
    torch.testing.assert_close(fp.flatten(back), flat, rtol=0, atol=0)


def test_cosine():
    a = torch.tensor([1.0, 0.0], dtype=D)
    assert linalg.cosine(a, a) == 1.0
    assert linalg.cosine(a, torch.tensor([0.0, 2.0], dtype=D)) == 0.0
    assert linalg.cosine(a, torch.zeros(2, dtype=D)) == 0.0


def test_all_finite_agrees_with_isfinite_and_does_not_overflow():
    big = torch.finfo(torch.float32).max
    cases = [torch.zeros(0), torch.randn(10), torch.full((4,), big),  # the sum of these overflows; t - t does not
             torch.tensor([1.0, float("inf")]), torch.tensor([float("-inf"), 2.0]), torch.tensor([0.0, float("nan")]),
             torch.randn(3, 5, dtype=D).requires_grad_(True), torch.tensor([1.0, float("nan")], dtype=torch.float16),
             torch.tensor([1 + 1j, complex(float("inf"), 0)]), torch.tensor([1 + 1j]), torch.arange(4),
             torch.tensor([True, False])]
    for t in cases:
        assert linalg.all_finite(t) is bool(torch.isfinite(t).all()), t
