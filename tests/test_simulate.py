import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scm import LinearGaussianSCM
from theory import checks, closed_forms
from theory.balancing import Balancer, make
from theory.simulate import (TrainConfig, effective_heads, least_squares_heads, monte_carlo_risk, sweep, train,
                             train_and_evaluate)

SCM = LinearGaussianSCM(betas=[[1.0, 0.0], [0.5, 1.5]], sigma_s=1.0, sigma_r_source=0.5, sigma_r_target=1.5,
                        noise_std=0.1)
CONFIG = TrainConfig(num_samples=256, steps=300, learning_rate=0.05)


@pytest.mark.parametrize("name", ["ew", "pcgrad", "mgda"])
def test_training_reaches_the_empirical_risk_minimiser(name):
    key = jax.random.key(4)
    result = train(SCM, make(name), 0.6, key, CONFIG)
    np.testing.assert_allclose(effective_heads(result.params), least_squares_heads(SCM, 0.6, key, CONFIG),
                               atol=2e-3)


def test_vmapped_grid_equals_configuration_by_configuration():
    thetas, seeds = np.array([0.2, 0.9]), np.array([0, 5])
    config = TrainConfig(num_samples=64, steps=50)
    grid = sweep(SCM, make("cagrad"), thetas, seeds, config)
    assert grid.gap.shape == (2, 2, 2)
    for i, theta in enumerate(thetas):
        for j, seed in enumerate(seeds):
            single = train_and_evaluate(SCM, make("cagrad"), theta, jax.random.key(seed), config)
            np.testing.assert_allclose(grid.gap[i, j], single.gap, rtol=1e-8, atol=1e-10)


def test_exact_risks_of_a_trained_predictor_match_monte_carlo():
    key = jax.random.key(9)
    heads = effective_heads(train(SCM, make("ew"), 0.8, key, CONFIG).params)
    for domain, sample_key in (("source", jax.random.key(1)), ("target", jax.random.key(2))):
        estimate, standard_error = monte_carlo_risk(SCM, 0.8, heads, sample_key, 200_000, domain)
        assert np.all(np.abs(estimate - closed_forms.risk(SCM, 0.8, heads, domain)) < 4 * standard_error)


def test_trained_gap_matches_the_closed_form_within_its_standard_error():
    """Over seeds, the gap of trained predictors is centred on the source-optimal closed form (Theorem 2.3
    'given θ')."""
    thetas = np.array([0.3, 0.7, 1.1])
    grid = sweep(SCM, make("ew"), thetas, np.arange(12), CONFIG)
    gap = np.asarray(grid.gap).mean(axis=-1)
    closed = np.asarray(jax.vmap(lambda t: closed_forms.source_optimal_gap(SCM, t).mean())(thetas))
    assert checks.agreement_check(gap, closed, num_se=4.0)["holds"]
    assert checks.convergence_check(gap, np.asarray(grid.least_squares_gap).mean(axis=-1))["converged"]
    floor = np.asarray(jax.vmap(lambda t: closed_forms.gap_floor(SCM, t).mean())(thetas))
    assert checks.floor_check(gap, floor, +1)["holds"]


@pytest.mark.parametrize("field, value", [("num_samples", 1), ("steps", 0), ("steps", True), ("steps", 300.0),
                                          ("learning_rate", -1.0), ("hidden_dim", 0), ("hidden_dim", 8.0),
                                          ("init_scale", float("nan"))])
def test_train_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=rf"^{field} must be .*; got {value!r}$"):
        TrainConfig(**{field: value})


def test_sweep_rejects_angles_outside_the_quarter_turn():
    with pytest.raises(ValueError, match="theta"):
        sweep(SCM, make("ew"), [0.1, 1.7], [0], CONFIG)


@pytest.mark.parametrize("seeds", [[-1], [2**32], [0.5], 3])
def test_sweep_rejects_seeds_that_are_not_keys(seeds):
    """A negative seed used to fail with NumPy's OverflowError about uint32."""
    with pytest.raises(ValueError, match=r"seeds must be a 1-D sequence of integers in \[0, 2\*\*32\)"):
        sweep(SCM, make("ew"), [0.1], seeds, CONFIG)


def test_checks_fail_when_they_should():
    gap = np.array([[1.0, 1.1, 0.9], [2.0, 2.1, 1.9]])
    assert checks.floor_check(gap, np.array([0.5, 1.5]), +1)["holds"]
    verdict = checks.floor_check(gap, np.array([0.5, 3.0]), +1)
    assert not verdict["holds"] and verdict["violations"] == [1]
    assert not checks.floor_check(-gap, np.array([0.5, 1.5]), +1)["holds"]   # wrong sign
    assert checks.floor_check(-gap, np.array([0.5, 1.5]), -1)["holds"]
    assert checks.agreement_check(gap, np.array([1.0, 2.0]))["holds"]
    assert not checks.agreement_check(gap, np.array([1.0, 2.5]))["holds"]
    assert not checks.convergence_check(gap, gap + 0.05)["converged"]


