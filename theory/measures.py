r"""Estimators on samples (and the closed forms they are checked against) for Theorem 2.4 and Proposition 2.5.

* Wasserstein-1 between residual distributions (Eq (9)): POT's 1-D and exact-OT plug-in estimates and sliced W₁
  (the Gaussian closed forms they are checked against, and the W₂ upper bound, are in :mod:`theory.closed_forms`).
* Linear CKA (Eq (11)) in its Gram form and feature form, the **debiased** CKA built on the unbiased HSIC
  estimator, and linear CKA's finite-batch floor.
* The leakage coefficient κ of Eq (8): exact for linear encoders, and a sample estimate from Jacobians.
* Gradient cosine and inner products (Eq (10)), and principal angles between subspaces (a learned θ̂).

**Estimator biases, in one place.** Plug-in W₁ between two empirical measures is biased *upwards*
(:math:`\mathbb E\,W_1(\hat\mu_n,\hat\nu_n) \ge W_1(\mu,\nu)` by joint convexity), by :math:`O(n^{-1/2})` in 1-D and
:math:`O(n^{-1/d})` in :math:`d \ge 3` dimensions — badly so for :math:`d \ge 5` at thousands of points. Sliced W₁
is a *lower* bound of W₁ in population, but its plug-in estimate inherits the 1-D upward bias. Linear CKA on a batch
of B codes of widths p and q has a positive floor :math:`\approx\sqrt{pq/((B+p)(B+q))}` even for independent
streams; debiased CKA removes it (its expectation is ~0 for independent streams, and it can be slightly negative).
The Jacobian estimate of κ is a supremum over the samples seen, hence a lower bound of the supremum in Eq (8).

Array functions are JAX and jittable; the POT-based estimators and the Gaussian closed forms take and return numpy
(POT's exact OT runs in C++ on the host).
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

# ----------------------------------------------------------------------------------------------- Wasserstein-1


def w1_empirical_1d(x, y) -> float:
    """Plug-in W₁ between two 1-D samples (``ot.wasserstein_1d``, sorting, :math:`O(n\\log n)`).

    Biased upwards by :math:`O(n^{-1/2})`: with equal distributions its expectation is :math:`\\propto n^{-1/2}`.
    """
    import ot

    x, y = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
    return float(ot.wasserstein_1d(x, y, p=1))


def w1_empirical(x, y, max_iterations: int = 1_000_000) -> float:
    """Plug-in W₁ between two d-D samples by exact optimal transport (``ot.emd2`` with the Euclidean cost).

    :math:`O(n^2)` memory and roughly cubic time: keep n to a few thousand. Biased upwards, by
    :math:`O(n^{-1/d})` for :math:`d \\ge 3`; prefer the closed forms or 1-D projections for bound checks.
    """
    import ot

    x, y = _as_2d(x), _as_2d(y)
    cost = ot.dist(x, y, metric="euclidean")
    return float(ot.emd2(ot.unif(len(x)), ot.unif(len(y)), cost, numItermax=max_iterations))


def sliced_w1(x, y, num_projections: int = 200, seed: int = 0) -> float:
    """Sliced W₁ (``ot.sliced_wasserstein_distance`` with p = 1): the mean over random directions of the 1-D W₁.

    In population it is a *lower* bound of W₁ (projections are 1-Lipschitz); its plug-in estimate carries the 1-D
    upward bias. Using it on the right side of an upper-bound check can produce false failures.
    """
    import ot

    x, y = _as_2d(x), _as_2d(y)
    return float(ot.sliced_wasserstein_distance(x, y, n_projections=num_projections, p=1, seed=seed))


def _as_2d(x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x[:, None] if x.ndim == 1 else x


# ------------------------------------------------------------------------------------------------------- CKA


def _centre(x: jax.Array) -> jax.Array:
    return x - jnp.mean(x, axis=0, keepdims=True)


def _codes(x, y, name: str) -> tuple[jax.Array, jax.Array]:
    """``x`` and ``y`` as ``[B, p]`` and ``[B, q]`` (a ``[B]`` vector is one feature), the same batch ``B``. Shapes
    are static: this runs under ``jit`` too."""
    x, y = jnp.asarray(x), jnp.asarray(y)
    x, y = (x[:, None] if x.ndim == 1 else x), (y[:, None] if y.ndim == 1 else y)
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"{name} needs codes [B, p] and [B, q] of the same batch B; got shapes {jnp.shape(x)} and "
                         f"{jnp.shape(y)}")
    return x, y


def linear_cka(x: jax.Array, y: jax.Array) -> jax.Array:
    r"""Linear CKA between two batches of codes ``x`` ``[B, p]`` and ``y`` ``[B, q]`` (Eq (11)), feature form:

    .. math:: \mathrm{CKA} = \frac{\|\tilde X^\top \tilde Y\|_F^2}
                                   {\|\tilde X^\top\tilde X\|_F\,\|\tilde Y^\top\tilde Y\|_F}
              = \frac{\mathrm{tr}(KHLH)}{\sqrt{\mathrm{tr}(KHKH)\,\mathrm{tr}(LHLH)}},\quad K = XX^\top, L = YY^\top,

    equal to the Gram form the paper's code uses (:func:`linear_cka_gram`), at :math:`O(B(p+q)\min(p,q))` cost.
    0 when a stream is constant.
    """
    x, y = _codes(x, y, "linear_cka")
    x, y = _centre(x), _centre(y)
    return _ratio_to_root(jnp.sum((x.T @ y) ** 2), jnp.sum((x.T @ x) ** 2) * jnp.sum((y.T @ y) ** 2))


def _ratio_to_root(numerator: jax.Array, squared_denominator: jax.Array) -> jax.Array:
    """``numerator / sqrt(squared_denominator)``, and 0 where ``squared_denominator <= 0``, with a finite gradient
    there too: the square root is taken of 1 where the denominator vanishes, since its derivative at 0 is infinite
    and the masked branch's gradient would be 0·∞ = NaN (a constant stream over a batch of one, say)."""
    positive = squared_denominator > 0
    root = jnp.sqrt(jnp.where(positive, squared_denominator, 1.0))
    return jnp.where(positive, numerator / root, 0.0)


