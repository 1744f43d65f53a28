r"""The learner Theorem 2.3 talks about, trained on source samples of the linear-Gaussian SCM.

The tasks share a trainable linear layer :math:`W \in \mathbb R^{h\times d}` on the entangled semantic slot
:math:`\hat z_s` (so a balancer has shared parameters to balance), followed by per-task linear heads
:math:`v_t \in \mathbb R^h`:

.. math:: \hat y_t = v_t^\top W \hat z_s, \qquad \hat{\mathcal L}_t = \frac1n\sum_i (\hat y_{t,i} - y_{t,i})^2 .

Training is full-batch, so the losses depend on the data only through their empirical second moments
:math:`\hat\Sigma_{zz} = \frac1n\sum_i \hat z_i\hat z_i^\top`, :math:`\hat\Sigma_{zy}` and :math:`\hat\Sigma_{yy}`:

.. math:: \hat{\mathcal L}_t = v_t^\top W \hat\Sigma_{zz} W^\top v_t - 2\, v_t^\top W \hat\Sigma_{zy,t}
          + \hat\Sigma_{yy,t},

computed once per configuration; a step then costs :math:`O(d^2 h)` whatever the sample size (the gradients are
exactly those of the per-sample mean squared error).

One training step (Definition 2.1): per-task gradients of :math:`W` from one forward pass (``jax.vjp``, ``vmap``
over one-hot cotangents) go through the balancer, whose direction updates :math:`W`; each head is updated by its
own task's gradient. An optax optimiser (Adam with a cosine-decayed step, so the iterates settle) applies both.

**This departs from Eq (4).** Eq (4) moves the shared parameters by plain steps, :math:`\vartheta \leftarrow
\vartheta - \eta\, d`; here the balancer's direction :math:`d` is handed to Adam, which divides it coordinate-wise
by running moments, so the step actually taken is not a multiple of :math:`d`. The behaviour is kept on purpose, and
the conclusions drawn from it do not depend on it:

* the limit points are unchanged. A point where every task gradient vanishes gives :math:`d = 0` for every method of
  the class, whatever its weights or projections, and is then a fixed point of Adam exactly as of Eq (4); in this
  model all tasks can be optimal at once, and the trained predictor is compared with those points (the exact gap of
  the source-optimal heads, the least-squares heads of the same sample), so any run that does not reach them shows
  up as optimisation error instead of passing silently. Adam changes the path and the speed, not where a converged
  run ends;
* Adam normalises away the scale of :math:`d`, which differs by orders of magnitude between methods (in the default
  θ sweep MGDA's mean weights lie on the simplex, Nash-MTL's are about 440 and FairGrad's about 10⁵): one learning
  rate and schedule then serve every method, where plain Eq (4) steps would need a step size tuned per method to be
  stable and to converge.

The trained predictor is linear in :math:`\hat z_s` with effective heads :math:`w_t = W^\top v_t`, so its source
and target risks are the exact quadratic forms of :mod:`theory.closed_forms`; :func:`monte_carlo_risk` estimates
them from fresh samples with a standard error as an independent check.

:func:`sweep` trains one method over a whole grid (θ × seeds) under a single ``jit`` of nested ``vmap`` s.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from scm.linear_gaussian import Domain, LinearGaussianSCM, check_count, check_theta, rotation_encoder, sample
from theory import closed_forms
from theory.balancing import Balancer


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How the simulated learner is trained.

    Attributes:
        num_samples: source samples per seed (``n >= 2``), drawn once and used full-batch.
        steps: optimisation steps (``>= 1``).
        learning_rate: peak Adam step size, decayed by a cosine schedule to 0 (``> 0``).
        hidden_dim: width ``h`` of the shared layer; ``None`` means ``d`` (every task optimum is reachable at once).
        init_scale: standard deviation of the initial weights, times :math:`1/\\sqrt{\\text{fan-in}}` (``> 0``).
    """

    num_samples: int = 2048
    steps: int = 400
    learning_rate: float = 0.05
    hidden_dim: int | None = None
    init_scale: float = 1.0

    def __post_init__(self):
        check_count("num_samples", self.num_samples, 2)
        check_count("steps", self.steps, 1)
        if not (self.learning_rate > 0 and np.isfinite(self.learning_rate)):
            raise ValueError(f"learning_rate must be a finite number > 0; got {self.learning_rate!r}")
        if self.hidden_dim is not None:
            check_count("hidden_dim", self.hidden_dim, 1, or_none=True)
        if not (self.init_scale > 0 and np.isfinite(self.init_scale)):
            raise ValueError(f"init_scale must be a finite number > 0; got {self.init_scale!r}")


