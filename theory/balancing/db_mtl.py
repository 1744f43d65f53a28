r"""DB-MTL (Lin et al.): balance loss scales with a log transform and gradient magnitudes to the largest one.

B. Lin, W. Jiang, F. Ye, Y. Zhang, P. Chen, Y.-C. Chen, S. Liu, J. T. Kwok, "Dual-Balancing for Multi-Task
Learning", arXiv:2308.12029 (2023), Section 3.

Also home of :func:`parameter_buffer`, shared by the methods whose state lives in parameter space (DB-MTL,
MoCo, ExcessMTL): their state holds a ``[K, P]`` array, and ``init(num_tasks)`` cannot know P.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from theory.balancing.base import (Balancer, check_count, check_inputs, check_num_tasks, check_positive, register,
                                   safe_divide)

#: Added to the losses inside the log, as LibMTL does (``log(L + 1e-8)``); keeps a task with loss 0 finite.
LOSS_EPSILON = 1e-8


def check_num_params(num_params: int | None) -> int:
    """``num_params`` of a parameter-space state: an integer >= 0, or None for the zero-size placeholder."""
    return 0 if num_params is None else check_count("num_params", num_params, 0, or_none=True)


def parameter_buffer(buffer: jax.Array, jacobian: jax.Array) -> jax.Array:
    r"""The ``[K, P]`` state array ``buffer`` as the step computes with it (in the Jacobian's dtype).

    ``init(num_tasks)`` without ``num_params`` stores a zero-size ``[K, 0]`` placeholder, read here as zeros
    of shape ``[K, P]``. Shapes are static, so this jits and vmaps; the state's shape then changes once, after
    the first step, which costs one retrace under ``jax.jit`` and is refused by ``lax.scan`` (whose carry must
    keep its shape): there, build the state with ``init(num_tasks, num_params=P)``. A buffer of another shape
    never gets here: :func:`theory.balancing.make`'s methods refuse it.
    """
    if buffer.shape == (jacobian.shape[0], 0):
        return jnp.zeros(jacobian.shape, jacobian.dtype)
    return buffer.astype(jacobian.dtype)


def step_size(base: float, decay: float, count: jax.Array, dtype) -> jax.Array:
    r""":math:`\text{base} / k^{\text{decay}}` at step :math:`k` = ``count`` (>= 1), in ``dtype``."""
    return base / count.astype(dtype) ** decay


class DBMTLState(NamedTuple):
    r"""State of DB-MTL.

    Attributes:
        ema: ``[K, P]`` the EMA :math:`m_t` of the gradients of the log losses (``[K, 0]`` until the first
            step when ``init`` was not given ``num_params``); every step replaces it by
            :math:`\beta_k m_t + (1-\beta_k)\nabla\log L_t`.
        count: number of steps taken (sets :math:`\beta_k = \beta / k^{\beta_\sigma}`).
    """

    ema: jax.Array
    count: jax.Array


@register("db_mtl")
def db_mtl(beta: float = 0.9, beta_sigma: float = 0.0) -> Balancer:
    r"""DB-MTL: a log transform balances loss scales; rescaling to the largest norm balances gradient sizes.

    At step :math:`k`, with :math:`\beta_k = \beta / k^{\beta_\sigma}` and the gradient of the log loss
    :math:`\nabla\log L_t = g_t / L_t`,

    .. math:: m_t \leftarrow \beta_k\, m_t + (1-\beta_k)\,\frac{g_t}{L_t + \epsilon}, \qquad
              \alpha_t = \frac{\max_s \|m_s\|}{\|m_t\|}, \qquad d = \sum_t \alpha_t\, m_t ,

    so every rescaled task gradient :math:`\alpha_t m_t` has the norm of the largest (:math:`\epsilon` = 1e-8
    as in LibMTL; :math:`m_t = 0` at ``init``). The EMA lives in parameter space and its norms involve inner
    products of gradients from different steps, which no Gram matrix of one step holds: the method needs the
    Jacobian, and the state holds the ``[K, P]`` EMA (``init(num_tasks, num_params=None)``; see
    :func:`parameter_buffer`).

    **Weights** are the coefficients of this step's rows, :math:`w_t = \alpha_t (1-\beta_k)/(L_t+\epsilon)`:
    ``direction - weights @ jacobian`` is the part carried by the EMA from earlier steps,
    :math:`\beta_k\sum_t\alpha_t m_t^{\rm prev}`, zero at the first step (and for ``beta = 0``), where
    ``direction == weights @ jacobian`` holds exactly.

    Options:
        beta: EMA rate, in [0, 1) (LibMTL's ``DB_beta``, default 0.9).
        beta_sigma: decay exponent of the EMA rate, >= 0 (``DB_beta_sigma``, default 0: a constant rate).

    Deviation from LibMTL: :math:`\alpha_t` divides exactly (0 for a zero :math:`m_t`) instead of adding 1e-8
    to :math:`\|m_t\|`; LibMTL's returned weights are all ones (here: the coefficients above).
    """
    if not 0.0 <= float(beta) < 1.0:
        raise ValueError(f"beta must be a number in [0, 1); got {beta!r}")
    beta = float(beta)
    beta_sigma = check_positive("beta_sigma", beta_sigma, allow_zero=True)

    def init(num_tasks: int, num_params: int | None = None) -> DBMTLState:
        num_tasks = check_num_tasks(num_tasks)
        return DBMTLState(jnp.zeros((num_tasks, check_num_params(num_params))), jnp.zeros((), jnp.int32))

    def step(jacobian, losses, state, key):
        check_inputs(jacobian, losses)
        ema = parameter_buffer(state.ema, jacobian)
        count = state.count + 1
        rate = step_size(beta, beta_sigma, count, jacobian.dtype)
        inverse_losses = safe_divide(jnp.ones_like(losses), losses + LOSS_EPSILON).astype(jacobian.dtype)
        ema = rate * ema + (1.0 - rate) * (jacobian * inverse_losses[:, None])
        norms = jnp.sqrt(jnp.sum(ema**2, axis=1))
        scales = safe_divide(jnp.max(norms), norms)
        direction = scales @ ema
        weights = scales * (1.0 - rate) * inverse_losses
        return direction, weights, DBMTLState(ema.astype(state.ema.dtype), count)

    return Balancer("db_mtl", init, step, None, "jacobian", "parameters")
