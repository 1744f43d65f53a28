r"""GradDrop (Chen et al., NeurIPS 2020): keep one sign per coordinate, drawn by the signs' purity.

Z. Chen, J. Ngiam, Y. Huang, T. Luong, H. Kretzschmar, Y. Chai, D. Anguelov, "Just Pick a Sign: Optimizing
Deep Multitask Models with Gradient Sign Dropout", NeurIPS 2020, Algorithm 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from theory.balancing.base import Balancer, EmptyState, check_inputs, check_num_tasks, register, safe_divide


def sign_purity_mask(jacobian: jax.Array, key: jax.Array) -> jax.Array:
    r"""GradDrop's mask ``[K, R]``: which task gradients each coordinate keeps.

    With the purity :math:`P = \frac12\big(1 + \sum_t J_t / \sum_t |J_t|\big)` (per coordinate; 1/2 where
    every :math:`J_t` is 0) and one :math:`U \sim \mathcal U[0, 1)` per coordinate from ``key``, a
    coordinate keeps the positive entries when :math:`U < P` and the negative ones otherwise. Exposed so that
    a caller holding per-example gradients can draw the mask from batch sums (LibMTL multiplies them by the
    sign of the representation first) and apply it to every example.
    """
    purity = 0.5 * (1.0 + safe_divide(jnp.sum(jacobian, axis=0), jnp.sum(jnp.abs(jacobian), axis=0)))
    keep_positive = jax.random.uniform(key, purity.shape, jacobian.dtype) < purity
    return jnp.where(keep_positive[None, :], jacobian > 0, jacobian < 0)


@register("graddrop")
def graddrop(leak: float = 0.0) -> Balancer:
    r"""GradDrop on gradients with respect to the shared representation (``gradient_of="representation"``).

    The input Jacobian is ``[K, R]``: row t is the gradient of task t's loss with respect to the shared
    representation (summed over the batch, or flattened with the batch axis). With the mask :math:`M` of
    :func:`sign_purity_mask`,

    .. math:: P = \tfrac12\Big(1 + \frac{\sum_t J_t}{\sum_t |J_t|}\Big), \quad U \sim \mathcal U[0,1), \quad
              M_t = \mathbb 1[U < P]\,\mathbb 1[J_t > 0] + \mathbb 1[U \ge P]\,\mathbb 1[J_t < 0], \quad
              d = \sum_t \big(\ell + (1-\ell)\, M_t\big) \odot J_t ,

    elementwise per coordinate, with :math:`\ell` = ``leak``. A coordinate where every task agrees in sign
    keeps them all (:math:`P \in \{0, 1\}`), and ``leak = 1`` returns the plain sum. The direction is a
    representation gradient, to be pulled back through the encoder.

    **Weights** are pseudo-weights: the mask acts per coordinate, so the direction is not in the row space.
    Weight t is the least-squares coefficient of task t's kept gradient on its own gradient,
    :math:`w_t = \langle c_t \odot J_t, J_t\rangle / \|J_t\|^2` with :math:`c_t = \ell + (1-\ell) M_t`: the
    fraction of its squared gradient the task kept (1 when it kept everything, ``leak`` when it kept nothing
    or its row is 0).

    Options:
        leak: :math:`\ell` in [0, 1] (default 0).

    Deviations from LibMTL: LibMTL forms :math:`P` from batch sums of the per-example gradients multiplied
    by the sign of the representation and applies one mask to every example; with a ``[K, R]`` Jacobian the
    mask is drawn per given coordinate (use :func:`sign_purity_mask` for LibMTL's batch-wide variant).
    LibMTL adds 1e-7 to :math:`\sum_t|J_t|` and keeps neither sign when :math:`U = P` exactly; here the
    division is exact and :math:`U \ge P` keeps the negative sign, so a coordinate of one sign always keeps
    all its gradients. LibMTL returns no weights.
    """
    if not 0.0 <= float(leak) <= 1.0:
        raise ValueError(f"leak must be a number in [0, 1]; got {leak!r}")
    leak = float(leak)

    def init(num_tasks: int) -> EmptyState:
        check_num_tasks(num_tasks)
        return EmptyState()

    def step(jacobian, losses, state, key):
        check_inputs(jacobian, losses)
        multiplier = leak + (1.0 - leak) * sign_purity_mask(jacobian, key).astype(jacobian.dtype)
        # Rows are scaled by their largest entry first, so tiny gradients do not underflow to "zero rows".
        largest = jnp.max(jnp.abs(jacobian), axis=1)
        scaled = safe_divide(jacobian, largest[:, None])
        weights = jnp.where(largest > 0, safe_divide(jnp.sum(multiplier * scaled**2, axis=1),
                                                     jnp.sum(scaled**2, axis=1)), leak)
        return jnp.sum(multiplier * jacobian, axis=0), weights.astype(jacobian.dtype), state

    return Balancer("graddrop", init, step, None, "jacobian", "representation")