def test_checks_at_their_boundaries():
    """Verdicts on either side of their thresholds, in standard errors of the mean (not of one seed). The gap
    [0.9, 1.0, 1.1] has mean 1 and SEM 0.1/√3 = 0.0577: a floor of 1.1 is 1.73 SE above the mean, within 3; 1.2 is
    3.46 SE above, beyond. An optimisation error of 0.005 is within 0.1 SE (0.00577), 0.008 is not."""
    gap = np.array([[0.9, 1.0, 1.1]])
    verdict = checks.floor_check(gap, np.array([1.1]), +1)
    assert verdict["holds"] and verdict["min_margin_se"] == pytest.approx(-math.sqrt(3), rel=1e-9)
    assert not checks.floor_check(gap, np.array([1.2]), +1)["holds"]
    assert checks.agreement_check(gap, np.array([1.17]))["holds"]
    assert not checks.agreement_check(gap, np.array([1.18]))["holds"]
    assert checks.convergence_check(gap, gap + 0.005)["converged"]
    assert not checks.convergence_check(gap, gap + 0.008)["converged"]


def test_the_monte_carlo_standard_error_is_the_spread_of_the_estimate():
    """monte_carlo_risk's standard error against the standard deviation of its estimate over 300 independent keys
    (known to about 4%; tolerance 25%)."""
    heads = np.asarray(closed_forms.source_optimal_heads(SCM, 0.8))
    keys = jax.random.split(jax.random.key(8), 300)
    means, errors = jax.vmap(lambda key: monte_carlo_risk(SCM, 0.8, heads, key, 1000, "target"))(keys)
    spread = np.std(np.asarray(means), axis=0, ddof=1)
    assert np.all(np.abs(np.mean(np.asarray(errors), axis=0) / spread - 1) < 0.25)


def test_the_least_squares_gap_depends_on_the_sample_not_on_training():
    """evaluate's least_squares_gap is the gap of the empirical risk minimiser of the seed's sample: the same after
    one step of training as after 300, while the trained gap moves onto it only with training."""
    config_short = TrainConfig(num_samples=256, steps=1, learning_rate=0.05)
    short, long = (train_and_evaluate(SCM, make("ew"), 0.6, jax.random.key(4), config)
                   for config in (config_short, CONFIG))
    np.testing.assert_allclose(short.least_squares_gap, long.least_squares_gap, rtol=1e-10)
    np.testing.assert_allclose(long.gap, long.least_squares_gap, rtol=1e-3)
    assert np.all(np.abs(short.gap - short.least_squares_gap) > 0.1 * np.abs(short.least_squares_gap))


def test_losses_from_moments_equal_the_per_sample_mean_squared_error():
    from theory.simulate import init_params, moment_losses, moments_of, task_losses
    from scm import rotation_encoder, sample

    data = sample(SCM, jax.random.key(0), 500)
    z_s, _ = rotation_encoder(0.4, data.s, data.r)
    params = init_params(SCM, CONFIG, jax.random.key(1))
    np.testing.assert_allclose(moment_losses(params, moments_of(z_s, data.y)), task_losses(params, z_s, data.y),
                               rtol=1e-10)
    grad_moments = jax.grad(lambda p: moment_losses(p, moments_of(z_s, data.y)).sum())(params)
    grad_samples = jax.grad(lambda p: task_losses(p, z_s, data.y).sum())(params)
    for a, b in zip(grad_moments, grad_samples):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


def test_representation_path_gives_the_parameter_path_for_a_linear_method():
    """EW through representation gradients pulled back through the layer equals EW on parameter gradients."""
    from theory.balancing.base import Balancer

    ew = make("ew")
    ew_on_representation = Balancer("ew_rep", ew.init, ew.step, None, "jacobian", "representation")
    key, config = jax.random.key(2), TrainConfig(num_samples=128, steps=40)
    a = train(SCM, ew, 0.5, key, config)
    b = train(SCM, ew_on_representation, 0.5, key, config)
    np.testing.assert_allclose(effective_heads(a.params), effective_heads(b.params), rtol=1e-8, atol=1e-10)


def test_floor_check_allows_three_standard_errors_by_default_and_measures_margins_on_the_signed_gap():
    """The gap [0.9, 1.0, 1.1] has mean 1 and SEM 0.1/√3 (hand computation); a floor 2.5 SEM above the mean is
    within the default 3 SE, so the check holds, with a margin of −2.5 SE. (The existing boundary test sits at 1.73
    and 3.46 SE, which a default of 2 SE passes too.)"""
    sem = 0.1 / math.sqrt(3)
    verdict = checks.floor_check(np.array([[0.9, 1.0, 1.1]]), np.array([1.0 + 2.5 * sem]), +1)
    assert verdict["holds"] and verdict["num_se"] == 3.0
    assert verdict["min_margin_se"] == pytest.approx(-2.5, rel=1e-9)
    # A shrinking residual (sign −1): the margin is measured on the signed mean, sign·mean = 1, not on the mean −1.
    shrinking = checks.floor_check(-np.array([[0.9, 1.0, 1.1]]), np.array([0.9]), -1)
    assert shrinking["holds"] and shrinking["min_margin_se"] == pytest.approx(0.1 / sem, rel=1e-9)


