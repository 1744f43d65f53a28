"""Theorem 2.4 with non-Gaussian residuals (theory.leakage, scm.residuals) and its experiment script."""

import json
import math
from pathlib import Path
from unittest import mock

import jax
import numpy as np
import pytest
import scipy.integrate
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st

from scm.residuals import FAMILIES, Residual1D, w1_exact
from scripts import assert_one_line_error, drawn_calls, load_script, run_in_process, run_script, with_out
from theory import closed_forms as cf
from theory import leakage

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = "experiments/leakage_bound.py"


@pytest.mark.parametrize("family", FAMILIES)
def test_residual_samples_have_the_stated_mean_and_variance(family):
    # Separation 0.5, not 1: at 1 a variance formula with the separation unsquared would pass too.
    residual = Residual1D(family, loc=0.5, std=1.5, separation=0.5 if family == "mixture" else 0.0)
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


def test_source_optimal_weight_is_least_squares_on_samples_with_a_shifted_residual():
    """The squared loss sees the residual's second moment, variance plus mean²: least squares (no bias) on 400 000
    samples lands on the formula, within 4 standard errors of the fitted slope."""
    theta, beta, sigma_s = 0.7, 1.3, 1.2
    residual = Residual1D("gaussian", loc=1.0, std=0.8)
    key_s, key_eps, key_r = jax.random.split(jax.random.key(3), 3)
    n = 400_000
    s_factor = sigma_s * np.asarray(jax.random.normal(key_s, (n,)), np.float64)
    y = beta * s_factor + 0.3 * np.asarray(jax.random.normal(key_eps, (n,)), np.float64)
    stream = math.cos(theta) * s_factor - math.sin(theta) * np.asarray(residual.sample(key_r, n), np.float64)
    fitted = stream @ y / (stream @ stream)
    standard_error = np.std(y - fitted * stream) / math.sqrt(stream @ stream)
    weight = leakage.source_optimal_weight(theta, beta, sigma_s, residual)
    assert abs(fitted - weight) < 4 * standard_error
    assert abs(weight - leakage.source_optimal_weight(theta, beta, sigma_s, Residual1D("gaussian", std=0.8))) > 0.05


def test_the_paired_gap_standard_error_is_the_spread_of_the_estimate():
    """The reported standard error of the paired Monte Carlo gap is the standard deviation of the estimate over
    independent keys (300 of them: that spread is known to about 4%, the tolerance is 25%). An unpaired error would
    be about twice as large, a missing square root of n far larger."""
    target = Residual1D("gaussian", std=2.0)
    source = Residual1D("gaussian", std=0.5)
    estimates = [leakage.loss_gap(0.6, 1.0, 1.0, 0.3, "linear", 0.8, "absolute", source, target, key, 2000)
                 for key in jax.random.split(jax.random.key(5), 300)]
    spread = np.std([e.gap for e in estimates], ddof=1)
    reported = np.mean([e.standard_error for e in estimates])
    assert abs(reported / spread - 1) < 0.25


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


# theory.md §9.3's table (linear head w* and absolute loss; squared loss; tanh(a u) head). §9.3 does not print the
# settings of its rows: θ = 0.3 is §9.1's first row, and the other three were recovered by matching the table's three
# closed-form columns (abs-gap cf, bound, sq-gap cf) to 4 decimals over a grid of (β, σ_s, σ_rS, σ_rT, σ_ε); the
# match was unique there. The tanh head's slope a is the bound column over κ·W₁ (a = 1, 2, 0.5, 1).
#   (θ, β, σ_s, σ_rS, σ_rT, σ_ε, abs-gap cf, bound, sq-gap cf, a, tanh bound)
SECTION_9_3 = [
    (0.30, 1.5, 1.0, 1.0, 2.0, 0.5, 0.2585, 0.3379, 0.5380, 1.0, 0.2358),
    (0.80, 1.0, 1.0, 0.5, 2.5, 0.1, 1.2602, 1.2988, 3.9748, 2.0, 2.2895),
    (1.20, 0.7, 2.0, 1.0, 0.3, 0.3, -0.1599, 0.3789, -0.4188, 0.5, 0.2603),   # the residual's scale shrinks
    (0.05, 1.0, 1.0, 1.0, 3.0, 0.2, 0.0349, 0.0797, 0.0199, 1.0, 0.0798),
]


