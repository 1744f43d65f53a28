r"""Bound checks that return a verdict together with the numbers behind it.

Measured quantities come as seeds × grid arrays; each check summarises them by the mean over seeds and its
standard error (SEM, :math:`\hat\sigma/\sqrt S`) and compares within ``num_se`` standard errors, so a verdict
states its own statistical slack.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def mean_and_sem(values: np.ndarray, axis: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard error of the mean along ``axis`` (SEM is 0 for a single sample)."""
    values = np.asarray(values, dtype=np.float64)
    count = values.shape[axis]
    mean = values.mean(axis=axis)
    if count < 2:
        return mean, np.zeros_like(mean)
    return mean, values.std(axis=axis, ddof=1) / np.sqrt(count)


def floor_check(gap: np.ndarray, floor: np.ndarray, sign: int, num_se: float = 3.0) -> dict[str, Any]:
    r"""Does the measured gap stay at or beyond Theorem 2.3's floor at every grid point, within its error?

    The floor bounds :math:`|\mathrm{Gap}|` and the gap has the sign of the residual-variance change, so the check
    is :math:`\mathrm{sign}\cdot\overline{\mathrm{Gap}} + z\,\mathrm{SEM} \ge \mathrm{floor}` at each point.

    Args:
        gap: ``[T, S]`` measured gaps (grid × seeds).
        floor: ``[T]`` the floor (non-negative).
        sign: +1 / -1, the sign of the variance change (0: no floor applies, the check holds vacuously).
        num_se: allowed slack in standard errors.

    Returns:
        ``holds``, the indices of ``violations``, and ``min_margin_se``: the smallest
        :math:`(\mathrm{sign}\cdot\overline{\mathrm{Gap}} - \mathrm{floor})/\mathrm{SEM}` over points with SEM > 0.
    """
    mean, sem = mean_and_sem(gap)
    floor = np.asarray(floor, dtype=np.float64)
    signed = sign * mean
    tolerance = num_se * sem + 1e-9 * np.maximum(1.0, np.abs(floor))
    violations = np.flatnonzero(signed + tolerance < floor) if sign != 0 else np.array([], dtype=int)
    with np.errstate(divide="ignore", invalid="ignore"):
        margins = np.where(sem > 0, (signed - floor) / sem, np.inf)
    return {
        "holds": bool(violations.size == 0),
        "violations": violations.tolist(),
        "min_margin_se": float(np.min(margins)) if np.isfinite(np.min(margins)) else None,
        "num_se": float(num_se),
    }


def agreement_check(measured: np.ndarray, expected: np.ndarray, num_se: float = 3.0) -> dict[str, Any]:
    """Does the mean over seeds of ``measured`` ``[T, S]`` match ``expected`` ``[T]`` within ``num_se`` SEMs?

    Points with zero SEM (for example θ = 0, where every gap is exactly 0) must match to 1e-6 absolutely.

    Returns:
        ``holds``, ``max_abs_z`` (largest |mean − expected|/SEM over points with SEM > 0) and the ``mismatches``.
    """
    mean, sem = mean_and_sem(measured)
    expected = np.asarray(expected, dtype=np.float64)
    difference = np.abs(mean - expected)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(sem > 0, difference / sem, 0.0)
    mismatches = np.flatnonzero(np.where(sem > 0, z > num_se, difference > 1e-6))
    return {"holds": bool(mismatches.size == 0), "max_abs_z": float(np.max(z)), "mismatches": mismatches.tolist(),
            "num_se": float(num_se)}


def convergence_check(gap: np.ndarray, least_squares_gap: np.ndarray, fraction_of_se: float = 0.1) -> dict[str, Any]:
    """Did training reach the empirical risk minimiser closely enough not to matter statistically?

    The optimisation error at each grid point is the mean over seeds of |gap(trained) − gap(least squares on the
    same sample)|; it must stay below ``fraction_of_se`` of the gap's standard error (or 1e-4 where that is 0).
    """
    error = np.abs(np.asarray(gap, np.float64) - np.asarray(least_squares_gap, np.float64)).mean(axis=-1)
    _, sem = mean_and_sem(gap)
    allowed = np.where(sem > 0, fraction_of_se * sem, 1e-4)
    return {"converged": bool(np.all(error <= allowed)), "optimisation_error": error.tolist(),
            "worst_error_over_se": float(np.max(np.where(sem > 0, error / np.where(sem > 0, sem, 1.0), 0.0)))}
