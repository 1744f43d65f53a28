"""The loss-based weightings UW, DWA, GLS, STCH and FAMO: each method's defining behaviour.

The generic contract (jit, vmap, exact weights, degenerate inputs) is checked for them in test_balancing.py.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from theory.balancing import make

KEY = jax.random.key(0)
NAMES = ("uw", "dwa", "gls", "stch", "famo")


@functools.lru_cache(maxsize=None)
def compiled(name, **options):
    """The balancer and a jitted ``lax.scan`` of its step over a sequence of losses [S, K] (one compile per shape)."""
    balancer = make(name, **options)

    @jax.jit
    def scan(jacobian, losses, state):
        def body(state, step_losses):
            direction, weights, state = balancer.step(jacobian, step_losses, state, KEY)
            return state, (direction, weights)

        return jax.lax.scan(body, state, losses)

    return balancer, scan


def run_sequence(name, losses, jacobian=None, state=None, **options):
    """Runs ``name`` over the rows of ``losses`` [S, K]; returns (directions [S, P], weights [S, K], final state)."""
    losses = jnp.asarray(losses, dtype=jnp.float64)
    num_tasks = losses.shape[1]
    jacobian = jnp.eye(num_tasks, dtype=jnp.float64) if jacobian is None else jnp.asarray(jacobian)
    balancer, scan = compiled(name, **options)
    state = balancer.init(num_tasks) if state is None else state
    state, (directions, weights) = scan(jacobian, losses, state)
    return directions, weights, state


def positive_losses(min_tasks=1, max_tasks=5, low=1e-3, high=1e3):
    sizes = st.integers(min_tasks, max_tasks)
    return sizes.flatmap(lambda k: hnp.arrays(np.float64, (k,), elements=st.floats(low, high, width=64)))


# ---------------------------------------------------------------- every method of this module


@pytest.mark.parametrize("name", NAMES)
def test_permuting_tasks_permutes_weights_over_a_trajectory(name):
    """Stateful methods too: permuting the tasks of every step permutes every step's weights."""
    steps = jnp.arange(12, dtype=jnp.float64)[:, None]
    losses = jnp.asarray([3.0, 1.0, 0.5, 2.0]) * jnp.exp(-jnp.asarray([0.3, 0.05, 0.1, 0.2]) * steps)
    permutation = jnp.asarray([2, 0, 3, 1])
    options = {"stch": {"warmup_steps": 4, "period": 2}, "dwa": {"period": 2}}.get(name, {})
    _, weights, _ = run_sequence(name, losses, **options)
    _, permuted, _ = run_sequence(name, losses[:, permutation], **options)
    np.testing.assert_allclose(permuted, weights[:, permutation], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_dtypes_are_preserved_and_the_state_scans(name):
    """float32 losses give float32 weights; state leaves keep their dtype (int32 counters, no weak types)."""
    balancer = make(name)
    state = balancer.init(3)
    for leaf in jax.tree.leaves(state):
        assert not leaf.weak_type
        assert leaf.dtype in (jnp.int32, jnp.float64)
    jacobian = jnp.ones((3, 4), jnp.float32)
    losses = jnp.asarray([0.5, 1.0, 2.0], jnp.float32)
    _, weights, new_state = jax.jit(balancer.step)(jacobian, losses, state, KEY)
    assert weights.dtype == jnp.float32
    assert [(x.dtype, x.shape, x.weak_type) for x in jax.tree.leaves(new_state)] == \
        [(x.dtype, x.shape, x.weak_type) for x in jax.tree.leaves(state)]
    # lax.scan needs a carry of fixed type.
    _, weights, _ = run_sequence(name, jnp.tile(jnp.asarray([0.5, 1.0, 2.0]), (10, 1)))
    assert weights.shape == (10, 3) and bool(jnp.all(jnp.isfinite(weights)))


@pytest.mark.parametrize("name, options, message", [
    ("uw", {"learning_rate": 0.0}, "learning_rate must be a finite number > 0"),
    ("uw", {"learning_rate": float("nan")}, "learning_rate must be a finite number > 0"),
    ("dwa", {"temperature": -1.0}, "temperature must be a finite number > 0"),
    ("dwa", {"period": 0}, "period must be an integer >= 1; got 0"),
    ("dwa", {"period": 1.5}, "period must be an integer >= 1; got 1.5"),
    ("stch", {"mu": 0.0}, "mu must be a finite number > 0"),
    ("stch", {"warmup_steps": 0}, "warmup_steps must be an integer >= 1; got 0"),
    ("stch", {"warmup_steps": 3, "period": 4}, r"period must be an integer in \[1, warmup_steps=3\]; got 4"),
    ("famo", {"w_lr": float("inf")}, "w_lr must be a finite number > 0"),
    ("famo", {"w_gamma": -1e-3}, "w_gamma must be a finite number >= 0"),
])
def test_options_are_validated_with_one_line_errors(name, options, message):
    with pytest.raises(ValueError, match=message) as error:
        make(name, **options)
    assert "\n" not in str(error.value)


def test_options_and_defaults():
    from theory.balancing import options_of

    assert options_of("uw") == {"learning_rate": 0.05}
    assert options_of("dwa") == {"temperature": 2.0, "period": 1}
    assert options_of("gls") == {}
    assert options_of("stch") == {"mu": 1.0, "warmup_steps": 5, "period": 1}
    assert options_of("famo") == {"w_lr": 0.025, "w_gamma": 1e-3}


# ---------------------------------------------------------------- UW


def test_uw_starts_from_libmtl_initialisation():
    _, weights, _ = run_sequence("uw", [[0.3, 4.0]])
    np.testing.assert_allclose(weights[0], 1 / (2 * np.exp(-0.5)), rtol=1e-12)


def test_uw_log_variances_converge_to_the_log_losses():
    """Constant losses: s_t -> log L_t, the fixed point of the UW objective, so w_t -> 1/(2 L_t)."""
    losses = jnp.asarray([0.3, 1.0, 4.0])
    _, weights, state = run_sequence("uw", jnp.tile(losses, (300, 1)), learning_rate=0.5)
    np.testing.assert_allclose(state.log_variances, jnp.log(losses), atol=1e-8)
    np.testing.assert_allclose(weights[-1], 1 / (2 * losses), rtol=1e-7)


@given(positive_losses(), st.floats(-3.0, 3.0), st.floats(1e-3, 1.0))
def test_uw_updates_s_by_the_gradient_of_its_objective(losses, s0, learning_rate):
    losses = jnp.asarray(losses)
    state = make("uw").init(len(losses))._replace(log_variances=jnp.full(len(losses), s0))
    _, weights, new_state = run_sequence("uw", losses[None], state=state, learning_rate=learning_rate)
    objective = lambda loss, s: jnp.sum(loss / (2 * jnp.exp(s)) + s / 2)
    np.testing.assert_allclose(weights[0], jax.grad(objective)(losses, state.log_variances), rtol=1e-12)
    expected = state.log_variances - learning_rate * jax.grad(objective, argnums=1)(losses, state.log_variances)
    np.testing.assert_allclose(new_state.log_variances, expected, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- DWA


def test_dwa_is_uniform_until_two_periods_are_complete_and_at_equal_rates():
    period = 3
    steps = jnp.arange(5 * period, dtype=jnp.float64)[:, None]
    losses = jnp.asarray([4.0, 1.0, 0.2]) * 0.9**steps  # every loss falls at the same rate
    _, weights, _ = run_sequence("dwa", losses, period=period)
    np.testing.assert_allclose(weights, 1.0, rtol=1e-12)


def test_dwa_weights_come_from_ratios_of_period_averages():
    """period=2: the step after two complete periods uses r = mean(steps 2, 3) / mean(steps 0, 1)."""
    losses = jnp.asarray([[1.0, 1.0], [0.8, 0.9], [0.4, 0.85], [0.2, 0.8], [0.1, 0.7], [0.1, 0.7]])
    _, weights, _ = run_sequence("dwa", losses, period=2, temperature=2.0)
    np.testing.assert_allclose(weights[:4], 1.0)
    ratio = losses[2:4].mean(axis=0) / losses[0:2].mean(axis=0)
    expected = 2 * jax.nn.softmax(ratio / 2.0)
    np.testing.assert_allclose(weights[4], expected, rtol=1e-12)
    np.testing.assert_allclose(weights[5], expected, rtol=1e-12)  # constant within a period
    assert weights[4, 1] > weights[4, 0]  # the task whose loss fell least gets the larger weight


def test_dwa_guards_a_zero_previous_average():
    """The docstring's guards: a ratio 0/0 is 1, a positive loss over 0 the largest finite number, whose task then
    takes the whole weight K. Step 2 weighs with the averages of steps 1 and 0: task 1 went from 0 to 1, task 2
    stayed at 0 and task 3 at 1, so w = 3 softmax((big, 1, 1) / 2) = (3, 0, 0). (Ten steps: the shape that
    test_dtypes_are_preserved_and_the_state_scans compiles.)"""
    _, weights, _ = run_sequence("dwa", [[0.0, 0.0, 1.0]] + [[1.0, 0.0, 1.0]] * 9)
    np.testing.assert_array_equal(weights[2], [3.0, 0.0, 0.0])
    _, weights, _ = run_sequence("dwa", [[0.0, 0.0, 1.0]] * 2 + [[1.0, 0.0, 1.0]] * 8)
    np.testing.assert_allclose(weights[2], 1.0, rtol=1e-12)  # every ratio 1


@given(hnp.arrays(np.float64, (3, 4), elements=st.floats(0.01, 10.0, width=64)), st.floats(0.1, 10.0))
def test_dwa_weights_sum_to_k_and_order_like_the_loss_ratios(losses, temperature):
    _, weights, _ = run_sequence("dwa", losses, temperature=temperature)
    ratio = losses[1] / losses[0]
    last = weights[2]
    np.testing.assert_allclose(last.sum(), 4.0, rtol=1e-12)
    assert np.all(last >= 0)  # > 0 in exact arithmetic; a large ratio gap underflows the others to 0
    order = np.argsort(ratio, kind="stable")
    assert np.all(np.diff(np.asarray(last)[order]) >= -1e-12)


# ---------------------------------------------------------------- GLS


def geometric_mean(losses):
    return jnp.prod(losses) ** (1.0 / losses.shape[0])


@given(positive_losses())
def test_gls_weights_are_the_gradient_of_the_geometric_mean(losses):
    losses = jnp.asarray(losses)
    _, weights, _ = run_sequence("gls", losses[None])
    np.testing.assert_allclose(weights[0], jax.grad(geometric_mean)(losses), rtol=1e-9)


def test_gls_direction_is_the_parameter_gradient_of_the_geometric_mean():
    """Chain rule on a model: d = sum_t (dGLS/dL_t) g_t equals grad_theta GLS(L(theta))."""
    targets = jax.random.normal(jax.random.key(4), (3, 5), dtype=jnp.float64)
    task_losses = lambda theta: jnp.sum((theta[None, :] - targets) ** 2, axis=1) + 0.1
    theta = jnp.linspace(-1.0, 1.0, 5)
    direction, _, _ = run_sequence("gls", task_losses(theta)[None], jacobian=jax.jacobian(task_losses)(theta))
    np.testing.assert_allclose(direction[0], jax.grad(lambda t: geometric_mean(task_losses(t)))(theta), rtol=1e-10)


def test_gls_guards_zero_losses_and_one_task():
    _, weights, _ = run_sequence("gls", [[0.0, 1.0, 2.0]])
    np.testing.assert_array_equal(weights[0], 0.0)
    _, weights, _ = run_sequence("gls", [[0.0], [3.0]])
    np.testing.assert_array_equal(weights, 1.0)  # K = 1: GLS = L


# ---------------------------------------------------------------- STCH


def stch_scalarisation(losses, nadir, mu, eps=1e-20):
    return mu * jax.scipy.special.logsumexp((jnp.log(losses + eps) - jnp.log(nadir + eps)) / mu)


def test_stch_warmup_is_the_log_loss_sum_and_the_nadir_its_last_period_mean():
    losses = jnp.asarray([[4.0, 2.0], [3.0, 1.5], [2.0, 1.2], [1.0, 1.0], [0.5, 0.9]])
    _, weights, state = run_sequence("stch", losses, warmup_steps=4, period=2)
    np.testing.assert_allclose(weights[:4], 1 / losses[:4], rtol=1e-12)  # d/dL sum log L
    np.testing.assert_allclose(state.nadir, losses[2:4].mean(axis=0), rtol=1e-12)
    nadir = losses[2:4].mean(axis=0)
    np.testing.assert_allclose(weights[4], jax.grad(stch_scalarisation)(losses[4], nadir, 1.0), rtol=1e-10)


@given(positive_losses(), st.floats(0.05, 5.0), st.integers(0, 2**31 - 1))
def test_stch_weights_are_the_gradient_of_its_scalarisation_after_warmup(losses, mu, seed):
    losses = jnp.asarray(losses)
    nadir = jnp.exp(jax.random.normal(jax.random.key(seed), losses.shape, dtype=jnp.float64))
    warmup = jnp.stack([nadir, losses])  # one warm-up step records the nadir, the next is a STCH step
    _, weights, _ = run_sequence("stch", warmup, warmup_steps=1, mu=mu)
    np.testing.assert_allclose(weights[1], jax.grad(stch_scalarisation)(losses, nadir, mu), rtol=1e-9)


def test_stch_concentrates_on_the_worst_relative_loss_as_mu_vanishes():
    nadir = jnp.asarray([1.0, 0.1, 2.0])
    losses = jnp.asarray([0.8, 0.15, 2.5])  # relative losses 0.8, 1.5, 1.25: task 1 is the worst
    for mu, tolerance in ((0.01, 1e-7), (0.001, 1e-60)):
        _, weights, _ = run_sequence("stch", jnp.stack([nadir, losses]), warmup_steps=1, mu=mu)
        np.testing.assert_allclose(weights[1] * losses, [0.0, 1.0, 0.0], atol=tolerance)
    _, smooth, _ = run_sequence("stch", jnp.stack([nadir, losses]), warmup_steps=1, mu=1.0)
    np.testing.assert_allclose(smooth[1], 1 / (nadir * jnp.sum(losses / nadir)), rtol=1e-12)  # mu = 1


# ---------------------------------------------------------------- FAMO


def test_famo_first_step_weights_are_the_normalised_log_loss_gradient():
    losses = jnp.asarray([0.5, 2.0, 4.0])
    _, weights, state = run_sequence("famo", losses[None])
    expected = (1 / (losses + 1e-8)) / jnp.sum(1 / (losses + 1e-8))
    np.testing.assert_allclose(weights[0], expected, rtol=1e-12)
    np.testing.assert_array_equal(state.logits, 0.0)  # no previous losses yet: no update


def test_famo_clamps_negative_losses_to_zero():
    """FAMO is defined for non-negative losses; a negative one is taken as 0 (the docstring), so its weights are
    those of a zero loss, non-negative, and the log-loss decrease of the next step stays finite."""
    losses = np.asarray([1.0, 0.8, 0.75]) * np.exp(-0.1 * np.arange(10))[:, None]  # ten steps, as the dtype test
    _, weights, state = run_sequence("famo", losses * [-1.0, 1.0, 1.0])
    _, clamped, clamped_state = run_sequence("famo", losses * [0.0, 1.0, 1.0])
    np.testing.assert_array_equal(weights, clamped)
    np.testing.assert_array_equal(state.logits, clamped_state.logits)
    assert np.all(np.asarray(weights) >= 0) and np.all(np.isfinite(np.asarray(state.logits)))


def test_famo_logits_favour_the_task_whose_log_loss_decreased_least():
    steps = jnp.arange(30, dtype=jnp.float64)[:, None]
    losses = jnp.asarray([1.0, 1.0]) * jnp.exp(-jnp.asarray([0.2, 0.01]) * steps)
    _, weights, state = run_sequence("famo", losses)
    assert state.logits[1] > state.logits[0]
    assert jax.nn.softmax(state.logits)[1] > 0.6
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-12)


@given(hnp.arrays(np.float64, (2, 3), elements=st.floats(1e-3, 1e3, width=64)),
       hnp.arrays(np.float64, (3,), elements=st.floats(-2.0, 2.0, width=64)))
def test_famo_logit_update_is_one_adam_step_on_the_softmax_pullback(losses, logits):
    """Against optax: chain(add_decayed_weights(gamma), adam(lr)) on J_softmax^T delta (torch's coupled decay)."""
    balancer = make("famo")
    state = balancer.init(3)._replace(logits=jnp.asarray(logits), previous_losses=jnp.asarray(losses[0]),
                                      count=jnp.ones((), jnp.int32))
    _, weights, new_state = run_sequence("famo", losses[1:], state=state)
    delta = jnp.log(losses[0] + 1e-8) - jnp.log(losses[1] + 1e-8)
    _, pullback = jax.vjp(jax.nn.softmax, jnp.asarray(logits))
    (gradient,) = pullback(delta)
    optimiser = optax.chain(optax.add_decayed_weights(1e-3), optax.adam(0.025, b1=0.9, b2=0.999, eps=1e-8))
    updates, _ = optimiser.update(gradient, optimiser.init(jnp.asarray(logits)), jnp.asarray(logits))
    expected = jnp.asarray(logits) + updates
    # Adam's first step is lr * g / (|g| + 1e-8) per logit, g the pullback plus 1e-3 * logits. Where g is zero but
    # for rounding (every loss ratio equal, as softmax's Jacobian maps a constant vector to 0, and the logits 0), a
    # few ulps of |delta| <= 13.8 in each computation (~4e-15) move the step by lr / 1e-8 = 2.5e6 times as much, up
    # to ~1e-8: hence the absolute tolerance. Still caught: Adam's eps at 2e-8, the decay's sign, a scaled mean term.
    np.testing.assert_allclose(new_state.logits, expected, rtol=1e-10, atol=1e-7)
    z = jax.nn.softmax(expected) / (losses[1] + 1e-8)
    np.testing.assert_allclose(weights[0], z / z.sum(), rtol=1e-10)


def test_famo_reproduces_libmtl_order_for_full_batch_training():
    """LibMTL: weigh, update theta, extra forward for the post-update losses, update the logits. Here the
    post-update losses arrive as the next step's losses; the weight sequences must coincide."""
    targets = jnp.asarray([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    scales = jnp.asarray([1.0, 0.2, 3.0])
    task_losses = lambda theta: scales * jnp.sum((theta[None] - targets) ** 2, axis=1) + 0.05
    learning_rate, num_steps = 0.05, 25

    # Reference: LibMTL's FAMO loop, written out with optax for the logits.
    optimiser = optax.chain(optax.add_decayed_weights(1e-3), optax.adam(0.025))
    logits, opt_state, theta = jnp.zeros(3), optimiser.init(jnp.zeros(3)), jnp.zeros(2)
    reference = []
    for _ in range(num_steps):
        losses = task_losses(theta)
        z = jax.nn.softmax(logits) / (losses + 1e-8)
        weights = z / z.sum()
        reference.append(weights)
        theta = theta - learning_rate * weights @ jax.jacobian(task_losses)(theta)
        delta = jnp.log(losses + 1e-8) - jnp.log(task_losses(theta) + 1e-8)
        (gradient,) = jax.vjp(jax.nn.softmax, logits)[1](delta)
        updates, opt_state = optimiser.update(gradient, opt_state, logits)
        logits = logits + updates

    balancer = make("famo")
    state, theta = balancer.init(3), jnp.zeros(2)
    for expected in reference:
        direction, weights, state = balancer.step(jax.jacobian(task_losses)(theta), task_losses(theta), state, KEY)
        np.testing.assert_allclose(weights, expected, rtol=1e-9)
        theta = theta - learning_rate * direction