@pytest.mark.parametrize("theta, beta, sigma_s, sigma_rs, sigma_rt, noise, gap, bound, squared_gap, slope, "
                         "tanh_bound", SECTION_9_3)
def test_wasserstein_bound_matches_the_reference_table(theta, beta, sigma_s, sigma_rs, sigma_rt, noise, gap, bound,
                                                       squared_gap, slope, tanh_bound):
    """The experiment's bound, built as it builds it (head Lipschitz constant, exact W₁), against §9.3."""
    source, target = Residual1D("gaussian", 0.0, sigma_rs), Residual1D("gaussian", 0.0, sigma_rt)
    w1 = w1_exact(source, target)
    weight = leakage.source_optimal_weight(theta, beta, sigma_s, source)
    _, head_lipschitz = leakage.head_function("linear", weight)
    _, loss_lipschitz = leakage.loss_function("absolute")
    assert leakage.wasserstein_bound(theta, head_lipschitz, w1, loss_lipschitz) == pytest.approx(bound, abs=6e-5)
    _, tanh_lipschitz = leakage.head_function("tanh", slope)
    assert leakage.wasserstein_bound(theta, tanh_lipschitz, w1) == pytest.approx(tanh_bound, abs=6e-5)
    assert leakage.gaussian_absolute_gap(theta, beta, sigma_s, noise, weight, source, target) == pytest.approx(
        gap, abs=6e-5)
    assert weight**2 * math.sin(theta) ** 2 * (sigma_rt**2 - sigma_rs**2) == pytest.approx(squared_gap, abs=6e-5)


@pytest.mark.parametrize("theta", [round(float(t), 3) for t in np.linspace(0.05, 1.5, 8)])
def test_wasserstein_bound_is_tight_at_every_angle(theta):
    """The exact gap is at least 0.9 of the bound at every θ, so a looser bound (κ dropped, √κ, a constant factor
    above 1.1) fails. The setting makes it nearly attained: as σ_rS → 0 the head is w* → β/c, the error is
    w*·s·z_r alone, and E|e| = |w*| s √(2/π) σ_r: the gap is the bound. With σ_s = 2, σ_rS = 0.3, σ_rT = 5 and no
    label noise gap/bound is 0.92 at θ = 1.5 and above 0.99 for θ <= 1.3. Every point also obeys the bound."""
    source, target = Residual1D("gaussian", 0.0, 0.3), Residual1D("gaussian", 0.0, 5.0)
    weight = leakage.source_optimal_weight(theta, 1.0, 2.0, source)
    _, head_lipschitz = leakage.head_function("linear", weight)
    bound = leakage.wasserstein_bound(theta, head_lipschitz, w1_exact(source, target))
    gap = leakage.gaussian_absolute_gap(theta, 1.0, 2.0, 0.0, weight, source, target)
    assert 0.9 * bound <= gap <= bound * (1 + 1e-12)


@given(st.floats(0.02, 1.55), st.sampled_from([(1.0, 2.0), (0.5, 2.5), (1.0, 0.3), (2.0, 0.5)]),
       st.floats(0.3, 2.0), st.floats(0.5, 2.0), st.floats(0.0, 1.0))
@settings(max_examples=40)
def test_exact_gaussian_gap_never_exceeds_the_wasserstein_bound(theta, scales, beta, sigma_s, noise):
    """Theorem 2.4 without Monte Carlo noise: the folded-normal gap against the bound (a tighter, wrong bound fails)."""
    source, target = (Residual1D("gaussian", 0.0, scale) for scale in scales)
    weight = leakage.source_optimal_weight(theta, beta, sigma_s, source)
    _, head_lipschitz = leakage.head_function("linear", weight)
    bound = leakage.wasserstein_bound(theta, head_lipschitz, w1_exact(source, target))
    assert abs(leakage.gaussian_absolute_gap(theta, beta, sigma_s, noise, weight, source, target)) <= bound * (
        1 + 1e-9) + 1e-12


