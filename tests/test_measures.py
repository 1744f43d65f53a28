"""Measures of theory.measures and the Gaussian closed forms they are checked against (issue 4)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scm import LinearGaussianSCM, rotation_encoder, sample
from theory import closed_forms as cf
from theory import measures

means = st.floats(-2, 2)
stds = st.floats(0.1, 3)


@settings(max_examples=20)
@given(means, stds, means, stds)
def test_w1_1d_closed_form_matches_pot_on_large_samples(m1, s1, m2, s2):
    """200k samples of each, quantile-coupled. The estimate errs by at most W1(P_n, P) + W1(Q_n, Q) (the triangle
    inequality), whose mean is at most (s1 + s2) 1.615 / sqrt(n) = 0.0036 (s1 + s2) (Bobkov and Ledoux's
    n^-1/2 int sqrt(F(1 - F)) for each sample; 1.615 for the unit Gaussian). The tolerance, 0.01 (s1 + s2), is 2.8
    times that mean, and 5 to 14 of the estimate's standard deviations (measured over 60 replicates at six settings,
    from two equal distributions to scales 30 times apart: 0.0014 to 0.0058); two equal distributions add a plug-in
    bias of 0.004 at s1 = s2 = 1 (measured), within it."""
    rng = np.random.default_rng(0)
    n = 200_000
    x, y = m1 + s1 * rng.standard_normal(n), m2 + s2 * rng.standard_normal(n)
    assert abs(measures.w1_empirical_1d(x, y) - cf.w1_gaussian_1d(m1, s1, m2, s2)) < 0.01 * (s1 + s2)


@pytest.mark.parametrize("dim, expected", [(1, 0.7979), (2, 1.2533), (5, 2.1277), (16, 3.9380)])
def test_w1_isotropic_zero_means_reference_values(dim, expected):
    # theory.md §9.2: W1(N(0, I), N(0, 4 I)) in d dimensions.
    assert cf.w1_isotropic_gaussians(np.zeros(dim), 1.0, np.zeros(dim), 2.0) == pytest.approx(expected, abs=5e-5)


@given(means, stds, means, stds)
def test_w1_isotropic_reduces_to_1d_and_is_bracketed(m1, s1, m2, s2):
    assert cf.w1_isotropic_gaussians([m1], s1, [m2], s2) == pytest.approx(cf.w1_gaussian_1d(m1, s1, m2, s2),
                                                                          rel=1e-9, abs=1e-12)
    mean_1, mean_2 = np.array([m1, 0.5, -m2]), np.array([m2, -0.5, m1])
    w1 = cf.w1_isotropic_gaussians(mean_1, s1, mean_2, s2)
    assert np.linalg.norm(mean_1 - mean_2) - 1e-12 <= w1  # the means' distance is a lower bound
    assert w1 <= cf.w2_gaussians(mean_1, s1**2 * np.eye(3), mean_2, s2**2 * np.eye(3)) + 1e-9  # W1 <= W2


def test_w1_isotropic_general_means_matches_the_coupling_and_its_dual():
    """Primal (the scaling map's cost) and dual (the potential ||x - c||) Monte Carlo values bracket the closed form."""
    rng = np.random.default_rng(1)
    mean_1, mean_2, s1, s2, n = np.zeros(3), 0.5 * np.ones(3), 1.0, 2.0, 400_000
    x = mean_1 + s1 * rng.standard_normal((n, 3))
    y = mean_2 + s2 * rng.standard_normal((n, 3))
    scale = s2 / s1
    centre = (mean_2 - scale * mean_1) / (1 - scale)
    primal_terms = np.linalg.norm(x - (mean_2 + scale * (x - mean_1)), axis=1)
    dual_terms_x, dual_terms_y = np.linalg.norm(x - centre, axis=1), np.linalg.norm(y - centre, axis=1)
    exact = cf.w1_isotropic_gaussians(mean_1, s1, mean_2, s2)
    se = primal_terms.std() / math.sqrt(n)
    assert abs(primal_terms.mean() - exact) < 4 * se
    dual = dual_terms_y.mean() - dual_terms_x.mean()  # sign: scale > 1
    dual_se = math.sqrt(dual_terms_x.var() / n + dual_terms_y.var() / n)
    assert abs(dual - exact) < 4 * dual_se


def test_emd_uses_the_euclidean_cost_and_is_biased_upwards():
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal(300), 1.0 + 2.0 * rng.standard_normal(300)
    # In 1-D, exact OT with the Euclidean cost equals the quantile formula (a squared cost would not).
    assert measures.w1_empirical(x, y) == pytest.approx(measures.w1_empirical_1d(x, y), rel=1e-9)
    same = [measures.w1_empirical(rng.standard_normal((200, 4)), rng.standard_normal((200, 4))) for _ in range(3)]
    assert min(same) > 0.3  # two samples of one distribution are far apart in 4-D: the plug-in bias
    xs, ys = rng.standard_normal((400, 4)), 2.0 * rng.standard_normal((400, 4))
    assert measures.sliced_w1(xs, ys) < cf.w1_isotropic_gaussians(np.zeros(4), 1, np.zeros(4), 2) \
        < measures.w1_empirical(xs, ys)


# ---------------------------------------------------------------------------------------------------- CKA

def random_codes(seed, batch=64, p=5, q=3):
    keys = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(keys[0], (batch, p))
    y = x[:, :q] @ jax.random.normal(keys[1], (q, q)) + 0.5 * jax.random.normal(keys[2], (batch, q))
    return x, y


@given(st.integers(0, 10_000), st.floats(0.01, 100.0))
def test_linear_cka_is_invariant_to_isotropic_scaling_and_orthogonal_maps(seed, scale):
    x, y = random_codes(seed)
    q, _ = jnp.linalg.qr(jax.random.normal(jax.random.key(seed + 1), (5, 5)))
    value = measures.linear_cka(x, y)
    assert 0.0 <= float(value) <= 1.0
    np.testing.assert_allclose(measures.linear_cka(scale * x @ q, y), value, rtol=1e-9)
    np.testing.assert_allclose(measures.linear_cka(y, x), value, rtol=1e-12)
    np.testing.assert_allclose(measures.linear_cka_gram(x, y), value, rtol=1e-9)
    np.testing.assert_allclose(measures.linear_cka(x, x), 1.0, rtol=1e-12)


def test_linear_cka_is_zero_for_exactly_uncorrelated_streams():
    x, y = random_codes(3)
    x_c, y_c = x - x.mean(0), y - y.mean(0)
    y_orth = y_c - x_c @ jnp.linalg.lstsq(x_c, y_c)[0]  # centred cross-covariance exactly 0
    np.testing.assert_allclose(measures.linear_cka(x, y_orth), 0.0, atol=1e-20)


@pytest.mark.parametrize("theta, sigma_s, sigma_r", [(0.2, 1, 2), (0.5, 1, 2), (math.pi / 4, 1, 2), (1.0, 2, 0.5),
                                                     (0.7, 1, 1)])
def test_linear_cka_of_rotated_streams_matches_its_closed_form(theta, sigma_s, sigma_r):
    """theory.md §9.4; on 200k samples the estimator's bias (~ pq/n) and noise are below 0.005."""
    scm = LinearGaussianSCM(betas=np.ones((1, 4)), sigma_s=sigma_s, sigma_r_source=sigma_r)
    data = sample(scm, jax.random.key(5), 200_000)
    z_s, z_r = rotation_encoder(theta, data.s, data.r)
    assert abs(float(measures.linear_cka(z_s, z_r)) - float(cf.rotation_cka(theta, sigma_s, sigma_r))) < 0.005


def test_cka_is_blind_when_sigma_s_equals_sigma_r_but_oracle_leakage_is_not():
    assert float(cf.rotation_cka(0.7, 1.0, 1.0)) == pytest.approx(0.0, abs=1e-15)
    assert float(cf.oracle_leakage(0.7, 1.0, 1.0)) == pytest.approx(0.4150, abs=1e-4)
    assert float(cf.oracle_leakage(0.7, 1.0, 2.0)) == pytest.approx(0.7394, abs=1e-4)
    # With σ_s ≠ 1 (σ_s² in the denominator, not σ_s), against corr² of 200 000 samples (its SE about 0.002).
    draws = jax.random.normal(jax.random.key(4), (2, 200_000))
    semantic, residual = 2.0 * draws[0], 1.0 * draws[1]
    stream = math.cos(0.7) * semantic + math.sin(0.7) * residual
    sample_leakage = float(np.corrcoef(np.asarray(stream), np.asarray(residual))[0, 1] ** 2)
    assert float(cf.oracle_leakage(0.7, 2.0, 1.0)) == pytest.approx(sample_leakage, abs=0.008)


def test_debiased_cka_removes_the_finite_batch_floor():
    """Independent streams, B = 32, widths 64 and 32: linear CKA sits near its floor, debiased CKA near 0."""
    keys = jax.random.split(jax.random.key(7), 2)
    xs = jax.random.normal(keys[0], (60, 32, 64))
    ys = jax.random.normal(keys[1], (60, 32, 32))
    linear = np.asarray(jax.vmap(measures.linear_cka)(xs, ys))
    debiased = np.asarray(jax.vmap(measures.debiased_cka)(xs, ys))
    floor = measures.cka_finite_batch_floor(32, 64, 32)
    assert abs(linear.mean() - floor) < 0.03
    assert abs(debiased.mean()) < 4 * debiased.std(ddof=1) / math.sqrt(len(debiased))
    assert linear.mean() > 0.5 > abs(debiased.mean()) + 0.4


def test_finite_batch_floor_matches_monte_carlo():
    keys = jax.random.split(jax.random.key(8), 2)
    xs, ys = jax.random.normal(keys[0], (400, 64, 8)), jax.random.normal(keys[1], (400, 64, 8))
    values = np.asarray(jax.vmap(measures.linear_cka)(xs, ys))
    se = values.std(ddof=1) / math.sqrt(len(values))
    assert abs(values.mean() - measures.cka_finite_batch_floor(64, 8, 8)) < 4 * se + 0.003  # approx. formula


@pytest.mark.parametrize("name, batch", [(name, batch) for name in ("linear_cka", "linear_cka_gram", "gradient_cosine")
                                         for batch in (1, 6)] + [("debiased_cka", 6)])  # debiased: batch >= 4
def test_degenerate_ratios_are_zero_with_zero_gradients(name, batch):
    """A constant stream (every stream is constant over a batch of one) makes the denominator 0: the value is 0 and
    the gradient 0, not NaN, so one such batch does not end a training run (0·NaN is NaN even at weight 0)."""
    measure = getattr(measures, name)
    x = jax.random.normal(jax.random.key(0), (batch, 3))
    # A CKA's constant stream is any constant; a gradient cosine's degenerate gradient is zero.
    degenerate = jnp.zeros((batch, 3)) if name == "gradient_cosine" else jnp.ones((batch, 2))
    for args in ((x, degenerate), (degenerate, x), (degenerate, degenerate)):
        value, grads = jax.value_and_grad(measure, argnums=(0, 1))(*args)
        assert float(value) == 0.0
        for grad in grads:
            assert np.all(np.isfinite(grad)) and np.all(grad == 0.0), (name, grad)


def test_debiased_cka_needs_four_samples():
    with pytest.raises(ValueError, match="at least 4"):
        measures.debiased_cka(jnp.ones((3, 2)), jnp.ones((3, 2)))


# ------------------------------------------------------------------------------------------------ leakage

@given(st.floats(0.0, math.pi / 2))
def test_leakage_of_the_rotation_encoder_is_abs_sin_theta(theta):
    dim = 3
    residual_block = -math.sin(theta) * jnp.eye(dim)
    np.testing.assert_allclose(measures.leakage_linear(residual_block), abs(math.sin(theta)), atol=1e-12)
    z = jax.random.normal(jax.random.key(0), (16, dim))
    encoder = lambda s, r: rotation_encoder(theta, s, r)[0]
    np.testing.assert_allclose(measures.leakage_jacobian(encoder, z, 2 * z), abs(math.sin(theta)), atol=1e-12)
    np.testing.assert_allclose(cf.rotation_leakage(theta), abs(math.sin(theta)), atol=1e-15)


def test_leakage_of_a_nonlinear_encoder_is_its_largest_residual_slope():
    encoder = lambda s, r: jnp.tanh(s + 0.5 * r)  # slope 0.5 / cosh^2, largest where s + 0.5 r = 0
    z_s = jnp.linspace(-2, 2, 41)[:, None]
    np.testing.assert_allclose(measures.leakage_jacobian(encoder, z_s, jnp.zeros_like(z_s)), 0.5, atol=1e-12)
    np.testing.assert_allclose(measures.leakage_jacobian(encoder, z_s + 3.0, jnp.zeros_like(z_s)),
                               0.5 / math.cosh(1.0) ** 2, rtol=1e-9)  # fewer samples, lower estimate


@given(st.floats(0.0, math.pi / 2 - 1e-3), st.integers(1, 4))
def test_principal_angles_recover_the_rotation_angle(theta, dim):
    c, s = math.cos(theta), math.sin(theta)
    learned_semantic = jnp.concatenate([c * jnp.eye(dim), -s * jnp.eye(dim)], axis=0)  # columns: [2d, d]
    true_semantic = jnp.concatenate([jnp.eye(dim), jnp.zeros((dim, dim))], axis=0)
    np.testing.assert_allclose(measures.principal_angles(learned_semantic, true_semantic), theta, atol=1e-6)


def test_gradient_cosine_on_pytrees():
    a = {"w": jnp.asarray([1.0, 0.0]), "b": jnp.asarray(0.0)}
    b = {"w": jnp.asarray([1.0, 1.0]), "b": jnp.asarray(0.0)}
    assert float(measures.gradient_cosine(a, b)) == pytest.approx(1 / math.sqrt(2))
    assert float(measures.gradient_cosine(a, jax.tree.map(jnp.zeros_like, a))) == 0.0
    assert float(measures.gradient_inner_product(a, b)) == 1.0


# ---------------------------------------------------------------------------------- Theorem 2.4 closed forms

@given(st.floats(0.0, 1.5), scales := st.floats(0.2, 3.0), scales, scales, st.floats(-3, 3), st.floats(0, 1),
       st.integers(1, 4))
def test_theorem_2_4_holds_for_the_absolute_loss(theta, sigma_s, sigma_rs, sigma_rt, beta, noise, dim):
    """|R_T - R_S| <= ||w|| |sin θ| W1 for the absolute loss, any linear head (here the source-optimal one)."""
    scm = LinearGaussianSCM(betas=beta * np.ones((1, dim)) / math.sqrt(dim), sigma_s=sigma_s,
                            sigma_r_source=sigma_rs, sigma_r_target=sigma_rt, noise_std=noise)
    heads = cf.source_optimal_heads(scm, theta) + 0.3  # off-optimal heads are covered too
    gap = cf.absolute_loss_risk(scm, theta, heads, "target") - cf.absolute_loss_risk(scm, theta, heads, "source")
    assert np.all(np.abs(gap) <= cf.leakage_bound(scm, theta, heads) * (1 + 1e-9) + 1e-12)


def test_theorem_2_4_needs_isotropic_residuals_only():
    """The bound's W1 is between the residual distributions: any semantic covariance will do, while a
    non-isotropic residual covariance (whose W1 has no closed form here) is refused."""
    semantic = np.array([[2.0, 0.5], [0.5, 1.0]])
    scm = LinearGaussianSCM(betas=[[1.0, -0.5]], sigma_s=semantic, sigma_r_source=0.7, sigma_r_target=1.9)
    heads = cf.source_optimal_heads(scm, 0.6)
    gap = cf.absolute_loss_risk(scm, 0.6, heads, "target") - cf.absolute_loss_risk(scm, 0.6, heads, "source")
    bound = cf.leakage_bound(scm, 0.6, heads)
    assert not scm.is_isotropic and 0 < float(gap[0]) <= float(bound[0])
    residual = LinearGaussianSCM(betas=[[1.0, -0.5]], sigma_r_source=np.diag([0.5, 1.0]), sigma_r_target=1.9)
    with pytest.raises(ValueError, match="leakage_bound needs isotropic residual covariances"):
        cf.leakage_bound(residual, 0.6, heads)


def test_theorem_2_4_reference_values():
    # theory.md §9.3, first row: theta = 0.3, sigma_s = 1, sigma_r 1 -> 2, beta 1.5, noise 0.5.
    scm = LinearGaussianSCM(betas=[[1.5]], sigma_s=1, sigma_r_source=1, sigma_r_target=2, noise_std=0.5)
    heads = cf.source_optimal_heads(scm, 0.3)
    gap = cf.absolute_loss_risk(scm, 0.3, heads, "target") - cf.absolute_loss_risk(scm, 0.3, heads, "source")
    assert float(gap[0]) == pytest.approx(0.2585, abs=1e-4)
    assert float(cf.leakage_bound(scm, 0.3, heads)[0]) == pytest.approx(0.3379, abs=1e-4)


def test_the_unbiased_hsic_is_the_u_statistic_over_distinct_quadruples():
    """Song et al.'s estimator equals, exactly, the U-statistic of h(i, j, q, r) = k_ij l_ij + k_ij l_qr − 2 k_ij l_iq
    averaged over every ordered quadruple of distinct indices (n = 7: 840 of them), computed here by brute force."""
    import itertools

    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(7, 3)), rng.normal(size=(7, 2)) + rng.normal(size=(7, 1))
    k, l = x @ x.T, y @ y.T
    quadruples = list(itertools.permutations(range(7), 4))
    brute = np.mean([k[i, j] * l[i, j] + k[i, j] * l[q, r] - 2 * k[i, j] * l[i, q] for i, j, q, r in quadruples])
    np.testing.assert_allclose(float(measures._unbiased_hsic(jnp.asarray(k), jnp.asarray(l))), brute, rtol=1e-10)


