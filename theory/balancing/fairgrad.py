r"""FairGrad (Ban & Ji, ICML 2024): :math:`\alpha`-fair weights, :math:`G w = w^{-1/\alpha}`, by Newton's method.

The module also holds the solver shared with Nash-MTL (:mod:`theory.balancing.nash_mtl`), whose bargaining condition
:math:`G\alpha = 1/\alpha` is the case :math:`p = 1` of

.. math:: G w = w^{-p} \quad (w > 0,\ p = 1/\alpha), \qquad\text{the stationarity condition of}\qquad
          F(w) = \tfrac12 w^\top G w + \sum_t h_p(w_t), \quad h_p'(w) = -w^{-p},

with :math:`h_1(w) = -\log w` and :math:`h_p(w) = w^{1-p}/(p-1)` otherwise. :math:`h_p'' = p\,w^{-p-1} > 0`, so
:math:`F` is strictly convex on :math:`w > 0` and the condition has at most one solution. It has none when :math:`G`
has a non-zero, non-negative null vector :math:`v` (a zero gradient, or two opposite gradients): :math:`F` then
decreases strictly along :math:`w + sv` for all :math:`s > 0`. A ridge :math:`\lambda I` (relative to the normalised
:math:`G`, and at least the dtype's machine epsilon so that it survives rounding) is therefore always added. The
ridged problem has a unique solution for every :math:`G`: equal to the exact one up to :math:`O(\lambda)` when the
latter exists, finite (of size :math:`\lambda^{-1/(1+p)}` along the degenerate directions) when it does not. The
solver reports the relative residual of the *exact* condition, so a caller can tell the two cases apart.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from theory.balancing.base import (Balancer, check_count, check_num_tasks, check_positive, register,
                                   weighting_balancer)

LINE_SEARCH_STEPS = 40     # candidate step sizes 1, 1/2, ..., 2^-39 of the backtracking line search (p != 1)
ARMIJO_SLOPE = 0.25


class PowerSolution(NamedTuple):
    """A solution of :math:`(\\hat G + \\lambda I) w = w^{-p}` on a normalised Gram matrix.

    Attributes:
        weights: ``[K]`` the positive solution.
        residual: relative residual of the exact (ridge-free) condition,
            :math:`\\|\\hat G w - w^{-p}\\| / \\|w^{-p}\\|`.
        iterations: Newton iterations used.
    """

    weights: jax.Array
    residual: jax.Array
    iterations: jax.Array


class SolverReport(NamedTuple):
    """What a fixed-budget solver reports about the last solve of a step.

    Attributes:
        residual: relative residual of the defining condition at the returned weights (float32, for reporting).
        iterations: iterations the last solve used.
        converged: whether ``residual <= tolerance``. False after a solve that ran out of budget *or* whose exact
            condition has no solution (singular Gram matrices: the ridged solution is returned, finite).
    """

    residual: jax.Array
    iterations: jax.Array
    converged: jax.Array

    @classmethod
    def initial(cls) -> "SolverReport":
        return cls(jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32), jnp.ones((), bool))

    @classmethod
    def of(cls, residual: jax.Array, iterations: jax.Array, tolerance: float) -> "SolverReport":
        return cls(residual.astype(jnp.float32), iterations.astype(jnp.int32), residual <= tolerance)


def frobenius_normalise(gram: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(G / ||G||_F, ||G||_F)``; a zero matrix is returned unchanged (with scale 0)."""
    scale = jnp.sqrt(jnp.sum(gram**2))
    return gram / jnp.where(scale > 0, scale, 1.0), scale


def _barrier(w: jax.Array, power: float) -> jax.Array:
    """:math:`\\sum_t h_p(w_t)`, ``inf`` outside :math:`w > 0`."""
    positive = w > 0
    safe = jnp.where(positive, w, 1.0)
    value = -jnp.log(safe) if power == 1.0 else safe ** (1.0 - power) / (power - 1.0)
    return jnp.where(jnp.all(positive), jnp.sum(value), jnp.inf)


