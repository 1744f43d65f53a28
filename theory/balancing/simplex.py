r"""Small convex problems over the probability simplex :math:`\Delta^{K-1}`, solved in pure JAX so they jit.

Two problems appear in the balancing methods, both written on the Gram matrix :math:`G = J J^\top` so their cost
does not depend on the number of shared parameters:

* the **min-norm** problem of MGDA, :math:`\min_{\alpha \in \Delta} \alpha^\top G \alpha`;
* the **conflict-averse** problem of CAGrad, :math:`\min_{w \in \Delta} w^\top a + c\sqrt{w^\top G w}`.

Solvers run a fixed maximum number of iterations (``lax.while_loop``) and return the Frank–Wolfe duality gap
:math:`\max_{v \in \Delta} \nabla F(x)^\top (x - v) \ge F(x) - F^*`, a certificate of how far from optimal the
returned point is, so a caller can tell when the budget was not enough. Gram matrices are rescaled by their
largest diagonal entry first; every minimiser here is invariant to that scale, and the tolerances become relative.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class SimplexSolution(NamedTuple):
    """A point of the simplex and its certificate.

    Attributes:
        weights: ``[K]`` the solution.
        duality_gap: Frank–Wolfe gap of the scale-normalised problem (an upper bound on its suboptimality).
        iterations: iterations used (0 for closed-form or enumerative solvers).
    """

    weights: jax.Array
    duality_gap: jax.Array
    iterations: jax.Array


MAX_EXACT_TASKS = 12


def _normalise(gram: jax.Array) -> tuple[jax.Array, jax.Array]:
    scale = jnp.max(jnp.diag(gram))
    safe = jnp.where(scale > 0, scale, 1.0)
    return gram / safe, scale


def _supports(num_tasks: int) -> np.ndarray:
    """All non-empty subsets of the tasks as a boolean array ``[2^K - 1, K]``."""
    rows = [mask for mask in itertools.product([False, True], repeat=num_tasks) if any(mask)]
    return np.array(rows, dtype=bool)


def min_norm_gap(gram: jax.Array, alpha: jax.Array) -> jax.Array:
    """Frank–Wolfe gap of the min-norm problem at ``alpha`` (on a normalised Gram matrix)."""
    grad = 2.0 * gram @ alpha
    return grad @ alpha - jnp.min(grad)


def min_norm_exact(gram: jax.Array) -> SimplexSolution:
    r"""Exact minimiser of :math:`\alpha^\top G \alpha` over the simplex by enumerating supports.

    For each non-empty support :math:`S` the equality-constrained problem has the KKT system
    :math:`\begin{pmatrix} G_{SS} & 1 \\ 1^\top & 0\end{pmatrix}\binom{\alpha_S}{\mu} = \binom{0}{1}`; the optimum
    is the feasible (:math:`\alpha_S \ge 0`) candidate of least value. All :math:`2^K - 1` systems are solved in one
    batched call, so this suits :math:`K \le 12` (it is exact, not iterative). A tiny ridge keeps the systems
    solvable when gradients are linearly dependent (identical tasks, zero gradients).
    """
    num_tasks = gram.shape[0]
    if num_tasks > MAX_EXACT_TASKS:
        raise ValueError(f"the exact min-norm solver enumerates 2^K supports and allows K <= {MAX_EXACT_TASKS}; "
                         f"got K={num_tasks} (use solver='frank_wolfe')")
    g, _ = _normalise(gram)
    ridge = 10 * jnp.finfo(g.dtype).eps * num_tasks
    g_reg = g + ridge * jnp.eye(num_tasks, dtype=g.dtype)
    masks = jnp.asarray(_supports(num_tasks))
    eye = jnp.eye(num_tasks, dtype=g.dtype)

    def solve_on(mask):
        inside = mask[:, None] & mask[None, :]
        top_left = jnp.where(inside, g_reg, eye)
        border = mask.astype(g.dtype)
        kkt = jnp.zeros((num_tasks + 1, num_tasks + 1), g.dtype)
        kkt = kkt.at[:num_tasks, :num_tasks].set(top_left)
        kkt = kkt.at[:num_tasks, num_tasks].set(border).at[num_tasks, :num_tasks].set(border)
        rhs = jnp.zeros(num_tasks + 1, g.dtype).at[num_tasks].set(1.0)
        alpha = jnp.linalg.solve(kkt, rhs)[:num_tasks] * border
        feasible = jnp.all(jnp.isfinite(alpha)) & jnp.all(alpha >= -1e-6)
        alpha = jnp.clip(jnp.where(jnp.isfinite(alpha), alpha, 0.0), 0.0)
        alpha = alpha / jnp.maximum(alpha.sum(), 1e-30)
        value = jnp.where(feasible & (alpha.sum() > 0), alpha @ g @ alpha, jnp.inf)
        return alpha, value

    candidates, values = jax.vmap(solve_on)(masks)
    best = candidates[jnp.argmin(values)]
    return SimplexSolution(best, min_norm_gap(g, best), jnp.zeros((), jnp.int32))


def _pairwise_direction(grad: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Pairwise Frank–Wolfe direction :math:`e_s - e_v` (towards the best vertex, away from the worst vertex in
    the support) and its largest step :math:`x_v`. Plain Frank–Wolfe zigzags when the optimum lies on a face and
    converges as :math:`O(1/k)`; pairwise steps converge linearly on the simplex (Lacoste-Julien & Jaggi, 2015).
    """
    num_tasks = x.shape[0]
    towards = jnp.argmin(grad)
    away = jnp.argmax(jnp.where(x > 0, grad, -jnp.inf))
    direction = jax.nn.one_hot(towards, num_tasks, dtype=x.dtype) - jax.nn.one_hot(away, num_tasks, dtype=x.dtype)
    return direction, x[away]


