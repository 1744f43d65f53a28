r"""Per-task gradients for the balancers: the Jacobian from one forward pass, or its Gram matrix without it.

Definition 2.1 needs :math:`g_t = \nabla_\vartheta \mathcal L_t` for every task. Two ways, both pure JAX:

* :func:`task_jacobian` — one forward pass, ``jax.vjp``, then ``vmap`` over the K one-hot cotangents: the Jacobian
  ``[K, P]`` of any pytree of shared parameters (raveled). Memory :math:`O(KP)`.
* :func:`linear_layer_gram` — for a shared linear layer :math:`h = xW^\top` the per-task gradient is
  :math:`g_t = \Delta_t^\top X` with :math:`\Delta_t = \partial\mathcal L_t/\partial h` ``[B, out]``, so

  .. math:: G_{st} = \langle g_s, g_t\rangle_F = \operatorname{tr}(\Delta_s^\top X X^\top \Delta_t)
            = \sum_{b} \big(\Delta_s \odot (XX^\top\Delta_t)\big)_{b\cdot},

  computed through the batch in :math:`O(B^2\,\text{in} + K B^2\,\text{out} + K^2 B\,\text{out})` time and
  :math:`O(K B\,\text{out})` memory, never holding the ``[K, P]`` Jacobian (the layer-wise Gramian idea of
  torchjd's ``autogram``). The combined direction is then one more product, :func:`linear_layer_direction`.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree


def task_jacobian(loss_fn: Callable[[Any], jax.Array], params: Any) -> tuple[jax.Array, jax.Array, Callable]:
    """Per-task losses and the Jacobian of the shared parameters from one forward pass.

    Args:
        loss_fn: ``params -> losses [K]``.
        params: a pytree of shared parameters.

    Returns:
        ``(losses [K], jacobian [K, P], unravel)``, where ``unravel`` maps a ``[P]`` direction back to the pytree.
    """
    flat, unravel = ravel_pytree(params)
    losses, pullback = jax.vjp(lambda v: loss_fn(unravel(v)), flat)
    (jacobian,) = jax.vmap(pullback)(jnp.eye(losses.shape[0], dtype=losses.dtype))
    return losses, jacobian, unravel


def linear_layer_gram(inputs: jax.Array, output_cotangents: jax.Array) -> jax.Array:
    """Gram matrix of the per-task gradients of a linear layer's weight, through the batch.

    Args:
        inputs: ``X`` ``[B, in]``, the layer's inputs.
        output_cotangents: ``Δ`` ``[K, B, out]``, each task loss's gradient with respect to the layer's outputs.

    Returns:
        ``G`` ``[K, K]`` with ``G[s, t] = <Δ_s^T X, Δ_t^T X>``.
    """
    input_gram = inputs @ inputs.T  # [B, B]
    mixed = jnp.einsum("bc,tco->tbo", input_gram, output_cotangents)  # X X^T Δ_t
    return jnp.einsum("sbo,tbo->st", output_cotangents, mixed)


def linear_layer_direction(inputs: jax.Array, output_cotangents: jax.Array, weights: jax.Array) -> jax.Array:
    """The combined gradient :math:`\\sum_t w_t \\Delta_t^\\top X` of the layer's weight ``[out, in]``."""
    return jnp.einsum("t,tbo->ob", weights, output_cotangents) @ inputs
