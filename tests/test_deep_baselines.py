"""Every parameter-space balancing baseline takes one step of the tiny dual-stream model (per-task Jacobian of the
shared parameters from one forward pass, then the method's direction). A file of its own so that the test runner
can spread the compile-heavy deep tests over its workers."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

from deep import losses, train, trainer
from deep.model import DualStreamModel, ModelConfig
from test_deep_model import AUTHORS
from test_deep_train import TINY, StandInConfig, comparable_leaves, compiled, copied, make_batch
from test_trained import tree_layout
from theory.balancing import METHODS, make

# No weight decay: with the coupled L2 inside Adam every weight would move by about the learning rate even along a
# zero direction, so a step that lost its direction would still change the parameters. No warm-up: the first step
# runs at the full learning rate.
OPTIM = train.OptimConfig(warmup_epochs=0, weight_decay=0.0)
ADAM_B1, ADAM_EPSILON = 0.9, 1e-8  # optax's defaults, which make_optimizer keeps


@pytest.fixture(scope="module")
def setup():
    optimizer = train.make_optimizer(OPTIM)
    model = DualStreamModel(ModelConfig(**{**TINY.__dict__, "grounding": "none"}), nnx.Rngs(0))
    graphdef, state = train.split_model(model, optimizer)
    return graphdef, optimizer, state


@pytest.fixture(scope="module")
def jacobian_step(setup):
    """``task_jacobian_step`` on :func:`make_batch`: losses, Jacobian, head gradients and the new statistics."""
    graphdef, _, state = setup
    batch = make_batch()
    return compiled(functools.partial(train.task_jacobian_step, graphdef), state, batch)(state, batch)


@pytest.fixture(scope="module")
def apply(setup):
    graphdef, optimizer, _ = setup
    return jax.jit(functools.partial(train.apply_gradients, graphdef, optimizer))


@pytest.fixture(scope="module")
def script_steps(setup):
    """The script's steps (``trainer.make_step``, donating what they are given) for DWA, which weighs the losses
    (one backward pass), and GradVac, which goes through the per-task Jacobian; each compiled once, on first use."""
    graphdef, optimizer, _ = setup
    return {name: trainer.make_step(name, graphdef, optimizer, losses.PRESETS["nyuv2"]) for name in ("dwa", "gradvac")}


def first_adam_step(params, grads):
    """The parameters after one step of :data:`OPTIM`'s optimiser from fresh moments, in numpy: the gradients
    clipped to global norm ``clip_norm``, then Adam's bias-corrected first step, where the moments are g and g^2, so
    each weight moves by -lr g / (|g| + eps)."""
    grads = [np.asarray(g, np.float64) for g in jax.tree.leaves(grads)]
    norm = np.sqrt(sum(np.sum(g**2) for g in grads))
    clipped = [g * min(1.0, OPTIM.clip_norm / norm) for g in grads]
    return [np.asarray(p, np.float64) - OPTIM.learning_rate * g / (np.abs(g) + ADAM_EPSILON)
            for p, g in zip(jax.tree.leaves(params), clipped, strict=True)]


def whole_model_jacobian(graphdef, state, batch, tasks):
    """The plain way: one train-mode pass of the whole model, its K losses pulled back together; ``(losses,
    Jacobian, head gradients, batch_stats, rest)`` as :func:`train.task_jacobian_step` returns them."""

    @jax.jit
    def run(state, batch):
        flat_shared, unravel = ravel_pytree(state.params[0])

        def stacked_losses(flat, heads):
            model = nnx.merge(graphdef, unravel(flat), heads, *jax.tree.map(jnp.copy, (state.batch_stats,
                                                                                       state.rest)))
            model.train()
            predictions, _ = model(batch["images"])
            return jnp.stack([model.task_loss(name, predictions[name], batch) for name, _ in tasks]), (
                train.split_states(model)[2:])

        losses_k, pullback, states = jax.vjp(stacked_losses, flat_shared, state.params[1], has_aux=True)
        jacobian, head_grads = jax.vmap(pullback)(jnp.eye(len(tasks), dtype=losses_k.dtype))
        return losses_k, jacobian, jax.tree.map(lambda g: g.sum(axis=0), head_grads), *states

    return run(state, batch)


def assert_same_jacobian_step(got, expected, gradient_tolerance=1e-5):
    """Same losses and states; gradients within ``gradient_tolerance`` of each leaf's largest entry (float32
    rounding of two orders of the same sums)."""
    losses_k, jacobian, head_grads, batch_stats, rest = got
    np.testing.assert_allclose(losses_k, expected[0], rtol=1e-6)
    scale = float(jnp.abs(expected[1]).max())
    np.testing.assert_allclose(jacobian, expected[1], rtol=0, atol=gradient_tolerance * scale)
    # Plus a floor at 10⁻⁷ of the largest head gradient, for leaves that are 0 up to rounding (MTAN's attention
    # convolutions have biases before BatchNorm, whose gradient is exactly 0 in exact arithmetic and about 10⁻⁸ in
    # float32, whichever way it is computed).
    floor = 1e-7 * max(float(jnp.abs(wanted).max()) for wanted in jax.tree.leaves(expected[2]))
    for got_leaf, wanted in zip(jax.tree.leaves(head_grads), jax.tree.leaves(expected[2]), strict=True):
        np.testing.assert_allclose(got_leaf, wanted, rtol=0,
                                   atol=gradient_tolerance * float(jnp.abs(wanted).max()) + floor)
    assert jax.tree.structure(batch_stats) == jax.tree.structure(expected[3])
    for got_leaf, wanted in zip(jax.tree.leaves(batch_stats), jax.tree.leaves(expected[3]), strict=True):
        np.testing.assert_allclose(got_leaf, wanted, rtol=1e-6, atol=1e-7)
    for got_leaf, wanted in zip(comparable_leaves(rest), comparable_leaves(expected[4]), strict=True):
        np.testing.assert_array_equal(got_leaf, wanted)  # the dropout streams, each advanced by its head's one pass


def test_the_jacobian_step_equals_the_pull_back_of_all_losses_through_the_whole_model(setup, jacobian_step):
    """``task_jacobian_step`` takes each task's loss through its own head alone, then the representation gradients
    through the encoder. It must give what the plain way gives: one train-mode pass of the whole model, its K
    losses pulled back together (the heads run dropout, so equal losses also say each head drew its own mask, as
    in the whole pass), with the same losses, Jacobian, head gradients and states after the pass."""
    graphdef, _, state = setup
    assert_same_jacobian_step(jacobian_step, whole_model_jacobian(graphdef, state, make_batch(), TINY.tasks))


def test_the_jacobian_step_of_the_authors_heads_equals_the_whole_model_pull_back():
    """The same with the authors' DeepLabV3+ heads, which also read the fused features and the backbone's c1 (two
    tasks, to keep the compile short)."""
    config = dataclasses.replace(AUTHORS, tasks=(("segmentation", 13), ("depth", 1)), grounding="none")
    graphdef, state = train.split_model(DualStreamModel(config, nnx.Rngs(1)), train.make_optimizer(OPTIM))
    batch = make_batch(pixels=32)
    got = jax.jit(functools.partial(train.task_jacobian_step, graphdef))(state, batch)
    assert_same_jacobian_step(got, whole_model_jacobian(graphdef, state, batch, config.tasks))


def test_every_parameter_space_baseline_takes_one_adam_step_along_its_direction(setup, jacobian_step, apply):
    _, _, state = setup
    losses_k, jacobian, head_grads, batch_stats, rest = jacobian_step
    assert jacobian.shape[0] == 3 and jnp.all(jnp.isfinite(jacobian))
    unravel = ravel_pytree(state.params[0])[1]
    names = [m for m in METHODS if make(m).gradient_of == "parameters"]
    assert len(names) == len(METHODS) - 1  # GradDrop acts on representation gradients
    for name in names:
        balancer = make(name)
        balancer_state = balancer.init(3, num_params=jacobian.shape[1])
        direction, weights, _ = jax.jit(balancer.step)(jacobian, losses_k, balancer_state, jax.random.key(0))
        # The contract: the weights are the direction's exact coordinates in the rows of the Jacobian. With some
        # weight non-zero (the rows are independent), the direction cannot be zero either.
        combined = np.asarray(weights, np.float64) @ np.asarray(jacobian, np.float64)
        np.testing.assert_allclose(direction, combined, rtol=0, atol=1e-6 * np.abs(combined).max(), err_msg=name)
        assert np.abs(np.asarray(weights)).max() > 0.01, (name, weights)
        new_state, finite = apply(state, direction, head_grads, batch_stats, rest, losses_k.sum())
        assert bool(finite), name
        assert int(new_state.step) == 1
        expected = first_adam_step(state.params, (unravel(direction), head_grads))
        # A tenth of a percent of the learning rate: a float32 weight near 1 rounds by 6e-8 (0.03 %).
        for new, wanted in zip(jax.tree.leaves(new_state.params), expected, strict=True):
            np.testing.assert_allclose(new, wanted, rtol=0, atol=1e-3 * OPTIM.learning_rate, err_msg=name)


@pytest.mark.parametrize("method", [*METHODS, "stl"])
def test_the_first_balancer_state_has_the_shapes_every_step_keeps(setup, method):
    """trainer.initial_balancer_state, what the scripts' first step gets, against the state the balancer's step
    returns (traced, not compiled): the same structure, shapes and dtypes. DB-MTL's, MoCo's and ExcessMTL's init
    without P gave a [K, 0] placeholder, which the step's keeping of the old state when not finite could not
    broadcast against [K, P]: those methods stopped at their first step, and their checkpoints could not be
    restored."""
    graphdef, optimizer, state = setup
    balancer, _ = trainer.make_step(method, graphdef, optimizer, losses.PRESETS["nyuv2"])
    num_tasks = 1 if method == "stl" else 3
    initial = trainer.initial_balancer_state(method, balancer, state, num_tasks)
    jacobian = jax.ShapeDtypeStruct((num_tasks, ravel_pytree(state.params[0])[0].size), jnp.float32)
    _, _, after = jax.eval_shape(balancer.step, jacobian, jax.ShapeDtypeStruct((num_tasks,), jnp.float32), initial,
                                 jax.random.key(0))
    assert tree_layout(after) == tree_layout(initial)
    assert trainer.initial_balancer_state("core", None, state, 3) == ()


def adam_first_moments(state):
    """Adam's first moment of every parameter, in the order of ``jax.tree.leaves(state.params)``: after one step
    from fresh moments, (1 - b1) times the clipped gradient. (Each group's Adam keeps its moments raveled into one
    vector, in the order of its parameters' leaves.)"""
    is_adam = lambda node: isinstance(node, optax.ScaleByAdamState)
    groups = state.opt_state[1].inner_states  # make_optimizer's chain: clipping, each group's Adam, the schedule
    moments = []
    for group, params in zip(("shared", "heads"), state.params, strict=True):
        (adam,) = [node for node in jax.tree.leaves(groups[group], is_leaf=is_adam) if is_adam(node)]
        shapes = [leaf.shape for leaf in jax.tree.leaves(params)]
        pieces = np.split(np.asarray(adam.mu), np.cumsum([int(np.prod(shape)) for shape in shapes])[:-1])
        moments += [piece.reshape(shape) for piece, shape in zip(pieces, shapes, strict=True)]
    return moments


def test_balanced_step_equals_its_pieces_composed_on_both_paths(setup, jacobian_step, apply, script_steps):
    """``balanced_step``, as the script runs it, against its pieces composed here. DWA weighs every task 1 until
    two periods are complete, so its first step is EW through the losses path, one backward pass of the summed
    losses: it must feed the optimiser the summed rows of the per-task Jacobian. GradVac takes the Jacobian path:
    its step must be its own direction applied."""
    _, _, state = setup
    losses_k, jacobian, head_grads, batch_stats, rest = jacobian_step
    key = jax.random.key(0)
    gradvac = make("gradvac")
    gradvac_direction, _, _ = jax.jit(gradvac.step)(jacobian, losses_k, gradvac.init(3), key)
    directions = {"dwa": jacobian.sum(axis=0), "gradvac": gradvac_direction}
    for name, (balancer, step) in script_steps.items():
        balancer_state = balancer.init(3, num_params=jacobian.shape[1])
        new_state, _, metrics = step(copied(state), copied(balancer_state), make_batch(), key, None)
        assert bool(metrics["finite"]), name
        if name == "dwa":
            assert all(float(metrics[f"weight/{task}"]) == 1.0 for task in ("segmentation", "depth", "normal"))
        expected, _ = apply(state, directions[name], head_grads, batch_stats, rest, losses_k.sum())
        # The gradient that reached the optimiser, read from Adam's first moments (linear in it).
        expected_moments = adam_first_moments(expected)
        scale = max(np.abs(moment).max() for moment in expected_moments)
        for new, wanted in zip(adam_first_moments(new_state), expected_moments, strict=True):
            np.testing.assert_allclose(new, wanted, rtol=0, atol=1e-5 * scale, err_msg=name)
        # The move: Adam's first step is about -lr sign(g), so a gradient at rounding level (here the backbone's
        # first BatchNorm bias, about 1e-7) may move the two sides opposite ways. Elsewhere, |g| > 1000 eps puts
        # g / (|g| + eps) within 0.1 % of +-1 and the two sides agree.
        checked = 0
        for new, wanted, moment in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(expected.params),
                                       expected_moments, strict=True):
            clear = np.abs(np.asarray(moment)) / (1 - ADAM_B1) > 1000 * ADAM_EPSILON  # the moment is (1 - b1) g
            np.testing.assert_allclose(np.asarray(new)[clear], np.asarray(wanted)[clear], rtol=0,
                                       atol=1e-3 * OPTIM.learning_rate, err_msg=name)
            checked += clear.sum()
        assert checked > 0.5 * sum(leaf.size for leaf in jax.tree.leaves(state.params)), (name, checked)
        for new, wanted in zip(jax.tree.leaves(new_state.batch_stats), jax.tree.leaves(batch_stats), strict=True):
            np.testing.assert_allclose(new, wanted, rtol=1e-6, atol=1e-6 * np.abs(np.asarray(wanted)).max(),
                                       err_msg=name)