def test_cka_takes_vectors_as_one_feature_and_refuses_batches_that_differ():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=20), rng.normal(size=(20, 3))
    for cka in (measures.linear_cka, measures.linear_cka_gram, measures.debiased_cka):
        np.testing.assert_allclose(cka(x, y), cka(x[:, None], y), rtol=1e-12)
        with pytest.raises(ValueError, match=r"needs codes \[B, p\] and \[B, q\] of the same batch B; got shapes "
                                             r"\(20, 1\) and \(19, 3\)"):
            cka(x, y[:19])


def test_finite_batch_floor_with_unequal_widths_matches_monte_carlo():
    """cka_finite_batch_floor's √(pq)/√((B+p)(B+q)) with p ≠ q (theory.md §9.4's table: B = 32, p = 1024, q = 64,
    mc 0.8047, approx 0.8040), against linear CKA of 40 pairs of independent Gaussian batches computed here in numpy.
    The existing test has p = q, where √(pq)/(B + √(pq)) gives the same number; at these widths that form gives 0.889.
    The sample SE is about 0.002; allowed: 4 SE plus the approximation's 0.003."""
    rng = np.random.default_rng(11)
    values = []
    for _ in range(40):
        x, y = rng.standard_normal((32, 1024)), rng.standard_normal((32, 64))
        x, y = x - x.mean(0), y - y.mean(0)
        values.append(np.sum((x.T @ y) ** 2) / np.sqrt(np.sum((x.T @ x) ** 2) * np.sum((y.T @ y) ** 2)))
    se = np.std(values, ddof=1) / math.sqrt(len(values))
    assert se < 0.01
    assert abs(np.mean(values) - measures.cka_finite_batch_floor(32, 1024, 64)) < 4 * se + 0.003
    assert measures.cka_finite_batch_floor(32, 1024, 64) == pytest.approx(0.8040, abs=1e-4)


