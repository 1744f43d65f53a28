r"""Loss-based weightings: UW, DWA, GLS, STCH and FAMO.

Each method here looks at the task losses only (``requires="losses"``). Its weights are the exact coefficients of
the raw task gradients, :math:`d = \sum_t w_t g_t` (``direction == weights @ jacobian``): for a method that
minimises a scalarisation :math:`S(\mathcal L_1, \dots, \mathcal L_K)` of the losses, the chain rule gives
:math:`\nabla_\theta S = \sum_t (\partial S/\partial\mathcal L_t)\, g_t`, so :math:`w_t = \partial S/\partial
\mathcal L_t` evaluated at this step's losses.

The contract calls ``step`` once per optimisation step with that step's losses; there are no epochs. LibMTL's
epoch-based rules are restated per step with a ``period`` option: a *period* is a block of ``period`` consecutive
steps, and wherever LibMTL uses an epoch's average training loss the average over one period is used. The
default ``period=1`` makes each step its own period, which is exact for full-batch training (one step per epoch,
as in :mod:`theory.simulate`); to reproduce LibMTL on minibatches set ``period`` to the number of steps per epoch
(99 for NYUv2 with 795 images, batch 8 and ``drop_last``).

Losses are assumed non-negative (they are in every method's paper); each method documents how it keeps its
outputs finite when a loss is 0.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from theory.balancing.base import (Balancer, EmptyState, check_count, check_num_tasks, check_positive, register,
                                   weighting_balancer)


def _check_integer(name: str, value, minimum: int, maximum: int | None = None, maximum_name: str = "") -> int:
    """An integer option in ``[minimum, maximum]`` (one-line error naming the option and the range)."""
    value = check_count(name, value, minimum)
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be an integer in [{minimum}, {maximum_name or maximum}]; got {value!r}")
    return value


def _state_dtype():
    """The default float dtype (float64 under ``jax_enable_x64``): states keep it whatever the losses' dtype."""
    return jnp.zeros(()).dtype


def _floor(dtype, value: float) -> jax.Array:
    """The guard constant ``value``, raised to the dtype's smallest normal number so that it is non-zero."""
    return jnp.asarray(max(value, float(jnp.finfo(dtype).tiny)), dtype)


# ---------------------------------------------------------------- UW


class UncertaintyState(NamedTuple):
    """State of UW.

    Attributes:
        log_variances: ``[K]`` the learnable :math:`s_t = \\log\\sigma_t^2` (initially −0.5, as LibMTL); each step
            returns the weights of the current :math:`s` and then takes one gradient step on :math:`s`.
    """

    log_variances: jax.Array


@register("uw")
def uncertainty_weighting(learning_rate: float = 0.05) -> Balancer:
    r"""Uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018), with learnable log-variances :math:`s_t`.

    The joint objective, in LibMTL's form (homoscedastic regression likelihood, :math:`s_t = \log\sigma_t^2`), is

    .. math:: \mathcal J(\theta, s) = \sum_{t=1}^K \frac{\mathcal L_t(\theta)}{2e^{s_t}} + \frac{s_t}{2},
              \qquad w_t = \frac{\partial\mathcal J}{\partial\mathcal L_t} = \frac{1}{2e^{s_t}},
              \qquad d = \sum_t w_t g_t .

    Each step returns the weights of the current :math:`s` (initialised at −0.5 as LibMTL), then updates :math:`s`
    by one plain gradient step on :math:`\mathcal J` at this step's losses, which is simultaneous gradient descent on
    :math:`(\theta, s)`:

    .. math:: s_t \leftarrow s_t - \eta\,\frac{\partial\mathcal J}{\partial s_t}
              = s_t - \eta\Big(\frac12 - \frac{\mathcal L_t}{2e^{s_t}}\Big), \qquad \eta = \texttt{learning\_rate}.

    For constant losses the fixed point is :math:`s_t = \log\mathcal L_t`, where :math:`w_t = 1/(2\mathcal L_t)`;
    near it the step contracts by :math:`1 - \eta/2`, so it is stable for :math:`\eta < 4`.

    Deviation from LibMTL: LibMTL registers :math:`s` as a model parameter, so the model's optimiser (Adam, with
    its weight decay) updates it together with the network; here :math:`s` has its own plain gradient step of size
    ``learning_rate`` (default 0.05, a time constant of about 40 steps near the fixed point), so the weighting is
    self-contained. A loss that stays exactly 0 has no fixed point: :math:`s_t` then falls by :math:`\eta/2` per
    step (the weight grows geometrically, finite for any realistic run length), as in the paper's objective.
    """
    learning_rate = check_positive("learning_rate", learning_rate)

    def init(num_tasks: int) -> UncertaintyState:
        num_tasks = check_num_tasks(num_tasks)
        return UncertaintyState(jnp.full((num_tasks,), -0.5, _state_dtype()))

    def weigh(gram, losses, state, key):
        s = state.log_variances.astype(losses.dtype)
        weights = 0.5 * jnp.exp(-s)
        grad_s = 0.5 - losses * weights
        new_s = s - learning_rate * grad_s
        return weights, UncertaintyState(new_s.astype(state.log_variances.dtype))

    return weighting_balancer("uw", init, weigh, requires="losses")


