"""Every parameter-space balancing baseline takes one step of the tiny dual-stream model (per-task Jacobian of the
shared parameters from one forward pass, then the method's direction). A file of its own so that the test runner
can spread the compile-heavy deep tests over its workers."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deep import losses, train, trainer
from deep.model import DualStreamModel, ModelConfig
from test_deep_train import TINY, compiled, copied, make_batch
from theory.balancing import METHODS, make


def test_every_parameter_space_baseline_runs_one_step():
    optimizer = train.make_optimizer(train.OptimConfig(warmup_epochs=0))
    model = DualStreamModel(ModelConfig(**{**TINY.__dict__, "grounding": "none"}), nnx.Rngs(0))
    graphdef, state = train.split_model(model, optimizer)
    batch = make_batch()
    losses_k, jacobian, head_grads, batch_stats, rest = compiled(
        functools.partial(train.task_jacobian_step, graphdef), state, batch)(state, batch)
    apply = jax.jit(functools.partial(train.apply_gradients, graphdef, optimizer))
    assert jacobian.shape[0] == 3 and jnp.all(jnp.isfinite(jacobian))
    names = [m for m in METHODS if make(m).gradient_of == "parameters"]
    assert len(names) == len(METHODS) - 1  # GradDrop acts on representation gradients
    for name in names:
        balancer = make(name)
        balancer_state = balancer.init(3, num_params=jacobian.shape[1])
        direction, weights, _ = jax.jit(balancer.step)(jacobian, losses_k, balancer_state, jax.random.key(0))
        new_state, finite = apply(state, direction, head_grads, batch_stats, rest, losses_k.sum())
        assert bool(finite), name
        assert int(new_state.step) == 1


def test_a_non_finite_step_leaves_the_balancers_state_too():
    """DWA keeps the last losses and GradVac its alignment targets: a step rejected as non-finite must not leave
    NaNs there either, or every later step would inherit them. The script's step (``trainer.make_step``) donates
    both states it is given, so each call gets copies, and the first checks that they were consumed."""
    optimizer = train.make_optimizer(train.OptimConfig(warmup_epochs=0))
    model = DualStreamModel(ModelConfig(**{**TINY.__dict__, "grounding": "none"}), nnx.Rngs(0))
    graphdef, state = train.split_model(model, optimizer)
    bad = make_batch()
    bad["images"] = bad["images"].at[0, 0, 0, 0].set(jnp.nan)
    num_params = sum(leaf.size for leaf in jax.tree.leaves(state.params[0]))
    for name in ("dwa", "gradvac"):
        balancer, step = trainer.make_step(name, graphdef, optimizer, losses.PRESETS["nyuv2"])
        given_state, given_balancer = copied(state), copied(balancer.init(3, num_params=num_params))
        _, balancer_state, metrics = step(given_state, given_balancer, make_batch(), jax.random.key(0), None)
        assert bool(metrics["finite"]), name
        assert jax.tree.leaves(given_balancer), name
        assert all(leaf.is_deleted() for leaf in jax.tree.leaves((given_state, given_balancer))), name
        _, after_finite, _ = step(copied(state), copied(balancer_state), make_batch(seed=2), jax.random.key(1), None)
        assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(after_finite),
                                                             jax.tree.leaves(balancer_state))), name
        _, kept, metrics = step(copied(state), copied(balancer_state), bad, jax.random.key(1), None)
        assert not bool(metrics["finite"]), name
        for a, b in zip(jax.tree.leaves(kept), jax.tree.leaves(balancer_state), strict=True):
            assert np.array_equal(a, b), name