def test_a_non_finite_step_leaves_the_balancers_state_too(setup, script_steps):
    """DWA keeps the last losses and GradVac its alignment targets: a step rejected as non-finite must not leave
    NaNs there either, or every later step would inherit them. The script's step (``trainer.make_step``) donates
    both states it is given, so each call gets copies, and the first checks that they were consumed."""
    _, _, state = setup
    bad = make_batch()
    bad["images"] = bad["images"].at[0, 0, 0, 0].set(jnp.nan)
    num_params = sum(leaf.size for leaf in jax.tree.leaves(state.params[0]))
    for name, (balancer, step) in script_steps.items():
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


class _TwoTasks(nnx.Module):
    """A stand-in whose two task losses are w_a·mean(x) and w_b·mean(x): their gradients are mean(x) along each
    weight, so a weighted backward pass with weights (α, β) and x = 1 is (α, β)."""

    def __init__(self):
        self.config = StandInConfig((("a", 1), ("b", 1)))
        self.w = nnx.Param(jnp.asarray([1.0, 2.0]))

    def __call__(self, images):
        return {"a": self.w[0] * images, "b": self.w[1] * images}, {}

    def task_loss(self, name, prediction, batch):
        return jnp.mean(prediction)


class _FixedWeights:
    """A loss-weighting method (UW, DWA, RLW's kind) that always weighs the tasks (3, 0.5)."""

    requires, gradient_of = "losses", "parameters"

    def weigh(self, jacobian, losses_k, state, key):
        return jnp.asarray([3.0, 0.5]), state


