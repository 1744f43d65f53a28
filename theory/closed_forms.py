r"""Exact risks, OOD gaps and the floor of Theorem 2.3 in the linear-Gaussian SCM (``reference/theory.md`` §4).

A linear head :math:`w_t \in \mathbb R^d` reads only the semantic slot
:math:`\hat Z_s = c Z_s - s Z_r` (:math:`c = \cos\theta`, :math:`s = \sin\theta`). Its risk in domain :math:`e`
is a quadratic form (Eq (21), in :math:`d` dimensions):

.. math::

    \mathcal R_e(w_t) = \beta_t^\top \Sigma_s \beta_t + \sigma_\varepsilon^2 - 2 c\, w_t^\top \Sigma_s \beta_t
    + w_t^\top (c^2 \Sigma_s + s^2 \Sigma_{r,e})\, w_t .

Only the last term depends on the domain, so the OOD gap of Eq (3) is
:math:`\mathrm{Gap}_t = s^2\, w_t^\top (\Sigma_{r,T} - \Sigma_{r,S})\, w_t` for **any** head.

Every function takes ``theta`` as a scalar (vmap for grids) and returns per-task values ``[K]``;
:func:`weighted` combines them with simplex weights :math:`\alpha`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from scm.linear_gaussian import Domain, LinearGaussianSCM, check_theta


def _cos_sin(theta):
    check_theta(theta)
    return jnp.cos(theta), jnp.sin(theta)


def semantic_slot_covariance(scm: LinearGaussianSCM, theta, domain: Domain) -> jax.Array:
    r"""Covariance of the semantic slot, :math:`\mathrm{Cov}_e(\hat Z_s) = c^2 \Sigma_s + s^2 \Sigma_{r,e}`, ``[d, d]``."""
    c, s = _cos_sin(theta)
    return c**2 * scm.cov_s + s**2 * scm.cov_r(domain)


def risk(scm: LinearGaussianSCM, theta, heads: jax.Array, domain: Domain) -> jax.Array:
    r"""Exact squared-loss risk :math:`\mathcal R_e(w_t)` of linear heads on the semantic slot (Eq (21)).

    Args:
        scm: the model.
        theta: entanglement angle (scalar).
        heads: ``[K, d]`` heads :math:`w_t`, one per task.
        domain: "source" or "target".

    Returns:
        ``[K]`` risks.
    """
    c, _ = _cos_sin(theta)
    betas = jnp.asarray(scm.betas)
    cov_s = scm.cov_s
    signal = jnp.einsum("ki,ij,kj->k", betas, cov_s, betas)
    cross = jnp.einsum("ki,ij,kj->k", heads, cov_s, betas)
    quad = jnp.einsum("ki,ij,kj->k", heads, semantic_slot_covariance(scm, theta, domain), heads)
    return signal + scm.noise_std**2 - 2.0 * c * cross + quad


def source_optimal_heads(scm: LinearGaussianSCM, theta) -> jax.Array:
    r"""The source-optimal heads (Eq (22), in :math:`d` dimensions), ``[K, d]``:

    .. math:: w_t^* = (c^2 \Sigma_s + s^2 \Sigma_{r,S})^{-1}\, c\, \Sigma_s \beta_t .
    """
    c, _ = _cos_sin(theta)
    rhs = c * (scm.cov_s @ jnp.asarray(scm.betas).T)  # [d, K]
    return jnp.linalg.solve(semantic_slot_covariance(scm, theta, "source"), rhs).T


def ood_gap(scm: LinearGaussianSCM, theta, heads: jax.Array) -> jax.Array:
    r"""Exact OOD gap :math:`\mathcal R_T(w_t) - \mathcal R_S(w_t) = s^2 w_t^\top(\Sigma_{r,T}-\Sigma_{r,S}) w_t`, ``[K]``."""
    _, s = _cos_sin(theta)
    delta = scm.cov_r("target") - scm.cov_r("source")
    return s**2 * jnp.einsum("ki,ij,kj->k", heads, delta, heads)


def source_optimal_risk(scm: LinearGaussianSCM, theta, domain: Domain) -> jax.Array:
    r"""Risk of the source-optimal heads in ``domain`` (Eqs (23)-(24)), ``[K]``."""
    return risk(scm, theta, source_optimal_heads(scm, theta), domain)


def source_optimal_gap(scm: LinearGaussianSCM, theta) -> jax.Array:
    r"""Exact OOD gap of the source-optimal heads (Eq (25)), ``[K]``. In the isotropic case

    .. math:: \mathrm{Gap}_t = \frac{\|\beta_t\|^2 c^2 s^2 \sigma_s^4}{(c^2\sigma_s^2 + s^2\sigma_{r,S}^2)^2}
              (\sigma_{r,T}^2 - \sigma_{r,S}^2).
    """
    return ood_gap(scm, theta, source_optimal_heads(scm, theta))


def floor_constants(scm: LinearGaussianSCM, cos_theta_bar) -> jax.Array:
    r"""The constants :math:`C_t` of Theorem 2.3 (Eq (7)), ``[K]``.

    Isotropic case (the paper's statement):
    :math:`C_t = \|\beta_t\|^2 \sigma_s^4 \cos^2\bar\theta / \max(\sigma_s^2, \sigma_{r,S}^2)^2`.
    For SPD covariances the same argument (Eq (26) with operator norms) gives
    :math:`C_t = \|\Sigma_s\beta_t\|^2 \cos^2\bar\theta / \max(\lambda_{\max}(\Sigma_s), \lambda_{\max}(\Sigma_{r,S}))^2`,
    which reduces to the isotropic form.
    """
    lam_max = max(np.linalg.eigvalsh(scm.cov_s_np).max(), np.linalg.eigvalsh(scm.cov_r_np("source")).max())
    pulled = jnp.asarray(scm.betas) @ scm.cov_s  # rows: (Sigma_s beta_t)^T
    return jnp.sum(pulled**2, axis=1) * cos_theta_bar**2 / lam_max**2


def residual_shift(scm: LinearGaussianSCM) -> float:
    r"""The size of the residual-variance shift that multiplies the floor.

    Isotropic: :math:`|\sigma_{r,T}^2 - \sigma_{r,S}^2|`. General: the smallest absolute eigenvalue of
    :math:`\Sigma_{r,T} - \Sigma_{r,S}` when that difference is definite, and 0 when it is indefinite (then some
    head directions see no shift and Theorem 2.3 gives no floor).
    """
    eig = np.linalg.eigvalsh(scm.cov_r_np("target") - scm.cov_r_np("source"))
    if np.all(eig > 0) or np.all(eig < 0):
        return float(np.min(np.abs(eig)))
    return 0.0


def residual_shift_sign(scm: LinearGaussianSCM) -> int:
    """+1 when the residual variance grows from source to target (definite), -1 when it shrinks, 0 otherwise."""
    eig = np.linalg.eigvalsh(scm.cov_r_np("target") - scm.cov_r_np("source"))
    return 1 if np.all(eig > 0) else (-1 if np.all(eig < 0) else 0)


def gap_floor(scm: LinearGaussianSCM, theta, theta_max=None) -> jax.Array:
    r"""Theorem 2.3's lower bound on :math:`|\mathrm{Gap}_t|` of the source-optimal heads, ``[K]``.

    .. math:: |\mathrm{Gap}_t| \ \ge\ C_t \sin^2\theta\, |\sigma_{r,T}^2 - \sigma_{r,S}^2|

    With ``theta_max=None`` the constant is evaluated pointwise, :math:`\cos^2\bar\theta \to \cos^2\theta`
    (Eq (27)); with ``theta_max`` = :math:`\bar\theta` it is the uniform constant of Eq (7), valid for
    :math:`\theta \le \bar\theta`. The gap has the sign of the variance change (:func:`residual_shift_sign`).
    """
    c, s = _cos_sin(theta)
    if theta_max is not None:
        check_theta(theta_max)
        c = jnp.cos(theta_max)
    return floor_constants(scm, c) * s**2 * residual_shift(scm)


def weighted(values: jax.Array, alpha=None) -> jax.Array:
    r"""The :math:`\alpha`-weighted sum :math:`\sum_t \alpha_t v_t` over the last axis (Eq (3)).

    Args:
        values: ``[..., K]`` per-task values (gaps, floors, risks).
        alpha: simplex weights ``[K]``; ``None`` means uniform :math:`1/K`.
    """
    k = values.shape[-1]
    if alpha is None:
        return jnp.mean(values, axis=-1)
    alpha_np = np.asarray(alpha, dtype=np.float64) if not isinstance(alpha, jax.core.Tracer) else None
    if alpha_np is not None:
        if alpha_np.shape != (k,) or np.any(alpha_np < 0) or not np.isclose(alpha_np.sum(), 1.0, atol=1e-6):
            raise ValueError(f"alpha must be {k} non-negative weights summing to 1 (a point of the simplex); "
                             f"got {alpha_np.tolist()}")
    return values @ jnp.asarray(alpha)