def min_norm_frank_wolfe(gram: jax.Array, max_iterations: int = 250, tolerance: float = 1e-5) -> SimplexSolution:
    r"""Frank–Wolfe for :math:`\min_{\alpha\in\Delta}\alpha^\top G\alpha` (the solver of Sener & Koltun, 2018),
    with pairwise steps so that it also converges when the optimum lies on a face of the simplex.

    Each iteration moves along :math:`d = e_s - e_v` (see :func:`_pairwise_direction`) with the exact line search
    :math:`\gamma = \mathrm{clip}(-\alpha^\top G d / d^\top G d,\ 0,\ \alpha_v)`, until the duality gap falls
    below ``tolerance`` (relative to the largest squared gradient norm) or ``max_iterations`` is reached.
    """
    g, _ = _normalise(gram)
    num_tasks = g.shape[0]
    alpha0 = jnp.full((num_tasks,), 1.0 / num_tasks, g.dtype)

    def cond(carry):
        _, gap, it = carry
        return (it < max_iterations) & (gap > tolerance)

    def body(carry):
        alpha, _, it = carry
        direction, gamma_max = _pairwise_direction(g @ alpha, alpha)
        curvature, slope = direction @ g @ direction, alpha @ g @ direction
        safe = jnp.where(curvature > 0, curvature, 1.0)
        flat_step = jnp.where(slope < 0, gamma_max, 0.0)  # no curvature: the objective is linear along d
        gamma = jnp.where(curvature > 0, jnp.clip(-slope / safe, 0.0, gamma_max), flat_step)
        alpha = jnp.clip(alpha + gamma * direction, 0.0)
        return alpha, min_norm_gap(g, alpha), it + 1

    alpha, gap, it = jax.lax.while_loop(cond, body, (alpha0, min_norm_gap(g, alpha0), jnp.zeros((), jnp.int32)))
    return SimplexSolution(alpha, gap, it)


def _conflict_averse_grad(g, a, c, w):
    q = w @ g @ w
    return a + jnp.where(q > 0, c * (g @ w) / jnp.sqrt(jnp.where(q > 0, q, 1.0)), 0.0)


