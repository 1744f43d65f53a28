r"""PCGrad (Yu et al., NeurIPS 2020): project each task gradient off the gradients it conflicts with."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from theory.balancing.base import Balancer, EmptyState, check_num_tasks, register, weighting_balancer


@register("pcgrad")
def pcgrad() -> Balancer:
    r"""PCGrad ("gradient surgery").

    For each task :math:`i`, in a random order of the other tasks :math:`j \ne i`,

    .. math:: \text{if } \tilde g_i^\top g_j < 0:\quad \tilde g_i \leftarrow \tilde g_i -
              \frac{\tilde g_i^\top g_j}{\|g_j\|^2}\, g_j, \qquad d = \sum_i \tilde g_i .

    Each :math:`\tilde g_i` stays a linear combination :math:`C_i J` of the original rows, so the surgery runs on
    the Gram matrix (:math:`\tilde g_i^\top g_j = C_i G_{:, j}`), vectorised over :math:`i`, and the returned
    weights :math:`w = \sum_i C_i` satisfy ``direction == weights @ jacobian`` exactly.
    """

    def init(num_tasks: int) -> EmptyState:
        check_num_tasks(num_tasks)
        return EmptyState()

    def weigh(g, losses, state, key):
        num_tasks = losses.shape[0]
        orders = jax.vmap(lambda k: jax.random.permutation(k, num_tasks))(jax.random.split(key, num_tasks))

        def surgery(i, order):
            def project(position, coefficients):
                j = order[position]
                inner = coefficients @ g[:, j]
                conflict = (j != i) & (inner < 0) & (g[j, j] > 0)
                shrink = jnp.where(conflict, inner / jnp.where(conflict, g[j, j], 1.0), 0.0)
                return coefficients.at[j].add(-shrink)

            start = jax.nn.one_hot(i, num_tasks, dtype=g.dtype)
            return jax.lax.fori_loop(0, num_tasks, project, start)

        coefficients = jax.vmap(surgery)(jnp.arange(num_tasks), orders)  # row i: tilde g_i = C_i J
        weights = coefficients.sum(axis=0)
        return weights, state

    return weighting_balancer("pcgrad", init, weigh)