class Params(NamedTuple):
    """Parameters of the simulated learner.

    Attributes:
        shared: the shared layer :math:`W`, ``[h, d]``.
        heads: the task heads :math:`v_t` as rows, ``[K, h]``.
    """

    shared: jax.Array
    heads: jax.Array


def effective_heads(params: Params) -> jax.Array:
    """The heads :math:`w_t = W^\\top v_t` of the predictor on :math:`\\hat z_s`, ``[K, d]``."""
    return params.heads @ params.shared


def task_losses(params: Params, z_s: jax.Array, y: jax.Array) -> jax.Array:
    """Per-task mean squared errors on a batch: ``z_s`` ``[n, d]``, ``y`` ``[n, K]`` -> ``[K]``."""
    predictions = (z_s @ params.shared.T) @ params.heads.T
    return jnp.mean((predictions - y) ** 2, axis=0)


class Moments(NamedTuple):
    """Empirical second moments of a sample: ``zz`` ``[d, d]``, ``zy`` ``[d, K]``, ``yy`` ``[K]``."""

    zz: jax.Array
    zy: jax.Array
    yy: jax.Array


def moments_of(z_s: jax.Array, y: jax.Array) -> Moments:
    n = z_s.shape[0]
    return Moments(z_s.T @ z_s / n, z_s.T @ y / n, jnp.mean(y**2, axis=0))


def moment_losses(params: Params, moments: Moments) -> jax.Array:
    """:func:`task_losses` from the sample's second moments (identical values, cost independent of ``n``), ``[K]``."""
    heads = effective_heads(params)  # [K, d]
    quadratic = jnp.einsum("ki,ij,kj->k", heads, moments.zz, heads)
    return quadratic - 2.0 * jnp.einsum("ki,ik->k", heads, moments.zy) + moments.yy


def init_params(scm: LinearGaussianSCM, config: TrainConfig, key: jax.Array) -> Params:
    hidden = config.hidden_dim or scm.dim
    key_shared, key_heads = jax.random.split(key)
    shared = config.init_scale * jax.random.normal(key_shared, (hidden, scm.dim)) / np.sqrt(scm.dim)
    heads = config.init_scale * jax.random.normal(key_heads, (scm.num_tasks, hidden)) / np.sqrt(hidden)
    return Params(shared, heads)


class TrainResult(NamedTuple):
    """What training one configuration produced.

    Attributes:
        params: the trained parameters.
        final_losses: ``[K]`` empirical source losses at the last step.
        final_weights: ``[K]`` the balancer's weights at the last step.
        mean_weights: ``[K]`` the balancer's weights averaged over all steps.
        least_squares_heads: ``[K, d]`` the empirical risk minimisers on the same sample (from its moments).
    """

    params: Params
    final_losses: jax.Array
    final_weights: jax.Array
    mean_weights: jax.Array
    least_squares_heads: jax.Array


def _source_batch(scm: LinearGaussianSCM, theta, key: jax.Array, num_samples: int):
    data = sample(scm, key, num_samples, "source")
    z_s, _ = rotation_encoder(theta, data.s, data.r)
    return z_s, data.y


class TrainState(NamedTuple):
    """Everything one training step reads and writes (a pytree, so it can be scanned, vmapped or checkpointed).

    ``samples`` holds the source sample ``(z_s [n, d], y [n, K])`` only for methods that act on representation
    gradients (they need per-sample gradients); it is ``None`` otherwise, and steps read the moments alone.
    """

    params: Params
    opt_state: optax.OptState
    balancer_state: object
    moments: Moments
    samples: tuple[jax.Array, jax.Array] | None = None


def _optimiser(config: TrainConfig) -> optax.GradientTransformation:
    return optax.adam(optax.cosine_decay_schedule(config.learning_rate, config.steps))


