r"""UPGrad (Quinton & Rey, *Jacobian Descent for Multi-Objective Optimization*, 2024; torchjd): the mean of each
task gradient's projection onto the dual cone of all of them."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from theory.balancing.base import (Balancer, check_count, check_num_tasks, check_positive, register,
                                   weighting_balancer)
from theory.balancing.simplex import nonnegative_qps


class BoxQPSolution(NamedTuple):
    """Solution of :math:`\\min_v v^\\top A v` s.t. :math:`v \\ge u` (each field has a leading batch axis when
    several programs are solved at once by :func:`box_qps`).

    Attributes:
        weights: ``[K]`` the minimiser :math:`v`.
        kkt_residual: :math:`\\max_i |\\min(v_i - u_i,\\ (Av)_i)|`, zero exactly at the optimum (the KKT conditions
            :math:`v \\ge u`, :math:`Av \\ge 0`, :math:`(v-u)\\cdot Av = 0`).
        iterations: active-set iterations used: one per principal pivot, and one more that finds the optimum.
    """

    weights: jax.Array
    kkt_residual: jax.Array
    iterations: jax.Array


def box_qps(matrix: jax.Array, lowers: jax.Array, max_iterations: int = 100,
            tolerance: float = 1e-10) -> BoxQPSolution:
    r"""Exact solver of the N programs :math:`\min_v v^\top A v` s.t. :math:`v \ge u_n` (``lowers`` ``[N, K]``)
    that share one positive definite ``matrix`` :math:`A`, all at once.

    With :math:`v = u + z` each is :math:`\min_{z \ge 0} z^\top A z + 2 (Au)^\top z` (up to a constant), which
    :func:`~theory.balancing.simplex.nonnegative_qps` solves exactly by the Lawson–Hanson active-set method, one
    rank-one tableau update per program and iteration; ``tolerance`` is its stopping rule on the partial derivatives.
    """
    solution = nonnegative_qps(matrix, lowers @ matrix.T, max_iterations, tolerance)
    return BoxQPSolution(lowers + solution.weights, solution.kkt_residual, solution.iterations)


def box_qp(matrix: jax.Array, lower: jax.Array, max_iterations: int = 100,
           tolerance: float = 1e-10) -> BoxQPSolution:
    r"""Exact solver of :math:`\min_v v^\top A v` s.t. :math:`v \ge u`, for a positive definite ``matrix`` :math:`A`
    (:func:`box_qps` with one program; vmappable)."""
    solution = box_qps(matrix, lower[None], max_iterations, tolerance)
    return BoxQPSolution(*(field[0] for field in solution))


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
        iterations: largest number of active-set iterations (pivots) over the K programs.
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
    which makes the programs strictly convex when gradients are linearly dependent). The direction is the **mean** of
    the projections (torchjd's default ``pref_vector`` :math:`1/K`; LibMTL's UPGrad too). The regularisation costs
    exactness by a known amount: at the optimum :math:`\tilde G v_t \ge 0`, so
    :math:`J d \ge -\epsilon_{\rm reg}\,\mathrm{tr}(G)\, w` (zero conflict as :math:`\epsilon_{\rm reg}\to 0`).

    The K programs have only lower bounds and share :math:`\tilde G`; they are solved exactly and together by an
    active-set method (:func:`box_qps`, which replaces torchjd's ``quadprog``; one rank-one tableau update per
    program and iteration, no factorisation), with a budget of ``max_iterations`` active-set iterations and the
    stopping ``tolerance`` on the partial derivatives of the normalised problem.
    The state (:class:`UPGradState`) is the report of the last step's programs.

    Quirk kept from torchjd: when :math:`\mathrm{tr}(G) = \sum_t\|g_t\|^2 <` ``norm_eps`` (an absolute threshold),
    :math:`\tilde G = \epsilon_{\rm reg} I`, every :math:`v_t = e_t` and the direction is the plain mean gradient,
    which may conflict. ``norm_eps=0`` disables the threshold.
    """
    norm_eps = check_positive("norm_eps", norm_eps, allow_zero=True)
    reg_eps = check_positive("reg_eps", reg_eps)
    max_iterations = check_count("max_iterations", max_iterations, 1)
    tolerance = check_positive("tolerance", tolerance)

    def init(num_tasks: int) -> UPGradState:
        check_num_tasks(num_tasks)
        return UPGradState(jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32), jnp.ones((), bool))

    def weigh(gram, losses, state, key):
        num_tasks = losses.shape[0]
        regularised = upgrad_gram(gram, norm_eps, reg_eps)
        solutions = box_qps(regularised, jnp.eye(num_tasks, dtype=gram.dtype), max_iterations, tolerance)
        weights = jnp.mean(solutions.weights, axis=0)
        kkt = jnp.max(solutions.kkt_residual)
        floor = 64 * jnp.finfo(gram.dtype).eps * jnp.maximum(1.0, jnp.max(solutions.weights))
        report = UPGradState(kkt.astype(jnp.float32), jnp.max(solutions.iterations).astype(jnp.int32),
                             kkt <= jnp.maximum(tolerance, floor))
        return weights, report

    return weighting_balancer("upgrad", init, weigh)