def test_a_loss_weighting_method_backpropagates_its_weighted_sum_of_losses():
    """The losses path's backward pass takes the method's weights as the cotangent: plain SGD at rate 1 then moves
    w by -(3, 0.5). (DWA, the suite's loss-path method, weighs every task 1 on its first step, where EW's pass is
    the same.)"""
    optimizer = optax.sgd(1.0)
    graphdef, state = train.split_model(_TwoTasks(), optimizer)
    batch = {"images": jnp.ones((2, 3))}
    new_state, _, metrics = train.balanced_step(graphdef, optimizer, _FixedWeights(), state, (), batch,
                                                jax.random.key(0))
    assert bool(metrics["finite"])
    np.testing.assert_allclose(new_state.params[0]["w"], [1.0 - 3.0, 2.0 - 0.5], rtol=1e-6)
    assert float(metrics["weight/a"]) == 3.0 and float(metrics["loss"]) == pytest.approx(3.0)


class _BFloat16Heads(nnx.Module):
    """A stand-in with the interface task_jacobian_step uses, computing in bfloat16 as a model with
    ``compute_dtype="bfloat16"`` does (its heads' outputs, hence its predictions, are bfloat16); its ``task_loss``
    records the dtype of each prediction it is handed."""

    shared_read_by_heads = nnx.Nothing
    handed = []

    def __init__(self):
        self.config = StandInConfig((("a", 1), ("b", 1)))
        self.w = nnx.Param(jnp.asarray([1.0, 2.0, 3.0], jnp.float32))
        self.heads = nnx.Dict({name: nnx.Linear(3, 1, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)) for name in "ab"})

    def encode(self, images):
        return {"semantic_map": (images * self.w[...]).astype(jnp.bfloat16)}

    def predict_from_streams(self, semantic_map, image_size, tasks):
        return {name: self.heads[name](semantic_map) for name in tasks}

    @staticmethod
    def task_loss(name, prediction, batch):
        _BFloat16Heads.handed.append(prediction.dtype)
        return jnp.mean(prediction ** 2)


