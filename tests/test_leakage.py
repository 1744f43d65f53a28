"""Theorem 2.4 with non-Gaussian residuals (theory.leakage, scm.residuals) and its experiment script."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scm.residuals import FAMILIES, Residual1D, w1_exact
from theory import closed_forms as cf
from theory import leakage

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("family", FAMILIES)
def test_residual_samples_have_the_stated_mean_and_variance(family):
    residual = Residual1D(family, loc=0.5, std=1.5, separation=1.0 if family == "mixture" else 0.0)
    x = np.asarray(residual.sample(jax.random.key(0), 400_000))
    n = len(x)
    assert abs(x.mean() - 0.5) < 4 * x.std() / math.sqrt(n)
    # SE of the sample variance ~ sqrt((m4 - s^4) / n)
    m4 = np.mean((x - x.mean()) ** 4)
    assert abs(x.var() - residual.variance) < 4 * math.sqrt((m4 - x.var() ** 2) / n)
    # The CDF is that of the samples (Kolmogorov distance within ~4/sqrt(n)).
    grid = np.linspace(-4, 5, 37)
    assert np.max(np.abs(residual.cdf(grid) - np.searchsorted(np.sort(x), grid) / n)) < 4 / math.sqrt(n) + 1e-3


@given(st.floats(-2, 2), st.floats(0.2, 3), st.floats(-2, 2), st.floats(0.2, 3))
@settings(max_examples=25)
def test_exact_w1_by_quadrature_matches_the_gaussian_closed_form(m1, s1, m2, s2):
    value = w1_exact(Residual1D("gaussian", m1, s1), Residual1D("gaussian", m2, s2))
    assert value == pytest.approx(cf.w1_gaussian_1d(m1, s1, m2, s2), rel=1e-7, abs=1e-9)


def test_exact_w1_of_scale_changes_of_uniform_and_laplace():
    # Quantiles scale linearly: W1 = |b - a| E|X| for the unit-variance X of the family.
    assert w1_exact(Residual1D("uniform", 0, 1), Residual1D("uniform", 0, 2)) == pytest.approx(math.sqrt(3) / 2)
    assert w1_exact(Residual1D("laplace", 0, 1), Residual1D("laplace", 0, 3)) == pytest.approx(2 / math.sqrt(2))
    assert w1_exact(Residual1D("laplace", 0, 1), Residual1D("laplace", 0.7, 1)) == pytest.approx(0.7)


def test_bad_residuals_name_the_field():
    with pytest.raises(ValueError, match="family"):
        Residual1D("cauchy")
    with pytest.raises(ValueError, match="std"):
        Residual1D("gaussian", std=0.0)
    with pytest.raises(ValueError, match="separation"):
        Residual1D("laplace", separation=1.0)


@pytest.mark.parametrize("theta, target", [(0.3, ("gaussian", 0.0, 2.0)), (0.9, ("gaussian", 1.0, 1.0)),
                                           (1.2, ("gaussian", 0.0, 0.5))])
def test_paired_monte_carlo_gap_matches_the_gaussian_closed_form(theta, target):
    source, target = Residual1D("gaussian", 0.0, 1.0), Residual1D(*target)
    weight = leakage.source_optimal_weight(theta, 1.0, 1.0, source)
    estimate = leakage.loss_gap(theta, 1.0, 1.0, 0.3, "linear", weight, "absolute", source, target,
                                jax.random.key(3), 200_000)
    exact = leakage.gaussian_absolute_gap(theta, 1.0, 1.0, 0.3, weight, source, target)
    assert abs(estimate.gap - exact) < 4 * estimate.standard_error


cases = st.sampled_from([(("gaussian", 0, 1, 0), ("gaussian", 0, 2.5, 0)), (("laplace", 0, 1, 0), ("laplace", 0, 2, 0)),
                         (("uniform", 0, 2, 0), ("uniform", 0.5, 1, 0)),
                         (("mixture", 0, 0.5, 0.3), ("mixture", 0, 0.5, 2.0)),
                         (("laplace", 0, 1, 0), ("gaussian", 0, 1, 0))])


@given(cases, st.floats(0.02, 1.5), st.sampled_from(leakage.HEADS), st.floats(0.3, 2.0), st.floats(0.0, 1.0))
@settings(max_examples=25)
def test_theorem_2_4_holds_within_three_standard_errors_for_lipschitz_losses(case, theta, head, beta, noise):
    source, target = (Residual1D(*parameters) for parameters in case)
    weight = leakage.source_optimal_weight(theta, beta, 1.0, source)
    _, head_lipschitz = leakage.head_function(head, weight)
    estimate = leakage.loss_gap(theta, beta, 1.0, noise, head, weight, "absolute", source, target,
                                jax.random.key(int(theta * 1e6)), 50_000)
    bound = leakage.wasserstein_bound(theta, head_lipschitz, w1_exact(source, target))
    assert abs(estimate.gap) - 3 * estimate.standard_error <= bound


def test_the_squared_loss_breaks_the_bound_where_the_variance_grows():
    source, target = Residual1D("gaussian", 0, 1), Residual1D("gaussian", 0, 2)
    theta = 0.8
    weight = leakage.source_optimal_weight(theta, 1.0, 1.0, source)
    estimate = leakage.loss_gap(theta, 1.0, 1.0, 0.3, "linear", weight, "squared", source, target,
                                jax.random.key(1), 100_000)
    assert estimate.gap - 3 * estimate.standard_error > leakage.wasserstein_bound(theta, abs(weight),
                                                                                  w1_exact(source, target))


def run_script(*args):
    return subprocess.run([sys.executable, str(ROOT / "experiments" / "leakage_bound.py"), *args],
                          capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                          timeout=300)


def test_script_end_to_end(tmp_path):
    result = run_script("--num-thetas", "2", "--cases", "laplace,gaussian-mean", "--samples", "2000",
                        "--out", str(tmp_path), "--quiet")
    assert result.returncode == 0, result.stderr
    payload = json.loads((tmp_path / "leakage_bound.json").read_text())
    assert (tmp_path / "leakage_bound.png").stat().st_size > 10_000
    assert {c["name"] for c in payload["cases"]} == {"laplace", "gaussian-mean"}
    assert len(payload["points"]) == 2 * 2 * 2 * 2
    point = payload["points"][0]
    assert set(point) >= {"case", "head", "loss", "theta", "kappa", "gap", "gap_se", "bound", "holds",
                          "assumptions_hold"}
    assert set(payload["verdict"]) >= {"bound_holds_where_assumptions_hold", "failures"}


@pytest.mark.parametrize("flags, message", [
    (["--cases", "cauchy"], "--cases must be 'all' or comma-separated names"),
    (["--theta-max", "3"], "--theta-max must lie in [0, pi/2]"),
    (["--samples", "10"], "--samples must be an integer >= 100"),
    (["--losses", "hinge"], "--losses must be 'all' or comma-separated names"),
])
def test_script_bad_flags(flags, message, tmp_path):
    result = run_script(*flags, "--out", str(tmp_path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr
