r"""UPGrad (Quinton & Rey, *Jacobian Descent for Multi-Objective Optimization*, 2024; torchjd): the mean of each
task gradient's projection onto the dual cone of all of them."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from theory.balancing.base import Balancer, check_num_tasks, check_positive, register, weighting_balancer
from theory.balancing.fairgrad import check_iterations


class BoxQPSolution(NamedTuple):
    """Solution of :math:`\\min_v v^\\top A v` s.t. :math:`v \\ge u`.

    Attributes:
        weights: ``[K]`` the minimiser :math:`v`.
        kkt_residual: :math:`\\max_i |\\min(v_i - u_i,\\ (Av)_i)|`, zero exactly at the optimum (the KKT conditions
            :math:`v \\ge u`, :math:`Av \\ge 0`, :math:`(v-u)\\cdot Av = 0`).
        iterations: active-set iterations used.
    """

    weights: jax.Array
    kkt_residual: jax.Array
    iterations: jax.Array


def _solve_on(matrix: jax.Array, rhs: jax.Array, free: jax.Array) -> jax.Array:
    """Solves ``matrix[F, F] x_F = rhs_F`` with ``x`` zero off the free set ``F`` (one fixed-shape system)."""
    eye = jnp.eye(matrix.shape[0], dtype=matrix.dtype)
    system = jnp.where(free[:, None] & free[None, :], matrix, eye)
    return jnp.linalg.solve(system, jnp.where(free, rhs, 0.0)) * free


def box_qp(matrix: jax.Array, lower: jax.Array, max_iterations: int = 100,
           tolerance: float = 1e-10) -> BoxQPSolution:
    r"""Exact solver of :math:`\min_v v^\top A v` s.t. :math:`v \ge u`, for a positive definite ``matrix`` :math:`A`.

    With :math:`v = u + z` this is the non-negative problem :math:`\min_{z\ge0}\frac12 z^\top A z + (Au)^\top z`,
    solved by the Lawson–Hanson active-set method (*Solving Least Squares Problems*, 1974, ch. 23, written on
    :math:`A` instead of a factor of it): free variables are added one at a time, the one whose partial derivative is
    most negative; the problem restricted to the free set is solved exactly; if that leaves the feasible set, the
    method steps back to the boundary and releases the variables that reached it. It terminates after finitely many
    steps at the exact optimum (no step size, so ill-conditioning, up to :math:`1/\text{reg\_eps}`, costs nothing
    but rounding). Each ``lax.while_loop`` iteration is one restricted solve; the loop stops at optimality (every
    partial derivative of a bound variable :math:`\ge -` ``tolerance``, floored at 64 machine epsilons) or after
    ``max_iterations``.
    """
    dtype = matrix.dtype
    num = matrix.shape[0]
    tol = jnp.maximum(jnp.asarray(tolerance, dtype), 64 * jnp.finfo(dtype).eps)
    linear = matrix @ lower

    def gradient(z):
        return matrix @ z + linear

    def cond(carry):
        _, _, _, done, it = carry
        return ~done & (it < max_iterations)

    def body(carry):
        z, free, inner, _, it = carry
        grad = gradient(z)
        bound_grad = jnp.where(free, jnp.inf, grad)
        enter = jnp.argmin(bound_grad)
        optimal = bound_grad[enter] >= -tol            # no bound variable wants to move: KKT holds
        adding = ~inner & ~optimal
        free_now = jnp.where(adding, free.at[enter].set(True), free)
        s = _solve_on(matrix, -linear, free_now)
        # Rounding can leave the entering variable non-positive although its derivative is negative: stop there.
        stalled = adding & (s[enter] <= 0)
        feasible = jnp.all(jnp.where(free_now, s > 0, True))
        # Step from z towards s up to the first free variable that would cross zero, and release those at zero.
        blocking = free_now & (s <= 0)
        gap = z - s
        ratios = jnp.where(blocking & (gap > 0), z / jnp.where(gap > 0, gap, 1.0), jnp.where(blocking, 0.0, jnp.inf))
        step = jnp.minimum(jnp.min(ratios), 1.0)
        z_back = z + step * (s - z)
        free_back = free_now & (z_back > 0) & ~(blocking & (ratios <= step))
        z_back = jnp.where(free_back, z_back, 0.0)
        finished = (~inner & optimal) | stalled
        z_new = jnp.where(finished, z, jnp.where(feasible, s, z_back))
        free_new = jnp.where(finished, free, jnp.where(feasible, free_now, free_back))
        inner_new = ~finished & ~feasible
        return z_new, free_new, inner_new, finished, it + 1

    false = jnp.zeros((num,), bool)
    z, _, _, _, it = jax.lax.while_loop(
        cond, body, (jnp.zeros((num,), dtype), false, jnp.zeros((), bool), jnp.zeros((), bool),
                     jnp.zeros((), jnp.int32)))
    kkt = jnp.max(jnp.abs(jnp.minimum(z, gradient(z))))
    return BoxQPSolution(lower + z, kkt, it)


def upgrad_gram(gram: jax.Array, norm_eps: float, reg_eps: float) -> jax.Array:
    r"""torchjd's regularised, normalised Gram matrix :math:`\tilde G = G/\mathrm{tr}(G) + \epsilon_{\rm reg} I`
    (:math:`G/\mathrm{tr}(G)` is replaced by 0 when :math:`\mathrm{tr}(G) <` ``norm_eps``)."""
    trace = jnp.trace(gram)
    normalised = jnp.where(trace >= norm_eps, gram / jnp.where(trace > 0, trace, 1.0), 0.0)
    return normalised + reg_eps * jnp.eye(gram.shape[0], dtype=gram.dtype)


class UPGradState(NamedTuple):
    """State of UPGrad: the report of the last step's K quadratic programs (replaced at every step).

    Attributes:
        kkt_residual: largest KKT residual (see :class:`BoxQPSolution`) over the K programs (float32).
        iterations: largest number of active-set iterations over the K programs.
        converged: ``kkt_residual <= tolerance`` (floored at 64 machine epsilons of the Gram dtype's scale).
    """

    kkt_residual: jax.Array
    iterations: jax.Array
    converged: jax.Array


@register("upgrad")
def upgrad(norm_eps: float = 1e-4, reg_eps: float = 1e-4, max_iterations: int = 100,
           tolerance: float = 1e-10) -> Balancer:
    r"""UPGrad with torchjd's and LibMTL's ``norm_eps = reg_eps = 1e-4`` and the uniform preference vector.

    Each gradient :math:`g_t` is projected onto the dual cone :math:`\{d : Jd \ge 0\}` of all gradients; by
    Proposition 1 of the paper the projection is :math:`J^\top v_t` with

    .. math:: v_t = \arg\min_{v \ge e_t} v^\top \tilde G v, \qquad
              d = \frac1K \sum_t J^\top v_t, \qquad w = \frac1K \sum_t v_t,

    where :math:`\tilde G = G/\mathrm{tr}(G) + \epsilon_{\rm reg} I` (torchjd's normalisation by the squared
    Frobenius norm of :math:`J`, skipped when :math:`\mathrm{tr}(G) < \epsilon_{\rm norm}`, and its regularisation,
    which makes the programs strictly convex when gradients are linearly dependent). The direction is the **mean** of the
    projections (torchjd's default ``pref_vector`` :math:`1/K`; LibMTL's UPGrad too). The regularisation costs
    exactness by a known amount: at the optimum :math:`\tilde G v_t \ge 0`, so
    :math:`J d \ge -\epsilon_{\rm reg}\,\mathrm{tr}(G)\, w` (zero conflict as :math:`\epsilon_{\rm reg}\to 0`).

    The K programs have only lower bounds; they are solved exactly by an active-set method (:func:`box_qp`, which
    replaces torchjd's ``quadprog``), vmapped over the tasks, with a budget of ``max_iterations`` restricted solves
    and the stopping ``tolerance`` on the partial derivatives of the normalised problem.
    The state (:class:`UPGradState`) is the report of the last step's programs.

    Quirk kept from torchjd: when :math:`\mathrm{tr}(G) = \sum_t\|g_t\|^2 <` ``norm_eps`` (an absolute threshold),
    :math:`\tilde G = \epsilon_{\rm reg} I`, every :math:`v_t = e_t` and the direction is the plain mean gradient,
    which may conflict. ``norm_eps=0`` disables the threshold.
    """
    norm_eps = check_positive("norm_eps", norm_eps, allow_zero=True)
    reg_eps = check_positive("reg_eps", reg_eps)
    max_iterations = check_iterations("max_iterations", max_iterations)
    tolerance = check_positive("tolerance", tolerance)

    def init(num_tasks: int) -> UPGradState:
        check_num_tasks(num_tasks)
        return UPGradState(jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32), jnp.ones((), bool))

    def weigh(gram, losses, state, key):
        num_tasks = losses.shape[0]
        regularised = upgrad_gram(gram, norm_eps, reg_eps)
        solutions = jax.vmap(lambda u: box_qp(regularised, u, max_iterations, tolerance))(
            jnp.eye(num_tasks, dtype=gram.dtype))
        weights = jnp.mean(solutions.weights, axis=0)
        kkt = jnp.max(solutions.kkt_residual)
        floor = 64 * jnp.finfo(gram.dtype).eps * jnp.maximum(1.0, jnp.max(solutions.weights))
        report = UPGradState(kkt.astype(jnp.float32), jnp.max(solutions.iterations).astype(jnp.int32),
                             kkt <= jnp.maximum(tolerance, floor))
        return weights, report

    return weighting_balancer("upgrad", init, weigh)
