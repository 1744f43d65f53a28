r"""Methods whose weights do not look at the gradients: EW and RLW."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from theory.balancing.base import Balancer, EmptyState, check_num_tasks, register, weighting_balancer


def _stateless_init(num_tasks: int) -> EmptyState:
    check_num_tasks(num_tasks)
    return EmptyState()


@register("ew")
def equal_weighting() -> Balancer:
    r"""Equal weighting, the plain sum of the task gradients as LibMTL runs it (weight 1 each, not 1/K).

    .. math:: d = \sum_{t=1}^K g_t, \qquad w_t = 1 .
    """

    def weigh(gram, losses, state, key):
        return jnp.ones_like(losses), state

    return weighting_balancer("ew", _stateless_init, weigh, requires="losses")


@register("rlw")
def random_loss_weighting() -> Balancer:
    r"""Random loss weighting (Lin et al., TMLR 2022): fresh weights from a softmax of Gaussian logits each step.

    .. math:: w = \mathrm{softmax}(\xi), \quad \xi \sim \mathcal N(0, I_K), \qquad d = \sum_t w_t g_t .
    """

    def weigh(gram, losses, state, key):
        return jax.nn.softmax(jax.random.normal(key, losses.shape, losses.dtype)), state

    return weighting_balancer("rlw", _stateless_init, weigh, requires="losses")
