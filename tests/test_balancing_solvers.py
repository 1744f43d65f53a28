"""Solver-based balancing methods (Nash-MTL, FairGrad, UPGrad, IMTL, Aligned-MTL): each paper's defining property,
checked against an independent reference (scipy, or numpy written from the paper) on random Jacobians.

The generic contract (jit, vmap, Gram path, degenerate inputs) is checked for every method by test_balancing.py.
Shapes are drawn from a short list so that each compiled step is reused across examples.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import scipy.optimize
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from test_balancing import KEY, jitted_step, run
from theory.balancing import make
from theory.balancing.imtl import imtl_g_weights
from theory.balancing.upgrad import box_qp, box_qps

SHAPES = [(2, 3), (3, 4), (3, 6), (4, 6)]            # (K, P), K <= P: generically full row rank
SINGULAR_SHAPES = [(3, 2), (4, 3)]                   # K > P: G is singular
SOLVER_METHODS = ["nash_mtl", "fairgrad", "upgrad", "imtl_g", "imtl", "aligned_mtl"]
EXAMPLES = settings(max_examples=25, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])


def jacobians_of(shapes):
    return st.sampled_from(shapes).flatmap(
        lambda shape: hnp.arrays(np.float64, shape, elements=st.floats(-5, 5, width=64)))


def well_conditioned(jacobian, max_condition=1e3):
    """Full row rank with cond(J) bounded, so that the exact conditions are solvable and the references accurate
    (and G = JJ' neither underflows nor overflows: hypothesis likes entries such as 1e-195)."""
    singular_values = np.linalg.svd(jacobian, compute_uv=False)
    return 1e-100 < singular_values[-1] and singular_values[0] / singular_values[-1] < max_condition


def gram_of(jacobian):
    return np.asarray(jacobian) @ np.asarray(jacobian).T


def step_with_state(name, jacobian, losses, state, **options):
    balancer, step = jitted_step(name, **options)
    return step(jnp.asarray(jacobian), jnp.asarray(losses), state, KEY)


# ---------------------------------------------------------------- every solver method

@pytest.mark.parametrize("name", SOLVER_METHODS)
def test_permuting_tasks_permutes_weights(name):
    jacobian = jax.random.normal(jax.random.key(3), (4, 6), dtype=jnp.float64)
    losses = jnp.asarray([0.3, 1.0, 2.0, 0.7])
    permutation = jnp.asarray([2, 0, 3, 1])
    balancer = make(name)
    state = balancer.init(4)
    _, weights, state_a = step_with_state(name, jacobian, losses, state)
    _, permuted, state_b = step_with_state(name, jacobian[permutation], losses[permutation], state)
    np.testing.assert_allclose(permuted, weights[permutation], rtol=1e-7, atol=1e-10)
    if name == "imtl":  # and the second step, from permuted loss scales
        _, weights, _ = step_with_state(name, jacobian, losses, state_a)
        _, permuted, _ = step_with_state(name, jacobian[permutation], losses[permutation], state_b)
        np.testing.assert_allclose(permuted, weights[permutation], rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("name", SOLVER_METHODS)
def test_float32_in_float32_out(name):
    jacobian = jax.random.normal(jax.random.key(4), (3, 5), dtype=jnp.float32)
    balancer = make(name)
    direction, weights, _ = jax.jit(balancer.step)(jacobian, jnp.ones(3, jnp.float32), balancer.init(3), KEY)
    assert direction.dtype == jnp.float32 and weights.dtype == jnp.float32
    np.testing.assert_allclose(direction, weights @ jacobian, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name, options, message", [
    ("nash_mtl", {"max_norm": -1.0}, "max_norm must be a finite number >= 0"),
    ("nash_mtl", {"update_weights_every": 0}, "update_weights_every must be an integer >= 1"),
    ("nash_mtl", {"optim_niter": 2.5}, "optim_niter must be an integer >= 1"),
    ("nash_mtl", {"ridge": 0.0}, "ridge must be a finite number > 0"),
    ("fairgrad", {"alpha": 0.0}, "alpha must be a finite number > 0"),
    ("fairgrad", {"tolerance": float("nan")}, "tolerance must be a finite number > 0"),
    ("upgrad", {"reg_eps": 0.0}, "reg_eps must be a finite number > 0"),
    ("upgrad", {"norm_eps": -1e-4}, "norm_eps must be a finite number >= 0"),
    ("upgrad", {"max_iterations": 0}, "max_iterations must be an integer >= 1"),
    ("imtl", {"scale_learning_rate": -0.1}, "scale_learning_rate must be a finite number >= 0"),
    ("aligned_mtl", {"eigenvalue_rtol": float("inf")}, "eigenvalue_rtol must be a finite number > 0"),
])
def test_options_are_validated(name, options, message):
    with pytest.raises(ValueError, match=message):
        make(name, **options)


# ---------------------------------------------------------------- Nash-MTL

def nash_reference(normalised_gram):
    """Independent reference: L-BFGS-B on f(a) = a'Ga/2 - sum log a over a > 0."""
    k = normalised_gram.shape[0]
    result = scipy.optimize.minimize(
        lambda a: 0.5 * a @ normalised_gram @ a - np.sum(np.log(a)), np.ones(k),
        jac=lambda a: normalised_gram @ a - 1 / a, method="L-BFGS-B", bounds=[(1e-9, None)] * k,
        options={"ftol": 1e-15, "gtol": 1e-11, "maxiter": 10_000})
    return result.x


@EXAMPLES
@given(jacobians_of(SHAPES))
def test_nash_mtl_weights_solve_the_bargaining_condition(jacobian):
    assume(well_conditioned(jacobian))
    _, weights, state = run("nash_mtl", jacobian, max_norm=0.0)
    gram = gram_of(jacobian)
    normalised = gram / np.linalg.norm(gram)            # LibMTL's normalisation: Frobenius norm of G
    alpha = np.asarray(weights)
    residual = np.linalg.norm(normalised @ alpha - 1 / alpha) / np.linalg.norm(1 / alpha)
    assert bool(state.converged) and residual <= 1e-6
    np.testing.assert_allclose(alpha, nash_reference(normalised), rtol=1e-4)


@EXAMPLES
@given(jacobians_of(SHAPES), st.lists(st.floats(0.1, 10.0), min_size=4, max_size=4))
def test_nash_mtl_direction_keeps_its_orientation_when_a_task_is_rescaled(jacobian, scales):
    """Navon et al.: the bargaining solution is invariant to each task's scale; with G/||G||_F only the direction's
    length changes, by sqrt(||G'||_F / ||G||_F)."""
    assume(well_conditioned(jacobian))
    scales = np.asarray(scales[: jacobian.shape[0]])
    direction, _, _ = run("nash_mtl", jacobian, max_norm=0.0)
    scaled, _, _ = run("nash_mtl", scales[:, None] * jacobian, max_norm=0.0)
    factor = np.sqrt(np.linalg.norm(gram_of(scales[:, None] * jacobian)) / np.linalg.norm(gram_of(jacobian)))
    np.testing.assert_allclose(scaled, factor * np.asarray(direction), rtol=1e-5,
                               atol=1e-5 * np.linalg.norm(scaled))  # the solve stops at residual 1e-6


def test_nash_mtl_clips_the_direction_to_max_norm():
    jacobian = jax.random.normal(jax.random.key(7), (3, 5), dtype=jnp.float64) * 10
    free, alpha, _ = run("nash_mtl", jacobian, max_norm=0.0)
    clipped, weights, state = run("nash_mtl", jacobian, max_norm=1.0)
    assert float(jnp.linalg.norm(free)) > 1.0
    np.testing.assert_allclose(jnp.linalg.norm(clipped), 1.0, rtol=1e-12)
    np.testing.assert_allclose(weights, alpha / jnp.linalg.norm(free), rtol=1e-12)
    np.testing.assert_allclose(state.alpha, alpha, rtol=1e-12)   # the state keeps the unclipped weights
    small = jacobian / 1000                                      # below the bound: no clip
    np.testing.assert_allclose(run("nash_mtl", small, max_norm=1.0)[1], run("nash_mtl", small, max_norm=0.0)[1])


def test_nash_mtl_update_weights_every_reuses_the_stored_weights():
    first = jax.random.normal(jax.random.key(8), (3, 5), dtype=jnp.float64)
    second = jax.random.normal(jax.random.key(9), (3, 5), dtype=jnp.float64)
    balancer = make("nash_mtl", update_weights_every=2, max_norm=0.0)
    state = balancer.init(3)
    _, w0, state = step_with_state("nash_mtl", first, jnp.ones(3), state, update_weights_every=2, max_norm=0.0)
    _, w1, state = step_with_state("nash_mtl", second, jnp.ones(3), state, update_weights_every=2, max_norm=0.0)
    _, w2, state = step_with_state("nash_mtl", second, jnp.ones(3), state, update_weights_every=2, max_norm=0.0)
    np.testing.assert_array_equal(w1, w0)                               # step 1 reuses step 0's weights
    np.testing.assert_allclose(w2, run("nash_mtl", second, max_norm=0.0)[1], rtol=1e-12)   # step 2 solves again
    assert int(state.count) == 3


def test_nash_mtl_clips_reused_weights_against_the_current_gradients():
    """Between solves the stored alpha is reused and clipped against this step's gradients (the docstring; LibMTL
    clips every step's gradient): the direction of a reusing step has norm max_norm too, and its weights are the
    stored alpha scaled by max_norm / ||alpha J||."""
    first = jax.random.normal(jax.random.key(8), (3, 5), dtype=jnp.float64) * 10
    second = jax.random.normal(jax.random.key(9), (3, 5), dtype=jnp.float64) * 10
    state = make("nash_mtl", update_weights_every=2).init(3)
    _, _, state = step_with_state("nash_mtl", first, jnp.ones(3), state, update_weights_every=2)
    direction, weights, state = step_with_state("nash_mtl", second, jnp.ones(3), state, update_weights_every=2)
    np.testing.assert_allclose(jnp.linalg.norm(direction), 1.0, rtol=1e-12)
    np.testing.assert_allclose(weights, state.alpha / jnp.linalg.norm(state.alpha @ second), rtol=1e-12)


def test_nash_mtl_reports_when_the_condition_has_no_solution():
    """Opposite gradients: G a = 1/a has no solution (G (1,1) = 0); the ridged solution is finite, and reported."""
    g = jnp.asarray([1.0, -2.0, 0.5])
    direction, weights, state = run("nash_mtl", jnp.stack([g, -g]))
    assert jnp.all(jnp.isfinite(weights)) and not bool(state.converged)
    np.testing.assert_allclose(state.residual, 1.0, rtol=1e-6)      # G a = 0: nothing of 1/a is matched
    np.testing.assert_allclose(direction, 0.0, atol=1e-6)
    _, _, solvable = run("nash_mtl", jnp.stack([g, jnp.asarray([0.0, 1.0, 4.0])]))
    assert bool(solvable.converged) and float(solvable.residual) < 1e-6


def test_nash_mtl_gives_a_zero_gradient_the_weight_the_ridge_sets():
    """A zero gradient has a zero row and column in G, so its coordinate of (G^ + ridge I) a = 1/a reads
    ridge a_z = 1/a_z: a_z = ridge^(-1/2) exactly, whatever the other tasks (the docstring's 'about ridge^(-1/2)'),
    while they solve their own condition. ridge = 1e-6 gives 1000; the solve stops at a ridged residual of 1e-6,
    hence rtol 1e-5. The exact condition has no solution, which the state reports."""
    jacobian = np.asarray([[1.0, 0.5, -0.2], [0.0, 0.0, 0.0], [-0.3, 1.0, 0.4]])
    _, weights, state = run("nash_mtl", jacobian, max_norm=0.0, ridge=1e-6)
    np.testing.assert_allclose(weights[1], 1e3, rtol=1e-5)
    rest = gram_of(jacobian[[0, 2]]) / np.linalg.norm(gram_of(jacobian))
    np.testing.assert_allclose(np.asarray(weights)[[0, 2]], nash_reference(rest + 1e-6 * np.eye(2)), rtol=1e-4)
    assert not bool(state.converged)


def test_nash_mtl_and_fairgrad_pass_their_iteration_budget_on():
    """optim_niter (Nash-MTL) and max_iterations (FairGrad) bound the Newton iterations that the state reports: here
    the default budgets stop at the tolerance after 4 iterations, and a budget of one leaves the residual at 0.18."""
    jacobian = np.asarray([[1.0, 0.2, -0.4, 0.0], [-0.8, 1.1, 0.1, 0.5], [0.3, -0.9, 0.7, -0.2]])
    for name, budget in (("nash_mtl", "optim_niter"), ("fairgrad", "max_iterations")):
        _, _, state = run(name, jacobian, **{budget: 1})
        assert int(state.iterations) == 1 and not bool(state.converged) and float(state.residual) > 0.1, name

# ---------------------------------------------------------------- FairGrad


def fairgrad_reference(gram, alpha):
    """LibMTL's own solver: scipy least_squares on G w - w^(-1/alpha), w >= 0, from 1/K (tolerances tightened)."""
    k = gram.shape[0]
    result = scipy.optimize.least_squares(lambda w: gram @ w - w ** (-1 / alpha), np.ones(k) / k,
                                          bounds=(0, np.inf), xtol=1e-15, ftol=1e-15, gtol=1e-15, max_nfev=10_000)
    return result.x


@EXAMPLES
@given(jacobians_of(SHAPES), st.sampled_from([1.0, 0.5, 2.0]))
def test_fairgrad_weights_solve_the_alpha_fair_condition(jacobian, alpha):
    assume(well_conditioned(jacobian) and np.linalg.norm(jacobian) > 1e-3)   # scipy's tolerances are absolute
    _, weights, state = run("fairgrad", jacobian, alpha=alpha)
    gram, w = gram_of(jacobian), np.asarray(weights)
    target = w ** (-1 / alpha)
    assert bool(state.converged) and np.linalg.norm(gram @ w - target) <= 1e-6 * np.linalg.norm(target)
    np.testing.assert_allclose(w, fairgrad_reference(gram, alpha), rtol=1e-4)


@EXAMPLES
@given(jacobians_of(SHAPES), st.sampled_from([1.0, 0.5, 2.0]), st.floats(0.1, 10.0))
def test_fairgrad_direction_scales_as_the_paper_says(jacobian, alpha, scale):
    """G -> c^2 G gives w -> c^(-2 alpha/(1+alpha)) w, so d -> c^((1-alpha)/(1+alpha)) d."""
    assume(well_conditioned(jacobian))
    direction, _, _ = run("fairgrad", jacobian, alpha=alpha)
    scaled, _, _ = run("fairgrad", scale * jacobian, alpha=alpha)
    np.testing.assert_allclose(scaled, scale ** ((1 - alpha) / (1 + alpha)) * np.asarray(direction), rtol=1e-5,
                               atol=1e-5 * np.linalg.norm(scaled))  # the solve stops at residual 1e-6


def test_fairgrad_with_alpha_1_is_nash_mtl_on_the_raw_gram_matrix():
    jacobian = jax.random.normal(jax.random.key(10), (4, 6), dtype=jnp.float64) * 3
    _, fair, _ = run("fairgrad", jacobian, alpha=1.0)
    _, nash, _ = run("nash_mtl", jacobian, max_norm=0.0)
    frobenius = np.linalg.norm(gram_of(jacobian))
    np.testing.assert_allclose(fair, np.asarray(nash) / np.sqrt(frobenius), rtol=1e-7)
    # alpha = 1: rescaling one task's loss leaves the direction unchanged.
    scales = jnp.asarray([1.0, 5.0, 0.2, 1.0])
    np.testing.assert_allclose(run("fairgrad", scales[:, None] * jacobian)[0], run("fairgrad", jacobian)[0],
                               rtol=1e-6)


# ---------------------------------------------------------------- UPGrad

def box_qp_reference(regularised, lower):
    """Independent reference: min v'Av s.t. v >= u as NNLS: A = LL', v = u + z, min_{z>=0} ||L'z + L'u||."""
    factor = scipy.linalg.cholesky(regularised, lower=True).T          # A = factor' factor
    z, _ = scipy.optimize.nnls(factor, -factor @ lower, maxiter=50 * len(lower))
    return lower + z


all_box_qps = jax.jit(jax.vmap(box_qp, in_axes=(None, 0)))


@EXAMPLES
@given(jacobians_of(SHAPES + SINGULAR_SHAPES))
def test_upgrad_qp_solutions_match_scipy_and_the_weights_are_their_mean(jacobian):
    gram = gram_of(jacobian)
    assume(np.trace(gram) >= 1e-4)                      # below it, torchjd's norm_eps threshold applies
    _, weights, state = run("upgrad", jacobian)
    # torchjd's normalisation, written out: G / tr(G) (tr(G) = ||J||_F^2) plus reg_eps I, both 1e-4 by default.
    regularised = gram / np.trace(gram) + 1e-4 * np.eye(len(gram))
    reference = np.stack([box_qp_reference(regularised, e) for e in np.eye(len(gram))])
    ours = all_box_qps(jnp.asarray(regularised), jnp.eye(len(gram))).weights
    np.testing.assert_allclose(ours, reference, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(weights, reference.mean(axis=0), rtol=1e-6, atol=1e-8)
    assert bool(state.converged)


@EXAMPLES
@given(jacobians_of(SHAPES + SINGULAR_SHAPES))
def test_upgrad_direction_does_not_conflict_with_any_task(jacobian):
    """J d >= 0 up to the regularisation's known slack: J d >= -reg_eps tr(G) w (see the docstring)."""
    gram = gram_of(jacobian)
    assume(np.trace(gram) >= 1e-4)
    direction, weights, _ = run("upgrad", jacobian)
    slack = 1e-4 * np.trace(gram) * np.asarray(weights) + 1e-9 * np.trace(gram)
    assert np.all(np.asarray(weights) >= 0)
    assert np.all(jacobian @ np.asarray(direction) >= -slack)


@EXAMPLES
@given(jacobians_of(SHAPES), st.lists(st.floats(0.1, 10.0), min_size=8, max_size=8), st.floats(0.1, 2.0))
def test_upgrad_is_linear_under_task_scaling(jacobian, scales, mix):
    """torchjd's property: A(diag(a c1 + b c2) J) = a A(diag(c1) J) + b A(diag(c2) J), exact as reg_eps -> 0
    (the ridge reg_eps tr(G) I moves each projection by about reg_eps cond(G) relative: the tolerance)."""
    assume(well_conditioned(jacobian))
    k = jacobian.shape[0]
    c1, c2 = np.asarray(scales[:k]), np.asarray(scales[4:4 + k])
    reg_eps = 1e-12
    aggregate = lambda c: np.asarray(run("upgrad", c[:, None] * jacobian, reg_eps=reg_eps, norm_eps=0.0)[0])
    combined = aggregate(mix * c1 + c2)
    worst = max(np.linalg.cond(gram_of(c[:, None] * jacobian)) for c in (c1, c2, mix * c1 + c2))
    tolerance = 1e-7 + 10 * reg_eps * worst
    np.testing.assert_allclose(combined, mix * aggregate(c1) + aggregate(c2), rtol=tolerance,
                               atol=tolerance * np.linalg.norm(combined))


def test_upgrad_is_the_mean_gradient_when_nothing_conflicts():
    jacobian = jnp.asarray([[1.0, 0.0, 0.5], [0.5, 1.0, 0.0], [0.0, 0.2, 1.0]])   # all pairwise products >= 0
    direction, weights, _ = run("upgrad", jacobian)
    np.testing.assert_allclose(weights, 1 / 3, rtol=1e-12)
    conflicting = jnp.asarray([[1.0, 0.0], [-1.0, 1.0]])
    direction, _, _ = run("upgrad", conflicting, reg_eps=1e-12)
    # Projections onto the dual cone {d : d1 >= 0, d2 >= d1}: g1 -> (1/2, 1/2), g2 -> (0, 1); d is their mean.
    np.testing.assert_allclose(direction, [0.25, 0.75], atol=1e-9)


def test_upgrad_is_the_plain_mean_below_norm_eps():
    """torchjd's quirk, kept and documented: when tr(G) < norm_eps (absolute), G~ = reg_eps I, so every v_t = e_t
    and the weights are 1/K although the gradients conflict; norm_eps = 0 projects them (the conflicting case of the
    test above, scaled by 1e-3: tr(G) = 3e-6)."""
    conflicting = 1e-3 * jnp.asarray([[1.0, 0.0], [-1.0, 1.0]])
    direction, weights, _ = run("upgrad", conflicting, reg_eps=1e-12)
    np.testing.assert_allclose(weights, 0.5, rtol=1e-12)
    direction, _, _ = run("upgrad", conflicting, reg_eps=1e-12, norm_eps=0.0)
    np.testing.assert_allclose(direction, [0.25e-3, 0.75e-3], rtol=1e-8)


def test_upgrad_normalises_when_the_trace_equals_norm_eps():
    """The threshold is strict, as torchjd's (G/tr(G) is replaced by 0 only when tr(G) < norm_eps): at tr(G) =
    norm_eps exactly (0.75 + 0.25 = 1, exact in floating point) the conflicting gradients are still projected, as with
    no threshold, and not simply averaged (weights 1/2)."""
    conflicting = jnp.asarray([[0.5, 0.5, 0.5], [-0.5, 0.0, 0.0]])
    _, weights, _ = run("upgrad", conflicting, norm_eps=1.0)
    np.testing.assert_allclose(weights, run("upgrad", conflicting, norm_eps=0.0)[1], rtol=1e-12)
    assert abs(float(weights[0]) - 0.5) > 0.1


def ill_conditioned(rng, size, condition):
    """A random symmetric positive definite matrix with eigenvalues spread geometrically from 1 to 1/condition."""
    basis, _ = np.linalg.qr(rng.standard_normal((size, size)))
    matrix = (basis * np.geomspace(1.0, 1.0 / condition, size)) @ basis.T
    return (matrix + matrix.T) / 2


@pytest.mark.parametrize("size", [5, 12, 40])
@pytest.mark.parametrize("condition", [1e2, 1e5, 1e8])
def test_box_qps_match_scipy_on_ill_conditioned_matrices(size, condition):
    """All programs at once (UPGrad's v >= e_i and random lower bounds of both signs) against scipy's NNLS, to the
    accuracy the conditioning allows both solvers; one program at a time (box_qp, vmapped) gives the same answer.
    The KKT residual is that of the final refinement step, a few ulps of the O(1) terms of Az + q (<= 5.6e-16
    measured); 1e-14 leaves a margin of 20, while the rounding the pivots accumulate without that step reaches 1e-12
    at condition 1e8 (1e-14 at 1e5)."""
    rng = np.random.default_rng(size)
    matrix = ill_conditioned(rng, size, condition)
    lowers = np.concatenate([np.eye(size), rng.standard_normal((size, size))])
    reference = np.stack([box_qp_reference(matrix, lower) for lower in lowers])
    solution = jax.jit(box_qps)(jnp.asarray(matrix), jnp.asarray(lowers))
    atol = 1e-14 * condition * np.abs(reference).max()
    np.testing.assert_allclose(solution.weights, reference, rtol=0, atol=atol)
    assert np.all(np.asarray(solution.kkt_residual) <= 1e-14)
    assert np.all(np.asarray(solution.iterations) < 100)
    np.testing.assert_allclose(all_box_qps(jnp.asarray(matrix), jnp.asarray(lowers)).weights, solution.weights,
                               rtol=0, atol=atol)


def test_upgrad_reports_an_exhausted_iteration_budget():
    jacobian = jax.random.normal(jax.random.key(11), (12, 20), dtype=jnp.float64)
    _, _, state = run("upgrad", jacobian, max_iterations=2)
    assert not bool(state.converged) and int(state.iterations) == 2 and float(state.kkt_residual) > 1e-6
    _, _, state = run("upgrad", jacobian)
    assert bool(state.converged) and 2 < int(state.iterations) < 100


def test_upgrad_in_float32_with_40_tasks():
    """The benchmark's precision and size: the solver converges to its float32 floor (64 machine epsilons on the
    partial derivatives, which bounds the agreement with float64), and the direction does not conflict."""
    jacobian = jax.random.normal(jax.random.key(12), (40, 300), dtype=jnp.float64)
    jacobian = jacobian * jnp.exp(jax.random.normal(jax.random.key(13), (40, 1), dtype=jnp.float64))
    balancer = make("upgrad")
    _, exact, _ = run("upgrad", jacobian)
    direction, weights, state = jax.jit(balancer.step)(jacobian.astype(jnp.float32), jnp.ones(40, jnp.float32),
                                                       balancer.init(40), KEY)
    assert weights.dtype == jnp.float32 and bool(state.converged)
    np.testing.assert_allclose(weights, exact, rtol=0, atol=0.05 * float(jnp.max(exact)))
    # J d >= -reg_eps tr(G) w (see test_upgrad_direction_does_not_conflict_with_any_task), up to float32 rounding;
    # the mean gradient conflicts here, so this is not vacuous.
    jacobian, direction = np.asarray(jacobian), np.asarray(direction, np.float64)
    rounding = 1e-3 * np.linalg.norm(jacobian, axis=1) * np.linalg.norm(direction)
    slack = 1e-4 * np.trace(gram_of(jacobian)) * np.asarray(weights, np.float64) + rounding
    assert np.all(jacobian @ direction >= -slack)
    assert np.min(jacobian @ jacobian.mean(axis=0)) < -np.max(slack)


# ---------------------------------------------------------------- IMTL

def imtl_g_reference(jacobian):
    """The paper's closed form as LibMTL codes it (anchored on task 1), in numpy."""
    grads = np.asarray(jacobian)
    units = grads / np.linalg.norm(grads, axis=1, keepdims=True)
    d_matrix, u_matrix = grads[0] - grads[1:], units[0] - units[1:]
    alpha = grads[0] @ u_matrix.T @ np.linalg.inv(d_matrix @ u_matrix.T)
    return np.concatenate([[1 - alpha.sum()], alpha])


@EXAMPLES
@given(jacobians_of(SHAPES))
def test_imtl_g_projections_on_the_unit_gradients_are_equal(jacobian):
    assume(well_conditioned(jacobian, 1e2))
    direction, weights, _ = run("imtl_g", jacobian)
    units = jacobian / np.linalg.norm(jacobian, axis=1, keepdims=True)
    projections = units @ np.asarray(direction)
    np.testing.assert_allclose(projections, projections.mean(), rtol=1e-8, atol=1e-10 * np.linalg.norm(direction))
    np.testing.assert_allclose(np.sum(weights), 1.0, rtol=1e-10)
    np.testing.assert_allclose(weights, imtl_g_reference(jacobian), rtol=1e-6, atol=1e-9)


def test_imtl_g_divides_by_a_negative_sum_of_g_inverse_n():
    """1'G^-1 n can be negative from three tasks on (for two it is (n1 + n2)(n1 n2 - g1'g2) / det G >= 0; about 3% of
    random 3-task Jacobians, which the examples above rarely draw): the weights are then G^-1 n divided by that
    negative sum, as in the paper's closed form, not zeros (only a zero sum is degenerate; here G^-1 n =
    (-5.2, 0.41, 0.76))."""
    jacobian = np.asarray([[-0.03, 0.13, 0.02, -0.11], [0.8, 2.89, 2.1, -1.56], [-0.77, -0.38, 0.03, -1.42]])
    v = np.linalg.solve(gram_of(jacobian), np.linalg.norm(jacobian, axis=1))
    assert v.sum() < -1.0
    _, weights, _ = run("imtl_g", jacobian)
    np.testing.assert_allclose(weights, v / v.sum(), rtol=1e-8)
    np.testing.assert_allclose(weights, imtl_g_reference(jacobian), rtol=1e-8)


@EXAMPLES
@given(jacobians_of(SHAPES), st.lists(st.floats(0.1, 10.0), min_size=4, max_size=4))
def test_imtl_g_direction_changes_by_a_known_factor_when_a_task_is_rescaled(jacobian, scales):
    """Unit gradients do not see the scales c, so d(CJ) is parallel to d(J): with v = G^-1 n, the normalisation
    sum(alpha) = 1 gives d(CJ) = [sum(v) / sum(v / c)] d(J); the factor can be negative (the paper's constraint
    fixes the sum of the weights, not the sign of the common projection)."""
    assume(well_conditioned(jacobian, 1e2))
    scales = np.asarray(scales[: jacobian.shape[0]])
    direction = np.asarray(run("imtl_g", jacobian)[0])
    scaled = np.asarray(run("imtl_g", scales[:, None] * jacobian)[0])
    v = np.linalg.solve(gram_of(jacobian), np.linalg.norm(jacobian, axis=1))
    assume(abs(v.sum()) > 1e-6 * np.abs(v).sum() and abs((v / scales).sum()) > 1e-6 * np.abs(v / scales).sum())
    factor = v.sum() / (v / scales).sum()
    np.testing.assert_allclose(scaled, factor * direction, rtol=1e-6, atol=1e-9 * np.linalg.norm(scaled))


def test_imtl_scales_the_losses_and_takes_a_gradient_step_on_the_scales():
    jacobian = jax.random.normal(jax.random.key(11), (3, 5), dtype=jnp.float64)
    losses = jnp.asarray([0.5, 2.0, 0.0])
    state = make("imtl", scale_learning_rate=0.1).init(3)
    _, weights, state = step_with_state("imtl", jacobian, losses, state, scale_learning_rate=0.1)
    np.testing.assert_allclose(weights, run("imtl_g", jacobian)[1], rtol=1e-12)         # s = 0 at the start
    np.testing.assert_allclose(state.log_scales, -0.1 * (np.asarray(losses) - 1.0), rtol=1e-12)
    # Second step: IMTL-G on the gradients e^s g of the scaled losses, expressed on the raw gradients.
    scales = np.exp(np.asarray(state.log_scales))
    direction, weights, new_state = step_with_state("imtl", jacobian, losses, state, scale_learning_rate=0.1)
    scaled_weights = np.asarray(run("imtl_g", scales[:, None] * np.asarray(jacobian))[1])
    np.testing.assert_allclose(weights, scaled_weights * scales, rtol=1e-10)
    np.testing.assert_allclose(new_state.log_scales,
                               np.log(scales) - 0.1 * (scales * np.asarray(losses) - 1.0), rtol=1e-12)


def test_imtl_log_scales_stay_within_their_bound():
    """s is clipped to [-30, 30] after each step: a loss of 0 raises s by the step size for ever (gradient
    e^s L - 1 = -1), a huge loss lowers it by up to eta e^s L. Step size 1 from s = +-29.5: 29.5 + 1 and
    -29.5 - e^-29.5 1e20 would leave the bound."""
    jacobian = np.asarray([[1.0, 0.0, 0.5], [0.0, 1.0, -0.5]])
    state = make("imtl").init(2)._replace(log_scales=jnp.asarray([29.5, -29.5]))
    _, weights, state = step_with_state("imtl", jacobian, jnp.asarray([0.0, 1e20]), state, scale_learning_rate=1.0)
    np.testing.assert_array_equal(state.log_scales, [30.0, -30.0])
    assert np.all(np.isfinite(np.asarray(weights)))


@pytest.mark.parametrize("name", ["imtl_g", "imtl"])
def test_imtl_g_weights_of_identical_and_opposite_gradients(name):
    """The docstring's degenerate cases, where G is singular: identical gradients get equal weights 1/K (G^+ n lies
    along the ones vector); two pairs of opposite gradients have no common projection but 0 (n is orthogonal to G's
    range, so 1'G^+ n = 0 and only rounding is left of it, 5.6e-17 here), so the weights are the ones vector's part
    in G's null space, 1/4 each, and d = 0. Without G^+'s eigenvalue cut-off rounding's eigenvalues are inverted."""
    g = np.asarray([1.0, -2.0, 0.5])
    _, weights, _ = run(name, np.stack([g, g, g]))
    np.testing.assert_allclose(weights, 1 / 3, rtol=1e-9)
    h = np.asarray([0.3, 0.4, -1.2])
    direction, weights, _ = run(name, np.stack([g, -g, h, -h]))
    np.testing.assert_allclose(weights, 1 / 4, rtol=1e-9)
    np.testing.assert_allclose(direction, 0.0, atol=1e-12)


@pytest.mark.parametrize("jacobian", [
    np.asarray([[1.0, -2.0, 0.5], [-2.0, 4.0, -1.0]]),  # g and -2g: along one line, of unequal norms
    np.asarray([[1.0, 0.2], [-0.3, 1.0], [-0.8, -0.7]])],  # three tasks in two dimensions
    ids=["g_and_minus_2g", "more_tasks_than_dimensions"])
def test_imtl_g_gives_no_direction_where_only_a_zero_projection_is_equal(jacobian):
    """Where n is outside G's range, the only d in the gradients' span with equal projections on the unit
    gradients is 0 (for g, -2g: d = t g has projections t|g| and -t|g|; three generic unit vectors in the plane
    have no d of equal non-zero projections). The weights then sum to 1 with d = 0, as LibMTL's formula gives
    (its D U' is invertible here): for g, -2g they are (2/3, 1/3). G^+ n normalised would give (-1, 2) and
    d = -5g, which raises task 1's loss fastest of all."""
    direction, weights, _ = run("imtl_g", jacobian)
    np.testing.assert_allclose(direction, 0.0, atol=1e-12)
    np.testing.assert_allclose(weights, imtl_g_reference(jacobian), rtol=1e-9)
    float32 = imtl_g_weights(jnp.asarray(jacobian @ jacobian.T, jnp.float32))  # rounding 1e-7, not 1e-16
    assert float32.dtype == jnp.float32
    np.testing.assert_allclose(float32, imtl_g_reference(jacobian), rtol=1e-5)


# ---------------------------------------------------------------- Aligned-MTL

def aligned_reference(jacobian, rtol=float(np.finfo(np.float32).eps)):
    """The paper's Algorithm 1 from the SVD of J = U S V' (numpy): J_hat = sigma_R U_R V_R', d = J_hat' 1."""
    u, s, vt = np.linalg.svd(np.asarray(jacobian), full_matrices=False)
    keep = s**2 > rtol * len(s) * s[0] ** 2
    return s[keep][-1] * (u[:, keep] @ vt[keep]).T @ np.ones(u.shape[0])


@EXAMPLES
@given(jacobians_of(SHAPES + SINGULAR_SHAPES))
def test_aligned_mtl_matches_the_papers_algorithm(jacobian):
    s = np.linalg.svd(jacobian, compute_uv=False)
    assume(s[0] > 1e-6)
    ratios = s**2 / (len(s) * s[0] ** 2 * np.finfo(np.float32).eps)
    assume(np.all((ratios < 0.5) | (ratios > 2)))           # no eigenvalue at the rank cut-off
    direction, weights, state = run("aligned_mtl", jacobian)
    reference = aligned_reference(jacobian)
    np.testing.assert_allclose(direction, reference, rtol=1e-7, atol=1e-9 * np.linalg.norm(reference))
    # w = B 1 where the aligned gradients B J have every kept singular value equal to sigma_R: B G B = sigma_R^2 P.
    gram = gram_of(jacobian)
    eigenvalues, vectors = np.linalg.eigh(gram)
    kept = eigenvalues > np.finfo(np.float32).eps * len(gram) * eigenvalues[-1]
    b = np.sqrt(eigenvalues[kept].min()) * (vectors[:, kept] / np.sqrt(eigenvalues[kept])) @ vectors[:, kept].T
    np.testing.assert_allclose(weights, b @ np.ones(len(gram)), rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(b @ gram @ b, eigenvalues[kept].min() * vectors[:, kept] @ vectors[:, kept].T,
                               atol=1e-9 * eigenvalues[-1])
    assert int(state.rank) == int(kept.sum())


@EXAMPLES
@given(jacobians_of(SHAPES), st.floats(0.01, 100.0))
def test_aligned_mtl_direction_is_linear_in_a_common_scale(jacobian, scale):
    assume(well_conditioned(jacobian, 1e3))
    direction = np.asarray(run("aligned_mtl", jacobian)[0])
    np.testing.assert_allclose(run("aligned_mtl", scale * jacobian)[0], scale * direction, rtol=1e-7,
                               atol=1e-9 * scale * np.linalg.norm(direction))


def test_aligned_mtl_of_zero_gradients_is_the_identity():
    """Rank 0 (all-zero gradients): B = I as in torchjd, so the weights are the preferences (ones), the direction 0,
    and the state reports rank 0 and sigma_R = 0."""
    _, weights, state = run("aligned_mtl", np.zeros((3, 4)))
    np.testing.assert_array_equal(weights, 1.0)
    assert int(state.rank) == 0 and float(state.sigma_min) == 0.0


def test_aligned_mtl_rank_cutoff_scales_with_the_number_of_tasks():
    """LibMTL's cut-off is lambda > K eps32 lambda_max. Eigenvalues 1 and 1.5 eps32 (K = 2): the small one lies
    between eps32 and 2 eps32, so it is dropped; rank 1 gives d = sigma_1 u_1 v_1^T 1 = (1, 0). (The hypothesis
    test assumes no eigenvalue near the cut-off, so it cannot see the K factor.)"""
    jacobian = jnp.asarray([[1.0, 0.0], [0.0, np.sqrt(1.5 * np.finfo(np.float32).eps)]])
    direction, weights, state = run("aligned_mtl", jacobian)
    assert int(state.rank) == 1
    np.testing.assert_allclose(direction, [1.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(weights, [1.0, 0.0], atol=1e-12)