def test_linear_leakage_is_the_largest_singular_value_of_any_residual_block():
    """κ of Eq (8) for a linear encoder is the operator (spectral) norm of the block A_r that reads the residual. The
    existing test uses A_r = −sin θ I, whose 1-norm, ∞-norm and spectral norm coincide; a dense, non-symmetric block
    tells them apart. Reference: numpy's SVD."""
    block = np.random.default_rng(4).standard_normal((3, 5))
    np.testing.assert_allclose(measures.leakage_linear(jnp.asarray(block)), np.linalg.svd(block, compute_uv=False)[0],
                               rtol=1e-12)


def test_sliced_w1_of_a_scale_change_is_the_one_dimensional_w1_of_every_projection():
    """N(0, I_4) against N(0, 4 I_4): every unit projection is N(0, 1) against N(0, 4), whose W₁ is
    |2 − 1| E|Z| = √(2/π) = 0.798 (sliced W₂ would be 1). Plug-in on 20 000 points per side: its upward bias and
    noise are below 0.02 here; allowed 0.05."""
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((20_000, 4)), 2.0 * rng.standard_normal((20_000, 4))
    assert measures.sliced_w1(x, y, num_projections=50) == pytest.approx(math.sqrt(2 / math.pi), abs=0.05)


def test_jacobian_leakage_of_a_dense_linear_encoder_is_the_spectral_norm_of_its_residual_block():
    """leakage_jacobian on φ_s(z_s, z_r) = A_s z_s + A_r z_r: every Jacobian is A_r, so the estimate is its largest
    singular value (numpy's SVD). The existing cases are −sin θ·I and a 1 × 1 slope, where the 1-, ∞- and spectral
    norms coincide; a dense 3 × 4 block tells them apart."""
    rng = np.random.default_rng(6)
    block_s, block_r = jnp.asarray(rng.standard_normal((3, 2))), jnp.asarray(rng.standard_normal((3, 4)))
    encoder = lambda s, r: block_s @ s + block_r @ r  # noqa: E731
    z_s, z_r = jnp.asarray(rng.standard_normal((5, 2))), jnp.asarray(rng.standard_normal((5, 4)))
    np.testing.assert_allclose(measures.leakage_jacobian(encoder, z_s, z_r),
                               np.linalg.svd(np.asarray(block_r), compute_uv=False)[0], rtol=1e-12)