def test_each_heads_loss_is_taken_in_float32_under_bfloat16_compute():
    """The baselines' per-task pass scores each head's prediction in float32, as the model's own forward pass does
    (losses, CKA and metrics in float32 whatever the compute dtype): a cross-entropy's log-softmax in bfloat16 would
    keep about three significant digits of each loss the balancing methods weigh."""
    model = _BFloat16Heads()
    graphdef, state = train.split_model(model, train.make_optimizer(OPTIM))
    _BFloat16Heads.handed.clear()
    losses_k, jacobian, _, _, _ = jax.eval_shape(functools.partial(train.task_jacobian_step, graphdef), state,
                                                 {"images": jnp.ones((2, 3), jnp.float32)})
    assert _BFloat16Heads.handed == [jnp.float32, jnp.float32]
    assert losses_k.dtype == jacobian.dtype == jnp.float32 and jacobian.shape == (2, 3)


def test_representation_gradients_pull_back_through_a_bfloat16_encoder():
    """GradDrop's direction comes back from the method in float32, the representation it pulls back through is
    bfloat16 under ``compute_dtype="bfloat16"``: the pull-back takes it in the representation's dtype (jax.vjp refuses
    a cotangent of another dtype) and returns a float32 gradient of the float32 shared parameters."""
    graphdef, state = train.split_model(_BFloat16Heads(), train.make_optimizer(OPTIM))

    def pulled_back(state, batch):
        _, jacobian, pull_back, _, _, _ = train.representation_jacobian_step(graphdef, state, batch)
        return jacobian, pull_back(jnp.ones(jacobian.shape[1], jnp.float32))

    jacobian, gradient = jax.eval_shape(pulled_back, state, {"images": jnp.ones((2, 3), jnp.float32)})
    assert jacobian.shape == (2, 6) and (gradient.shape, gradient.dtype) == ((3,), jnp.float32)


