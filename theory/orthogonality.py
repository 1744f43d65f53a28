r"""Proposition 2.5 (Eq (10), ``reference/theory.md`` §6): task and residual gradients on a shared backbone.

Setting, on a sample of n points. The latent factors are whitened, :math:`x = (z_s/\sigma_s, z_r/\sigma_r)`,
centred and rotated by the sample's inverse square-root covariance so that :math:`\frac1n X^\top X = I` exactly;
the shared backbone :math:`f = Vx` (the shared parameters, evaluated at :math:`V = I`) is then whitened as D.3
requires. The two streams are the rotation encoder of Eq (6) in the raw coordinates,

.. math:: \hat z_s = A f,\ A = [\,c\,\sigma_s I,\ -s\,\sigma_r I\,], \qquad
          \hat z_r = B f,\ B = [\,s\,\sigma_s I,\ c\,\sigma_r I\,],

so :math:`\hat z_s = c z_s - s z_r` and :math:`\hat z_r = s z_s + c z_r`. A task loss reads only the semantic
stream, :math:`\mathcal L_i = \frac1n\sum (w^\top\hat z_s - y)^2`, and a nuisance loss only the residual stream,
:math:`\mathcal L_j = \frac1n\sum (u^\top \hat z_r - z_{r,1})^2` (a stand-in for appearance reconstruction). Then

.. math:: |\langle\nabla_V\mathcal L_i, \nabla_V\mathcal L_j\rangle| \le \sqrt{\mathrm{CKA}(\hat Z_s,\hat Z_r)}\,
          (\|\Sigma_{ss}\|_F\|\Sigma_{rr}\|_F)^{1/2}\,\|G_i\|_F\,\|G_j\|_F ,
          \qquad G = \tfrac1n\textstyle\sum_k \delta_k f_k^\top,

holds exactly on the sample (every quantity is an empirical moment), which is what :func:`stream_gradients`
returns the pieces of.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from scm.linear_gaussian import check_theta
from theory import measures


# How close, in float64, autodiff's backbone gradients must be to A^T G_i and B^T G_j (StreamGradients'
# chain_rule_error): rounding is about 1e-15.
CHAIN_RULE_TOLERANCE = 1e-10


class StreamGradients(NamedTuple):
    """Gradients of a task loss and a nuisance loss on the shared backbone, and what Eq (10) bounds them with."""

    inner_product: jax.Array
    cosine: jax.Array
    bound: jax.Array
    linear_cka: jax.Array
    task_gradient_norm: jax.Array
    nuisance_gradient_norm: jax.Array
    # D.1 on this sample: the largest entry of |grad_V L_i - A^T G_i| relative to grad_V L_i's largest entry, and
    # the same for L_j and B^T G_j, the larger of the two (autodiff against the G the bound is built from); 0 up to
    # rounding.
    chain_rule_error: jax.Array


def whiten(x: jax.Array) -> jax.Array:
    """Centres ``x`` ``[n, m]`` and maps it so that its sample covariance (1/n) is exactly the identity."""
    x = x - jnp.mean(x, axis=0, keepdims=True)
    covariance = x.T @ x / x.shape[0]
    eigenvalues, eigenvectors = jnp.linalg.eigh(covariance)
    return x @ eigenvectors @ jnp.diag(eigenvalues**-0.5) @ eigenvectors.T


def stream_maps(theta, sigma_s: float, sigma_r: float, dim: int) -> tuple[jax.Array, jax.Array]:
    """The stream maps ``A``, ``B`` ``[d, 2d]`` on the whitened backbone (see the module docstring)."""
    check_theta(theta)
    c, s = jnp.cos(theta), jnp.sin(theta)
    eye = jnp.eye(dim)
    a = jnp.concatenate([c * sigma_s * eye, -s * sigma_r * eye], axis=1)
    b = jnp.concatenate([s * sigma_s * eye, c * sigma_r * eye], axis=1)
    return a, b


def stream_gradients(theta, sigma_s: float, sigma_r: float, dim: int, key: jax.Array, num_samples: int,
                     noise_std: float = 0.1) -> StreamGradients:
    """Gradients of the task and nuisance losses on the backbone ``V`` at ``V = I`` for one sample."""
    keys = jax.random.split(key, 5)
    z = jax.random.normal(keys[0], (num_samples, 2 * dim))
    f = whiten(z)  # the whitened backbone output at V = I
    a, b = stream_maps(theta, sigma_s, sigma_r, dim)
    z_s_true, z_r_true = sigma_s * f[:, :dim], sigma_r * f[:, dim:]
    beta = jax.random.normal(keys[1], (dim,)) / jnp.sqrt(dim)
    y = z_s_true @ beta + noise_std * jax.random.normal(keys[2], (num_samples,))
    w = jax.random.normal(keys[3], (dim,)) / jnp.sqrt(dim)
    u = jax.random.normal(keys[4], (dim,)) / jnp.sqrt(dim)

    def task_loss(v):
        return jnp.mean(((f @ v.T) @ a.T @ w - y) ** 2)

    def nuisance_loss(v):
        return jnp.mean(((f @ v.T) @ b.T @ u - z_r_true[:, 0]) ** 2)

    identity = jnp.eye(2 * dim)
    grad_i, grad_j = jax.grad(task_loss)(identity), jax.grad(nuisance_loss)(identity)
    # G = (1/n) sum delta f^T with delta the gradient w.r.t. the stream; grad_V = A^T G_i, B^T G_j (D.1).
    residual_i = (f @ a.T @ w - y)
    residual_j = (f @ b.T @ u - z_r_true[:, 0])
    g_i = 2.0 * jnp.outer(w, residual_i @ f) / num_samples
    g_j = 2.0 * jnp.outer(u, residual_j @ f) / num_samples
    stream_s, stream_r = f @ a.T, f @ b.T
    cka = measures.linear_cka(stream_s, stream_r)
    cov_ss, cov_rr = a @ a.T, b @ b.T
    bound = jnp.sqrt(cka) * jnp.sqrt(jnp.linalg.norm(cov_ss) * jnp.linalg.norm(cov_rr)) * jnp.linalg.norm(
        g_i) * jnp.linalg.norm(g_j)

    def relative_error(gradient, pulled_back):
        scale = jnp.maximum(jnp.max(jnp.abs(gradient)), jnp.finfo(gradient.dtype).tiny)
        return jnp.max(jnp.abs(gradient - pulled_back)) / scale

    chain_rule_error = jnp.maximum(relative_error(grad_i, a.T @ g_i), relative_error(grad_j, b.T @ g_j))
    return StreamGradients(measures.gradient_inner_product(grad_i, grad_j), measures.gradient_cosine(grad_i, grad_j),
                           bound, cka, jnp.linalg.norm(grad_i), jnp.linalg.norm(grad_j), chain_rule_error)
