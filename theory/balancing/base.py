r"""The contract shared by every gradient-balancing method (Definition 2.1, Eq (4) of ``reference/theory.md``).

A method of the class combines the per-task gradients of the shared parameters into one update direction,

.. math:: d^{(k)} = \sum_{t=1}^K \alpha_t^{(k)}\, \tilde g_t^{(k)}, \qquad
          \tilde g_t^{(k)} = \Pi_t^{(k)}(g_1^{(k)}, \dots, g_K^{(k)}),

where the weights and projections may depend only on the task losses and gradients. Every method here is
written as a pair of pure functions, as optax writes its transformations::

    state = balancer.init(num_tasks)
    direction, weights, state = balancer.step(jacobian, losses, state, key)

with ``jacobian`` ``[K, P]`` (row t is :math:`g_t`), ``losses`` ``[K]``, ``direction`` ``[P]`` and ``weights``
``[K]``. For every method registered so far the direction lies in the row space of the Jacobian and the returned
weights are its *exact* coordinates, ``direction == weights @ jacobian`` (projections such as PCGrad's are tracked
as linear combinations of the rows), so ``weights`` is what the method did, not a decoration. ``step`` is
jittable and vmappable; ``key`` is used only by randomised methods.

Methods are registered under a name with :func:`register`; :func:`make` builds one with validated options.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from scm.linear_gaussian import check_count

REQUIRES = ("losses", "gram", "jacobian")
GRADIENTS_OF = ("parameters", "representation")


class Balancer(NamedTuple):
    r"""A gradient-balancing method: pure functions, its name, and what it needs to see.

    Attributes:
        name: the registered name.
        init: ``(num_tasks, num_params=None) -> state`` (a pytree of arrays, each its own: a jitted step may
            donate the state, as the deep model's steps do, and XLA refuses a buffer donated twice). Methods whose
            state lives in parameter space (DB-MTL, MoCo, ExcessMTL) allocate it when ``num_params`` (P) is given,
            and otherwise on their first step, which cannot happen inside ``lax.scan``: callers that know P should
            pass it. Every other method ignores it.
        step: ``(jacobian [K, P], losses [K], state, key) -> (direction [P], weights [K], state)``.
        weigh: the **Gram-matrix path**, ``(gram [K, K] or None, losses [K], state, key) -> (weights [K], state)``,
            for methods whose direction is exactly ``weights @ jacobian`` and whose weights depend on the gradients
            only through :math:`G = JJ^\top`; a caller may then compute G without holding J (for example through
            the batch) and form the direction by one backward pass of :math:`\sum_t w_t \mathcal L_t`. ``None``
            for methods that need the Jacobian itself. ``step`` always equals ``weigh`` followed by
            ``weights @ jacobian`` when ``weigh`` exists.
        requires: ``"losses"`` (weights from the losses alone; ``weigh`` accepts ``gram=None``), ``"gram"`` or
            ``"jacobian"``.
        gradient_of: ``"parameters"`` when the Jacobian is taken with respect to the shared parameters (Definition
            2.1), ``"representation"`` when the method acts on gradients with respect to the shared representation
            (GradDrop): the direction is then a representation gradient, to be pulled back through the encoder.
    """

    name: str
    init: Callable[[int], Any]
    step: Callable[[jax.Array, jax.Array, Any, jax.Array], tuple[jax.Array, jax.Array, Any]]
    weigh: Callable[[jax.Array | None, jax.Array, Any, jax.Array], tuple[jax.Array, Any]] | None = None
    requires: str = "jacobian"
    gradient_of: str = "parameters"


def weighting_balancer(name: str, init: Callable[[int], Any],
                       weigh: Callable[[jax.Array | None, jax.Array, Any, jax.Array], tuple[jax.Array, Any]],
                       requires: str = "gram") -> Balancer:
    """Builds a :class:`Balancer` from a weighting (Gram matrix and losses -> weights), torchjd's split.

    The Jacobian path computes :math:`G = JJ^\top` (skipped when ``requires == "losses"``), weighs, and returns
    ``weights @ jacobian``.
    """
    check_choice("requires", requires, ("losses", "gram"))

    def checked_weigh(gram_matrix, losses, state, key):
        # JAX arrays: a method that indexes them with a traced index (PCGrad's projection order) fails on NumPy's.
        losses = jnp.asarray(losses)
        gram_matrix = None if gram_matrix is None else jnp.asarray(gram_matrix)
        if losses.ndim != 1:
            raise ValueError(f"losses must have shape [K]; got shape {losses.shape}")
        num_tasks = losses.shape[0]
        if requires == "gram" and (gram_matrix is None or gram_matrix.shape != (num_tasks, num_tasks)):
            shape = None if gram_matrix is None else gram_matrix.shape
            raise ValueError(f"{name} needs the Gram matrix of shape [K, K]=[{num_tasks}, {num_tasks}]; got {shape}")
        return weigh(gram_matrix, losses, state, key)

    def step(jacobian, losses, state, key):
        check_inputs(jacobian, losses)
        weights, state = checked_weigh(gram(jacobian) if requires == "gram" else None, losses, state, key)
        return combine(weights, jacobian), weights, state

    return Balancer(name, init, step, checked_weigh, requires, "parameters")


class EmptyState(NamedTuple):
    """State of a stateless method."""


_REGISTRY: dict[str, Callable[..., Balancer]] = {}


def register(name: str):
    """Registers ``factory(**options) -> Balancer`` under ``name``."""

    def decorator(factory: Callable[..., Balancer]) -> Callable[..., Balancer]:
        if name in _REGISTRY:
            raise ValueError(f"balancing method {name!r} is registered twice")
        _REGISTRY[name] = factory
        return factory

    return decorator


def registered_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def options_of(name: str) -> dict[str, Any]:
    """The options of method ``name`` with their defaults."""
    signature = inspect.signature(_factory(name))
    return {p.name: p.default for p in signature.parameters.values()}


def _factory(name: str) -> Callable[..., Balancer]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown balancing method {name!r}; valid methods: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def make(name: str, **options: Any) -> Balancer:
    """Builds the balancing method ``name`` with ``options``.

    Raises:
        ValueError: for an unknown method or option (the message lists the valid ones), or an option value
            outside its allowed range.
    """
    factory = _factory(name)
    valid = options_of(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        allowed = ", ".join(f"{k}={v!r}" for k, v in valid.items()) or "none"
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for {name!r}; valid options: {allowed}")
    balancer = factory(**options)
    takes_num_params = _takes_num_params(balancer.init)
    return _checking_state(balancer._replace(init=_accepting_num_params(balancer.init)), takes_num_params)


def _takes_num_params(init: Callable[..., Any]) -> bool:
    return "num_params" in inspect.signature(init).parameters


def _accepting_num_params(init: Callable[..., Any]) -> Callable[..., Any]:
    """Gives every ``init`` the uniform signature ``(num_tasks, num_params=None)``."""
    if _takes_num_params(init):
        return init

    def uniform_init(num_tasks: int, num_params: int | None = None) -> Any:
        return init(num_tasks)

    return uniform_init


def _checking_state(balancer: Balancer, takes_num_params: bool) -> Balancer:
    """Makes ``step`` and ``weigh`` refuse a state that ``init`` builds for another K (or P).

    Without this a state built for another number of tasks fails deep inside a method with a broadcasting error,
    or, where a size-1 axis broadcasts (DWA, IMTL, STCH built with ``init(1)``), gives wrong weights silently.
    The check reads static shapes only, so it costs nothing under ``jax.jit``.
    """
    name, init = balancer.name, balancer.init

    def check(state, num_tasks: int, num_params: int | None, inputs: str) -> None:
        # Methods whose state lives in parameter space accept either size: [K, P], or [K, 0] to be sized later.
        sizes = [None] + ([num_params] if takes_num_params and num_params is not None else [])
        builds = [f"init({num_tasks})" if p is None else f"init({num_tasks}, num_params={p})" for p in sizes]
        # Leaves only, not containers: a stateless method may be given () for its empty state.
        expected = [[leaf.shape for leaf in jax.tree.leaves(jax.eval_shape(lambda p=p: init(num_tasks, p)))]
                    for p in sizes]
        paths_and_leaves = jax.tree_util.tree_flatten_with_path(state)[0]
        shapes = [jnp.shape(leaf) for _, leaf in paths_and_leaves]
        if shapes in expected:
            return
        if len(shapes) != len(expected[0]):
            raise ValueError(f"{name} got a state of {len(shapes)} arrays ({type(state).__name__}), not "
                             f"{name}'s {len(expected[0])}; build it with {name}'s {builds[-1]}")
        path, shape, wanted = next((path, shape, wanted) for (path, _), shape, wanted
                                   in zip(paths_and_leaves, shapes, expected[-1]) if shape != wanted)
        hint = builds[-1] + (f" (or {builds[0]} to size it at the first step)" if len(builds) > 1 else "")
        raise ValueError(f"{name} state{jax.tree_util.keystr(path)} has shape {shape}, but {inputs} needs {wanted}; "
                         f"build the state with {hint}")

    def step(jacobian, losses, state, key):
        check_inputs(jacobian, losses)
        check(state, jacobian.shape[0], jacobian.shape[1], f"a jacobian of shape {tuple(jacobian.shape)}")
        return balancer.step(jacobian, losses, state, key)

    def weigh(gram_matrix, losses, state, key):
        if jnp.ndim(losses) == 1:  # else the method's own check names the wrong shape
            check(state, jnp.shape(losses)[0], None, f"losses of shape {tuple(jnp.shape(losses))}")
        return balancer.weigh(gram_matrix, losses, state, key)

    return balancer._replace(step=step, weigh=None if balancer.weigh is None else weigh)


def check_inputs(jacobian: jax.Array, losses: jax.Array) -> int:
    """Checks the static shapes of a step's inputs and returns the number of tasks ``K``."""
    if jacobian.ndim != 2:
        raise ValueError(f"jacobian must have shape [K, P] (one row of shared-parameter gradients per task); "
                         f"got shape {jacobian.shape}")
    if losses.shape != (jacobian.shape[0],):
        raise ValueError(f"losses must have shape [K]=[{jacobian.shape[0]}] to match the jacobian; "
                         f"got shape {losses.shape}")
    return jacobian.shape[0]


def check_num_tasks(num_tasks: int) -> int:
    return check_count("num_tasks", num_tasks, 1)


def check_positive(name: str, value: float, *, allow_zero: bool = False) -> float:
    value = float(value)
    if not (value > 0 or (allow_zero and value == 0)) or value != value or value == float("inf"):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}; got {value!r}")
    return value


def check_choice(name: str, value: Any, choices: tuple) -> Any:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def gram(jacobian: jax.Array) -> jax.Array:
    """The Gram matrix :math:`G = J J^\\top` of the task gradients, ``[K, K]``."""
    return jacobian @ jacobian.T


def combine(weights: jax.Array, jacobian: jax.Array) -> jax.Array:
    """The direction :math:`d = J^\\top w = \\sum_t w_t g_t`, ``[P]``."""
    return weights @ jacobian


def safe_divide(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
    """``numerator / denominator`` where the denominator is non-zero, else 0 (finite for degenerate inputs)."""
    nonzero = denominator != 0
    return jnp.where(nonzero, numerator / jnp.where(nonzero, denominator, 1.0), 0.0)
