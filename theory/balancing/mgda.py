r"""MGDA (Sener & Koltun, NeurIPS 2018): the minimum-norm element of the convex hull of the task gradients."""

from __future__ import annotations

import jax.numpy as jnp

from theory.balancing.base import (Balancer, check_choice, check_count, check_num_tasks, check_positive, register,
                                   safe_divide, weighting_balancer)
from theory.balancing.simplex import (MAX_EXACT_TASKS, SolverState, min_norm_active_set, min_norm_exact,
                                      min_norm_frank_wolfe)

NORMALISATIONS = ("none", "l2", "loss", "loss+")
SOLVERS = ("auto", "exact", "active_set", "frank_wolfe")
AUTO_EXACT_MAX_TASKS = 6
# The duality gap an exact solution reaches, in machine epsilons: the active set stops when no derivative is below
# -64 eps, which leaves a gap of up to 4 x 64 eps (126 eps measured in float32).
ROUNDING_GAPS = 256


@register("mgda")
def mgda(normalization: str = "none", solver: str = "auto", max_iterations: int = 250,
         tolerance: float = 1e-5) -> Balancer:
    r"""MGDA: the common descent direction of least norm.

    .. math:: \alpha^* = \arg\min_{\alpha \in \Delta^{K-1}} \Big\|\sum_t \alpha_t \hat g_t\Big\|^2, \qquad
              d = \sum_t \alpha^*_t \hat g_t,

    where :math:`\hat g_t = g_t / n_t` with :math:`n_t` from ``normalization`` (LibMTL's ``mgda_gn``): ``"none"``
    (1), ``"l2"`` (:math:`\|g_t\|`), ``"loss"`` (:math:`L_t`) or ``"loss+"`` (:math:`L_t\|g_t\|`). The returned
    weights are :math:`\alpha^*_t / n_t`, the coefficients of the raw gradients.

    ``solver``: ``"exact"`` enumerates supports (:math:`K \le 12`); ``"active_set"`` solves the equivalent nonnegative
    least-squares problem by Lawson–Hanson's active-set method (exact for any :math:`K`, typically in about one step per
    task of the solution's support, within a budget of ``max_iterations`` or 3K steps, whichever is larger);
    ``"frank_wolfe"`` runs Frank–Wolfe with exact line search (the paper's Algorithm 2) for at most ``max_iterations``
    until the duality gap is below ``tolerance``, which can take thousands of steps where the hull of the gradients is
    nearly flat; ``"auto"`` picks ``exact`` for :math:`K \le 6` and ``active_set`` above. The state reports the
    certificate: the duality gap, and ``converged`` when it is at most ``tolerance`` or within rounding (256 machine
    epsilons, 3·10⁻⁵ in float32).
    """
    check_choice("normalization", normalization, NORMALISATIONS)
    check_choice("solver", solver, SOLVERS)
    max_iterations = check_count("max_iterations", max_iterations, 1)
    tolerance = check_positive("tolerance", tolerance)

    def init(num_tasks: int) -> SolverState:
        num_tasks = check_num_tasks(num_tasks)
        if solver == "exact" and num_tasks > MAX_EXACT_TASKS:
            raise ValueError(f"solver='exact' allows K <= {MAX_EXACT_TASKS} tasks; got {num_tasks}")
        return SolverState.initial()

    def weigh(gram, losses, state, key):
        num_tasks = losses.shape[0]
        norms = jnp.sqrt(jnp.maximum(jnp.diag(gram), 0.0))
        scale = {"none": jnp.ones_like(losses), "l2": norms, "loss": losses, "loss+": losses * norms}[normalization]
        inverse_scale = safe_divide(jnp.ones_like(scale), scale)
        g = gram * jnp.outer(inverse_scale, inverse_scale)
        use_exact = solver == "exact" or (solver == "auto" and num_tasks <= AUTO_EXACT_MAX_TASKS)
        if use_exact:
            solution = min_norm_exact(g)
        elif solver == "frank_wolfe":
            solution = min_norm_frank_wolfe(g, int(max_iterations), tolerance)
        else:  # at least three steps per task: one to enter the support, two for each release
            solution = min_norm_active_set(g, max(int(max_iterations), 3 * num_tasks))
        weights = solution.weights * inverse_scale
        # A gap below a few hundred rounding errors cannot be certified smaller (float32's floor is about 3e-5).
        floor = ROUNDING_GAPS * float(jnp.finfo(g.dtype).eps)
        return weights, SolverState.of(solution, max(tolerance, floor))

    return weighting_balancer("mgda", init, weigh)