# ---------------------------------------------------------------- DWA


class DWAState(NamedTuple):
    """State of DWA.

    Attributes:
        count: ``int32`` steps taken (incremented every step).
        running_sum: ``[K]`` sum of the losses of the current, incomplete period (reset when a period completes).
        last_average: ``[K]`` mean loss over the last complete period, :math:`\\bar{\\mathcal L}(p-1)`.
        previous_average: ``[K]`` mean loss over the period before it, :math:`\\bar{\\mathcal L}(p-2)`.
            Both averages shift when a period completes, at the end of every ``period``-th step.
    """

    count: jax.Array
    running_sum: jax.Array
    last_average: jax.Array
    previous_average: jax.Array


@register("dwa")
def dynamic_weight_average(temperature: float = 2.0, period: int = 1) -> Balancer:
    r"""Dynamic weight average (Liu, Johns & Davison, CVPR 2019) with ``temperature`` :math:`T` and a ``period``.

    Steps are grouped into periods of ``period`` steps (LibMTL: epochs). With :math:`\bar{\mathcal L}_t(p)` the
    mean loss of task :math:`t` over period :math:`p`, a step of period :math:`p \ge 2` uses

    .. math:: r_t = \frac{\bar{\mathcal L}_t(p-1)}{\bar{\mathcal L}_t(p-2)}, \qquad
              w_t = K\,\frac{\exp(r_t/T)}{\sum_j \exp(r_j/T)}, \qquad d = \sum_t w_t g_t,

    and steps of periods 0 and 1 (before two periods are complete) use :math:`w_t = 1`. The weights thus favour
    the task whose loss fell least and are uniform when every loss falls at the same rate; they are constant
    within a period. With ``period`` = steps per epoch this is LibMTL's rule exactly (its epoch averages are the
    averages of the training-step losses; it weighs from epoch 2 on); the default ``period=1`` treats each step
    as an epoch, exact for full-batch training.

    Guards: a ratio with a zero denominator is 1 when its numerator is also 0 (no change) and the largest finite
    number otherwise (the softmax then gives that task the whole weight), so the weights stay finite.
    """
    temperature = check_positive("temperature", temperature)
    period = _check_integer("period", period, 1)

    def init(num_tasks: int) -> DWAState:
        num_tasks = check_num_tasks(num_tasks)
        return DWAState(jnp.zeros((), jnp.int32), *(jnp.zeros((num_tasks,), _state_dtype()) for _ in range(3)))

    def weigh(gram, losses, state, key):
        dtype = losses.dtype
        num_tasks = losses.shape[0]
        last = state.last_average.astype(dtype)
        previous = state.previous_average.astype(dtype)
        big = jnp.finfo(dtype).max
        positive = previous > 0
        ratio = jnp.where(positive, last / jnp.where(positive, previous, 1.0), jnp.where(last > 0, big, 1.0))
        ratio = jnp.minimum(ratio, big)
        active = state.count >= 2 * period
        weights = jnp.where(active, num_tasks * jax.nn.softmax(ratio / temperature), jnp.ones_like(losses))

        running = state.running_sum.astype(dtype) + losses
        completes = (state.count + 1) % period == 0
        new_state = DWAState(
            state.count + 1,
            jnp.where(completes, jnp.zeros_like(running), running).astype(state.running_sum.dtype),
            jnp.where(completes, running / period, last).astype(state.last_average.dtype),
            jnp.where(completes, last, previous).astype(state.previous_average.dtype))
        return weights, new_state

    return weighting_balancer("dwa", init, weigh, requires="losses")