def solve_power_condition(gram: jax.Array, power: float, ridge: float, max_iterations: int, tolerance: float,
                          start: jax.Array | None = None) -> PowerSolution:
    r"""Solves :math:`(\hat G + \lambda I) w = w^{-p}`, :math:`w > 0`, by Newton's method on :math:`F`.

    ``gram`` should already be normalised (entries of order one); ``power`` is the static exponent :math:`p > 0`.

    * **Start.** ``start`` defaults to :math:`w_t = (\hat G_{tt}+\lambda)^{-1/(1+p)}`, the exact solution when the
      gradients are orthogonal; it is rescaled by the factor :math:`\sigma` that minimises :math:`F` along its ray,
      :math:`\sigma^{1+p} = \sum_t w_t^{1-p} / w^\top(\hat G+\lambda I)w`, so that the start already satisfies
      :math:`w^\top(\hat G+\lambda I)w = \sum_t w_t^{1-p}` (which the solution does).
    * **Step.** The Newton system is solved in the variables scaled by :math:`D = \mathrm{diag}(h_p''(w))^{-1/2}`,
      :math:`(D(\hat G+\lambda I)D + I)\,y = -D\nabla F`, :math:`\Delta = Dy`, which is well conditioned whatever the
      spread of :math:`w`; :math:`\lambda_N^2 = -\nabla F^\top\Delta` is the Newton decrement.
    * **Step size.** For :math:`p = 1` (Nash-MTL), :math:`F` is self-concordant and the damped step
      :math:`t = 1/(1+\lambda_N)` (full step once :math:`\lambda_N < 1/4`) keeps :math:`w > 0` and converges from
      every start, quadratically at the end (Nesterov, *Lectures on Convex Optimization*, §5.2). Otherwise a
      backtracking (Armijo) line search over :math:`t \in \{1, \frac12, \dots\}` restricted to :math:`w > 0`, which
      converges for strictly convex :math:`F` with compact sublevel sets (the ridge ensures this; Boyd &
      Vandenberghe, §9.5).
    * **Stop** after ``max_iterations``, when the ridged relative residual is at most ``tolerance``, or when the
      line search finds no decrease (the iterate is at the precision floor).
    """
    num_tasks = gram.shape[0]
    dtype = gram.dtype
    eps = jnp.finfo(dtype).eps
    h_ridge = gram + max(ridge, float(eps)) * jnp.eye(num_tasks, dtype=dtype)
    tiny = jnp.finfo(dtype).tiny

    def target(w):
        return w ** (-power)

    def ridged_residual(w):
        t = target(w)
        return jnp.linalg.norm(h_ridge @ w - t) / jnp.maximum(jnp.linalg.norm(t), tiny)

    def objective(w):
        return 0.5 * w @ h_ridge @ w + _barrier(w, power)

    diagonal_solution = jnp.maximum(jnp.diag(h_ridge), eps) ** (-1.0 / (1.0 + power))
    w0 = diagonal_solution if start is None else start.astype(dtype)
    w0 = jnp.where(jnp.all(jnp.isfinite(w0) & (w0 > 0)), w0, diagonal_solution)
    curvature = jnp.maximum(w0 @ h_ridge @ w0, eps * jnp.sum(w0**2))  # the floor: the ridge, before rounding
    sigma = (jnp.sum(w0 ** (1.0 - power)) / curvature) ** (1.0 / (1.0 + power))
    w0 = sigma * w0

    def cond(carry):
        _, residual, it, stalled = carry
        return (it < max_iterations) & (residual > tolerance) & ~stalled

    def body(carry):
        w, _, it, _ = carry
        grad = h_ridge @ w - target(w)
        d = jnp.sqrt(w ** (power + 1.0) / power)
        scaled_hessian = d[:, None] * h_ridge * d[None, :] + jnp.eye(num_tasks, dtype=dtype)
        y = -jnp.linalg.solve(scaled_hessian, d * grad)
        delta = d * y
        decrement = jnp.sqrt(jnp.maximum(-(d * grad) @ y, 0.0))
        if power == 1.0:
            step = jnp.where(decrement < 0.25, 1.0, 1.0 / (1.0 + decrement))
        else:
            steps = 0.5 ** jnp.arange(LINE_SEARCH_STEPS, dtype=dtype)
            current = objective(w)
            values = jax.vmap(lambda t: objective(w + t * delta))(steps)
            slack = 16 * jnp.finfo(dtype).eps * (jnp.abs(current) + 1.0)
            accepted = values <= current - ARMIJO_SLOPE * steps * decrement**2 + slack
            step = jnp.where(jnp.any(accepted), steps[jnp.argmax(accepted)], 0.0)
        w = w + step * delta
        return w, ridged_residual(w), it + 1, step == 0  # no acceptable step: at the precision floor

    initial = (w0, ridged_residual(w0), jnp.zeros((), jnp.int32), jnp.zeros((), bool))
    w, _, it, _ = jax.lax.while_loop(cond, body, initial)
    t = target(w)
    exact = jnp.linalg.norm(gram @ w - t) / jnp.maximum(jnp.linalg.norm(t), tiny)
    return PowerSolution(w, exact, it)


