r"""CAGrad (Liu et al., NeurIPS 2021): conflict-averse gradient descent."""

from __future__ import annotations

import jax.numpy as jnp

from theory.balancing.base import (Balancer, check_choice, check_count, check_num_tasks, check_positive, register,
                                   safe_divide, weighting_balancer)
from theory.balancing.simplex import SolverState, conflict_averse_frank_wolfe

RESCALES = (0, 1, 2)


@register("cagrad")
def cagrad(calpha: float = 0.5, rescale: int = 1, max_iterations: int = 250, tolerance: float = 1e-6) -> Balancer:
    r"""CAGrad with conflict radius ``calpha`` (:math:`c`) and LibMTL's ``rescale`` convention.

    With the mean gradient :math:`g_0 = \frac1K\sum_t g_t` and :math:`\phi = c^2\|g_0\|^2`, solve the dual

    .. math:: w^* = \arg\min_{w\in\Delta^{K-1}} g_w^\top g_0 + \sqrt{\phi}\,\|g_w\|, \qquad g_w = \sum_t w_t g_t,

    then :math:`d = \big(g_0 + \tfrac{\sqrt\phi}{\|g_w\|} g_w\big) / \rho` with :math:`\rho = 1, 1 + c^2, 1 + c`
    for ``rescale`` = 0, 1, 2. The dual is solved on the Gram matrix by Frank–Wolfe with an exact (closed-form)
    line search; :math:`c = 0` gives the mean gradient. Weights: :math:`(\frac1K + \frac{\sqrt\phi}{\|g_w\|}w^*)/\rho`.
    """
    calpha = check_positive("calpha", calpha, allow_zero=True)
    check_choice("rescale", rescale, RESCALES)
    max_iterations = check_count("max_iterations", max_iterations, 1)
    tolerance = check_positive("tolerance", tolerance)
    divisor = {0: 1.0, 1: 1.0 + calpha**2, 2: 1.0 + calpha}[rescale]

    def init(num_tasks: int) -> SolverState:
        check_num_tasks(num_tasks)
        return SolverState.initial()

    def weigh(g, losses, state, key):
        num_tasks = losses.shape[0]
        mean_weights = jnp.full((num_tasks,), 1.0 / num_tasks, g.dtype)
        radius = calpha * jnp.sqrt(jnp.maximum(mean_weights @ g @ mean_weights, 0.0))  # sqrt(phi) = c ||g_0||
        solution = conflict_averse_frank_wolfe(g, g @ mean_weights, radius, int(max_iterations), tolerance)
        norm_gw = jnp.sqrt(jnp.maximum(solution.weights @ g @ solution.weights, 0.0))
        weights = (mean_weights + safe_divide(radius, norm_gw) * solution.weights) / divisor
        return weights, SolverState.of(solution, tolerance)

    return weighting_balancer("cagrad", init, weigh)
