import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scm import LinearGaussianSCM, check_theta, rotation_encoder, sample
from scm.linear_gaussian import as_count, check_count
from theory import closed_forms as cf


def make_scm(**overrides):
    fields = dict(betas=[[1.0, 0.5, -0.2], [0.3, 2.0, 1.0]], sigma_s=1.2, sigma_r_source=0.7, sigma_r_target=1.9,
                  noise_std=0.3)
    fields.update(overrides)
    return LinearGaussianSCM(**fields)


@pytest.mark.parametrize("overrides, field", [
    (dict(sigma_s=0.0), "sigma_s"),
    (dict(sigma_s=-1.0), "sigma_s"),
    (dict(sigma_r_source=float("nan")), "sigma_r_source"),
    (dict(sigma_r_target=np.eye(2)), "sigma_r_target"),                 # shape does not match d=3
    (dict(sigma_r_target=np.array([[1, 0.5, 0], [0, 1, 0], [0, 0, 1.0]])), "symmetric"),
    (dict(sigma_s=np.diag([1.0, -1.0, 1.0])), "positive definite"),
    (dict(noise_std=-0.1), "noise_std"),
    (dict(noise_std=float("inf")), "noise_std must be a finite number"),
    (dict(betas=np.ones((2, 3, 1))), "betas"),
    (dict(betas=[[1.0, float("inf"), 0.0]]), "betas"),
])
def test_bad_configurations_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        make_scm(**overrides)


@pytest.mark.parametrize("field, scale", [("sigma_s", 1e200), ("sigma_r_source", 1e-170),
                                          ("sigma_r_target", 1e100), ("sigma_s", 1e-80)])
def test_scales_whose_fourth_power_leaves_the_float_range_are_rejected(field, scale):
    """The closed forms use σ⁴ (squared variances): 1e200 overflows even σ² (a Python OverflowError before), 1e-170
    squares to 0 (NaN risks before), and 1e100 and 1e-80 give finite variances whose squares overflow or underflow
    float64 (NaN floors before). The message is one line naming the field and the allowed range."""
    with pytest.raises(ValueError, match=rf"^{field} = .* is outside what float64 computations can use: "
                                         r"a standard deviation must lie between about [^\n]*$"):
        make_scm(**{field: scale})
    with pytest.raises(ValueError, match=r"sigma_s must have eigenvalues in \[.*\] \(their squares must be normal "
                                         r"float64 numbers\)"):
        make_scm(sigma_s=np.diag([1.0, 1e-160, 1.0]))
    scm = make_scm(sigma_s=1e70)  # large but usable: accepted, and the floors are finite
    assert scm.cov_s_np[0, 0] == pytest.approx(1e140)
    assert np.all(np.isfinite(np.asarray(cf.gap_floor(scm, 0.3))))


def test_float32_scales_are_checked_against_float32():
    """Without jax_enable_x64 the covariances become float32 arrays: σ = 1e10 would give an infinite σ⁴ there (and a
    NaN floor), 1e9 does not."""
    jax.config.update("jax_enable_x64", False)
    try:
        with pytest.raises(ValueError, match="outside what float32 computations can use"):
            make_scm(sigma_s=1e10)
        scm = make_scm(sigma_s=1e9)
        assert np.isfinite(scm.cov_s).all() and np.all(np.isfinite(np.asarray(cf.gap_floor(scm, 0.3))))
    finally:
        jax.config.update("jax_enable_x64", True)  # the suite's setting (conftest.py)


@pytest.mark.parametrize("theta", [-0.1, math.pi / 2 + 1e-3, float("nan"), [0.1, 2.0]])
def test_theta_outside_the_quarter_turn_is_rejected(theta):
    with pytest.raises(ValueError, match=r"theta must lie in \[0, pi/2\]"):
        check_theta(theta)


