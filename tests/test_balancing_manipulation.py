"""Defining properties of the gradient-manipulation methods: GradVac, DB-MTL, MoCo, ExcessMTL and GradDrop.

The generic contract (jit, vmap, shapes, degenerate inputs) runs over every registered method in
``test_balancing.py``; this file checks what each paper says its method does.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from test_balancing import KEY, assert_each_sum_of_per_task_orders_is_drawn_equally, jacobians, jitted_step, run
from theory.balancing import make
from theory.balancing.gradvac import GradVacState
from theory.balancing.moco import MoCoState, project_to_simplex
from theory.balancing.simplex import min_norm_exact

MINE = ("gradvac", "db_mtl", "moco", "excess_mtl", "graddrop")
PARAMETER_STATE = ("db_mtl", "moco", "excess_mtl")
# Few examples by default (each new shape compiles); the "thorough" profile keeps its own count.
FEW = settings(max_examples=25) if settings.default.max_examples <= 100 else settings()


def steps(name, jacobians_, losses_=None, key=KEY, state=None, **options):
    """Runs ``len(jacobians_)`` steps; returns the list of (direction, weights, state) after each."""
    balancer, step = jitted_step(name, **options)
    jacobians_ = [jnp.asarray(j, jnp.float64) for j in jacobians_]
    num_tasks = jacobians_[0].shape[0]
    if losses_ is None:
        losses_ = [jnp.ones(num_tasks)] * len(jacobians_)
    losses_ = [jnp.asarray(losses, jnp.float64) for losses in losses_]
    state = balancer.init(num_tasks) if state is None else state
    out = []
    for jacobian, losses in zip(jacobians_, losses_):
        direction, weights, state = step(jacobian, losses, state, key)
        out.append((direction, weights, state))
    return out


def run_with_state(name, jacobian, state, key=KEY, **options):
    """One step from a given state (unit losses)."""
    balancer, step = jitted_step(name, **options)
    jacobian = jnp.asarray(jacobian, jnp.float64)
    return step(jacobian, jnp.ones(jacobian.shape[0]), state, key)


def well_conditioned(jacobian, floor=1e-3):
    """Rows whose norms are not tiny (so cosines and ratios are well defined to the tolerances used)."""
    return bool(np.all(np.linalg.norm(jacobian, axis=1) > floor))


def assert_row_combination(direction, weights, jacobian):
    """``direction == weights @ jacobian`` to rounding (relative to the terms, which may cancel)."""
    magnitude = np.abs(np.asarray(weights))[:, None] * np.abs(np.asarray(jacobian))
    np.testing.assert_allclose(direction, np.asarray(weights) @ jacobian, rtol=1e-9,
                               atol=1e-12 * magnitude.sum(axis=0).max() + 1e-300)


def cosine(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# ---------------------------------------------------------------- shared: options, dtype, permutation, state

@pytest.mark.parametrize("name, options, message", [
    ("gradvac", {"beta": 1.5}, r"beta must be a number in \[0, 1\]"),
    ("gradvac", {"group_type": 1}, "group_type must be 0"),
    ("gradvac", {"target_update": "sometimes"}, "target_update must be one of 'always', 'on_conflict'"),
    ("db_mtl", {"beta": 1.0}, r"beta must be a number in \[0, 1\)"),
    ("db_mtl", {"beta_sigma": -0.5}, "beta_sigma must be a finite number >= 0"),
    ("moco", {"beta": 0.0}, r"beta must be a number in \(0, 1\]"),
    ("moco", {"gamma": -1.0}, "gamma must be a finite number >= 0"),
    ("moco", {"rho": float("nan")}, "rho must be a finite number >= 0"),
    ("moco", {"lambda_update": "mirror"}, "lambda_update must be one of 'softmax', 'projection'"),
    ("excess_mtl", {"robust_step_size": 0.0}, "robust_step_size must be a finite number > 0"),
    ("graddrop", {"leak": -0.1}, r"leak must be a number in \[0, 1\]"),
])
def test_options_are_validated_naming_the_option_and_its_range(name, options, message):
    with pytest.raises(ValueError, match=message):
        make(name, **options)


@pytest.mark.parametrize("name", MINE)
def test_outputs_keep_the_jacobian_dtype(name):
    balancer = make(name)
    jacobian = jax.random.normal(jax.random.key(7), (3, 5), jnp.float32)
    losses = jnp.ones(3, jnp.float32)
    direction, weights, state = jax.jit(balancer.step)(jacobian, losses, balancer.init(3), KEY)
    assert direction.dtype == jnp.float32 and weights.dtype == jnp.float32
    again = jax.jit(balancer.step)(jacobian, losses, state, KEY)
    assert again[0].dtype == jnp.float32 and jax.tree.structure(again[2]) == jax.tree.structure(state)
    dtypes = lambda tree: [leaf.dtype for leaf in jax.tree.leaves(tree)]
    assert dtypes(again[2]) == dtypes(state)  # the state keeps the dtypes init gave it


@pytest.mark.parametrize("name", ["db_mtl", "moco", "excess_mtl", "graddrop", "gradvac"])
def test_permuting_tasks_permutes_weights(name):
    """Deterministic methods are equivariant; GradDrop draws per coordinate; GradVac's K=2 order is moot."""
    num_tasks = 2 if name == "gradvac" else 4
    keys = jax.random.split(jax.random.key(3), 3)
    sequence = [jax.random.normal(k, (num_tasks, 6), jnp.float64) for k in keys]
    losses = [jnp.asarray([0.3, 1.0, 2.0, 0.7][:num_tasks])] * 3
    permutation = jnp.asarray([2, 0, 3, 1] if num_tasks == 4 else [1, 0])
    plain = steps(name, sequence, losses)
    permuted = steps(name, [j[permutation] for j in sequence], [l[permutation] for l in losses])
    for (direction, weights, _), (direction_p, weights_p, _) in zip(plain, permuted):
        np.testing.assert_allclose(weights_p, weights[permutation], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(direction_p, direction, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", PARAMETER_STATE)
def test_parameter_space_state_sized_at_init_runs_under_scan_and_rejects_another_size(name):
    balancer = make(name)
    sequence = jax.random.normal(jax.random.key(8), (5, 3, 4), jnp.float64)
    losses = jnp.asarray([0.5, 1.0, 2.0])

    def body(state, jacobian):
        direction, weights, state = balancer.step(jacobian, losses, state, KEY)
        return state, (direction, weights)

    _, (directions, _) = jax.lax.scan(body, balancer.init(3, num_params=4), sequence)
    lazily_sized = steps(name, list(sequence), [losses] * 5)
    np.testing.assert_allclose(directions, jnp.stack([d for d, _, _ in lazily_sized]), rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match=r"state\.\w+ has shape \(3, 4\), but a jacobian of shape \(3, 5\) needs "
                                         r"\(3, 5\); build the state with init\(3, num_params=5\) \(or init\(3\) to "
                                         r"size it at the first step\)"):
        balancer.step(jnp.ones((3, 5)), losses, balancer.init(3, num_params=4), KEY)
    for num_params in (-1, 4.0):
        with pytest.raises(ValueError, match=r"num_params must be None or an integer >= 0; got "):
            balancer.init(3, num_params=num_params)


# ---------------------------------------------------------------- GradVac

@FEW
@given(jacobians(max_tasks=3, max_params=4), st.integers(0, 2**16))
def test_gradvac_with_zero_targets_and_beta_0_is_pcgrad(jacobian, seed):
    """Targets stay 0 when beta = 0, and a zero target makes the vaccine PCGrad's projection (same orders)."""
    key = jax.random.key(seed)
    direction, _, state = run("gradvac", jacobian, key=key, beta=0.0)
    pc_direction, _, _ = run("pcgrad", jacobian, key=key)
    scale = float(np.max(np.linalg.norm(jacobian, axis=1)))
    np.testing.assert_allclose(direction, pc_direction, rtol=1e-9, atol=1e-9 * scale + 1e-300)
    np.testing.assert_array_equal(state.targets, 0.0)


@FEW
@given(hnp.arrays(np.float64, (2, 4), elements=st.floats(-5, 5)), st.floats(-0.9, 0.9), st.floats(-0.9, 0.9))
def test_gradvac_sets_the_cosine_to_its_target_when_below_it_for_two_tasks(jacobian, target_12, target_21):
    """K = 2: g1' = g1 + w12 g2 has cos(g1', g2) = target exactly when cos(g1, g2) < target; else w12 = 0."""
    assume(well_conditioned(jacobian))
    phi = cosine(jacobian[0], jacobian[1])
    assume(abs(phi) < 0.999)
    targets = jnp.asarray([[0.0, target_12], [target_21, 0.0]])
    _, weights, state = run_with_state("gradvac", jacobian, GradVacState(targets), beta=0.5)
    w12, w21 = float(weights[1]) - 1.0, float(weights[0]) - 1.0  # weights = [1 + w21, 1 + w12]
    for (i, j), w, target in (((0, 1), w12, target_12), ((1, 0), w21, target_21)):
        if phi < target:
            assert cosine(jacobian[i] + w * jacobian[j], jacobian[j]) == pytest.approx(target, abs=1e-9)
        else:
            assert w == 0.0
        # the target then moves towards the observed cosine (the paper's Eq. (3), every visited pair)
        assert float(state.targets[i, j]) == pytest.approx(0.5 * target + 0.5 * phi, abs=1e-12)


def test_gradvac_on_conflict_updates_only_corrected_pairs_like_libmtl():
    jacobian = jnp.asarray([[1.0, 0.0, 0.0], [-1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    gram = np.asarray(jacobian @ jacobian.T)
    cosines = gram / np.sqrt(np.outer(np.diag(gram), np.diag(gram)))
    _, _, always = run("gradvac", jacobian, beta=0.5)
    _, _, on_conflict = run("gradvac", jacobian, beta=0.5, target_update="on_conflict")
    # Task 3 agrees with both others and is never modified: its row of targets sees the original cosines.
    np.testing.assert_allclose(always.targets[2], 0.5 * cosines[2] * (np.arange(3) != 2), rtol=1e-12)
    np.testing.assert_array_equal(on_conflict.targets[2], 0.0)
    # Targets can only fall from 0 under "on_conflict"; g1 and g2 conflict, so those targets move below 0.
    assert float(on_conflict.targets[0, 1]) < 0 and float(on_conflict.targets[1, 0]) < 0
    assert np.all(np.asarray(on_conflict.targets) <= 0)


def test_gradvac_positive_targets_pull_agreeing_gradients_closer():
    """Unlike PCGrad, a pair that agrees but less than its target is still corrected."""
    jacobian = jnp.asarray([[1.0, 0.0], [0.2, 1.0]])
    targets = jnp.asarray([[0.0, 0.8], [0.8, 0.0]])
    direction, weights, _ = run_with_state("gradvac", jacobian, GradVacState(targets))
    assert np.all(np.asarray(weights) > 1.0)
    np.testing.assert_allclose(direction, weights @ jacobian, rtol=1e-12)


def gradvac_vaccinated(jacobian, i, order, targets):
    """Wang et al.'s Algorithm 1 for task i in numpy: the other tasks in ``order``, each raising cos(g~_i, g_j) to
    its target where it is below, with the norm of the *modified* g~_i."""
    g = jacobian[i].copy()
    for j in order:
        phi, target = cosine(g, jacobian[j]), targets[i, j]
        if phi < target:
            g = g + np.linalg.norm(g) * (target * np.sqrt(1 - phi**2) - phi * np.sqrt(1 - target**2)) / (
                np.linalg.norm(jacobian[j]) * np.sqrt(1 - target**2)) * jacobian[j]
    return g


def test_gradvac_with_three_tasks_follows_the_paper_with_an_order_per_task():
    """K = 3 and targets 0.5, which every pair's cosine is below, so each task is corrected twice and its second
    correction uses its modified norm (with zero targets the norm cancels, as in PCGrad; the two-task tests correct
    once). Each task's two visiting orders give different results, so the direction must be one of the 2^3 sums of
    the reference's results, and with an order drawn per task (as LibMTL shuffles per task) each sum comes with
    probability 1/8 (assert_each_sum_of_per_task_orders_is_drawn_equally)."""
    jacobian = np.asarray([[1.0, 0.0, 0.2], [-0.3, 1.0, 0.1], [0.2, -0.4, 1.0]])
    targets = np.full((3, 3), 0.5) - 0.5 * np.eye(3)
    balancer, _ = jitted_step("gradvac")
    assert_each_sum_of_per_task_orders_is_drawn_equally(
        balancer, GradVacState(jnp.asarray(targets)), jacobian,
        lambda i, order: gradvac_vaccinated(jacobian, i, order, targets), min_gap=0.01)

# ---------------------------------------------------------------- DB-MTL


@FEW
@given(jacobians(max_tasks=3, max_params=4), st.lists(st.floats(0.1, 10.0), min_size=3, max_size=3))
def test_db_mtl_rescales_every_log_gradient_to_the_largest_norm(jacobian, losses):
    """First step: m_t = (1 - beta) g_t / L_t; every rescaled alpha_t m_t = w_t g_t has norm max_s |m_s|."""
    losses = np.asarray(losses[: jacobian.shape[0]])
    row_norms = np.linalg.norm(jacobian, axis=1)
    assume(np.all((row_norms == 0) | (row_norms > 1e-100)))
    direction, weights, state = run("db_mtl", jacobian, losses)
    np.testing.assert_allclose(state.ema, 0.1 * jacobian / (losses[:, None] + 1e-8), rtol=1e-12, atol=1e-300)
    assert_row_combination(direction, weights, jacobian)
    norms = np.linalg.norm(np.asarray(weights)[:, None] * jacobian, axis=1)
    largest = np.max(np.linalg.norm(np.asarray(state.ema), axis=1))
    nonzero = np.linalg.norm(np.asarray(state.ema), axis=1) > 0
    np.testing.assert_allclose(norms[nonzero], largest, rtol=1e-9)


@FEW
@given(st.lists(st.floats(0.1, 10.0), min_size=3, max_size=3), st.integers(0, 2**16))
def test_db_mtl_is_invariant_to_the_scale_of_each_loss(scales, seed):
    """L_t -> c_t L_t (so g_t -> c_t g_t) leaves log-gradients and hence every direction unchanged."""
    sequence = jax.random.normal(jax.random.key(seed), (3, 3, 5), jnp.float64)
    losses = jnp.asarray([0.5, 1.0, 2.0])
    c = jnp.asarray(scales)
    plain = steps("db_mtl", list(sequence), [losses] * 3)
    scaled = steps("db_mtl", [j * c[:, None] for j in sequence], [losses * c] * 3)
    for (direction, _, _), (direction_s, _, _) in zip(plain, scaled):
        # up to the 1e-8 added to the losses (relative 1e-7 here), on the scale of the direction
        np.testing.assert_allclose(direction_s, direction, rtol=1e-6, atol=1e-6 * np.abs(direction).max())


def test_db_mtl_ema_and_weights_over_two_steps():
    j1, j2 = jax.random.normal(jax.random.key(9), (2, 3, 4), jnp.float64)
    l1, l2 = jnp.asarray([0.5, 1.0, 2.0]), jnp.asarray([1.5, 0.2, 1.0])
    (_, _, s1), (direction, weights, s2) = steps("db_mtl", [j1, j2], [l1, l2])
    inv1, inv2 = 1 / (l1 + 1e-8), 1 / (l2 + 1e-8)
    ema = 0.9 * 0.1 * j1 * inv1[:, None] + 0.1 * j2 * inv2[:, None]
    np.testing.assert_allclose(s2.ema, ema, rtol=1e-12)
    norms = np.linalg.norm(ema, axis=1)
    alpha = norms.max() / norms
    np.testing.assert_allclose(direction, alpha @ ema, rtol=1e-12)
    np.testing.assert_allclose(weights, alpha * 0.1 * inv2, rtol=1e-12)
    # what the current rows do not carry is the EMA's memory of earlier steps
    np.testing.assert_allclose(direction - weights @ j2, 0.9 * alpha @ s1.ema, rtol=1e-10, atol=1e-12)


def test_db_mtl_decays_its_ema_rate_with_beta_sigma():
    """beta_k = beta / k^sigma with k = 1 at the first step (the docstring's count): with beta = 0.9, sigma = 0.5
    the rates are 0.9 and 0.9/sqrt(2). Every other DB-MTL test uses sigma = 0, where k does not matter."""
    j1, j2 = jax.random.normal(jax.random.key(9), (2, 3, 4), jnp.float64)
    l1, l2 = jnp.asarray([0.5, 1.0, 2.0]), jnp.asarray([1.5, 0.2, 1.0])
    balancer, step = jitted_step("db_mtl", beta_sigma=0.5)
    _, _, s1 = step(j1, l1, balancer.init(3), KEY)
    direction, weights, s2 = step(j2, l2, s1, KEY)
    r1, r2 = 0.9, 0.9 / np.sqrt(2.0)
    m1 = (1 - r1) * np.asarray(j1) / (np.asarray(l1)[:, None] + 1e-8)
    m2 = r2 * m1 + (1 - r2) * np.asarray(j2) / (np.asarray(l2)[:, None] + 1e-8)
    np.testing.assert_allclose(s1.ema, m1, rtol=1e-12)
    np.testing.assert_allclose(s2.ema, m2, rtol=1e-12)
    norms = np.linalg.norm(m2, axis=1)
    np.testing.assert_allclose(direction, (norms.max() / norms) @ m2, rtol=1e-12)
    np.testing.assert_allclose(weights, norms.max() / norms * (1 - r2) / (np.asarray(l2) + 1e-8), rtol=1e-12)


# ---------------------------------------------------------------- MoCo

def scan_steps(name, jacobian, losses, num_steps, **options):
    balancer = make(name, **options)

    def body(state, _):
        direction, weights, state = balancer.step(jacobian, losses, state, KEY)
        return state, direction

    return jax.lax.scan(body, balancer.init(jacobian.shape[0], num_params=jacobian.shape[1]), None,
                        length=num_steps)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_moco_tracking_converges_to_the_rescaled_gradients_on_a_constant_jacobian(seed):
    jacobian = jax.random.normal(jax.random.key(seed), (3, 6), jnp.float64)
    losses = jnp.asarray([0.5, 1.0, 2.0])
    state, directions = jax.jit(lambda j: scan_steps("moco", j, losses, 600))(jacobian)
    rescaled = jacobian * (losses / jnp.linalg.norm(jacobian, axis=1))[:, None]
    # beta_k = 0.5 / sqrt(k): the error shrinks like prod (1 - beta_k) ~ exp(-sqrt(k)), ~1e-11 at k = 600
    np.testing.assert_allclose(state.tracked, rescaled, rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(state.lambdas.sum(), 1.0, rtol=1e-12)
    assert np.all(np.asarray(state.lambdas) > 0)
    np.testing.assert_allclose(directions[-1], state.lambdas @ state.tracked, rtol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_moco_with_projection_finds_the_min_norm_weights_of_the_tracked_gradients(seed):
    """The paper's lambda update is projected gradient descent on lambda^T Y Y^T lambda: MGDA on Y."""
    jacobian = jax.random.normal(jax.random.key(seed), (3, 6), jnp.float64)
    losses = jnp.asarray([0.7, 1.0, 1.3])
    state, _ = jax.jit(lambda j: scan_steps("moco", j, losses, 3000, beta=1.0, beta_sigma=0.0, gamma=0.1,
                                            gamma_sigma=0.0, lambda_update="projection"))(jacobian)
    gram = state.tracked @ state.tracked.T
    best = min_norm_exact(gram).weights
    assert float(state.lambdas @ gram @ state.lambdas) == pytest.approx(float(best @ gram @ best), rel=1e-8)
    np.testing.assert_allclose(state.lambdas, best, atol=1e-5)


@FEW
@given(jacobians(max_tasks=3, max_params=4), st.lists(st.floats(0.1, 10.0), min_size=3, max_size=3))
def test_moco_first_step_uses_loss_sized_gradients_and_exact_weights(jacobian, losses):
    losses = np.asarray(losses[: jacobian.shape[0]])
    assume(well_conditioned(jacobian, 1e-100))
    direction, weights, state = run("moco", jacobian, losses, beta=1.0)
    np.testing.assert_allclose(np.linalg.norm(state.tracked, axis=1), losses, rtol=1e-10)  # ||y_t|| = L_t
    assert_row_combination(direction, weights, jacobian)
    k = jacobian.shape[0]
    y = np.asarray(state.tracked)
    expected = np.exp(1 / k - 0.1 * (y @ y.T) @ np.full(k, 1 / k))
    np.testing.assert_allclose(state.lambdas, expected / expected.sum(), rtol=1e-10)


def project_to_simplex_reference(v):
    """Euclidean projection onto the simplex by bisection on the threshold (independent of the sort-based code)."""
    low, high = v.min() - 1.0, v.max()
    for _ in range(200):
        mid = 0.5 * (low + high)
        low, high = (mid, high) if np.maximum(v - mid, 0).sum() > 1 else (low, mid)
    return np.maximum(v - 0.5 * (low + high), 0)


@pytest.mark.parametrize("lambda_update", ["softmax", "projection"])
def test_moco_lambda_step_includes_rho(lambda_update):
    """lambda <- Pi(lambda - gamma_k (Y Y^T + rho I) lambda). At init lambda = 1/K, where rho I lambda shifts every
    entry equally and neither Pi sees it; so the step starts from non-uniform lambdas (as from step 2 on). With
    beta = 1 the step's Y is L_t g_t / ||g_t|| and gamma_1 = 0.1. Every other MoCo test used rho = 0."""
    jacobian = np.asarray([[3.0, 0.0, 1.0], [0.0, 2.0, -1.0], [1.0, 1.0, 1.0]])
    losses = np.asarray([0.5, 1.0, 2.0])
    lambdas = np.asarray([0.6, 0.3, 0.1])
    balancer, step = jitted_step("moco", beta=1.0, rho=2.0, lambda_update=lambda_update)
    state = MoCoState(jnp.zeros((3, 3)), jnp.asarray(lambdas), jnp.zeros((), jnp.int32))
    direction, _, state = step(jnp.asarray(jacobian), jnp.asarray(losses), state, KEY)
    y = jacobian * (losses / np.linalg.norm(jacobian, axis=1))[:, None]
    moved = lambdas - 0.1 * (y @ y.T + 2.0 * np.eye(3)) @ lambdas
    expected = (np.exp(moved) / np.exp(moved).sum() if lambda_update == "softmax"
                else project_to_simplex_reference(moved))
    np.testing.assert_allclose(state.lambdas, expected, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(direction, expected @ y, rtol=1e-9, atol=1e-12)


def test_moco_first_step_weights_are_the_rows_coefficients_for_any_beta():
    """w_t = lambda_t beta_k L_t / ||g_t||, and at the first step (Y = 0 at init) the direction is exactly w @ J.
    The first-step test above uses beta = 1, where a missing beta_k goes unseen; here the default beta_1 = 0.5."""
    jacobian = jnp.asarray([[3.0, 0.0, 1.0], [0.0, 2.0, -1.0], [1.0, 1.0, 1.0]], jnp.float64)
    losses = jnp.asarray([0.5, 1.0, 2.0])
    balancer, step = jitted_step("moco")
    direction, weights, state = step(jacobian, losses, balancer.init(3), KEY)
    np.testing.assert_allclose(state.tracked, 0.5 * jacobian * (losses / jnp.linalg.norm(jacobian, axis=1))[:, None],
                               rtol=1e-12)
    np.testing.assert_allclose(direction, weights @ jacobian, rtol=1e-12, atol=1e-15)


def test_moco_step_sizes_decay_with_their_own_exponents():
    """beta_k = beta / k^beta_sigma and gamma_k = gamma / k^gamma_sigma, each with its own exponent: two steps with
    beta_sigma = 0 (beta_k = 0.5) and the default gamma_sigma = 0.5 (gamma_2 = 0.1 / sqrt 2), against numpy. The
    defaults give both exponents 0.5, and the other tests take one step or constant rates."""
    j1 = np.asarray([[3.0, 0.0, 1.0], [0.0, 2.0, -1.0], [1.0, 1.0, 1.0]])
    j2 = np.asarray([[1.0, -1.0, 0.5], [2.0, 0.5, 0.0], [-0.5, 1.0, 2.0]])
    losses = np.asarray([0.5, 1.0, 2.0])
    (_, _, s1), (direction, _, s2) = steps("moco", [j1, j2], [losses] * 2, beta_sigma=0.0)
    rescaled = lambda j: j * (losses / np.linalg.norm(j, axis=1))[:, None]
    softmax = lambda x: np.exp(x - x.max()) / np.exp(x - x.max()).sum()
    y1 = 0.5 * rescaled(j1)
    lambdas1 = softmax(np.full(3, 1 / 3) - 0.1 * (y1 @ y1.T) @ np.full(3, 1 / 3))
    y2 = y1 - 0.5 * (y1 - rescaled(j2))
    lambdas2 = softmax(lambdas1 - 0.1 / np.sqrt(2.0) * (y2 @ y2.T) @ lambdas1)
    np.testing.assert_allclose(s1.lambdas, lambdas1, rtol=1e-12)
    np.testing.assert_allclose(s2.tracked, y2, rtol=1e-12)
    np.testing.assert_allclose(s2.lambdas, lambdas2, rtol=1e-12)
    np.testing.assert_allclose(direction, lambdas2 @ y2, rtol=1e-12)


@FEW
@given(hnp.arrays(np.float64, st.integers(1, 4), elements=st.floats(-3, 3)))
def test_projection_onto_the_simplex_is_the_closest_point(v):
    x = np.asarray(jax.jit(project_to_simplex)(jnp.asarray(v)))
    assert np.all(x >= 0) and x.sum() == pytest.approx(1.0, abs=1e-12)
    rng = np.random.default_rng(0)
    others = rng.dirichlet(np.ones(v.shape[0]), size=200)
    assert np.linalg.norm(v - x) <= np.min(np.linalg.norm(v - others, axis=1)) + 1e-12


# ---------------------------------------------------------------- ExcessMTL

def excess_risk_reference(sequence, step_size=1e-2):
    """Independent numpy transcription of the estimate and the exponentiated update."""
    accumulated, initial, weights = 0.0, None, np.ones(sequence[0].shape[0])
    history = []
    for jacobian in sequence:
        accumulated = accumulated + jacobian**2
        risk = np.sum(jacobian**2 / np.sqrt(accumulated + 1e-7), axis=1)
        if initial is None:
            initial = risk
        else:
            weights = weights * np.exp(step_size * risk / initial)
            weights = weights / weights.sum() * len(weights)
        history.append(weights.copy())
    return history


@FEW
@given(jacobians(min_tasks=2, max_tasks=3, max_params=4),
       st.lists(st.floats(0.2, 5.0), min_size=3, max_size=3))
def test_excess_mtl_up_weights_the_task_with_the_larger_excess_risk(jacobian, growth):
    """Step 2 multiplies task t's gradient by growth_t: its normalised excess risk r_t grows with it."""
    assume(well_conditioned(jacobian, 1e-2))
    growth = np.asarray(growth[: jacobian.shape[0]])
    sequence = [jacobian, jacobian * growth[:, None], jacobian * growth[:, None]]
    results = steps("excess_mtl", sequence, robust_step_size=0.5)
    np.testing.assert_array_equal(results[0][1], 1.0)  # the first step only records the reference
    expected_weights = excess_risk_reference(sequence, 0.5)
    for (direction, weights, _), expected, jac in zip(results, expected_weights, sequence):
        np.testing.assert_allclose(weights, expected, rtol=1e-10)
        np.testing.assert_allclose(direction, weights @ jac, rtol=1e-12, atol=1e-12)
    weights = np.asarray(results[-1][1])
    for s in range(len(growth)):
        for t in range(len(growth)):
            if growth[s] > growth[t] + 0.05:
                assert weights[s] > weights[t]
    assert weights.sum() == pytest.approx(jacobian.shape[0], rel=1e-12)


def test_excess_mtl_first_step_keeps_unit_weights_with_a_zero_gradient():
    """The first step only records e^(1) and weighs every task 1 (the docstring), a zero gradient too: its ratio
    r_t = 0/0 is taken as 0 while the others are 1, so an update at the first step would move weight away from it.
    The second step does update: lambda = K softmax(eta r) with r_t = e_t^(2) / e_t^(1) (0 for the zero row)."""
    jacobian = np.asarray([[1.0, -0.5, 2.0], [0.0, 0.0, 0.0], [0.3, 0.2, -0.1]])
    results = steps("excess_mtl", [jacobian, 2 * jacobian], robust_step_size=0.5)
    np.testing.assert_array_equal(results[0][1], 1.0)
    first = np.sum(jacobian**2 / np.sqrt(jacobian**2 + 1e-7), axis=1)
    second = np.sum(4 * jacobian**2 / np.sqrt(5 * jacobian**2 + 1e-7), axis=1)
    ratios = np.divide(second, first, out=np.zeros(3), where=first > 0)
    np.testing.assert_allclose(results[1][1], 3 * np.exp(0.5 * ratios) / np.exp(0.5 * ratios).sum(), rtol=1e-10)


def test_excess_mtl_estimate_does_not_see_the_scale_of_a_task_gradient():
    """On a constant Jacobian every normalised estimate is ~1/sqrt(k), whatever the task's gradient scale."""
    jacobian = jnp.asarray([[100.0, -50.0, 10.0], [0.1, 0.2, -0.3]])
    results = steps("excess_mtl", [jacobian] * 20)
    np.testing.assert_allclose(results[-1][1], 1.0, rtol=1e-5)


def test_excess_mtl_weights_stay_finite_when_a_ratio_overflows():
    """The docstring's log-space update: a task whose first estimate was tiny (3e-297) and whose second is huge (1e150)
    has r = inf; capped, its exponent still dominates and it takes the whole weight K, where exp(eta r) / sum would be
    inf / inf = nan."""
    first = np.asarray([[1e-150, 0.0], [1.0, -1.0]])
    second = np.asarray([[1e150, 0.0], [1.0, -1.0]])
    results = steps("excess_mtl", [first, second])
    np.testing.assert_array_equal(results[1][1], [2.0, 0.0])
    np.testing.assert_array_equal(results[1][0], [2e150, 0.0])


# ---------------------------------------------------------------- GradDrop

def test_graddrop_acts_on_the_representation():
    balancer = make("graddrop")
    assert balancer.gradient_of == "representation" and balancer.requires == "jacobian"
    assert balancer.weigh is None


@FEW
@given(jacobians(min_tasks=1, max_tasks=3, max_params=4), st.integers(0, 2**16))
def test_graddrop_keeps_every_gradient_where_the_signs_agree(jacobian, seed):
    column_signs = np.where(np.arange(jacobian.shape[1]) % 2 == 0, 1.0, -1.0)
    agreeing = np.abs(jacobian) * column_signs
    direction, weights, _ = run("graddrop", agreeing, key=jax.random.key(seed))
    np.testing.assert_allclose(direction, agreeing.sum(axis=0), rtol=1e-12, atol=1e-300)
    nonzero = np.any(np.abs(agreeing) >= np.finfo(np.float64).tiny, axis=1)  # XLA flushes subnormals to zero
    np.testing.assert_allclose(np.asarray(weights)[nonzero], 1.0, rtol=1e-12)
    np.testing.assert_array_equal(np.asarray(weights)[~nonzero], 0.0)  # a zero row: the leak


@FEW
@given(jacobians(min_tasks=1, max_tasks=3, max_params=4), st.integers(0, 2**16))
def test_graddrop_with_full_leak_is_the_plain_sum(jacobian, seed):
    direction, weights, _ = run("graddrop", jacobian, key=jax.random.key(seed), leak=1.0)
    np.testing.assert_allclose(direction, jacobian.sum(axis=0), rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(weights, 1.0, rtol=1e-12)


@FEW
@given(jacobians(max_tasks=3, max_params=4), st.integers(0, 2**16))
def test_graddrop_keeps_one_sign_per_coordinate(jacobian, seed):
    direction, weights, _ = run("graddrop", jacobian, key=jax.random.key(seed))
    positive = np.where(jacobian > 0, jacobian, 0).sum(axis=0)
    negative = np.where(jacobian < 0, jacobian, 0).sum(axis=0)
    kept_positive = np.isclose(direction, positive, rtol=1e-12, atol=1e-300)
    kept_negative = np.isclose(direction, negative, rtol=1e-12, atol=1e-300)
    assert np.all(kept_positive | kept_negative)
    assert np.all((np.asarray(weights) >= 0) & (np.asarray(weights) <= 1 + 1e-12))


def test_graddrop_keeps_the_positive_sign_with_probability_equal_to_the_purity():
    jacobian = jnp.asarray([[3.0, 1.0, -2.0], [-1.0, -1.0, 0.5], [0.0, -2.0, -0.5]])
    purity = 0.5 * (1 + jacobian.sum(axis=0) / jnp.abs(jacobian).sum(axis=0))  # [0.75, 0.25, 0.1667]
    step = jax.jit(jax.vmap(make("graddrop").step, in_axes=(None, None, None, 0)))
    directions, _, _ = step(jacobian, jnp.ones(3), (), jax.random.split(KEY, 20000))
    positive = jnp.where(jacobian > 0, jacobian, 0).sum(axis=0)
    kept_positive = np.asarray(directions) == np.asarray(positive)
    frequency = np.mean(kept_positive, axis=0)
    np.testing.assert_allclose(frequency, purity, atol=4 * np.sqrt(0.25 / 20000))
    # One U per coordinate (Algorithm 1: U has the shape of P), so the choices are independent: coordinates 1 and 2
    # keep their positive signs together with probability 0.75 * 0.25 = 0.1875, where one U shared by every
    # coordinate would give min(0.75, 0.25) = 0.25 (standard error 0.003; 0.02 is over 6 of them).
    np.testing.assert_allclose(np.mean(kept_positive[:, 0] & kept_positive[:, 1]), float(purity[0] * purity[1]),
                               atol=0.02)


def test_graddrop_is_deterministic_given_the_key_and_random_across_keys():
    jacobian = jax.random.normal(jax.random.key(4), (3, 50), jnp.float64)
    a, b, c = (run("graddrop", jacobian, key=k)[0] for k in (KEY, KEY, jax.random.key(1)))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