class _Normalised(nnx.Module):
    """A stand-in for every path of balanced_step with BatchNorm (Flax's momentum 0.9 of the running statistics) in
    the encoder and in each head; each head normalises 3 ẑ + 5, so that its running statistics move from the initial
    0 and 1 to 0.5 and 0.9 + 0.1·9 in train mode, and adds ẑ (without it the encoder's scale and shift, which the
    head's BatchNorm undoes, would get no gradient)."""

    shared_read_by_heads = nnx.Nothing

    def __init__(self):
        self.config = StandInConfig((("a", 1), ("b", 1)))
        self.encoder = nnx.BatchNorm(2, momentum=0.9, rngs=nnx.Rngs(0))
        self.heads = nnx.Dict({name: nnx.BatchNorm(2, momentum=0.9, rngs=nnx.Rngs(0)) for name in "ab"})

    def encode(self, images):
        return {"semantic_map": self.encoder(images)}

    def predict_from_streams(self, semantic_map, image_size, tasks):
        return {name: self.heads[name](3 * semantic_map + 5) + semantic_map for name in tasks}

    def __call__(self, images):
        return self.predict_from_streams(**self.encode(images), image_size=None, tasks=("a", "b")), {}

    @staticmethod
    def task_loss(name, prediction, batch):
        return jnp.mean(prediction * batch[name])


