r"""IMTL (Liu et al., *Towards Impartial Multi-task Learning*, ICLR 2021): IMTL-G's equal-projection weights, and
IMTL-L's learned loss scales."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from theory.balancing.base import (Balancer, EmptyState, check_num_tasks, check_positive, register, safe_divide,
                                   weighting_balancer)

LOG_SCALE_BOUND = 30.0  # |s_t| <= 30 (e^30 ~ 1e13): keeps e^{s_t} finite when a loss stays at 0 for ever


def pseudo_inverse(matrix: jax.Array) -> jax.Array:
    """Moore–Penrose inverse of a symmetric positive semi-definite matrix by ``eigh``, dropping eigenvalues at most
    ``10 K eps`` times the largest (``jnp.linalg.pinv``'s default cut-off)."""
    eigenvalues, vectors = jnp.linalg.eigh(matrix)
    cutoff = 10 * matrix.shape[0] * jnp.finfo(matrix.dtype).eps * jnp.max(jnp.abs(eigenvalues))
    keep = eigenvalues > cutoff
    inverse = jnp.where(keep, 1.0 / jnp.where(keep, eigenvalues, 1.0), 0.0)
    return (vectors * inverse) @ vectors.T


def imtl_g_weights(gram: jax.Array) -> jax.Array:
    r"""IMTL-G's weights: :math:`\alpha` with :math:`\sum_t\alpha_t = 1` and :math:`G\alpha = c\,n`,
    :math:`n_t = \|g_t\|` (equal projections :math:`c` of :math:`d = \sum_t\alpha_t g_t` on the unit gradients).

    Where :math:`n` lies in :math:`G`'s range and :math:`\mathbf 1^\top G^{+} n \ne 0` (always when :math:`G` is
    invertible): :math:`\alpha = G^{+}n / (\mathbf 1^\top G^{+} n)`. Otherwise no common projection other than
    :math:`c = 0` is defined (for gradients along one line of unequal norms, :math:`g` and :math:`-2g`, the
    directions in their span with equal projections are only 0), and :math:`\alpha` is the projection of
    :math:`\mathbf 1` on :math:`G`'s null space, normalised: :math:`d = 0` (LibMTL's formula gives the same), where
    :math:`G^{+}n` normalised would be a direction of unequal projections (:math:`-5g` for :math:`g, -2g`). Zero
    weights when that null space is orthogonal to :math:`\mathbf 1` as well. Computed on :math:`G/\mathrm{tr}(G)`
    (the weights are invariant to that scale).
    """
    num_tasks = gram.shape[0]
    dtype = gram.dtype
    eps = jnp.finfo(dtype).eps
    trace = jnp.trace(gram)
    g = gram / jnp.where(trace > 0, trace, 1.0)
    norms = jnp.sqrt(jnp.maximum(jnp.diag(g), 0.0))  # a unit vector unless every gradient is 0
    inverse = pseudo_inverse(g)
    range_projector = inverse @ g
    v = inverse @ norms
    total = jnp.sum(v)
    threshold = 100 * num_tasks * eps * jnp.maximum(jnp.max(jnp.abs(v)), 1.0)
    # n outside the range beyond rounding (sqrt(eps): the eigenvectors kept are exact to about that).
    in_range = jnp.linalg.norm(norms - range_projector @ norms) <= jnp.sqrt(eps) * jnp.maximum(jnp.sum(norms), 1.0)
    ok = in_range & (jnp.abs(total) > threshold)
    null = 1.0 - jnp.sum(range_projector, axis=1)  # the ones vector's part in G's null space
    null_total = jnp.sum(null)
    common_zero = safe_divide(null, jnp.where(jnp.abs(null_total) > 100 * num_tasks * eps, null_total, 0.0))
    return jnp.where(ok, safe_divide(v, jnp.where(ok, total, 0.0)), common_zero)


@register("imtl_g")
def imtl_g() -> Balancer:
    r"""IMTL-G: the direction in the span of the gradients whose projections on all unit gradients are equal.

    .. math:: d = \sum_t \alpha_t g_t, \quad \textstyle\sum_t \alpha_t = 1, \quad
              d^\top u_1 = \dots = d^\top u_K, \quad u_t = g_t/\|g_t\|
              \qquad\Longrightarrow\qquad \alpha = \frac{G^{-1} n}{\mathbf 1^\top G^{-1} n},\ n_t = \|g_t\|.

    The paper's closed form (as LibMTL codes it) anchors on task 1: with :math:`D` and :math:`U` stacking
    :math:`g_1 - g_t` and :math:`u_1 - u_t` (:math:`t \ge 2`), :math:`\alpha_{2:K} = g_1^\top U^\top (DU^\top)^{-1}`,
    :math:`\alpha_1 = 1 - \sum_{t\ge2}\alpha_t`. When :math:`G` is invertible both forms give the same :math:`\alpha`
    (equal projections :math:`d^\top u_t = (G\alpha)_t/n_t = c` means :math:`G\alpha = c\,n`); the symmetric form is
    used here because it needs only :math:`G`, and with the pseudo-inverse :math:`G^{+}` it stays defined when
    gradients are linearly dependent or zero: zero gradients get weight 0 and identical gradients equal weights
    (torchjd's generalisation); where no common projection but 0 exists (gradients along one line pointing both ways,
    more tasks than dimensions, every gradient 0), the weights sum to 1 on :math:`G`'s null space and :math:`d = 0`
    (:func:`imtl_g_weights`). Stateless (:class:`~theory.balancing.base.EmptyState`).
    """

    def init(num_tasks: int) -> EmptyState:
        check_num_tasks(num_tasks)
        return EmptyState()

    def weigh(gram, losses, state, key):
        return imtl_g_weights(gram), state

    return weighting_balancer("imtl_g", init, weigh)


class IMTLState(NamedTuple):
    """State of IMTL.

    Attributes:
        log_scales: ``[K]`` IMTL-L's learned loss scales :math:`s_t` (0 at the start): task t's loss is trained as
            :math:`e^{s_t}L_t - s_t`. Each step uses the current scales, then takes one gradient step on them.
        count: number of steps taken.
    """

    log_scales: jax.Array
    count: jax.Array


@register("imtl")
def imtl(scale_learning_rate: float = 1e-4) -> Balancer:
    r"""IMTL: IMTL-G on the gradients of IMTL-L's scaled losses (the paper's full method, as LibMTL runs it).

    IMTL-L scales task t's loss to :math:`\tilde L_t = e^{s_t}L_t - s_t`, whose gradient with respect to the
    shared parameters is :math:`e^{s_t} g_t`. One step does, in order:

    1. **Weights** (with the current :math:`s`): IMTL-G on the scaled gradients, Gram matrix
       :math:`\tilde G = E G E`, :math:`E = \mathrm{diag}(e^{s})`, gives :math:`\tilde\alpha`
       (:math:`\sum_t\tilde\alpha_t = 1`); the direction is
       :math:`d = \sum_t \tilde\alpha_t e^{s_t} g_t`, so the returned weights, coefficients of the **raw** gradients,
       are

       .. math:: w_t = \tilde\alpha_t\, e^{s_t}.

       (Unit gradients do not see the scales, so :math:`w \propto G^{+}n` whatever :math:`s`: the scales multiply
       IMTL-G's direction by :math:`\sum_t (G^+n)_t / \sum_t e^{-s_t}(G^+n)_t`, a factor that is negative when
       :math:`G^+n` has entries of both signs. The shared update follows IMTL-L only through this factor.)
    2. **Scales**: one gradient step of size ``scale_learning_rate`` on the scaled losses,

       .. math:: s_t \leftarrow s_t - \eta\,\partial\tilde L_t/\partial s_t = s_t - \eta\,(e^{s_t}L_t - 1),

       whose fixed point is :math:`e^{s_t} = 1/L_t`; :math:`s` is kept in :math:`[-30, 30]`.

    LibMTL makes :math:`s` a model parameter (initial value 0) updated by the model's optimiser (Adam in its
    examples, learning rate 1e-4 for NYUv2), and gives task t's own parameters the gradient of
    :math:`\tilde L_t`; here the scales take a plain gradient step (default size 1e-4) and a caller that wants
    LibMTL's task-specific gradients scales them by :math:`e^{s_t}` from the state.
    """
    scale_learning_rate = check_positive("scale_learning_rate", scale_learning_rate, allow_zero=True)

    def init(num_tasks: int) -> IMTLState:
        num_tasks = check_num_tasks(num_tasks)
        return IMTLState(jnp.zeros((num_tasks,)), jnp.zeros((), jnp.int32))

    def weigh(gram, losses, state, key):
        log_scales = state.log_scales.astype(gram.dtype)
        scales = jnp.exp(log_scales)
        weights = imtl_g_weights(gram * jnp.outer(scales, scales)) * scales
        gradient = scales * losses.astype(gram.dtype) - 1.0
        new_log_scales = jnp.clip(log_scales - scale_learning_rate * gradient, -LOG_SCALE_BOUND, LOG_SCALE_BOUND)
        return weights, IMTLState(new_log_scales.astype(state.log_scales.dtype), state.count + 1)

    return weighting_balancer("imtl", init, weigh)