# ---------------------------------------------------------------- GLS


@register("gls")
def geometric_loss_strategy() -> Balancer:
    r"""Geometric loss strategy (Chennupati et al., MultiNet++, CVPR Workshops 2019): minimise the geometric mean.

    .. math:: \mathrm{GLS} = \Big(\prod_{t=1}^K \mathcal L_t\Big)^{1/K}, \qquad
              \nabla_\theta\mathrm{GLS} = \sum_t \frac{\mathrm{GLS}}{K\,\mathcal L_t}\, g_t, \qquad
              w_t = \frac{\mathrm{GLS}}{K\,\mathcal L_t} .

    The geometric mean is computed as :math:`\exp(\frac1K\sum_t\log\mathcal L_t)`, so products of many losses
    neither overflow nor underflow. With :math:`K = 1`, :math:`w = 1` exactly.

    Guard: when some :math:`\mathcal L_t \le 0` (losses are assumed non-negative) the geometric mean is at its
    minimum 0, where its gradient is 0 in the other tasks and unbounded in task :math:`t`; every weight is then set
    to 0 (a stationary point of GLS), so the outputs stay finite. LibMTL returns :math:`\mathcal L_t /
    (K\prod_j\mathcal L_j)` as its reported weights, which are not the coefficients of its gradient
    (:math:`\mathrm{GLS}/(K\mathcal L_t)`); the weights here are the coefficients, as the contract requires.
    """

    def init(num_tasks: int) -> EmptyState:
        check_num_tasks(num_tasks)
        return EmptyState()  # stateless: the weights depend on this step's losses only

    def weigh(gram, losses, state, key):
        num_tasks = losses.shape[0]
        if num_tasks == 1:
            return jnp.ones_like(losses), state
        positive = losses > 0
        safe = jnp.where(positive, losses, 1.0)
        all_positive = jnp.all(positive)
        # w_t = GLS / (K L_t) = exp(mean(log L) - log L_t) / K, in logs.
        log_safe = jnp.log(safe)
        weights = jnp.exp(jnp.mean(log_safe) - log_safe) / num_tasks
        return jnp.where(all_positive, weights, jnp.zeros_like(weights)), state

    return weighting_balancer("gls", init, weigh, requires="losses")


# ---------------------------------------------------------------- STCH


class STCHState(NamedTuple):
    """State of STCH.

    Attributes:
        count: ``int32`` steps taken (incremented every step).
        nadir: ``[K]`` the reference point :math:`z`. During the last ``period`` warm-up steps each step adds
            :math:`\\mathcal L_t/\\texttt{period}`, so at the end of the warm-up it holds their mean loss; it is
            fixed afterwards.
    """

    count: jax.Array
    nadir: jax.Array