@pytest.mark.parametrize("method", ["dwa", "pcgrad", "graddrop"])
def test_every_path_runs_in_train_mode_and_keeps_its_passs_statistics_whatever_mode_the_model_was_split_in(method):
    """The losses path (DWA), the parameter-Jacobian path (PCGrad) and the representation path (GradDrop) each run
    the model in train mode even when it was split after ``model.eval()`` (which the graph definition keeps), and
    the state they return holds the statistics of that pass: the encoder's 0.1·mean and 0.9 + 0.1·(biased
    variance) of the images, the heads' of 3 ẑ + 5 (ẑ normalised by the batch: mean 0, variance about 1)."""
    model = _Normalised()
    model.eval()
    optimizer = train.make_optimizer(OPTIM)
    graphdef, state = train.split_model(model, optimizer)
    balancer = make(method)
    rng = np.random.default_rng(5)
    images = jnp.asarray(rng.normal(2.0, 1.5, size=(8, 2)), jnp.float32)
    batch = {"images": images, "a": jnp.asarray(rng.normal(size=(8, 2)), jnp.float32),
             "b": jnp.asarray(rng.normal(size=(8, 2)), jnp.float32)}
    new_state, _, metrics = jax.jit(functools.partial(train.balanced_step, graphdef, optimizer, balancer))(
        state, balancer.init(2, num_params=4), batch, jax.random.key(0))
    assert bool(metrics["finite"])
    x = np.asarray(images, np.float64)
    stats = new_state.batch_stats
    np.testing.assert_allclose(stats["encoder"]["mean"][...], 0.1 * x.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(stats["encoder"]["var"][...], 0.9 + 0.1 * x.var(axis=0), rtol=1e-5)
    for name in "ab":
        np.testing.assert_allclose(stats["heads"][name]["mean"][...], [0.5, 0.5], rtol=1e-5, err_msg=name)
        np.testing.assert_allclose(stats["heads"][name]["var"][...], [1.8, 1.8], rtol=1e-3, err_msg=name)


class _Huge(nnx.Module):
    """Two float32 task losses w_a·mean(x) and w_b·mean(x) (the x64 test session would make a plain array float64)."""

    def __init__(self):
        self.config = StandInConfig((("a", 1), ("b", 1)))
        self.w = nnx.Param(jnp.asarray([1.0, 2.0], jnp.float32))

    def __call__(self, images):
        return {"a": self.w[0] * images, "b": self.w[1] * images}, {}

    def task_loss(self, name, prediction, batch):
        return jnp.mean(prediction)


def test_a_gradient_beyond_float32s_range_is_refused_though_clipping_would_make_its_update_finite():
    """Gradients of 3e30 and 5e29 (finite, as is the loss) have a global norm beyond float32's range: the step has
    diverged. Clipping would scale them by 10/inf to a finite update of zeros, so the guard must read the
    gradients, not the update: the state (step count included, an int32) stays as it was."""
    optimizer = train.make_optimizer(OPTIM)
    graphdef, state = train.split_model(_Huge(), optimizer)
    step = jax.jit(functools.partial(train.balanced_step, graphdef, optimizer, _FixedWeights()))
    for scale, accepted in ((1.0, True), (1e30, False)):
        new_state, _, metrics = step(state, (), {"images": jnp.full((2, 3), scale, jnp.float32)}, jax.random.key(0))
        assert np.isfinite(float(metrics["loss"])) and bool(metrics["finite"]) == accepted, scale
        assert new_state.step.dtype == jnp.int32 and int(new_state.step) == int(accepted), scale
        assert np.array_equal(new_state.params[0]["w"], state.params[0]["w"]) != accepted, scale


class _FixedRepresentationDirection:
    """A method of GradDrop's kind (on representation gradients) whose direction is 2 g_a - g_b."""

    requires, gradient_of = "gradients", "representation"

    def step(self, jacobian, losses_k, state, key):
        return 2 * jacobian[0] - jacobian[1], jnp.asarray([2.0, -1.0]), state


def test_the_representation_path_applies_the_methods_own_direction_pulled_back():
    """balanced_step's representation path pulls back the direction the method returns, not the plain sum of the
    representation gradients, and gives each head its own task's gradient: plain SGD at rate 1 moves the shared
    parameters by minus the pull-back of 2 g_a - g_b (representation_jacobian_step's, composed here)."""
    optimizer = optax.sgd(1.0)
    graphdef, state = train.split_model(_Normalised(), optimizer)
    rng = np.random.default_rng(8)
    batch = {name: jnp.asarray(rng.normal(size=(8, 2)), jnp.float32) for name in ("images", "a", "b")}

    @jax.jit
    def composed(state, batch):
        _, jacobian, pull_back, head_grads, _, _ = train.representation_jacobian_step(graphdef, state, batch)
        return pull_back(2 * jacobian[0] - jacobian[1]), head_grads

    direction, head_grads = composed(state, batch)
    new_state, _, metrics = jax.jit(functools.partial(train.balanced_step, graphdef, optimizer,
                                                      _FixedRepresentationDirection()))(state, (), batch,
                                                                                        jax.random.key(0))
    assert bool(metrics["finite"]) and float(metrics["weight/a"]) == 2.0 and float(metrics["weight/b"]) == -1.0
    moved = ravel_pytree(state.params[0])[0] - ravel_pytree(new_state.params[0])[0]
    assert float(jnp.abs(direction).max()) > 1e-3
    np.testing.assert_allclose(moved, direction, rtol=1e-5, atol=1e-6)
    for new, old, gradient in zip(*map(jax.tree.leaves, (new_state.params[1], state.params[1], head_grads)),
                                  strict=True):
        np.testing.assert_allclose(old - new, gradient, rtol=1e-5, atol=1e-6)