@register("fairgrad")
def fairgrad(alpha: float = 1.0, max_iterations: int = 100, tolerance: float = 1e-6,
             ridge: float = 1e-14) -> Balancer:
    r"""FairGrad with fairness parameter ``alpha`` (:math:`\alpha > 0`; LibMTL's ``FairGrad_alpha = 1``).

    The update :math:`d = \sum_t w_t g_t` maximises the :math:`\alpha`-fair utility of the tasks' local improvements
    :math:`g_t^\top d`; its weights solve (Ban & Ji, *Fair Resource Allocation in Multi-Task Learning*, ICML 2024)

    .. math:: G w = w^{-1/\alpha}, \qquad w > 0, \qquad G = JJ^\top,

    on the **raw** Gram matrix, as LibMTL does (its ``scipy.optimize.least_squares`` from :math:`w = 1/K` is
    replaced here by Newton's method from a closed-form start, see :func:`solve_power_condition`). The problem is
    solved on :math:`\hat G = G/\|G\|_F` plus a ridge ``ridge``·I, and mapped back exactly:
    :math:`w = \|G\|_F^{-1/(1+p)}\,\hat w` with :math:`p = 1/\alpha`. :math:`\alpha = 1` is the Nash bargaining
    condition on the raw :math:`G`; then the direction is invariant to rescaling any task's loss, and for every
    :math:`\alpha` rescaling all gradients by :math:`c` rescales the direction by :math:`c^{(1-\alpha)/(1+\alpha)}`.

    Options: ``max_iterations`` (Newton iterations, fixed budget), ``tolerance`` (on the relative residual
    :math:`\|Gw - w^{-1/\alpha}\|/\|w^{-1/\alpha}\|`), ``ridge`` (relative to :math:`\hat G`; > 0, see the module
    docstring). The state (:class:`SolverReport`) is replaced at every step by the report of that step's solve;
    the weights themselves are not carried over (every solve starts from the same closed-form guess).
    """
    alpha = check_positive("alpha", alpha)
    max_iterations = check_count("max_iterations", max_iterations, 1)
    tolerance = check_positive("tolerance", tolerance)
    ridge = check_positive("ridge", ridge)
    power = 1.0 / alpha

    def init(num_tasks: int) -> SolverReport:
        check_num_tasks(num_tasks)
        return SolverReport.initial()

    def weigh(gram, losses, state, key):
        normalised, scale = frobenius_normalise(gram)
        solution = solve_power_condition(normalised, power, ridge, max_iterations, tolerance)
        factor = jnp.where(scale > 0, scale, 1.0) ** (-1.0 / (1.0 + power))
        return solution.weights * factor, SolverReport.of(solution.residual, solution.iterations, tolerance)

    return weighting_balancer("fairgrad", init, weigh)