def _conflict_averse_line_search(g, a, c, w, direction, gamma_max):
    r"""Exact minimiser over :math:`\gamma\in[0,\gamma_{\max}]` of :math:`\varphi(\gamma) = F(w + \gamma d)`.

    With :math:`A = a^\top d` and :math:`q(\gamma) = q_0 + 2\gamma q_1 + \gamma^2 q_2` (the squared norm along the
    segment), :math:`\varphi'(\gamma) = A + c(q_1 + \gamma q_2)/\sqrt{q(\gamma)}`. Writing :math:`u = q_1+\gamma q_2`
    and :math:`D = q_0 - q_1^2/q_2 \ge 0`, the root is :math:`u^* = -\mathrm{sign}(A)\sqrt{A^2 D/(c^2 - A^2/q_2)}`
    when :math:`c\sqrt{q_2} > |A|`; otherwise :math:`\varphi` is monotone and the minimiser is an end point.
    """
    slope = a @ direction
    q0, q1, q2 = w @ g @ w, w @ g @ direction, direction @ g @ direction
    flat = q2 <= 1e-12
    safe_q2 = jnp.where(flat, 1.0, q2)
    interior = (c**2 * safe_q2 > slope**2) & ~flat
    discriminant = jnp.maximum(q0 - q1**2 / safe_q2, 0.0)
    denom = jnp.where(interior, c**2 - slope**2 / safe_q2, 1.0)
    u_star = -jnp.sign(slope) * jnp.sqrt(slope**2 * discriminant / denom)
    gamma_interior = jnp.clip((u_star - q1) / safe_q2, 0.0, gamma_max)
    # Monotone cases: the derivative at 0 has the sign of the whole function's slope.
    derivative_at_0 = slope + jnp.where(q0 > 0, c * q1 / jnp.sqrt(jnp.where(q0 > 0, q0, 1.0)), 0.0)
    gamma_end = jnp.where(derivative_at_0 < 0, gamma_max, 0.0)
    return jnp.where(interior, gamma_interior, gamma_end)


def conflict_averse_frank_wolfe(gram: jax.Array, linear: jax.Array, radius: jax.Array,
                                max_iterations: int = 250, tolerance: float = 1e-6) -> SimplexSolution:
    r"""Pairwise Frank–Wolfe with exact line search for :math:`\min_{w\in\Delta} w^\top a + c\sqrt{w^\top G w}`.

    ``linear`` (:math:`a`) and ``radius`` (:math:`c`) must be given for the *unnormalised* ``gram``; the problem is
    rescaled internally (:math:`G\to G/s`, :math:`a\to a/s`, :math:`c\to c/\sqrt s` leave the minimiser unchanged).
    """
    g, scale = _normalise(gram)
    safe_scale = jnp.where(scale > 0, scale, 1.0)
    a, c = linear / safe_scale, radius / jnp.sqrt(safe_scale)
    num_tasks = g.shape[0]
    w0 = jnp.full((num_tasks,), 1.0 / num_tasks, g.dtype)

    def gap_at(w):
        grad = _conflict_averse_grad(g, a, c, w)
        return grad @ w - jnp.min(grad)

    def cond(carry):
        _, gap, it = carry
        return (it < max_iterations) & (gap > tolerance)

    def body(carry):
        w, _, it = carry
        direction, gamma_max = _pairwise_direction(_conflict_averse_grad(g, a, c, w), w)
        w = jnp.clip(w + _conflict_averse_line_search(g, a, c, w, direction, gamma_max) * direction, 0.0)
        return w, gap_at(w), it + 1

    w, gap, it = jax.lax.while_loop(cond, body, (w0, gap_at(w0), jnp.zeros((), jnp.int32)))
    return SimplexSolution(w, gap, it)


class SolverState(NamedTuple):
    """What a solver-based method reports about its last step.

    Attributes:
        duality_gap: Frank–Wolfe gap of the last solve (scale-normalised; an upper bound on suboptimality).
        iterations: iterations the last solve used.
        converged: whether the last solve met its tolerance within its iteration budget.
    """

    duality_gap: jax.Array
    iterations: jax.Array
    converged: jax.Array

    @classmethod
    def initial(cls) -> "SolverState":
        return cls(jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32), jnp.ones((), bool))

    @classmethod
    def of(cls, solution: SimplexSolution, tolerance: float) -> "SolverState":
        gap = solution.duality_gap.astype(jnp.float32)
        return cls(gap, solution.iterations.astype(jnp.int32), gap <= tolerance)
