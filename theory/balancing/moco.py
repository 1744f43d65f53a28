r"""MoCo (Fernando et al., ICLR 2023): track the task gradients, descend along their min-norm combination.

H. D. Fernando, H. Shen, M. Liu, S. Chaudhury, K. Murugesan, T. Chen, "Mitigating Gradient Bias in
Multi-objective Learning: A Provably Convergent Approach", ICLR 2023
(https://openreview.net/forum?id=dLAYGdKTi2), Algorithm 1, with LibMTL's practical choices (gradients
rescaled by loss/‖g‖, a softmax in place of the simplex projection).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from theory.balancing.base import (Balancer, check_choice, check_inputs, check_num_tasks, check_positive,
                                   register, safe_divide)
from theory.balancing.db_mtl import check_num_params, parameter_buffer, step_size

LAMBDA_UPDATES = ("softmax", "projection")


def project_to_simplex(v: jax.Array) -> jax.Array:
    r"""Euclidean projection of ``v`` ``[K]`` onto the probability simplex (exact, by sorting; Duchi 2008)."""
    num_tasks = v.shape[0]
    descending = -jnp.sort(-v)
    excess = jnp.cumsum(descending) - 1.0
    ranks = jnp.arange(1, num_tasks + 1, dtype=v.dtype)
    support = jnp.maximum(jnp.sum(descending - excess / ranks > 0), 1)  # the largest entry always qualifies
    threshold = excess[support - 1] / support.astype(v.dtype)
    return jnp.maximum(v - threshold, 0.0)


class MoCoState(NamedTuple):
    r"""State of MoCo.

    Attributes:
        tracked: ``[K, P]`` the tracked gradient estimates :math:`y_t` (zero at ``init``; ``[K, 0]`` until the
            first step when ``init`` was not given ``num_params``); every step moves them towards this step's
            rescaled gradients, :math:`y_t \leftarrow y_t - \beta_k (y_t - \hat g_t)`.
        lambdas: ``[K]`` the combination weights :math:`\lambda` on the simplex (:math:`1/K` at ``init``);
            every step takes one softmaxed (or projected) gradient step on
            :math:`\frac12\lambda^\top(YY^\top+\rho I)\lambda` with the new :math:`Y`.
        count: number of steps taken (sets :math:`\beta_k`, :math:`\gamma_k`).
    """

    tracked: jax.Array
    lambdas: jax.Array
    count: jax.Array


@register("moco")
def moco(beta: float = 0.5, beta_sigma: float = 0.5, gamma: float = 0.1, gamma_sigma: float = 0.5,
         rho: float = 0.0, lambda_update: str = "softmax") -> Balancer:
    r"""MoCo: stochastic gradient tracking plus a min-norm weighting of the tracked gradients.

    At step :math:`k`, with :math:`\beta_k = \beta/k^{\beta_\sigma}`, :math:`\gamma_k =
    \gamma/k^{\gamma_\sigma}` and the rescaled gradients :math:`\hat g_t = L_t\, g_t / \|g_t\|` (LibMTL)
    stacked as the rows of :math:`\hat J`,

    .. math:: Y \leftarrow Y - \beta_k\,(Y - \hat J), \qquad
              \lambda \leftarrow \Pi\big(\lambda - \gamma_k\,(Y Y^\top + \rho I)\,\lambda\big), \qquad
              d = Y^\top \lambda ,

    where :math:`\Pi` is ``softmax`` (LibMTL, default) or the Euclidean projection onto the simplex (the
    paper). :math:`Y` tracks the gradients (on a constant Jacobian it converges to :math:`\hat J` when
    :math:`\sum_k\beta_k = \infty`), and with the projection :math:`\lambda` runs projected gradient descent
    towards the min-norm (MGDA) weights of the tracked gradients. The state holds :math:`Y` ``[K, P]``, so
    the method needs the Jacobian (``init(num_tasks, num_params=None)``; see
    :func:`theory.balancing.db_mtl.parameter_buffer`).

    **Weights** are the coefficients of this step's rows, :math:`w_t = \lambda_t\beta_k L_t/\|g_t\|`:
    ``direction - weights @ jacobian`` is the part of :math:`Y` carried from earlier steps,
    :math:`(1-\beta_k)\,\lambda^\top Y^{\rm prev}`, zero at the first step when :math:`Y = 0` at ``init``.
    The combination weights themselves are ``state.lambdas`` (what LibMTL returns).

    Options:
        beta: tracking rate, in (0, 1] (``MoCo_beta``, default 0.5).
        beta_sigma: decay exponent of the tracking rate, >= 0 (``MoCo_beta_sigma``, 0.5).
        gamma: step size of the :math:`\lambda` update, >= 0 (``MoCo_gamma``, 0.1).
        gamma_sigma: its decay exponent, >= 0 (``MoCo_gamma_sigma``, 0.5).
        rho: :math:`\ell_2` regularisation of the :math:`\lambda` update, >= 0 (``MoCo_rho``, 0).
        lambda_update: ``"softmax"`` (LibMTL) or ``"projection"`` (the paper's :math:`\Pi_\Delta`).

    Deviations: from the paper, LibMTL's rescaling :math:`L_t/\|g_t\|`, its softmax (the default) and no
    projection of :math:`y_t` onto a bounded set; from LibMTL, :math:`L_t/\|g_t\|` divides exactly (0 for a
    zero gradient) instead of adding 1e-8 to :math:`\|g_t\|`.
    """
    if not 0.0 < float(beta) <= 1.0:
        raise ValueError(f"beta must be a number in (0, 1]; got {beta!r}")
    beta = float(beta)
    beta_sigma = check_positive("beta_sigma", beta_sigma, allow_zero=True)
    gamma = check_positive("gamma", gamma, allow_zero=True)
    gamma_sigma = check_positive("gamma_sigma", gamma_sigma, allow_zero=True)
    rho = check_positive("rho", rho, allow_zero=True)
    check_choice("lambda_update", lambda_update, LAMBDA_UPDATES)
    to_simplex = jax.nn.softmax if lambda_update == "softmax" else project_to_simplex

    def init(num_tasks: int, num_params: int | None = None) -> MoCoState:
        num_tasks = check_num_tasks(num_tasks)
        return MoCoState(jnp.zeros((num_tasks, check_num_params(num_params))),
                         jnp.full((num_tasks,), 1.0 / num_tasks), jnp.zeros((), jnp.int32))

    def step(jacobian, losses, state, key):
        num_tasks = check_inputs(jacobian, losses)
        tracked = parameter_buffer(state.tracked, jacobian)
        lambdas = state.lambdas.astype(jacobian.dtype)
        count = state.count + 1
        rate = step_size(beta, beta_sigma, count, jacobian.dtype)
        lambda_rate = step_size(gamma, gamma_sigma, count, jacobian.dtype)
        scales = safe_divide(losses.astype(jacobian.dtype), jnp.sqrt(jnp.sum(jacobian**2, axis=1)))
        tracked = tracked - rate * (tracked - jacobian * scales[:, None])
        curvature = tracked @ tracked.T + rho * jnp.eye(num_tasks, dtype=jacobian.dtype)
        lambdas = to_simplex(lambdas - lambda_rate * (curvature @ lambdas))
        direction = lambdas @ tracked
        weights = lambdas * rate * scales
        return direction, weights, MoCoState(tracked.astype(state.tracked.dtype),
                                             lambdas.astype(state.lambdas.dtype), count)

    return Balancer("moco", init, step, None, "jacobian", "parameters")
