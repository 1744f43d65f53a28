r"""The linear-Gaussian structural causal model of Assumption 2.2 (Eqs (5)-(6) of ``reference/theory.md``).

A semantic factor :math:`Z_s` that the labels depend on and a residual (nuisance) factor :math:`Z_r` whose
distribution is the whole domain shift:

.. math::

    Z_s \sim \mathcal N(0, \Sigma_s), \qquad Z_r \sim \mathcal N(0, \Sigma_{r,e}),\ e \in \{S, T\},
    \qquad Z_s \perp\!\!\!\perp Z_r, \qquad Y_t = \beta_t^\top Z_s + \varepsilon_t,\
    \varepsilon_t \sim \mathcal N(0, \sigma_\varepsilon^2).

An encoder reached by a method of the gradient-balancing class is modelled as a rotation of the true factors
(Eq (6)):

.. math::

    \begin{pmatrix}\hat Z_s \\ \hat Z_r\end{pmatrix} = (R_\theta \otimes I_d)
    \begin{pmatrix} Z_s \\ Z_r \end{pmatrix}, \qquad
    R_\theta = \begin{pmatrix}\cos\theta & -\sin\theta \\ \sin\theta & \cos\theta\end{pmatrix}.

Nothing here is about learning: this module is the world that ``theory`` measures.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Domain = Literal["source", "target"]
DOMAINS: tuple[str, ...] = ("source", "target")


def _variance_limits() -> tuple[float, float, str]:
    """The range a variance must lie in, with the name of the float type JAX computes in now (float32 unless
    ``jax_enable_x64``; the covariances are used as JAX arrays of that type): the closed forms square variances
    (σ⁴, in the source-optimal head's denominator), so the square must be a normal, finite number of that type."""
    dtype = jax.dtypes.canonicalize_dtype(np.float64)
    info = np.finfo(dtype)
    return math.sqrt(float(info.tiny)), math.sqrt(float(info.max)), np.dtype(dtype).name


def _as_covariance(field: str, value: Any, dim: int) -> np.ndarray:
    """Turns a positive scalar standard deviation or an SPD ``[d, d]`` covariance into a covariance matrix.

    A scale is squared into a variance and the closed forms square that again, so a finite positive scale can still
    be unusable: in float32 σ = 1e10 overflows σ⁴ and σ = 1e-10 underflows it, which turns the floors into NaN. The
    variance's square must therefore be a normal, finite number of the float type JAX computes in (float32: σ within
    about 6e-10 and 4e9).
    """
    array = np.asarray(value, dtype=np.float64)
    tiny, huge, dtype_name = _variance_limits()
    if array.ndim == 0:
        if not np.isfinite(array) or array <= 0:
            raise ValueError(f"{field} must be a positive standard deviation or an SPD [{dim}, {dim}] "
                             f"covariance; got {float(array)!r}")
        try:
            variance = float(array) ** 2
        except OverflowError:  # a Python float raises where numpy would give inf
            variance = math.inf
        if not tiny <= variance <= huge:
            raise ValueError(f"{field} = {float(array)!r} is outside what {dtype_name} computations can use: a "
                             f"standard deviation must lie between about {math.sqrt(tiny):.2g} and "
                             f"{math.sqrt(huge):.2g} (its variance is squared again in the closed forms)")
        return variance * np.eye(dim)
    if array.shape != (dim, dim):
        raise ValueError(f"{field} must be a positive scalar or a [{dim}, {dim}] covariance matching "
                         f"betas' dimension d={dim}; got shape {array.shape}")
    if not np.all(np.isfinite(array)) or not np.allclose(array, array.T, rtol=1e-10, atol=1e-12):
        raise ValueError(f"{field} must be a symmetric positive definite matrix; it is not symmetric")
    eigenvalues = np.linalg.eigvalsh(array)
    if eigenvalues.min() <= 0:
        raise ValueError(f"{field} must be a symmetric positive definite matrix; its smallest eigenvalue is "
                         f"{eigenvalues.min():.3g} <= 0")
    if eigenvalues.min() < tiny or np.abs(array).max() > huge:
        raise ValueError(f"{field} must have eigenvalues in [{tiny:.3g}, {huge:.3g}] (their squares must be normal "
                         f"{dtype_name} numbers); got eigenvalues from {eigenvalues.min():.3g} to "
                         f"{eigenvalues.max():.3g}")
    return array


# Equal and hashed by identity (eq=False): its fields are arrays, which field-wise == cannot reduce to one bool
# and which cannot be hashed (jit closes over instances).
@dataclasses.dataclass(frozen=True, eq=False)
class LinearGaussianSCM:
    r"""The linear-Gaussian SCM of Assumption 2.2, with ``K`` tasks in ``d`` dimensions.

    Scale fields take either a positive scalar **standard deviation** :math:`\sigma` (the covariance is then
    :math:`\sigma^2 I_d`, as in the paper) or a symmetric positive definite ``[d, d]`` **covariance** matrix.

    Attributes:
        betas: ``[K, d]`` task coefficients :math:`\beta_t` (a ``[d]`` vector means one task).
        sigma_s: semantic scale, :math:`\sigma_s` or :math:`\Sigma_s`.
        sigma_r_source: residual scale in the source domain, :math:`\sigma_{r,S}` or :math:`\Sigma_{r,S}`.
        sigma_r_target: residual scale in the target domain, :math:`\sigma_{r,T}` or :math:`\Sigma_{r,T}`.
        noise_std: label noise :math:`\sigma_\varepsilon \ge 0`, shared by all tasks.

    Raises:
        ValueError: naming the field and the allowed values, for non-positive or non-finite scales, scales whose
            square (the variance) overflows or underflows the float type JAX computes in (float32 unless
            ``jax_enable_x64``; the check uses the setting at construction), matrices that are not SPD or whose
            eigenvalues leave that type's normal range, or shapes that do not match ``d``.
    """

    betas: Any
    sigma_s: Any = 1.0
    sigma_r_source: Any = 1.0
    sigma_r_target: Any = 2.0
    noise_std: float = 0.1

    def __post_init__(self):
        betas = np.asarray(self.betas, dtype=np.float64)
        if betas.ndim == 1:
            betas = betas[None, :]
        if betas.ndim != 2 or betas.shape[0] < 1 or betas.shape[1] < 1:
            raise ValueError(f"betas must have shape [K, d] with K >= 1 tasks and d >= 1 dimensions; "
                             f"got shape {np.asarray(self.betas).shape}")
        if not np.all(np.isfinite(betas)):
            raise ValueError("betas must be finite")
        dim = betas.shape[1]
        object.__setattr__(self, "betas", betas)
        for field in ("sigma_s", "sigma_r_source", "sigma_r_target"):
            object.__setattr__(self, f"_cov_{field}", _as_covariance(field, getattr(self, field), dim))
        noise_std = float(self.noise_std)
        if not math.isfinite(noise_std) or noise_std < 0:
            raise ValueError(f"noise_std must be a finite number >= 0; got {self.noise_std!r}")
        object.__setattr__(self, "noise_std", noise_std)

    @property
    def dim(self) -> int:
        """The dimension ``d`` of each factor."""
        return self.betas.shape[1]

    @property
    def num_tasks(self) -> int:
        """The number of tasks ``K``."""
        return self.betas.shape[0]

    @property
    def is_isotropic(self) -> bool:
        """True when every covariance is a multiple of the identity (the paper's Assumption 2.2)."""
        return _is_scaled_identity(self.cov_s_np) and self.has_isotropic_residuals

    @property
    def has_isotropic_residuals(self) -> bool:
        """True when both domains' residual covariances are multiples of the identity."""
        return all(_is_scaled_identity(self.cov_r_np(domain)) for domain in ("source", "target"))

    @property
    def cov_s_np(self) -> np.ndarray:
        """:math:`\\Sigma_s` as a float64 numpy array ``[d, d]``."""
        return self._cov_sigma_s  # type: ignore[attr-defined]

    def cov_r_np(self, domain: Domain) -> np.ndarray:
        """:math:`\\Sigma_{r,e}` as a float64 numpy array ``[d, d]``."""
        _check_domain(domain)
        return self._cov_sigma_r_source if domain == "source" else self._cov_sigma_r_target  # type: ignore

    @property
    def cov_s(self) -> jax.Array:
        """:math:`\\Sigma_s`, ``[d, d]``."""
        return jnp.asarray(self.cov_s_np)

    def cov_r(self, domain: Domain) -> jax.Array:
        """:math:`\\Sigma_{r,e}` for ``domain`` in {"source", "target"}, ``[d, d]``."""
        return jnp.asarray(self.cov_r_np(domain))


def _is_scaled_identity(cov: np.ndarray) -> bool:
    return bool(np.allclose(cov, cov[0, 0] * np.eye(cov.shape[0]), rtol=1e-12, atol=0.0))


def _check_domain(domain: str) -> None:
    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {DOMAINS}; got {domain!r}")


def as_count(value: Any, minimum: int, maximum: int | None = None) -> int | None:
    """``value`` as an ``int`` when it is an integer in ``minimum..maximum`` (no upper end for None) of any integer
    type (Python's, NumPy's, a JAX scalar), else None: bools and floats such as 3.0 are not counts. The rule of every
    count in the project."""
    if isinstance(value, bool):
        return None
    try:
        count = operator.index(value)
    except TypeError:
        return None
    return count if minimum <= count and (maximum is None or count <= maximum) else None


def check_count(name: str, value: Any, minimum: int, maximum: int | None = None, or_none: bool = False) -> int:
    """:func:`as_count`, or a one-line ``ValueError`` naming ``name``; ``or_none``: the caller also takes None (for
    the message)."""
    count = as_count(value, minimum, maximum)
    if count is None:
        allowed = f"an integer >= {minimum}" if maximum is None else f"an integer in {minimum}..{maximum}"
        raise ValueError(f"{name} must be {'None or ' * or_none}{allowed}; got {value!r}")
    return count


def check_theta(theta: Any) -> None:
    r"""Raises ``ValueError`` unless every entanglement angle lies in :math:`[0, \pi/2]`.

    Traced values (inside ``jit``/``vmap``) cannot be inspected and are let through; validate at the edge.
    """
    if isinstance(theta, jax.core.Tracer):
        return
    values = np.asarray(theta, dtype=np.float64)
    if not np.all(np.isfinite(values)) or np.any(values < 0) or np.any(values > math.pi / 2):
        bad = values[~((values >= 0) & (values <= math.pi / 2))].ravel()
        raise ValueError(f"theta must lie in [0, pi/2] (radians); got {bad[0] if bad.size else values!r}")


class Samples(NamedTuple):
    """Draws of the latent factors and labels.

    Attributes:
        s: semantic factor :math:`Z_s`, ``[n, d]``.
        r: residual factor :math:`Z_r`, ``[n, d]``.
        y: labels :math:`Y_t` of every task, ``[n, K]``.
    """

    s: jax.Array
    r: jax.Array
    y: jax.Array


def sample(scm: LinearGaussianSCM, key: jax.Array, num_samples: int, domain: Domain = "source") -> Samples:
    r"""Draws ``num_samples`` i.i.d. samples of :math:`(Z_s, Z_r, Y)` from domain ``domain``.

    Pure in ``key``: vmap over keys for seeds. The semantic factor, the label noise and the *standardised*
    residual are drawn from independent sub-keys, so the source and target samples of one key differ only in the
    residual's covariance (common random numbers across domains).

    Args:
        scm: the model.
        key: a ``jax.random`` key.
        num_samples: ``n >= 1``.
        domain: "source" or "target".

    Returns:
        ``Samples`` with ``s``, ``r`` of shape ``[n, d]`` and ``y`` of shape ``[n, K]``.
    """
    _check_domain(domain)
    num_samples = check_count("num_samples", num_samples, 1)
    key_s, key_r, key_eps = jax.random.split(key, 3)
    d, k = scm.dim, scm.num_tasks
    chol_s = jnp.linalg.cholesky(scm.cov_s)
    chol_r = jnp.linalg.cholesky(scm.cov_r(domain))
    s = jax.random.normal(key_s, (num_samples, d)) @ chol_s.T
    r = jax.random.normal(key_r, (num_samples, d)) @ chol_r.T
    eps = scm.noise_std * jax.random.normal(key_eps, (num_samples, k))
    y = s @ jnp.asarray(scm.betas).T + eps
    return Samples(s=s, r=r, y=y)


def rotation_encoder(theta: jax.Array | float, s: jax.Array, r: jax.Array) -> tuple[jax.Array, jax.Array]:
    r"""The entangled encoder :math:`(\hat z_s, \hat z_r) = (R_\theta \otimes I_d)(s, r)` of Eq (6).

    .. math:: \hat z_s = \cos\theta\, s - \sin\theta\, r, \qquad \hat z_r = \sin\theta\, s + \cos\theta\, r.

    Args:
        theta: entanglement angle in :math:`[0, \pi/2]` (scalar; vmap for a grid).
        s: semantic factor, ``[..., d]``.
        r: residual factor, ``[..., d]``.

    Returns:
        ``(z_s, z_r)``, each shaped like ``s``.
    """
    check_theta(theta)
    c, sn = jnp.cos(theta), jnp.sin(theta)
    return c * s - sn * r, sn * s + c * r
