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

import math

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
import scipy.special
import scipy.stats

from scm.linear_gaussian import Domain, LinearGaussianSCM, check_theta


def _cos_sin(theta, one_angle: bool = True):
    # One angle where the result has a task or feature axis: an array of angles would broadcast against it and pair
    # angle i with task i, silently. Functions of the angle alone (one_angle=False) take arrays elementwise.
    if one_angle and jnp.ndim(theta) != 0:
        raise ValueError(f"theta must be one angle (a scalar); got shape {jnp.shape(theta)}: for a grid of angles, "
                         f"jax.vmap over them")
    check_theta(theta)
    return jnp.cos(theta), jnp.sin(theta)


def semantic_slot_covariance(scm: LinearGaussianSCM, theta, domain: Domain) -> jax.Array:
    r"""Covariance of the semantic slot, :math:`\mathrm{Cov}_e(\hat Z_s) = c^2 \Sigma_s + s^2 \Sigma_{r,e}`,
    ``[d, d]``."""
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
    r"""Exact OOD gap :math:`\mathcal R_T(w_t) - \mathcal R_S(w_t) = s^2 w_t^\top(\Sigma_{r,T}-\Sigma_{r,S}) w_t`,
    ``[K]``."""
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
    :math:`C_t = \|\Sigma_s\beta_t\|^2 \cos^2\bar\theta
    / \max(\lambda_{\max}(\Sigma_s), \lambda_{\max}(\Sigma_{r,S}))^2`,
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
    :math:`\theta \le \bar\theta` only: above :math:`\bar\theta` the factor :math:`\cos^2\bar\theta` is larger
    than the :math:`\cos^2\theta` that Eq (26) allows, and the "floor" can exceed the gap (β = 1, σ_r 1 → 2,
    θ = 1.4, θ̄ = 0.1: floor 2.88, gap 0.084). The gap has the sign of the variance change
    (:func:`residual_shift_sign`).

    Raises:
        ValueError: if ``theta`` or ``theta_max`` is not one angle, or ``theta_max`` is given and ``theta`` exceeds
            it. Traced values (inside ``jit``/``vmap``) cannot be inspected and are let through, as in
            :func:`check_theta`; the callers in this repository trace ``theta`` only with ``theta_max=None``.
    """
    c, s = _cos_sin(theta)
    if theta_max is not None:
        c, _ = _cos_sin(theta_max)  # the uniform constant's cosine, with the same checks (one angle in [0, pi/2])
        if not isinstance(theta, jax.core.Tracer) and not isinstance(theta_max, jax.core.Tracer):
            # Up to float32 rounding (a float32 grid ending at θ̄ = 0.1 ends at 0.10000000149).
            if float(theta) > float(theta_max) * (1 + 4 * np.finfo(np.float32).eps):
                raise ValueError(f"gap_floor's uniform constant (theta_max) holds for theta <= theta_max only; got "
                                 f"theta = {float(theta)} > theta_max = {float(theta_max)}")
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


def rotation_cka(theta, sigma_s: float, sigma_r: float) -> jax.Array:
    r"""Population linear CKA between the rotated streams :math:`\hat Z_s = cZ_s - sZ_r`, :math:`\hat Z_r = sZ_s + cZ_r`
    (isotropic, any d; ``reference/theory.md`` §9.4):

    .. math:: \mathrm{CKA}(\theta) = \frac{c^2 s^2 (\sigma_s^2 - \sigma_r^2)^2}
              {(c^2\sigma_s^2 + s^2\sigma_r^2)(s^2\sigma_s^2 + c^2\sigma_r^2)} .

    It is 0 for every θ when :math:`\sigma_s = \sigma_r`: the streams are then independent although the semantic
    stream leaks (CKA's blind spot; see :func:`oracle_leakage`).
    """
    c, s = _cos_sin(theta, one_angle=False)
    var_s, var_r = sigma_s**2, sigma_r**2
    return c**2 * s**2 * (var_s - var_r) ** 2 / ((c**2 * var_s + s**2 * var_r) * (s**2 * var_s + c**2 * var_r))


def oracle_leakage(theta, sigma_s: float, sigma_r: float) -> jax.Array:
    r"""The share of the semantic stream's variance that comes from the residual,
    :math:`\mathrm{corr}^2(\hat Z_s, Z_r) = s^2\sigma_r^2 / (c^2\sigma_s^2 + s^2\sigma_r^2)` (per coordinate). Unlike
    CKA it sees entanglement when :math:`\sigma_s = \sigma_r`."""
    c, s = _cos_sin(theta, one_angle=False)
    return s**2 * sigma_r**2 / (c**2 * sigma_s**2 + s**2 * sigma_r**2)


def rotation_leakage(theta) -> jax.Array:
    r"""κ of Eq (8) for the rotation encoder: :math:`|\sin\theta|`."""
    _, s = _cos_sin(theta, one_angle=False)
    return jnp.abs(s)


# ------------------------------------------------------------------ Wasserstein distances between Gaussians (§9.2)


def w1_gaussian_1d(mean_1: float, std_1: float, mean_2: float, std_2: float) -> float:
    r"""Exact :math:`W_1(\mathcal N(m_1,\sigma_1^2), \mathcal N(m_2,\sigma_2^2))`.

    The monotone coupling gives :math:`W_1 = \mathbb E|a + bZ|`, the folded-normal mean with :math:`a = m_1 - m_2`,
    :math:`b = |\sigma_1 - \sigma_2|`:

    .. math:: W_1 = a\,(2\Phi(a/b) - 1) + 2b\,\varphi(a/b) \qquad (W_1 = |a| \text{ if } b = 0).
    """
    _check_std(std_1, "std_1")
    _check_std(std_2, "std_2")
    a, b = float(mean_1) - float(mean_2), abs(float(std_1) - float(std_2))
    if b == 0:
        return abs(a)
    return a * (2 * scipy.stats.norm.cdf(a / b) - 1) + 2 * b * scipy.stats.norm.pdf(a / b)


def w1_isotropic_gaussians(mean_1, std_1: float, mean_2, std_2: float) -> float:
    r"""Exact :math:`W_1(\mathcal N(m_1,\sigma_1^2 I_d), \mathcal N(m_2,\sigma_2^2 I_d))` in any dimension.

    The map :math:`T(x) = m_2 + s(x - m_1)`, :math:`s = \sigma_2/\sigma_1`, pushes one onto the other and moves
    every point along a ray from its fixed point :math:`c`, so the 1-Lipschitz potential :math:`\pm\|x - c\|` certifies
    it optimal for the cost :math:`\|x-y\|` (a dual lower bound equal to the primal cost). Hence

    .. math:: W_1 = |\sigma_1 - \sigma_2|\;\mathbb E\|Z + \lambda e_1\|, \quad Z\sim\mathcal N(0,I_d),\quad
              \lambda = \frac{\|m_1 - m_2\|}{|\sigma_1 - \sigma_2|},

    the mean of a non-central chi distribution,
    :math:`\sqrt{\pi/2}\,L^{(d/2-1)}_{1/2}(-\lambda^2/2)
    = \sqrt2\,\frac{\Gamma((d+1)/2)}{\Gamma(d/2)}\,{}_1F_1(-\tfrac12; \tfrac d2; -\tfrac{\lambda^2}{2})`.
    With equal scales :math:`W_1 = \|m_1 - m_2\|`; with zero means it is
    :math:`|\sigma_2-\sigma_1|\sqrt2\,\Gamma(\frac{d+1}2)/\Gamma(\frac d2)` (``reference/theory.md`` §9.2).
    """
    _check_std(std_1, "std_1")
    _check_std(std_2, "std_2")
    mean_1, mean_2 = np.atleast_1d(np.asarray(mean_1, float)), np.atleast_1d(np.asarray(mean_2, float))
    if mean_1.shape != mean_2.shape or mean_1.ndim != 1:
        raise ValueError(f"mean_1 and mean_2 must be vectors of the same length d; got shapes {mean_1.shape} and "
                         f"{mean_2.shape}")
    dim = mean_1.shape[0]
    shift, scale_gap = float(np.linalg.norm(mean_1 - mean_2)), abs(float(std_1) - float(std_2))
    if scale_gap == 0:
        return shift
    noncentrality = shift / scale_gap
    log_ratio = scipy.special.gammaln((dim + 1) / 2) - scipy.special.gammaln(dim / 2)
    return scale_gap * math.sqrt(2) * math.exp(log_ratio) * float(
        scipy.special.hyp1f1(-0.5, dim / 2, -(noncentrality**2) / 2))


def w2_gaussians(mean_1, cov_1, mean_2, cov_2) -> float:
    r"""Exact :math:`W_2` between Gaussians (Bures): :math:`\|m_1-m_2\|^2 + \mathrm{tr}(\Sigma_1+\Sigma_2 -
    2(\Sigma_1^{1/2}\Sigma_2\Sigma_1^{1/2})^{1/2})`, square-rooted. An upper bound on :math:`W_1` in any dimension:
    substituting it for W₁ keeps an upper-bound check sound (and looser)."""
    mean_1, mean_2 = np.atleast_1d(np.asarray(mean_1, float)), np.atleast_1d(np.asarray(mean_2, float))
    cov_1, cov_2 = np.atleast_2d(np.asarray(cov_1, float)), np.atleast_2d(np.asarray(cov_2, float))
    dim = mean_1.shape[0]
    for name, mean, cov in (("1", mean_1, cov_1), ("2", mean_2, cov_2)):
        _check_gaussian(mean, cov, dim, name)
    root_1 = scipy.linalg.sqrtm(cov_1).real
    cross = scipy.linalg.sqrtm(root_1 @ cov_2 @ root_1).real
    squared = float(np.sum((mean_1 - mean_2) ** 2) + np.trace(cov_1 + cov_2 - 2 * cross))
    return math.sqrt(max(squared, 0.0))


def _check_std(value: float, name: str) -> None:
    if not (float(value) >= 0 and math.isfinite(float(value))):
        raise ValueError(f"{name} must be a finite standard deviation >= 0; got {value!r}")


def _check_gaussian(mean: np.ndarray, cov: np.ndarray, dim: int, name: str) -> None:
    """Refuses a mean or covariance that is not of dimension ``dim``, or a covariance that is not symmetric positive
    semi-definite (whose matrix square root is complex: its real part would give a wrong distance, silently)."""
    if mean.shape != (dim,) or cov.shape != (dim, dim):
        raise ValueError(f"mean_{name} must have shape [{dim}] and cov_{name} [{dim}, {dim}] (the dimension of "
                         f"mean_1); got {mean.shape} and {cov.shape}")
    if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(cov))):
        raise ValueError(f"mean_{name} and cov_{name} must be finite")
    scale = max(float(np.max(np.abs(cov))), 1e-300)
    if not np.allclose(cov, cov.T, rtol=0, atol=1e-10 * scale):
        raise ValueError(f"cov_{name} must be symmetric; got {cov.tolist()}")
    smallest = float(np.linalg.eigvalsh(cov)[0])
    if smallest < -1e-10 * scale:
        raise ValueError(f"cov_{name} must be positive semi-definite (a covariance; in one dimension a variance >= 0); "
                         f"its smallest eigenvalue is {smallest:g}")


# ----------------------------------------------------------------------------- Theorem 2.4 in the rotation model


def absolute_loss_risk(scm: LinearGaussianSCM, theta, heads: jax.Array, domain: Domain) -> jax.Array:
    r"""Exact absolute-loss risk of linear heads on the semantic slot, ``[K]``.

    The error :math:`Y_t - w_t^\top\hat Z_s` is a centred Gaussian whose variance is the squared-loss risk
    :math:`v_e` of :func:`risk`, so :math:`\mathbb E|Y_t - w_t^\top\hat Z_s| = \sqrt{2/\pi}\,\sqrt{v_e}`.
    """
    return jnp.sqrt(2.0 / jnp.pi) * jnp.sqrt(risk(scm, theta, heads, domain))


def leakage_bound(scm: LinearGaussianSCM, theta, heads: jax.Array) -> jax.Array:
    r"""Theorem 2.4's bound :math:`L_\ell L_h \kappa\, W_1(P_S(Z_r), P_T(Z_r))` for the absolute loss
    (:math:`L_\ell = 1`), linear heads (:math:`L_h = \|w_t\|`) and the rotation encoder (:math:`\kappa=|\sin\theta|`),
    with the exact W₁ between the isotropic residual Gaussians, ``[K]``. Needs isotropic residual covariances (the
    semantic one may be anything). The d-dimensional W₁ makes it valid for any head, and looser than the W₁ of the
    one projection a linear head reads by :math:`E\|Z_d\|/\sqrt{2/\pi}` (1 at d = 1, about :math:`\sqrt{\pi d/2}`
    for large d)."""
    if not scm.has_isotropic_residuals:
        raise ValueError("leakage_bound needs isotropic residual covariances (scalar sigma_r_source/target)")
    std_source = math.sqrt(scm.cov_r_np("source")[0, 0])
    std_target = math.sqrt(scm.cov_r_np("target")[0, 0])
    w1 = w1_isotropic_gaussians(np.zeros(scm.dim), std_source, np.zeros(scm.dim), std_target)
    return jnp.linalg.norm(heads, axis=1) * rotation_leakage(theta) * w1
