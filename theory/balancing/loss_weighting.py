r"""Methods whose weights do not look at the gradients: EW and RLW."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from theory.balancing.base import Balancer, EmptyState, check_inputs, check_num_tasks, combine, register


@register("ew")
def equal_weighting() -> Balancer:
    r"""Equal weighting, the plain sum of the task gradients as LibMTL runs it (weight 1 each, not 1/K).

    .. math:: d = \sum_{t=1}^K g_t, \qquad w_t = 1 .
    """

    def init(num_tasks: int) -> EmptyState:
        check_num_tasks(num_tasks)
        return EmptyState()

    def step(jacobian, losses, state, key):
        num_tasks = check_inputs(jacobian, losses)
        weights = jnp.ones((num_tasks,), jacobian.dtype)
        return combine(weights, jacobian), weights, state

    return Balancer("ew", init, step)


@register("rlw")
def random_loss_weighting() -> Balancer:
    r"""Random loss weighting (Lin et al., TMLR 2022): fresh weights from a softmax of Gaussian logits each step.

    .. math:: w = \mathrm{softmax}(\xi), \quad \xi \sim \mathcal N(0, I_K), \qquad d = \sum_t w_t g_t .
    """

    def init(num_tasks: int) -> EmptyState:
        check_num_tasks(num_tasks)
        return EmptyState()

    def step(jacobian, losses, state, key):
        num_tasks = check_inputs(jacobian, losses)
        weights = jax.nn.softmax(jax.random.normal(key, (num_tasks,), jacobian.dtype))
        return combine(weights, jacobian), weights, state

    return Balancer("rlw", init, step)
