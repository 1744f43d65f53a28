r"""GradNorm (Chen et al., ICML 2018): learn loss weights that equalise the tasks' training rates."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from theory.balancing.base import (Balancer, check_num_tasks, check_positive, register, safe_divide,
                                   weighting_balancer)


class GradNormState(NamedTuple):
    """State of GradNorm.

    Attributes:
        weights: ``[K]`` current loss weights, positive and summing to K.
        initial_losses: ``[K]`` the losses :math:`L_t(0)` seen at the first step (the reference for training rates).
        count: number of steps taken.
    """

    weights: jax.Array
    initial_losses: jax.Array
    count: jax.Array


@register("gradnorm")
def gradnorm(alpha: float = 1.5, weight_learning_rate: float = 0.025) -> Balancer:
    r"""GradNorm with asymmetry ``alpha`` and a plain gradient step of size ``weight_learning_rate`` on the weights.

    With :math:`G_t = \|w_t g_t\|`, :math:`\bar G = \frac1K\sum_t G_t`, training rates
    :math:`\tilde L_t = L_t / L_t(0)` and relative rates :math:`r_t = \tilde L_t / \frac1K\sum_j\tilde L_j`,

    .. math:: \mathcal L_{\rm grad}(w) = \sum_t \big|\, w_t\|g_t\| - \bar G\, r_t^{\alpha} \big|,

    where the target :math:`\bar G r_t^\alpha` is held constant. Each step returns :math:`d = \sum_t w_t g_t` with
    the current weights, then updates :math:`w \leftarrow w - \eta\,\partial\mathcal L_{\rm grad}/\partial w` and
    renormalises so that :math:`\sum_t w_t = K` (weights are kept at least 1e-3·K to stay positive).
    The paper takes the gradients of the last shared layer; here they are those of the shared parameters given.

    Deviation from LibMTL, which follows the paper less closely: it learns :math:`w = K\,\mathrm{softmax}(s)`
    with the model's optimiser, weighs equally through the first epoch, and takes :math:`L_t(0)` as that epoch's
    mean loss; here the weights themselves take the gradient step and :math:`L_t(0)` is the first step's loss.
    """
    alpha = check_positive("alpha", alpha, allow_zero=True)
    weight_learning_rate = check_positive("weight_learning_rate", weight_learning_rate)

    def init(num_tasks: int) -> GradNormState:
        num_tasks = check_num_tasks(num_tasks)
        return GradNormState(jnp.ones((num_tasks,)), jnp.ones((num_tasks,)), jnp.zeros((), jnp.int32))

    def weigh(gram, losses, state, key):
        num_tasks = losses.shape[0]
        weights = state.weights.astype(gram.dtype)
        initial = jnp.where(state.count == 0, losses, state.initial_losses.astype(losses.dtype))
        grad_norms = jnp.sqrt(jnp.maximum(jnp.diag(gram), 0.0))
        rates = safe_divide(losses, initial)
        relative = safe_divide(rates, jnp.mean(rates))
        target = jax.lax.stop_gradient(jnp.mean(weights * grad_norms) * relative**alpha)
        # d/dw_t sum_j |w_j ||g_j|| - target_j| with the target held constant.
        grad_weights = jnp.sign(weights * grad_norms - target) * grad_norms
        new_weights = jnp.maximum(weights - weight_learning_rate * grad_weights, 1e-3 * num_tasks)
        new_weights = num_tasks * new_weights / jnp.sum(new_weights)
        new_state = GradNormState(new_weights.astype(state.weights.dtype), initial.astype(state.initial_losses.dtype),
                                  state.count + 1)
        return weights, new_state

    return weighting_balancer("gradnorm", init, weigh)
