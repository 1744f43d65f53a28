r"""Nash-MTL (Navon et al., ICML 2022): the Nash bargaining solution, :math:`G\alpha = 1/\alpha`."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from theory.balancing.base import (Balancer, check_count, check_num_tasks, check_positive, register,
                                   weighting_balancer)
from theory.balancing.fairgrad import frobenius_normalise, solve_power_condition


class NashMTLState(NamedTuple):
    """State of Nash-MTL.

    Attributes:
        alpha: ``[K]`` the bargaining weights of the last solve, before the norm clip (ones before the first).
            Replaced at every update step; reused unchanged by the steps in between (``update_weights_every > 1``).
        count: number of steps taken; a step solves when ``count % update_weights_every == 0``.
        residual: relative residual :math:`\\|\\hat G\\alpha - 1/\\alpha\\| / \\|1/\\alpha\\|` of the last solve
            (float32), on the Gram matrix that solve saw.
        iterations: Newton iterations of the last solve.
        converged: ``residual <= tolerance`` for the last solve. False when the budget ran out or when the exact
            condition has no solution (a zero gradient, opposite gradients): the ridged solution is then used.
    """

    alpha: jax.Array
    count: jax.Array
    residual: jax.Array
    iterations: jax.Array
    converged: jax.Array


@register("nash_mtl")
def nash_mtl(max_norm: float = 1.0, update_weights_every: int = 1, optim_niter: int = 20,
             tolerance: float = 1e-6, ridge: float = 1e-14) -> Balancer:
    r"""Nash-MTL with LibMTL's options (``max_norm=1.0``, ``update_weights_every=1``, ``optim_niter=20``).

    The weights are the Nash bargaining solution of the tasks' utilities :math:`g_t^\top d` over a ball (Navon et
    al., *Multi-Task Learning as a Bargaining Game*, ICML 2022): :math:`d = \sum_t \alpha_t g_t` with

    .. math:: \hat G \alpha = 1/\alpha \ \ (\text{elementwise}), \qquad \alpha > 0, \qquad
              \hat G = G / \|G\|_F,\ G = JJ^\top,

    the minimiser, when it exists, of the strictly convex
    :math:`f(\alpha) = \frac12\alpha^\top\hat G\alpha - \sum_t\log\alpha_t`. As in LibMTL (and the official
    code) the condition is solved on the Gram matrix **normalised by its Frobenius norm**, and :math:`\alpha`
    weights the **raw** gradients: :math:`\alpha = \|G\|_F^{1/2}\alpha_{\rm raw}` with
    :math:`G\alpha_{\rm raw} = 1/\alpha_{\rm raw}`, so :math:`\|d\|^2 = K\|G\|_F` before the clip. Rescaling one
    task's gradient leaves :math:`d_{\rm raw}` unchanged (the paper's scale invariance), so :math:`d` changes only by
    the factor :math:`\|G\|_F^{1/2}`.

    * **Solver.** The official code and LibMTL run a convex-concave procedure in cvxpy/ECOS for at most
      ``optim_niter`` iterations and keep the previous weights when ECOS fails. Here ``optim_niter`` is the budget
      of damped Newton iterations on :math:`f` (self-concordant: convergent from any start, quadratically at the
      end; see :func:`theory.balancing.fairgrad.solve_power_condition`), stopped once the relative residual
      :math:`\|\hat G\alpha - 1/\alpha\|/\|1/\alpha\|` is below ``tolerance``. Every solve starts from the
      closed form for orthogonal gradients, :math:`\alpha_t = \hat G_{tt}^{-1/2}`, not from the previous weights,
      so the weights do not depend on history.
    * **Singular G.** A ridge ``ridge``·I (on :math:`\hat G`; at least the dtype's epsilon) is always added, so
      the weights stay finite when the exact condition has no solution; the state then reports the exact residual
      and ``converged=False`` (opposite or all-zero gradients: residual 1) instead of keeping old weights silently.
      A single zero gradient gets a weight of about ``ridge``:math:`^{-1/2}` (which moves nothing).
    * **Clip.** LibMTL clips the norm of the shared-parameter gradient to ``max_norm`` after the backward pass;
      here the weights are rescaled instead, :math:`w = \alpha\min(1, \texttt{max\_norm}/\|d\|)` with
      :math:`\|d\|^2 = \alpha^\top G\alpha`, so that the direction is still exactly ``w @ jacobian``
      (``max_norm=0`` disables the clip). LibMTL's task-specific parameters get the unclipped :math:`\alpha`, which
      a caller reads from ``state.alpha``.
    * **update_weights_every.** The steps in between reuse the stored :math:`\alpha` (clipped against the current
      gradients), as LibMTL does.
    """
    max_norm = check_positive("max_norm", max_norm, allow_zero=True)
    update_weights_every = check_count("update_weights_every", update_weights_every, 1)
    optim_niter = check_count("optim_niter", optim_niter, 1)
    tolerance = check_positive("tolerance", tolerance)
    ridge = check_positive("ridge", ridge)

    def init(num_tasks: int) -> NashMTLState:
        num_tasks = check_num_tasks(num_tasks)
        return NashMTLState(jnp.ones((num_tasks,)), jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32),
                            jnp.zeros((), jnp.int32), jnp.ones((), bool))

    def weigh(gram, losses, state, key):
        def solve(_):
            solution = solve_power_condition(frobenius_normalise(gram)[0], 1.0, ridge, optim_niter, tolerance)
            return (solution.weights, solution.residual.astype(jnp.float32), solution.iterations.astype(jnp.int32),
                    solution.residual <= tolerance)

        def reuse(_):
            return state.alpha.astype(gram.dtype), state.residual, state.iterations, state.converged

        if update_weights_every == 1:
            alpha, residual, iterations, converged = solve(None)
        else:
            alpha, residual, iterations, converged = jax.lax.cond(state.count % update_weights_every == 0,
                                                                  solve, reuse, None)
        weights = alpha
        if max_norm > 0:
            norm = jnp.sqrt(jnp.maximum(alpha @ gram @ alpha, 0.0))
            weights = alpha * jnp.where(norm > max_norm, max_norm / jnp.where(norm > 0, norm, 1.0), 1.0)
        new_state = NashMTLState(alpha.astype(state.alpha.dtype), state.count + 1, residual, iterations, converged)
        return weights, new_state

    return weighting_balancer("nash_mtl", init, weigh)