def linear_cka_gram(x: jax.Array, y: jax.Array) -> jax.Array:
    """Linear CKA in the Gram form of Eq (11),
    :math:`\\mathrm{HSIC}(K,L)/\\sqrt{\\mathrm{HSIC}(K,K)\\mathrm{HSIC}(L,L)}` with centred Grams
    (:math:`O(B^2(p+q))`): the form the paper's code computes, without the 1e-6 it adds to the denominator (which
    lets shrinking both codes lower the value), so that it equals :func:`linear_cka` exactly."""
    x, y = _codes(x, y, "linear_cka_gram")
    k, l = _centre(x) @ _centre(x).T, _centre(y) @ _centre(y).T
    return _ratio_to_root(jnp.sum(k * l), jnp.sum(k * k) * jnp.sum(l * l))


def _unbiased_hsic(k: jax.Array, l: jax.Array) -> jax.Array:
    r"""Unbiased HSIC (Song et al., 2012) of Grams with zeroed diagonals:
    :math:`\frac{1}{n(n-3)}\big[\mathrm{tr}(\tilde K\tilde L) + \frac{1^\top\tilde K 1\,1^\top\tilde L1}{(n-1)(n-2)}
    - \frac{2}{n-2}1^\top\tilde K\tilde L 1\big]`."""
    n = k.shape[0]
    k = k - jnp.diag(jnp.diag(k))
    l = l - jnp.diag(jnp.diag(l))
    k_sum, l_sum = jnp.sum(k, axis=0), jnp.sum(l, axis=0)
    trace = jnp.sum(k * l)
    return (trace + jnp.sum(k_sum) * jnp.sum(l_sum) / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * k_sum @ l_sum) / (
        n * (n - 3))


def debiased_cka(x: jax.Array, y: jax.Array) -> jax.Array:
    r"""Debiased linear CKA: CKA with every HSIC replaced by its unbiased estimator (Nguyen, Raghu & Kornblith 2021).

    Removes linear CKA's finite-batch floor: for independent streams its expectation is about 0 (it can be slightly
    negative), at any batch size :math:`B \ge 4`. Inputs ``[B, p]`` and ``[B, q]``.
    """
    x, y = _codes(x, y, "debiased_cka")
    if x.shape[0] < 4:
        raise ValueError(f"debiased CKA needs a batch of at least 4 samples; got {x.shape[0]}")
    k, l = x @ x.T, y @ y.T  # the unbiased estimator centres implicitly
    return _ratio_to_root(_unbiased_hsic(k, l), _unbiased_hsic(k, k) * _unbiased_hsic(l, l))