def test_bad_domain_and_sample_count():
    scm = make_scm()
    with pytest.raises(ValueError, match="domain"):
        sample(scm, jax.random.key(0), 10, "validation")
    with pytest.raises(ValueError, match="num_samples"):
        sample(scm, jax.random.key(0), 0)
    with pytest.raises(ValueError, match="num_samples must be an integer >= 1; got 10.5"):
        sample(scm, jax.random.key(0), 10.5)
    assert sample(scm, jax.random.key(0), np.int64(3)).y.shape == sample(scm, jax.random.key(0), jnp.int32(3)).y.shape
    # Models are compared by identity: field-wise == over arrays has no single truth value.
    assert scm == scm and scm != make_scm() and len({scm, scm}) == 1


def test_the_integer_rule_of_every_count():
    """as_count/check_count, the one rule of counts (theory's sizes, deep's configs and data readers): integers of
    any type inside minimum..maximum, both ends included; bools, floats such as 3.0 and strings refused."""
    for value in (1, 5, np.int64(3), jnp.int32(5), np.uint8(1)):
        assert as_count(value, 1, 5) == int(value) and type(as_count(value, 1, 5)) is int
    for value in (0, 6, True, np.bool_(True), 3.0, np.float32(3), "3", None, np.array([3])):
        assert as_count(value, 1, 5) is None, value
    assert as_count(10 ** 30, 0) == 10 ** 30                                  # no upper end by default
    with pytest.raises(ValueError, match=r"^severity must be an integer in 1\.\.5; got 6$"):
        check_count("severity", 6, 1, 5)
    with pytest.raises(ValueError, match=r"^limit must be None or an integer >= 1; got 0$"):
        check_count("limit", 0, 1, or_none=True)
    assert check_count("seed", np.int64(0), 0) == 0


def test_scalars_mean_standard_deviations_and_matrices_mean_covariances():
    cov = np.array([[2.0, 0.3, 0.0], [0.3, 1.0, 0.1], [0.0, 0.1, 0.5]])
    scm = make_scm(sigma_s=cov, sigma_r_source=0.5)
    np.testing.assert_allclose(scm.cov_s, cov)
    np.testing.assert_allclose(scm.cov_r("source"), 0.25 * np.eye(3))
    assert not scm.is_isotropic and make_scm().is_isotropic
    assert (scm.dim, scm.num_tasks) == (3, 2)


def test_sample_moments_match_the_model():
    """Sample covariances within 5 standard errors (SE of a covariance entry ~ sqrt((s_ii s_jj + s_ij^2)/n))."""
    cov_r = np.array([[1.5, -0.4, 0.2], [-0.4, 0.8, 0.0], [0.2, 0.0, 2.0]])
    scm = make_scm(sigma_r_target=cov_r)
    n = 200_000
    data = sample(scm, jax.random.key(3), n, "target")
    for x, cov in ((data.s, scm.cov_s_np), (data.r, cov_r)):
        empirical = np.cov(np.asarray(x).T)
        se = np.sqrt((np.outer(np.diag(cov), np.diag(cov)) + cov**2) / n)
        assert np.all(np.abs(empirical - cov) < 5 * se)
    residual = np.asarray(data.y - data.s @ jnp.asarray(scm.betas).T)
    assert abs(residual.var() - scm.noise_std**2) < 5 * scm.noise_std**2 * math.sqrt(2 / residual.size)
    assert abs(np.corrcoef(np.asarray(data.s[:, 0]), np.asarray(data.r[:, 0]))[0, 1]) < 5 / math.sqrt(n)


def test_domains_share_the_standardised_draws():
    scm = make_scm()
    source, target = sample(scm, jax.random.key(1), 50, "source"), sample(scm, jax.random.key(1), 50, "target")
    np.testing.assert_allclose(source.s, target.s)
    np.testing.assert_allclose(target.r, source.r * (1.9 / 0.7), rtol=1e-10)


