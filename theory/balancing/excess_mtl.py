r"""ExcessMTL (He et al., ICML 2024): up-weight the tasks whose estimated excess risk is largest.

Y. He, S. Zhou, G. Zhang, H. Yun, Y. Xu, B. Zeng, T. Chilimbi, H. Zhao, "Robust Multi-Task Learning with
Excess Risks", ICML 2024 (https://openreview.net/forum?id=JzWFmMySpn), Algorithm 1, as LibMTL implements it.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from theory.balancing.base import (Balancer, check_inputs, check_num_tasks, check_positive, register,
                                   safe_divide)
from theory.balancing.db_mtl import check_num_params, parameter_buffer

#: AdaGrad's constant inside the square root of the preconditioner, as in LibMTL (``sqrt(sum g^2 + 1e-7)``).
ADAGRAD_EPSILON = 1e-7


class ExcessMTLState(NamedTuple):
    r"""State of ExcessMTL.

    Attributes:
        squared_gradient_sum: ``[K, P]`` the AdaGrad accumulators :math:`\sum_{s\le k} g_{t,s}^2` (zero at
            ``init``; ``[K, 0]`` until the first step when ``init`` was not given ``num_params``); every step
            adds :math:`g_t^2`.
        initial_risk: ``[K]`` the excess-risk estimates of the first step, the reference of every later
            estimate (set by the first step, then kept).
        weights: ``[K]`` the loss weights :math:`\lambda`, positive and summing to K (ones at ``init``);
            every step after the first multiplies them by :math:`\exp(\eta\, r_t)` and renormalises.
        count: number of steps taken.
    """

    squared_gradient_sum: jax.Array
    initial_risk: jax.Array
    weights: jax.Array
    count: jax.Array


@register("excess_mtl")
def excess_mtl(robust_step_size: float = 1e-2) -> Balancer:
    r"""ExcessMTL: exponentiated-gradient ascent of the loss weights on normalised excess-risk estimates.

    The excess risk :math:`L_t(\theta) - L_t^*` is estimated to second order,
    :math:`\approx\frac12 g_t^\top H_t^{-1} g_t`, with a diagonal AdaGrad-style Hessian estimate
    :math:`H_t = \mathrm{diag}\big(\sqrt{\sum_{s\le k} g_{t,s}^2 + \epsilon}\big)` (:math:`\epsilon` = 1e-7
    as in LibMTL; the :math:`\frac12` cancels below):

    .. math:: e_t = g_t^\top H_t^{-1} g_t, \qquad r_t = e_t / e_t^{(1)}, \qquad
              \lambda_t \leftarrow K\,\frac{\lambda_t\, e^{\eta\, r_t}}{\sum_s \lambda_s\, e^{\eta\, r_s}},
              \qquad d = \sum_t \lambda_t\, g_t ,

    where :math:`e^{(1)}_t` is the estimate at the first step (which records it and keeps
    :math:`\lambda = 1`), :math:`\eta` is ``robust_step_size``, and this step's updated :math:`\lambda`
    weighs this step's gradients (the order of LibMTL's loop). A task whose first estimate was 0 gets
    :math:`r_t = 0`. The accumulators live in parameter space, so the method needs the Jacobian
    (``init(num_tasks, num_params=None)``; see :func:`theory.balancing.db_mtl.parameter_buffer`).
    ``direction == weights @ jacobian`` exactly.

    Options:
        robust_step_size: :math:`\eta`, finite and > 0 (LibMTL's ``robust_step_size``, default 1e-2).

    The weight update runs in log space: the same numbers, but an overflowing :math:`e^{\eta r}` stays
    finite. Deviation from LibMTL: a zero first estimate gives :math:`r_t = 0` instead of a division by 0.
    """
    robust_step_size = check_positive("robust_step_size", robust_step_size)

    def init(num_tasks: int, num_params: int | None = None) -> ExcessMTLState:
        num_tasks = check_num_tasks(num_tasks)
        return ExcessMTLState(jnp.zeros((num_tasks, check_num_params(num_params))), jnp.zeros((num_tasks,)),
                              jnp.ones((num_tasks,)), jnp.zeros((), jnp.int32))

    def step(jacobian, losses, state, key):
        num_tasks = check_inputs(jacobian, losses)
        dtype = jacobian.dtype
        accumulated = parameter_buffer(state.squared_gradient_sum, jacobian) + jacobian**2
        risk = jnp.sum(jacobian**2 / jnp.sqrt(accumulated + ADAGRAD_EPSILON), axis=1)
        first = state.count == 0
        initial = jnp.where(first, risk, state.initial_risk.astype(dtype))
        weights = state.weights.astype(dtype)
        # log(lambda) + eta r, capped so that an overflowing ratio stays finite; softmax renormalises.
        increment = jnp.minimum(robust_step_size * safe_divide(risk, initial), jnp.finfo(dtype).max / 4)
        weights = jnp.where(first, weights, num_tasks * jax.nn.softmax(jnp.log(weights) + increment))
        new_state = ExcessMTLState(accumulated.astype(state.squared_gradient_sum.dtype),
                                   initial.astype(state.initial_risk.dtype),
                                   weights.astype(state.weights.dtype), state.count + 1)
        return weights @ jacobian, weights, new_state

    return Balancer("excess_mtl", init, step, None, "jacobian", "parameters")