@register("stch")
def smooth_tchebycheff(mu: float = 1.0, warmup_steps: int = 5, period: int = 1) -> Balancer:
    r"""Smooth Tchebycheff scalarisation (Lin et al., ICML 2024) with smoothing ``mu`` :math:`\mu`.

    **Warm-up** (the first ``warmup_steps`` steps): minimise the sum of log-losses,

    .. math:: S_{\rm warm} = \sum_t \log(\mathcal L_t + \epsilon), \qquad w_t = \frac{1}{\mathcal L_t + \epsilon},

    and average the losses of the last ``period`` warm-up steps into the nadir (reference) vector :math:`z`.

    **Afterwards**: minimise the smooth Tchebycheff scalarisation of the log-losses relative to :math:`z`,

    .. math:: S_\mu = \mu\log\sum_{t=1}^K \exp\Big(\frac{u_t}{\mu}\Big), \qquad
              u_t = \log\frac{\mathcal L_t + \epsilon}{z_t + \epsilon} .

    Derivation of the weights: :math:`\partial S_\mu/\partial u_t = \mu\cdot\frac{e^{u_t/\mu}/\mu}
    {\sum_j e^{u_j/\mu}} = \mathrm{softmax}(u/\mu)_t` and :math:`\partial u_t/\partial\mathcal L_t =
    1/(\mathcal L_t + \epsilon)`, so by the chain rule

    .. math:: w_t = \frac{\partial S_\mu}{\partial\mathcal L_t}
              = \frac{\mathrm{softmax}(u/\mu)_t}{\mathcal L_t + \epsilon}, \qquad
              d = \nabla_\theta S_\mu = \sum_t w_t g_t .

    As :math:`\mu\to0` the softmax concentrates on the worst relative loss :math:`\arg\max_t\mathcal L_t/z_t`
    (the Tchebycheff scalarisation :math:`\max_t u_t`); :math:`\mu = 1` gives
    :math:`w_t = 1/\big(z_t\sum_j\mathcal L_j/z_j\big)`, a fixed weighting by :math:`1/z_t` up to a common scale.
    :math:`\epsilon` is 1e-20 (LibMTL's guard; the dtype's smallest normal number if larger), so a zero loss or a
    zero nadir entry gives finite weights.

    Per step restatement of LibMTL (``STCH_warmup_epoch=4``): LibMTL minimises the log-loss sum during epochs
    0..warmup_epoch and takes the nadir as the mean training loss of epoch ``warmup_epoch``, then switches. Here
    that is ``warmup_steps = (warmup_epoch + 1) * steps_per_epoch`` and ``period = steps_per_epoch``; the defaults
    ``warmup_steps=5, period=1`` are LibMTL's defaults for full-batch training (one step per epoch). ``period``
    must lie in ``[1, warmup_steps]``.

    Deviations from LibMTL: LibMTL multiplies :math:`S_\mu` by :math:`K` (its weights sum to :math:`K` rather than
    1 after the softmax); here :math:`S_\mu` is the paper's scalarisation, so the post-warm-up direction is
    :math:`K` times shorter than LibMTL's (the same direction; scale-free optimisers such as Adam do not see it).
    LibMTL guards with :math:`\log(\mathcal L_t/z_t + 10^{-20})`; here both :math:`\mathcal L_t` and :math:`z_t` are
    guarded, so that :math:`z_t = 0` stays finite. LibMTL reports weights of 1; these are the exact coefficients.
    """
    mu = check_positive("mu", mu)
    warmup_steps = _check_integer("warmup_steps", warmup_steps, 1)
    period = _check_integer("period", period, 1, warmup_steps, f"warmup_steps={warmup_steps}")

    def init(num_tasks: int) -> STCHState:
        num_tasks = check_num_tasks(num_tasks)
        return STCHState(jnp.zeros((), jnp.int32), jnp.zeros((num_tasks,), _state_dtype()))

    def weigh(gram, losses, state, key):
        dtype = losses.dtype
        eps = _floor(dtype, 1e-20)
        nadir = state.nadir.astype(dtype)
        shifted = losses + eps
        in_warmup = state.count < warmup_steps
        warm_weights = 1.0 / shifted
        relative = jnp.log(shifted) - jnp.log(nadir + eps)
        stch_weights = jax.nn.softmax(relative / mu) / shifted
        weights = jnp.where(in_warmup, warm_weights, stch_weights)

        in_window = in_warmup & (state.count >= warmup_steps - period)
        new_nadir = nadir + jnp.where(in_window, losses / period, jnp.zeros_like(losses))
        return weights, STCHState(state.count + 1, new_nadir.astype(state.nadir.dtype))

    return weighting_balancer("stch", init, weigh, requires="losses")


# ---------------------------------------------------------------- FAMO


class FAMOState(NamedTuple):
    """State of FAMO.

    Attributes:
        logits: ``[K]`` :math:`\\xi`; updated at the start of every step but the first (one Adam step), before the
            weights of that step are formed. The previous step's weights :math:`z = \\mathrm{softmax}(\\xi)` are
            these logits as they stand before that update.
        first_moment: ``[K]`` Adam's first-moment estimate for :math:`\\xi` (updated with the logits).
        second_moment: ``[K]`` Adam's second-moment estimate for :math:`\\xi` (updated with the logits).
        previous_losses: ``[K]`` the losses of the previous step (replaced by this step's losses every step).
        count: ``int32`` steps taken (incremented every step); the logits have had ``max(count - 1, 0)`` updates.
    """

    logits: jax.Array
    first_moment: jax.Array
    second_moment: jax.Array
    previous_losses: jax.Array
    count: jax.Array