def cka_finite_batch_floor(batch: int, p: int, q: int) -> float:
    r"""Approximate expected linear CKA of independent isotropic Gaussian streams on a batch of ``batch`` codes of
    widths ``p`` and ``q``: :math:`\sqrt{pq}/\sqrt{(B+p)(B+q)}` (``reference/theory.md`` §9.4)."""
    return math.sqrt(p * q) / math.sqrt((batch + p) * (batch + q))


# --------------------------------------------------------------------------------------------------- leakage


def leakage_linear(residual_map: jax.Array) -> jax.Array:
    r"""κ of Eq (8) for a linear semantic encoder :math:`\phi_s(g(z_s, z_r)) = A_s z_s + A_r z_r`: the spectral norm
    :math:`\|A_r\|_{op}` of the block that reads the residual, ``residual_map`` ``[m, d_r]``. For the rotation
    encoder :math:`A_r = -\sin\theta\, I`, so :math:`\kappa = |\sin\theta|`."""
    return jnp.linalg.norm(residual_map, ord=2)


def leakage_jacobian(semantic_encoder: Callable[[jax.Array, jax.Array], jax.Array], z_s: jax.Array,
                     z_r: jax.Array) -> jax.Array:
    r"""Sample estimate of κ for a differentiable, possibly nonlinear semantic stream:
    :math:`\max_i \|\partial_{z_r}\phi_s(g(z_{s,i}, z_{r,i}))\|_{op}` over the given samples.

    By the mean-value theorem κ equals the supremum of that operator norm over the whole space, so this is a lower
    bound that tightens with more (and more extreme) samples.

    Args:
        semantic_encoder: ``(z_s [d_s], z_r [d_r]) -> semantic code [m]`` (the composition :math:`\phi_s\circ g`).
        z_s: ``[n, d_s]`` semantic factors.
        z_r: ``[n, d_r]`` residual factors.
    """
    jacobians = jax.vmap(jax.jacfwd(semantic_encoder, argnums=1))(z_s, z_r)  # [n, m, d_r]
    return jnp.max(jax.vmap(lambda j: jnp.linalg.norm(j, ord=2))(jacobians))


# ------------------------------------------------------------------------------------- gradients, subspaces


def gradient_inner_product(grad_a, grad_b) -> jax.Array:
    """:math:`\\langle g_a, g_b\\rangle` of two gradients (arrays or matching pytrees), summed over all leaves."""
    leaves = jax.tree.map(lambda a, b: jnp.sum(a * b), grad_a, grad_b)
    return sum(jax.tree.leaves(leaves))


def gradient_cosine(grad_a, grad_b) -> jax.Array:
    """Cosine between two gradients (arrays or matching pytrees); 0 when either is zero."""
    return _ratio_to_root(gradient_inner_product(grad_a, grad_b),
                          gradient_inner_product(grad_a, grad_a) * gradient_inner_product(grad_b, grad_b))


def principal_angles(basis_a: jax.Array, basis_b: jax.Array) -> jax.Array:
    r"""Principal angles (radians, ascending) between the column spans of ``basis_a`` ``[n, k]`` and ``basis_b``
    ``[n, l]``: :math:`\arccos` of the singular values of :math:`Q_a^\top Q_b` for orthonormal bases :math:`Q`.

    With a learned semantic map's row space against the true semantic coordinates, the largest angle is the learned
    entanglement :math:`\hat\theta` (for the rotation encoder every angle equals θ).
    """
    q_a, _ = jnp.linalg.qr(basis_a)
    q_b, _ = jnp.linalg.qr(basis_b)
    cosines = jnp.linalg.svd(q_a.T @ q_b, compute_uv=False)
    return jnp.sort(jnp.arccos(jnp.clip(cosines, -1.0, 1.0)))