def test_script_end_to_end(tmp_path):
    result = run_script(SCRIPT, "--num-thetas", "2", "--cases", "laplace,gaussian-mean", "--samples", "2000",
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


@pytest.mark.parametrize("flags", [
    ["--losses", "squared"],   # the theorem's assumptions hold nowhere: no gap/bound ratio to report
    ["--beta", "0"],           # w* = 0: every bound is 0, so no ratio either
])
def test_script_summary_without_a_gap_to_bound_ratio(flags, tmp_path):
    result = run_script(SCRIPT, *flags, "--num-thetas", "2", "--cases", "laplace", "--samples", "1000",
                        "--out", str(tmp_path))
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    payload = json.loads((tmp_path / "leakage_bound.json").read_text())
    assert payload["verdict"]["tightest_ratio_where_assumptions_hold"] is None
    assert ("n/a" in result.stdout) if "--beta" in flags else ("hold at no point" in result.stdout)


@pytest.mark.parametrize("flags, message", [
    (["--cases", "cauchy"], "--cases must be 'all' or comma-separated names"),
    (["--theta-max", "3"], "--theta-max must lie in [0, pi/2]"),
    (["--theta-min", "0.5", "--theta-max", "0.5", "--num-thetas", "3"],
     "--theta-min (0.5) must be below --theta-max (0.5), or equal to it with --num-thetas 1 (one angle, not 3 copies"),
    (["--theta-min", "0.6", "--theta-max", "0.5"], "--theta-min (0.6) must be below --theta-max (0.5)"),
    # One angle is --theta-min: a --theta-max apart from it would be ignored (recorded, never evaluated).
    (["--num-thetas", "1", "--theta-min", "0.2", "--theta-max", "1.0"],
     "--num-thetas 1 evaluates the one angle --theta-min (0.2), so --theta-max (1.0) would be ignored: give "
     "--theta-max 0.2 too"),
    (["--samples", "10"], "--samples must be an integer >= 100"),
    (["--losses", "hinge"], "--losses must be 'all' or comma-separated names"),
])
def test_script_bad_flags(flags, message, tmp_path):
    assert_one_line_error(run_in_process(SCRIPT, *flags, "--out", str(tmp_path)), message)


@pytest.mark.parametrize("flags, message", [
    (["--seed", str(2**63)], "--seed must be an integer in [-2^63, 2^63 - 1]"),
    (["--seed", str(-(2**63) - 1)], "--seed must be an integer in [-2^63, 2^63 - 1]"),
    (["--num-thetas", "1", "--theta-max", "0.05", "--cases", "laplace", "--samples", "1000", "--out", "/proc/x.json"],
     "--out /proc/x.json cannot be written"),
])
def test_script_refuses_a_seed_jax_cannot_take_and_an_unwritable_out_before_any_work(flags, message, tmp_path):
    assert_one_line_error(run_in_process(SCRIPT, *with_out(flags, tmp_path)), message)


def test_a_bad_flag_from_the_command_line(tmp_path):
    """One of the errors above from ``python leakage_bound.py`` itself."""
    assert_one_line_error(run_script(SCRIPT, "--samples", "10", "--out", str(tmp_path)),
                          "leakage_bound.py: error: --samples must be an integer >= 100")


def test_the_leakage_verdicts_from_fabricated_gaps(tmp_path):
    """Gaussian scale growth 1 → 2, σ_s = β = 1: w* = cos θ (Eq (22)), W₁ = (2 − 1)·√(2/π) (same-mean Gaussians),
    so the bound is |cos θ|·|sin θ|·√(2/π). Gaps fabricated as f × bound with standard error 0.01 × bound: the
    absolute loss at f = 0.5, 1.02, 0.7 holds (1.02 only within its 3 SE), the squared loss at f = 2 fails. The grid
    includes θ_max, and θ_min = θ_max is accepted with --num-thetas 1 (one angle)."""
    module = load_script(SCRIPT)
    factors = {"absolute": [0.5, 1.02, 0.7], "squared": [2.0, 2.0, 2.0]}
    thetas = [0.2, 0.6, 1.0]
    bound_of = lambda theta: abs(math.cos(theta) * math.sin(theta)) * math.sqrt(2 / math.pi)  # noqa: E731

    def fake_gap(theta, beta, sigma_s, noise_std, head, weight, loss, source, target, key, num_samples):
        index = int(np.argmin(np.abs(np.asarray(thetas) - theta)))
        bound = bound_of(theta)
        return leakage.GapEstimate(factors[loss][index] * bound, 0.01 * bound)

    config = module.LeakageConfig(num_thetas=3, theta_min=0.2, theta_max=1.0, cases="gaussian-scale", heads="linear",
                                  samples=1000, out=str(tmp_path), quiet=True)
    with mock.patch("theory.leakage.loss_gap", side_effect=fake_gap):
        payload = module.run(config)
    points = payload["points"]
    assert [p["theta"] for p in points if p["loss"] == "absolute"] == pytest.approx(thetas, abs=1e-12)
    for p in points:
        assert p["bound"] == pytest.approx(bound_of(p["theta"]), rel=1e-6)
        assert p["kappa"] == pytest.approx(abs(math.sin(p["theta"])), rel=1e-12)
        assert p["holds"] is (p["loss"] == "absolute")
    verdict = payload["verdict"]
    assert verdict["bound_holds_where_assumptions_hold"] is True
    assert (verdict["failures_with_assumptions"], verdict["failures_without_assumptions"]) == (0, 3)
    assert verdict["tightest_ratio_where_assumptions_hold"] == pytest.approx(1.02, rel=1e-9)
    closed = [p for p in points if p["closed_form_gap"] is not None]  # the linear head, absolute loss, Gaussians
    assert len(closed) == 3 and verdict["closed_form_max_abs_z"] == pytest.approx(
        max(abs(p["gap"] - p["closed_form_gap"]) / p["gap_se"] for p in closed), rel=1e-12)
    one = module.LeakageConfig(num_thetas=1, theta_min=0.5, theta_max=0.5, out=str(tmp_path), quiet=True)
    assert (one.theta_min, one.theta_max) == (0.5, 0.5)


def test_paired_gap_with_a_semantic_scale_other_than_one_against_the_folded_normal():
    """loss_gap with σ_s = 2 (the existing tests have σ_s = 1, where σ_s and σ_s² agree): the absolute-loss error of
    a linear head, e = (β − wc) z_s + ε + ws z_r, is Gaussian, so each risk is scipy's folded-normal mean. Exact gap
    0.0365; σ_s² in place of σ_s would give 0.0188. The estimate's SE is 0.0005 at n = 200 000; allowed: 4 SE."""
    theta, beta, sigma_s, noise, w = 0.8, 1.0, 2.0, 0.3, 0.3
    source, target = Residual1D("gaussian", 0.0, 1.0), Residual1D("gaussian", 0.5, 2.0)
    c, s = math.cos(theta), math.sin(theta)

    def absolute_risk(residual):
        mean = w * s * residual.loc
        std = math.sqrt((beta - w * c) ** 2 * sigma_s**2 + noise**2 + (w * s * residual.std) ** 2)
        return scipy.stats.foldnorm(abs(mean) / std, scale=std).mean()

    estimate = leakage.loss_gap(theta, beta, sigma_s, noise, "linear", w, "absolute", source, target,
                                jax.random.key(0), 200_000)
    assert 0 < estimate.standard_error < 0.001
    assert abs(estimate.gap - (absolute_risk(target) - absolute_risk(source))) < 4 * estimate.standard_error


def test_exact_w1_of_a_translated_mixture_with_far_apart_components():
    """Translating a distribution by 3 moves it by W₁ = 3 exactly (the quantile functions differ by 3 everywhere),
    however far apart the mixture's components are: at separation 20 (σ = 1) the quadrature must reach past
    loc ± 20 to see them. Hand computation."""
    p = Residual1D("mixture", loc=0.0, std=1.0, separation=20.0)
    q = Residual1D("mixture", loc=3.0, std=1.0, separation=20.0)
    assert w1_exact(p, q) == pytest.approx(3.0, rel=1e-8)
    low, high = p.support_bounds()
    assert p.cdf(np.array([low]))[0] < 1e-15 and p.cdf(np.array([high]))[0] > 1 - 1e-15


def test_the_printed_failures_name_every_case_with_its_count_and_worst_point():
    """The script prints one line per failing case (the JSON holds every failure): each case appears, in order, with
    its count and the point furthest over its bound, so no case is hidden behind a cut-off."""
    module = load_script(SCRIPT)
    point = lambda case, gap, bound, theta: {"case": case, "head": "linear", "loss": "squared",  # noqa: E731
                                             "theta": theta, "gap": gap, "gap_se": 0.001, "bound": bound}
    failures = [point("laplace", 0.5, 0.4, 0.2), point("laplace", 0.9, 0.3, 0.8), point("laplace", 0.6, 0.1, 0.5),
                point("uniform", 0.3, 0.2, 1.0)]
    assert module.failure_lines(failures) == [
        "  laplace              3 failures; furthest over: linear head, squared loss, theta=0.80, gap=0.9000±0.0010 "
        "> bound=0.3000",
        "  uniform              1 failure; furthest over: linear head, squared loss, theta=1.00, gap=0.3000±0.0010 "
        "> bound=0.2000"]
    assert module.failure_lines([]) == []


@pytest.mark.parametrize("family", FAMILIES)
def test_support_bounds_hold_every_family_to_double_precision(family):
    """support_bounds promises an interval outside which the CDF is 0 or 1 to double precision (w1_exact integrates
    only inside it). Checked for each family with a shift and a separation: the CDF is below 1e-15 at the lower end
    and within 1e-15 of 1 at the upper (a Laplace cut at 12σ would leave 2e-8 outside)."""
    residual = Residual1D(family, loc=0.7, std=1.3, separation=2.0 if family == "mixture" else 0.0)
    low, high = residual.support_bounds()
    assert residual.cdf(np.array([low]))[0] < 1e-15 and residual.cdf(np.array([high]))[0] > 1 - 1e-15


@pytest.mark.parametrize("loc", [-1.0, 1.0])
def test_exact_absolute_gap_for_a_mean_shift_of_either_sign_against_scipy(loc):
    """gaussian_absolute_gap's folded-normal mean against scipy's foldnorm for a residual mean shifted down as well as
    up (the error's mean w·s·m has the sign of m for w > 0; the reference table has only centred residuals and the
    Monte Carlo check only m = +1). E|e| is even in the error's mean."""
    theta, beta, sigma_s, noise, w = 0.9, 1.0, 1.0, 0.3, 0.8
    source, target = Residual1D("gaussian", 0.0, 1.0), Residual1D("gaussian", loc, 1.5)
    c, s = math.cos(theta), math.sin(theta)

    def absolute_risk(residual):
        mean = w * s * residual.loc
        std = math.sqrt((beta - w * c) ** 2 * sigma_s**2 + noise**2 + (w * s * residual.std) ** 2)
        return scipy.stats.foldnorm(abs(mean) / std, scale=std).mean()

    expected = absolute_risk(target) - absolute_risk(source)
    assert leakage.gaussian_absolute_gap(theta, beta, sigma_s, noise, w, source, target) == pytest.approx(
        expected, rel=1e-10)


def test_gaussian_absolute_gap_refuses_other_families():
    with pytest.raises(ValueError, match="gaussian_absolute_gap needs Gaussian residuals"):
        leakage.gaussian_absolute_gap(0.5, 1.0, 1.0, 0.1, 0.8, Residual1D("gaussian"), Residual1D("laplace", std=2.0))


@pytest.mark.parametrize("weight", [-1.5, 0.4])
def test_heads_are_the_documented_functions_with_non_negative_lipschitz_constants(weight):
    """head_function's docstring: linear w·u and tanh(w·u), each with Lipschitz constant |w| (a constant, so never
    negative: a negative bound would fail every gap). w·tanh(u) has the same constant but is another head."""
    u = np.array([-2.0, -0.3, 0.0, 0.5, 3.0])
    linear, linear_lipschitz = leakage.head_function("linear", weight)
    tanh, tanh_lipschitz = leakage.head_function("tanh", weight)
    np.testing.assert_allclose(linear(u), weight * u, rtol=1e-12)
    np.testing.assert_allclose(tanh(u), np.tanh(weight * u), rtol=1e-12)
    assert linear_lipschitz == tanh_lipschitz == abs(weight)


def test_exact_w1_where_the_cdfs_cross_away_from_every_landmark():
    """A mixture (components at ±1, σ = 0.3) against N(0.1, 1): the CDFs cross four times, at none of the locations
    and support ends w1_exact splits at, so its accuracy rests on locating the crossings (without them the kinks
    inside the quadrature pieces cost 3e-6 relative). Reference: the trapezoid rule for ∫|F_P − F_Q| on 280 001
    points over [−14, 14] (both CDFs are 0 or 1 to 1e-40 outside), whose error is 2e-9 relative (measured against
    2.8 million points); allowed 1e-7."""
    p, q = Residual1D("mixture", 0.0, 0.3, 1.0), Residual1D("gaussian", 0.1, 1.0)
    x = np.linspace(-14.0, 14.0, 280_001)
    reference = scipy.integrate.trapezoid(np.abs(p.cdf(x) - q.cdf(x)), x)  # np.trapezoid needs numpy >= 2
    assert w1_exact(p, q) == pytest.approx(reference, rel=1e-7)


def test_num_se_noise_std_and_seed_reach_the_monte_carlo_and_its_verdict(tmp_path):
    """The squared loss at 2 x the bound with a standard error of 0.01 x the bound fails at the default 3 SE, and
    holds at --num-se 150 (slack 1.5 x the bound); --noise-std reaches every gap estimate; --seed sets the keys
    (the same seed draws the same keys, another seed others)."""
    module = load_script(SCRIPT)
    calls = []

    def fake_gap(theta, beta, sigma_s, noise_std, head, weight, loss, source, target, key, num_samples):
        calls.append((noise_std, tuple(np.asarray(jax.random.key_data(key)).ravel())))
        bound = abs(math.cos(theta) * math.sin(theta)) * math.sqrt(2 / math.pi)
        return leakage.GapEstimate(2.0 * bound, 0.01 * bound)

    def run(**flags):
        calls.clear()
        config = module.LeakageConfig(num_thetas=1, theta_min=0.6, theta_max=0.6, cases="gaussian-scale",
                                      heads="linear", losses="squared", samples=1000, out=str(tmp_path), quiet=True,
                                      **flags)
        with mock.patch("theory.leakage.loss_gap", side_effect=fake_gap):
            verdict = module.run(config)["verdict"]
        return verdict, list(calls)

    assert run()[0]["failures_without_assumptions"] == 1
    verdict, calls_150 = run(num_se=150.0, noise_std=0.7, seed=5)
    assert verdict["failures_without_assumptions"] == 0 and [noise for noise, _ in calls_150] == [0.7]
    assert run(num_se=150.0, noise_std=0.7, seed=5)[1] == calls_150 and run(seed=6)[1][0][1] != calls_150[0][1]


def test_negative_gaps_are_judged_and_plotted_by_their_magnitude_and_every_point_has_its_own_key(tmp_path):
    """A shrinking residual (gaussian-shrink) gives negative gaps; Theorem 2.4 bounds |R_T − R_S|. Gaps fabricated as
    f × bound with f = −0.5, −1.5, 0.7 and SE 0.01 × bound: the middle point fails (|gap| is 1.5 bounds, 50 SE over),
    the others hold, and the tightest gap/bound is 1.5, read from |gap|. Each Monte Carlo estimate gets its own key
    (one key for a whole case would correlate the errors of all its points). The figure plots |gap| against the bound
    with gap_se as the error bar (the log axes cannot show a negative gap)."""
    module = load_script(SCRIPT)
    factors, keys = [-0.5, -1.5, 0.7], []

    def fake_gap(theta, beta, sigma_s, noise_std, head, weight, loss, source, target, key, num_samples):
        keys.append(tuple(np.asarray(jax.random.key_data(key)).ravel()))
        bound = leakage.wasserstein_bound(theta, abs(weight), w1_exact(source, target))
        return leakage.GapEstimate(factors[len(keys) - 1] * bound, 0.01 * bound)

    config = module.LeakageConfig(num_thetas=3, theta_min=0.2, theta_max=1.0, cases="gaussian-shrink",
                                  heads="linear", losses="absolute", samples=1000, out=str(tmp_path), quiet=True)
    with mock.patch("theory.leakage.loss_gap", side_effect=fake_gap):
        payload = module.run(config)
    points = payload["points"]
    assert len(set(keys)) == len(keys) == 3
    assert [p["holds"] for p in points] == [True, False, True]
    verdict = payload["verdict"]
    assert verdict["bound_holds_where_assumptions_hold"] is False and verdict["failures_with_assumptions"] == 1
    assert verdict["tightest_ratio_where_assumptions_hold"] == pytest.approx(1.5, rel=1e-9)
    with drawn_calls("errorbar") as drawn:
        module.plot(payload, tmp_path / "leakage.png")
    (series,) = drawn["errorbar"]  # one case, one head, one loss: one series
    np.testing.assert_allclose(series["x"], [p["bound"] for p in points], rtol=1e-12)
    np.testing.assert_allclose(series["y"], [abs(p["gap"]) for p in points], rtol=1e-12)
    np.testing.assert_allclose(series["yerr"], [p["gap_se"] for p in points], rtol=1e-12)