@register("famo")
def famo(w_lr: float = 0.025, w_gamma: float = 1e-3) -> Balancer:
    r"""FAMO, fast adaptive multitask optimisation (Liu, Liang, Liu, Stone & Liu, NeurIPS 2023).

    With logits :math:`\xi` (initially 0), :math:`z = \mathrm{softmax}(\xi)` and
    :math:`D_t = \mathcal L_t + \epsilon` (:math:`\epsilon = 10^{-8}`, LibMTL's and the official code's), FAMO
    descends the weighted log-losses with a normalising constant :math:`c`:

    .. math:: d = c\sum_t \frac{z_t}{D_t}\, g_t = \nabla_\theta\, c\sum_t z_t\log D_t, \qquad
              c = \Big(\sum_t \frac{z_t}{D_t}\Big)^{-1}, \qquad w_t = \frac{z_t/D_t}{\sum_j z_j/D_j},

    so the weights on the raw gradients sum to 1. The logits follow the log-loss decrease the update produced,

    .. math:: \delta_t = \log D_t^{\rm before} - \log D_t^{\rm after}, \qquad
              \xi \leftarrow \xi - \beta\,\mathrm{Adam}\big(J_{\rm softmax}(\xi)^\top\delta + \gamma\,\xi\big),

    with :math:`\beta` = ``w_lr`` and :math:`\gamma` = ``w_gamma`` (Adam with coupled weight decay, β = (0.9,
    0.999), eps 1e-8: ``torch.optim.Adam(lr=w_lr, weight_decay=w_gamma)`` as LibMTL and the official code), which
    moves weight towards the tasks whose log-loss decreased least.

    Timing within this contract: FAMO needs the losses *after* the update, which LibMTL gets from an extra
    forward pass on the same batch (``update_w``). ``step`` sees only this step's losses, so the state keeps the
    previous step's losses, and at the start of step :math:`k+1` the logits are updated with
    :math:`\delta = \log D(\text{losses of step } k) - \log D(\text{losses of step } k+1)` before the weights of
    step :math:`k+1` are formed. The softmax Jacobian is taken at the logits of step :math:`k` (those that made the
    previous weights), as in LibMTL. For full-batch training the losses seen at step :math:`k+1` are exactly the
    post-update losses of step :math:`k`, so this equals LibMTL's sequence of logits and weights; with minibatches
    they are measured on the next batch instead of the same one, which adds batch-to-batch noise to
    :math:`\delta`. The first step uses :math:`\xi = 0` (uniform :math:`z`) and only records its losses. Negative
    losses are clamped to 0 (FAMO is defined for non-negative losses).
    """
    w_lr = check_positive("w_lr", w_lr)
    w_gamma = check_positive("w_gamma", w_gamma, allow_zero=True)
    beta1, beta2, adam_eps = 0.9, 0.999, 1e-8

    def init(num_tasks: int) -> FAMOState:
        num_tasks = check_num_tasks(num_tasks)
        return FAMOState(*(jnp.zeros((num_tasks,), _state_dtype()) for _ in range(4)), jnp.zeros((), jnp.int32))

    def weigh(gram, losses, state, key):
        dtype = losses.dtype
        eps = _floor(dtype, 1e-8)
        logits = state.logits.astype(dtype)
        m, v = state.first_moment.astype(dtype), state.second_moment.astype(dtype)
        current = jnp.maximum(losses, 0.0) + eps
        previous = jnp.maximum(state.previous_losses.astype(dtype), 0.0) + eps

        # The logit update for the previous step (skipped at the first step, which has no previous losses).
        delta = jnp.log(previous) - jnp.log(current)
        z = jax.nn.softmax(logits)
        grad = z * (delta - z @ delta) + w_gamma * logits  # J_softmax^T delta, plus the coupled weight decay
        m_new = beta1 * m + (1 - beta1) * grad
        v_new = beta2 * v + (1 - beta2) * grad**2
        updates = jnp.maximum(state.count, 1).astype(dtype)  # this is the count-th update of the logits
        m_hat = m_new / (1 - beta1**updates)
        v_hat = v_new / (1 - beta2**updates)
        logits_new = logits - w_lr * m_hat / (jnp.sqrt(v_hat) + adam_eps)
        first = state.count == 0
        logits = jnp.where(first, logits, logits_new)
        m = jnp.where(first, m, m_new)
        v = jnp.where(first, v, v_new)

        scaled = jax.nn.softmax(logits) / current
        weights = scaled / jnp.sum(scaled)
        new_state = FAMOState(logits.astype(state.logits.dtype), m.astype(state.first_moment.dtype),
                              v.astype(state.second_moment.dtype), losses.astype(state.previous_losses.dtype),
                              state.count + 1)
        return weights, new_state

    return weighting_balancer("famo", init, weigh, requires="losses")