def test_agreement_at_a_point_without_spread_is_to_one_millionth():
    """Where every seed gives the same value (SEM 0: θ = 0, where every gap is exactly 0) agreement_check asks for
    a match to 1e-6 absolutely (its docstring): 1e-7 off agrees, 1e-4 off does not."""
    measured = np.array([[0.5, 0.5, 0.5]])
    assert checks.agreement_check(measured, np.array([0.5 + 1e-7]))["holds"]
    verdict = checks.agreement_check(measured, np.array([0.5 + 1e-4]))
    assert not verdict["holds"] and verdict["mismatches"] == [0]


def test_optimisation_error_is_the_mean_over_seeds():
    """The optimisation error at a grid point is the mean over seeds of |gap − least-squares gap| (docstring):
    errors (0, 0, 0.015) average 0.005, within 0.1 SEM = 0.00577 of the gap [0.9, 1.0, 1.1] (hand computation),
    although one seed alone is 0.015 away."""
    gap = np.array([[0.9, 1.0, 1.1]])
    verdict = checks.convergence_check(gap, gap + np.array([[0.0, 0.0, 0.015]]))
    assert verdict["converged"]
    np.testing.assert_allclose(verdict["optimisation_error"], [0.005], rtol=1e-9)


def _counting_balancer() -> Balancer:
    """Weights (t, 2t) at step t = 1, 2, ... and a zero direction: a balancer whose weights change at every step."""
    def step(jacobian, losses, count, key):
        count = count + 1
        return jnp.zeros(jacobian.shape[1], jacobian.dtype), jnp.stack([count, 2 * count]).astype(jacobian.dtype), count

    return Balancer("counting", lambda num_tasks, num_params=None: jnp.zeros((), jnp.int32), step)


def test_final_weights_are_the_last_steps_and_mean_weights_their_average():
    """TrainResult's final_weights are the balancer's weights at the last step, mean_weights their average over the
    steps: (3, 6) and (2, 4) after three steps of weights (t, 2t) (hand computation)."""
    scm = LinearGaussianSCM(betas=[[1.0, 0.0], [0.5, 1.5]], sigma_s=1.0, sigma_r_source=0.5, sigma_r_target=1.5)
    result = train(scm, _counting_balancer(), 0.5, jax.random.key(7), TrainConfig(num_samples=64, steps=3))
    np.testing.assert_allclose(result.final_weights, [3.0, 6.0], rtol=1e-12)
    np.testing.assert_allclose(result.mean_weights, [2.0, 4.0], rtol=1e-12)


def test_checks_on_a_single_seed_and_at_points_without_spread():
    """Hand-computed edge cases of the documented rules. One seed: the SEM is 0 (mean_and_sem's docstring), not NaN.
    SEM 0 (every seed equal): floor_check allows only rounding (1e-9 relative), so a gap equal to its floor up to
    1e-12 holds and one 1e-6 short does not; convergence_check allows 1e-4 there (its docstring), so 5e-5 converges
    and 2e-4 does not. Sign 0 (no definite shift) makes the floor check vacuous whatever floor is passed."""
    mean, sem = checks.mean_and_sem(np.array([[2.0], [3.0]]))
    np.testing.assert_array_equal(mean, [2.0, 3.0])
    np.testing.assert_array_equal(sem, [0.0, 0.0])
    assert checks.floor_check(np.array([[1.5]]), np.array([1.0]), +1)["holds"]
    flat = np.array([[1.0, 1.0, 1.0]])
    assert checks.floor_check(flat, np.array([1.0 + 1e-12]), +1)["holds"]
    assert not checks.floor_check(flat, np.array([1.0 + 1e-6]), +1)["holds"]
    assert checks.convergence_check(flat, flat + 5e-5)["converged"]
    assert not checks.convergence_check(flat, flat + 2e-4)["converged"]
    assert checks.floor_check(np.array([[0.1, 0.2, 0.3]]), np.array([5.0]), 0)["holds"]


def test_worst_optimisation_error_is_the_largest_over_the_grid():
    """worst_error_over_se is the largest error/SEM over the grid points: errors 0.005 and 0.001 against SEMs
    0.1/√3 and 0.1/√3 give 0.005·√3/0.1 = 0.0866 (hand computation), not their mean."""
    gap = np.array([[0.9, 1.0, 1.1], [1.9, 2.0, 2.1]])
    verdict = checks.convergence_check(gap, gap + np.array([[0.005], [0.001]]))
    assert verdict["worst_error_over_se"] == pytest.approx(0.005 * math.sqrt(3) / 0.1, rel=1e-9)


def test_hidden_dim_sets_the_width_of_the_shared_layer():
    """TrainConfig.hidden_dim is the width h of W [h, d] and of the heads [K, h] (None, every other test, means d)."""
    from theory.simulate import init_params

    params = init_params(SCM, TrainConfig(hidden_dim=5), jax.random.key(0))
    assert params.shared.shape == (5, 2) and params.heads.shape == (2, 5)
