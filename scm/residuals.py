r"""Non-Gaussian residual (nuisance) distributions in one dimension, for Theorem 2.4's Wasserstein bound.

Theorem 2.4 holds for *any* residual shift, so its check needs shifts beyond the Gaussian scale change of
Assumption 2.2: Laplace, uniform, two-component Gaussian mixtures and mean shifts. Each distribution samples in pure
JAX (explicit keys) and exposes its CDF (numpy/scipy), from which the exact 1-D Wasserstein-1 distance is
:math:`W_1(P, Q) = \int |F_P(x) - F_Q(x)|\,dx`.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import scipy.integrate
import scipy.optimize
import scipy.stats

FAMILIES = ("gaussian", "laplace", "uniform", "mixture")


@dataclasses.dataclass(frozen=True)
class Residual1D:
    """A 1-D residual distribution.

    Attributes:
        family: "gaussian", "laplace", "uniform" or "mixture" (equal-weight Gaussians at ``loc ± separation``).
        loc: location (mean).
        std: standard deviation of the whole distribution (> 0). For the mixture, of each component.
        separation: half the distance between the mixture's components (>= 0; mixture only).
    """

    family: str
    loc: float = 0.0
    std: float = 1.0
    separation: float = 0.0

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {', '.join(FAMILIES)}; got {self.family!r}")
        if not (self.std > 0 and math.isfinite(self.std)):
            raise ValueError(f"std must be a finite number > 0; got {self.std!r}")
        if not (self.separation >= 0 and math.isfinite(self.separation)):
            raise ValueError(f"separation must be a finite number >= 0; got {self.separation!r}")
        if self.separation > 0 and self.family != "mixture":
            raise ValueError(f"separation applies to the mixture family only; got family {self.family!r}")

    @property
    def variance(self) -> float:
        return self.std**2 + self.separation**2

    def sample(self, key: jax.Array, num_samples: int) -> jax.Array:
        """``num_samples`` draws, ``[n]``."""
        if self.family == "gaussian":
            unit = jax.random.normal(key, (num_samples,))
        elif self.family == "laplace":
            unit = jax.random.laplace(key, (num_samples,)) / math.sqrt(2.0)  # unit variance
        elif self.family == "uniform":
            unit = jax.random.uniform(key, (num_samples,), minval=-math.sqrt(3.0), maxval=math.sqrt(3.0))
        else:
            key_sign, key_normal = jax.random.split(key)
            sign = jnp.where(jax.random.bernoulli(key_sign, 0.5, (num_samples,)), 1.0, -1.0)
            return self.loc + self.separation * sign + self.std * jax.random.normal(key_normal, (num_samples,))
        return self.loc + self.std * unit

    def cdf(self, x: np.ndarray) -> np.ndarray:
        z = (np.asarray(x, np.float64) - self.loc)
        if self.family == "gaussian":
            return scipy.stats.norm.cdf(z / self.std)
        if self.family == "laplace":
            return scipy.stats.laplace.cdf(z, scale=self.std / math.sqrt(2.0))
        if self.family == "uniform":
            half = self.std * math.sqrt(3.0)
            return np.clip((z + half) / (2 * half), 0.0, 1.0)
        return 0.5 * (scipy.stats.norm.cdf((z - self.separation) / self.std)
                      + scipy.stats.norm.cdf((z + self.separation) / self.std))

    def support_bounds(self) -> tuple[float, float]:
        """An interval outside which the CDF is 0 or 1 to double precision (the uniform's exact support)."""
        reach = {"uniform": math.sqrt(3.0) * self.std, "laplace": 40.0 * self.std / math.sqrt(2.0)}.get(
            self.family, 12.0 * self.std + self.separation)
        return self.loc - reach, self.loc + reach


def w1_exact(p: Residual1D, q: Residual1D) -> float:
    r"""Exact :math:`W_1(P, Q) = \int |F_P - F_Q|\,dx` by adaptive quadrature.

    The integrand has a kink wherever the CDFs cross, which slows quadrature to ~1e-5 relative accuracy; the
    crossings are located first (sign changes on a fine grid, refined by Brent's method) and each smooth piece is
    integrated separately, to about 1e-10.
    """
    low = min(p.support_bounds()[0], q.support_bounds()[0])
    high = max(p.support_bounds()[1], q.support_bounds()[1])
    difference = lambda x: float(p.cdf(x)) - float(q.cdf(x))
    grid = np.linspace(low, high, 4001)
    values = p.cdf(grid) - q.cdf(grid)
    crossings = [scipy.optimize.brentq(difference, grid[i], grid[i + 1], xtol=1e-14)
                 for i in np.flatnonzero(np.sign(values[:-1]) * np.sign(values[1:]) < 0)]
    landmarks = [x for r in (p, q) for x in (r.loc - r.separation, r.loc, r.loc + r.separation, *r.support_bounds())]
    edges = sorted({low, high, *crossings, *(x for x in landmarks if low < x < high)})
    total = 0.0
    for start, stop in zip(edges[:-1], edges[1:]):
        piece, _ = scipy.integrate.quad(lambda x: abs(difference(x)), start, stop, limit=500, epsabs=1e-12,
                                        epsrel=1e-11)
        total += piece
    return float(total)