def test_rotation_encoder_is_the_block_rotation_and_vmaps_over_theta_and_seeds():
    scm = make_scm()
    thetas = jnp.linspace(0.0, math.pi / 2, 5)
    keys = jax.vmap(jax.random.key)(jnp.arange(3))

    def encode(theta, key):
        data = sample(scm, key, 16)
        return rotation_encoder(theta, data.s, data.r), data

    (z_s, z_r), data = jax.vmap(jax.vmap(encode, in_axes=(None, 0)), in_axes=(0, None))(thetas, keys)
    assert z_s.shape == (5, 3, 16, 3)
    np.testing.assert_allclose(z_s[0], data.s[0], atol=1e-12)          # theta = 0: disentangled
    np.testing.assert_allclose(z_s[-1], -data.r[0], atol=1e-12)        # theta = pi/2: pure residual
    np.testing.assert_allclose(z_s**2 + z_r**2, data.s**2 + data.r**2, rtol=1e-10)  # orthogonal


def test_label_noise_is_independent_across_tasks():
    """ε_t ~ N(0, σ_ε²) is drawn for each task (Assumption 2.2): the two tasks' label residuals y − Sβ are
    uncorrelated (within 5/√n of 0, 5 SE) and have the stated variance (within 5 SE, √(2/n) relative). One draw
    shared by every task would correlate them fully, and change the cross-task gradient inner products the balancers
    read, while each task's risk stays right."""
    scm = make_scm()
    n = 20_000
    data = sample(scm, jax.random.key(4), n)
    residual = np.asarray(data.y - data.s @ jnp.asarray(scm.betas).T)
    assert abs(np.corrcoef(residual.T)[0, 1]) < 5 / math.sqrt(n)
    np.testing.assert_allclose(residual.var(axis=0), scm.noise_std**2, rtol=5 * math.sqrt(2 / n))


@pytest.mark.parametrize("domain", ["sigma_r_source", "sigma_r_target"])
def test_a_residual_covariance_with_off_diagonal_terms_is_not_isotropic(domain):
    """Equal variances with a correlation, in either domain, are not σ²I: the model is not isotropic and Theorem
    2.4's leakage_bound, which reads one scale from [0, 0], refuses it rather than using σ = 1 silently."""
    scm = make_scm(betas=[[1.0, 0.5]], **{domain: np.array([[1.0, 0.5], [0.5, 1.0]])})
    assert not scm.has_isotropic_residuals and not scm.is_isotropic
    with pytest.raises(ValueError, match="leakage_bound needs isotropic residual covariances"):
        cf.leakage_bound(scm, 0.5, jnp.ones((1, 2)))


def test_rotation_encoder_refuses_angles_outside_the_quarter_turn():
    s = r = jnp.ones((4, 2))
    for theta in (-0.2, 2.0):
        with pytest.raises(ValueError, match=r"theta must lie in \[0, pi/2\]"):
            rotation_encoder(theta, s, r)


def test_a_vector_of_betas_is_one_task():
    """betas [d] means one task in d dimensions (the class docstring), not d tasks in one dimension."""
    scm = LinearGaussianSCM(betas=[1.0, -0.5, 2.0])
    assert (scm.num_tasks, scm.dim) == (1, 3)
    np.testing.assert_allclose(scm.betas, [[1.0, -0.5, 2.0]])


def test_the_quarter_turn_itself_is_an_angle_and_a_matrix_with_a_huge_variance_is_refused():
    """θ = π/2, given as a number (not traced, so it is checked), is allowed ([0, π/2] is closed) and rotates the
    semantic stream onto −r. A covariance whose smallest eigenvalue is fine but whose largest entry squares past the
    float64 range (1e160² > 1.8e308) is refused like a scalar scale of that size."""
    check_theta(math.pi / 2)
    s, r = jnp.asarray([[1.0, 2.0]]), jnp.asarray([[3.0, -4.0]])
    z_s, z_r = rotation_encoder(math.pi / 2, s, r)
    np.testing.assert_allclose(z_s, -r, atol=1e-12)
    np.testing.assert_allclose(z_r, s, atol=1e-12)
    with pytest.raises(ValueError, match=r"sigma_r_target must have eigenvalues in \[.*\] \(their squares must be "
                                         r"normal float64 numbers\)"):
        make_scm(sigma_r_target=np.diag([1.0, 1e160, 1.0]))