def init_train_state(scm: LinearGaussianSCM, balancer: Balancer, theta, key: jax.Array,
                     config: TrainConfig) -> tuple[TrainState, jax.Array]:
    """Draws the source sample and the initial parameters; returns the state and the key for the balancer's steps.

    The key fixes the data, the initialisation and the balancer's randomness; the data depend on the key only, so
    one seed sees the same latent draws at every θ.
    """
    check_theta(theta)
    data_key, init_key, balance_key = jax.random.split(key, 3)
    z_s, y = _source_batch(scm, theta, data_key, config.num_samples)
    params = init_params(scm, config, init_key)
    representation = balancer.gradient_of == "representation"
    samples = (z_s, y) if representation else None
    num_params = config.num_samples * params.shared.shape[0] if representation else params.shared.size
    state = TrainState(params, _optimiser(config).init(params), balancer.init(scm.num_tasks, num_params=num_params),
                       moments_of(z_s, y), samples)
    return state, balance_key


def _shared_direction(scm: LinearGaussianSCM, balancer: Balancer, state: TrainState, key: jax.Array):
    """Per-task gradients -> balancer -> the update direction of the shared layer ``[h, d]``.

    Returns ``(direction, per-task head gradients [K, K, h], losses [K], weights [K], balancer_state)``.
    """
    one_hots = jnp.eye(scm.num_tasks, dtype=state.moments.zz.dtype)
    if balancer.gradient_of == "parameters":
        losses, pullback = jax.vjp(lambda p: moment_losses(p, state.moments), state.params)
        (per_task,) = jax.vmap(pullback)(one_hots)  # Params with a leading task axis
        jacobian = per_task.shared.reshape(scm.num_tasks, -1)
        direction, weights, balancer_state = balancer.step(jacobian, losses, state.balancer_state, key)
        return direction.reshape(state.params.shared.shape), per_task.heads, losses, weights, balancer_state
    # Representation gradients: the shared representation is rep = z_s W^T, [n, h].
    z_s, y = state.samples
    representation = z_s @ state.params.shared.T
    losses, pullback = jax.vjp(lambda r, heads: jnp.mean((r @ heads.T - y) ** 2, axis=0), representation,
                               state.params.heads)
    per_task_rep, per_task_heads = jax.vmap(pullback)(one_hots)  # [K, n, h], [K, K, h]
    direction, weights, balancer_state = balancer.step(per_task_rep.reshape(scm.num_tasks, -1), losses,
                                                       state.balancer_state, key)
    # Pull the representation-space direction back through rep = z_s W^T.
    shared_direction = direction.reshape(representation.shape).T @ z_s
    return shared_direction, per_task_heads, losses, weights, balancer_state


def train_step(scm: LinearGaussianSCM, balancer: Balancer, config: TrainConfig, state: TrainState,
               key: jax.Array) -> tuple[TrainState, tuple[jax.Array, jax.Array]]:
    """One step of Definition 2.1: per-task Jacobian of the shared layer (or representation) -> balancer -> optax.

    Returns the new state and ``(losses [K], weights [K])`` of this step.
    """
    direction, per_task_heads, losses, weights, balancer_state = _shared_direction(scm, balancer, state, key)
    # Head t only enters loss t, so summing the per-task head gradients gives each head its own task's gradient.
    grads = Params(direction, per_task_heads.sum(axis=0))
    updates, opt_state = _optimiser(config).update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return state._replace(params=params, opt_state=opt_state, balancer_state=balancer_state), (losses, weights)


def train(scm: LinearGaussianSCM, balancer: Balancer, theta, key: jax.Array, config: TrainConfig) -> TrainResult:
    r"""Trains the shared layer and heads on ``config.num_samples`` source samples with ``balancer``.

    Pure in ``(theta, key)``: vmap over both for grids. The steps run under ``lax.scan``.
    """
    state, balance_key = init_train_state(scm, balancer, theta, key, config)
    keys = jax.random.split(balance_key, config.steps)
    state, (_, weights) = jax.lax.scan(lambda s, k: train_step(scm, balancer, config, s, k), state, keys)
    final_losses = moment_losses(state.params, state.moments)
    return TrainResult(state.params, final_losses, weights[-1], jnp.mean(weights, axis=0),
                       moment_least_squares(state.moments))


def moment_least_squares(moments: Moments) -> jax.Array:
    r"""Ordinary least squares from a sample's second moments, :math:`\hat\Sigma_{zz}^{-1}\hat\Sigma_{zy}`,
    ``[K, d]``."""
    return jnp.linalg.solve(moments.zz, moments.zy).T


def least_squares_heads(scm: LinearGaussianSCM, theta, key: jax.Array, config: TrainConfig) -> jax.Array:
    """The empirical risk minimisers on the same source sample as :func:`train` (ordinary least squares), ``[K, d]``.

    A converged learner reaches these; comparing with them separates optimisation error from sampling error.
    """
    data_key, _, _ = jax.random.split(key, 3)
    return moment_least_squares(moments_of(*_source_batch(scm, theta, data_key, config.num_samples)))


