r"""Theorem 2.4 in the one-dimensional rotation model, for any residual distribution (``reference/theory.md`` §5).

The semantic stream :math:`\hat z_s = c\,z_s - s\,z_r` leaks with :math:`\kappa = |\sin\theta|`; a head :math:`h`
with Lipschitz constant :math:`L_h` and a loss with Lipschitz constant :math:`L_\ell` then satisfy

.. math:: |\mathcal R_T - \mathcal R_S| \le L_\ell\, L_h\, \kappa\, W_1(P_S(Z_r), P_T(Z_r)).

:func:`loss_gap` estimates the left side by Monte Carlo with **paired** samples: the semantic factor and the label
noise are shared between domains, and the residuals of both domains are drawn from the same key (a monotone
coupling within a family), so the per-sample loss differences have a small variance and the standard error is that
of their mean.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import scipy.stats

from scm.residuals import Residual1D

HEADS = ("linear", "tanh")
LOSSES = ("absolute", "squared")


class GapEstimate(NamedTuple):
    """Monte Carlo estimate of :math:`\\mathcal R_T - \\mathcal R_S` and its standard error."""

    gap: float
    standard_error: float


def head_function(kind: str, weight: float) -> tuple[Callable[[jax.Array], jax.Array], float]:
    """A head on the semantic stream and its Lipschitz constant: ``linear`` :math:`wu` (:math:`|w|`) or ``tanh``
    :math:`\\tanh(wu)` (:math:`|w|`)."""
    if kind == "linear":
        return (lambda u: weight * u), abs(weight)
    if kind == "tanh":
        return (lambda u: jnp.tanh(weight * u)), abs(weight)
    raise ValueError(f"head must be one of {', '.join(HEADS)}; got {kind!r}")


def loss_function(kind: str) -> tuple[Callable[[jax.Array, jax.Array], jax.Array], float | None]:
    """The loss and its Lipschitz constant in the prediction (``None``: not Lipschitz, the theorem does not apply)."""
    if kind == "absolute":
        return (lambda prediction, y: jnp.abs(prediction - y)), 1.0
    if kind == "squared":
        return (lambda prediction, y: (prediction - y) ** 2), None
    raise ValueError(f"loss must be one of {', '.join(LOSSES)}; got {kind!r}")


def source_optimal_weight(theta: float, beta: float, sigma_s: float, residual_source: Residual1D) -> float:
    """The squared-loss source-optimal linear head on :math:`\\hat z_s` (Eq (22) with the residual's second moment,
    variance plus mean², all the squared loss sees of it: the head has no bias to absorb a mean)."""
    c, s = math.cos(theta), math.sin(theta)
    return beta * c * sigma_s**2 / (c**2 * sigma_s**2 + s**2 * (residual_source.variance + residual_source.loc**2))


def loss_gap(theta: float, beta: float, sigma_s: float, noise_std: float, head: str, weight: float, loss: str,
             residual_source: Residual1D, residual_target: Residual1D, key: jax.Array,
             num_samples: int) -> GapEstimate:
    """Paired Monte Carlo estimate of the OOD gap of ``head`` on the entangled semantic stream."""
    predict, _ = head_function(head, weight)
    loss_of, _ = loss_function(loss)
    key_s, key_eps, key_r = jax.random.split(key, 3)
    s_factor = sigma_s * jax.random.normal(key_s, (num_samples,))
    y = beta * s_factor + noise_std * jax.random.normal(key_eps, (num_samples,))
    c, s = math.cos(theta), math.sin(theta)
    differences = (loss_of(predict(c * s_factor - s * residual_target.sample(key_r, num_samples)), y)
                   - loss_of(predict(c * s_factor - s * residual_source.sample(key_r, num_samples)), y))
    return GapEstimate(float(jnp.mean(differences)), float(jnp.std(differences) / math.sqrt(num_samples)))


def wasserstein_bound(theta: float, head_lipschitz: float, w1: float, loss_lipschitz: float = 1.0) -> float:
    """The right side of Eq (9) in the rotation model: :math:`L_\\ell L_h |\\sin\\theta|\\, W_1`."""
    return loss_lipschitz * head_lipschitz * abs(math.sin(theta)) * w1


def gaussian_absolute_gap(theta: float, beta: float, sigma_s: float, noise_std: float, weight: float,
                          residual_source: Residual1D, residual_target: Residual1D) -> float:
    r"""Exact absolute-loss gap of a linear head when both residuals are Gaussian: the error
    :math:`e = (\beta - wc)z_s + \varepsilon + ws\,z_r` is Gaussian with mean :math:`ws\,m_e` and variance
    :math:`v_e`, and :math:`\mathbb E|e|` is the folded-normal mean."""
    c, s = math.cos(theta), math.sin(theta)

    def folded_mean(residual: Residual1D) -> float:
        if residual.family != "gaussian":
            raise ValueError("gaussian_absolute_gap needs Gaussian residuals")
        mean = weight * s * residual.loc
        std = math.sqrt((beta - weight * c) ** 2 * sigma_s**2 + noise_std**2 + (weight * s * residual.std) ** 2)
        return std * math.sqrt(2 / math.pi) * math.exp(-mean**2 / (2 * std**2)) + mean * (
            1 - 2 * scipy.stats.norm.cdf(-mean / std))

    return folded_mean(residual_target) - folded_mean(residual_source)