def test_debiased_cka_at_its_smallest_batch_and_w1_of_a_point_mass():
    """Two documented edges. Debiased CKA takes any batch B >= 4 (its docstring; n(n − 3) > 0 from n = 4): at B = 4
    it is finite and 1 for identical streams. A standard deviation may be 0 (W₁'s checks allow >= 0): a point mass at
    0 against N(0, 1) is E|Z| = √(2/π) in one and in three dimensions √2 Γ(2)/Γ(3/2) = E‖Z₃‖ (hand computation),
    while a negative scale is refused."""
    x = jnp.asarray(np.random.default_rng(8).standard_normal((4, 2)))
    np.testing.assert_allclose(measures.debiased_cka(x, x), 1.0, rtol=1e-12)
    assert cf.w1_gaussian_1d(0.0, 0.0, 0.0, 1.0) == pytest.approx(math.sqrt(2 / math.pi), rel=1e-12)
    assert cf.w1_isotropic_gaussians(np.zeros(3), 0.0, np.zeros(3), 1.0) == pytest.approx(
        math.sqrt(2) / math.gamma(1.5), rel=1e-12)
    with pytest.raises(ValueError, match="std_1 must be a finite standard deviation >= 0"):
        cf.w1_gaussian_1d(0.0, -1.0, 0.0, 1.0)