class Evaluation(NamedTuple):
    """Exact population quantities of a trained predictor, each ``[K]``.

    Attributes:
        source_risk: :math:`\\mathcal R_S(w_t)`.
        target_risk: :math:`\\mathcal R_T(w_t)`.
        gap: :math:`\\mathcal R_T - \\mathcal R_S` (Eq (3)).
        least_squares_gap: the gap of the empirical risk minimiser on the same sample.
        final_losses: empirical source losses at the end of training.
        mean_weights: the balancer's weights averaged over training.
    """

    source_risk: jax.Array
    target_risk: jax.Array
    gap: jax.Array
    least_squares_gap: jax.Array
    final_losses: jax.Array
    mean_weights: jax.Array


def evaluate(scm: LinearGaussianSCM, theta, result: TrainResult) -> Evaluation:
    """Exact source and target risks of a trained predictor, and the gap of least squares on the same sample."""
    heads = effective_heads(result.params)
    source = closed_forms.risk(scm, theta, heads, "source")
    target = closed_forms.risk(scm, theta, heads, "target")
    ols_gap = closed_forms.ood_gap(scm, theta, result.least_squares_heads)
    return Evaluation(source, target, target - source, ols_gap, result.final_losses, result.mean_weights)


def train_and_evaluate(scm: LinearGaussianSCM, balancer: Balancer, theta, key: jax.Array,
                       config: TrainConfig) -> Evaluation:
    """Trains one configuration (seeded by ``key``) and evaluates its exact source and target risks."""
    return evaluate(scm, theta, train(scm, balancer, theta, key, config))


def seed_keys(seeds) -> jax.Array:
    """One ``jax.random`` key per integer seed in [0, 2³²), ``[S]``."""
    values = np.asarray(seeds)
    if values.ndim != 1 or not np.issubdtype(values.dtype, np.integer) or np.any(values < 0) or np.any(
            values >= 2**32):
        raise ValueError(f"seeds must be a 1-D sequence of integers in [0, 2**32); got {seeds!r}")
    return jax.vmap(jax.random.key)(jnp.asarray(values, dtype=jnp.uint32))


def sweep(scm: LinearGaussianSCM, balancer: Balancer, thetas, seeds, config: TrainConfig) -> Evaluation:
    """Trains and evaluates ``balancer`` on every (θ, seed) of the grid in one jitted, vmapped call.

    Args:
        scm: the model.
        balancer: a method of :mod:`theory.balancing`.
        thetas: ``[T]`` angles in :math:`[0, \\pi/2]`.
        seeds: ``[S]`` integer seeds.
        config: the training configuration.

    Returns:
        An :class:`Evaluation` whose fields have shape ``[T, S, K]``.
    """
    check_theta(thetas)
    thetas = jnp.asarray(thetas, dtype=jnp.result_type(float))
    if thetas.ndim != 1:
        raise ValueError(f"thetas must be a 1-D array of angles; got shape {thetas.shape}")
    return _compiled_grid(scm, balancer, config)(thetas, seed_keys(seeds))


@functools.lru_cache(maxsize=64)
def _compiled_grid(scm: LinearGaussianSCM, balancer: Balancer, config: TrainConfig):
    """One jitted grid function per (model, method, configuration), so repeated sweeps reuse the executable."""

    def one(theta, key):
        return train_and_evaluate(scm, balancer, theta, key, config)

    return jax.jit(jax.vmap(jax.vmap(one, in_axes=(None, 0)), in_axes=(0, None)))


def monte_carlo_risk(scm: LinearGaussianSCM, theta, heads: jax.Array, key: jax.Array, num_samples: int,
                     domain: Domain) -> tuple[jax.Array, jax.Array]:
    r"""Monte Carlo estimate of :math:`\mathcal R_e(w_t)` from ``num_samples`` fresh samples, with its standard error.

    Returns:
        ``(mean [K], standard_error [K])``, the standard error being :math:`\hat\sigma/\sqrt n` of the squared errors.
    """
    data = sample(scm, key, num_samples, domain)
    z_s, _ = rotation_encoder(theta, data.s, data.r)
    squared_errors = (z_s @ heads.T - data.y) ** 2
    return jnp.mean(squared_errors, axis=0), jnp.std(squared_errors, axis=0, ddof=1) / np.sqrt(num_samples)
