"""The jitted training steps of the deep model on a tiny configuration (CPU)."""

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from deep import losses, train
from deep.backbone import BackboneConfig
from deep.model import DualStreamModel, ModelConfig

TINY = ModelConfig(backbone=BackboneConfig(depths=(1, 1, 1, 1), width=2), semantic_channels=6, residual_channels=3,
                   head_channels=4, aspp_rates=(1, 2, 3), decoder_widths=(4, 4), albedo_seed=2, light_hidden=8,
                   generic_width=8)


def make_batch(seed=1, size=4, pixels=16):
    """Images with per-image labels (a class, a depth, a normal), so that a tiny model at output stride 8 can fit
    them; one pixel per image is unlabelled (-1 / zero depth / zero normal) to exercise the masks."""
    keys = jax.random.split(jax.random.key(seed), 4)
    # float32 explicitly: the test session enables x64 for the theory tests, the model runs in float32.
    images = jax.random.uniform(keys[0], (size, pixels, pixels, 3), jnp.float32)
    classes = jax.random.randint(keys[1], (size, 1, 1), 0, 13, jnp.int32)
    depth = jax.random.uniform(keys[2], (size, 1, 1, 1), jnp.float32, minval=0.5, maxval=3.0)
    normal = jax.random.normal(keys[3], (size, 1, 1, 3), jnp.float32)
    normal = normal / jnp.linalg.norm(normal, axis=-1, keepdims=True)
    ones = jnp.ones((size, pixels, pixels), jnp.int32)
    return {"images": images,
            "segmentation": (classes * ones).at[:, 0, 0].set(-1),
            "depth": (depth * ones[..., None]).at[:, 0, 0].set(0.0),
            "normal": (normal * ones[..., None]).at[:, 0, 0].set(0.0)}


def comparable_leaves(tree):
    """Leaves as numpy arrays (PRNG keys as their key data)."""
    return [np.asarray(jax.random.key_data(leaf) if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key) else leaf)
            for leaf in jax.tree.leaves(tree)]


def copied(tree):
    """A copy of every array of ``tree``, for a step that donates (deletes) what it is given."""
    return jax.tree.map(jnp.copy, tree)


def compiled(function, *args, **kwargs):
    """``jax.jit(function)`` compiled once for these arguments' shapes (under the suite's fast-compile XLA flags,
    conftest.py). Call the result with arguments of the same shapes and types (and the same keyword names)."""
    return jax.jit(function).lower(*args, **kwargs).compile()


def compiled_core_step(config: ModelConfig, seed: int = 0, counterfactual: bool = False):
    """``(graphdef, optimizer, state, step)`` for the tiny model ``config`` and :func:`make_batch`'s shapes; the
    step runs the counterfactual pass when ``counterfactual`` (a static flag: a program of its own)."""
    optimizer = train.make_optimizer(train.OptimConfig(learning_rate=1e-2, warmup_epochs=0, epochs=1000))
    graphdef, state = train.split_model(DualStreamModel(config, nnx.Rngs(seed)), optimizer)
    step = compiled(functools.partial(train.core_step, graphdef, optimizer, weights=losses.PRESETS["nyuv2"],
                                      counterfactual=counterfactual),
                    state, make_batch(), jax.random.key(0), independence_weight=0.0)
    return graphdef, optimizer, state, step


@pytest.fixture(scope="module")
def setup():
    return compiled_core_step(TINY)


def test_schedule_warms_up_then_decays_by_cosine():
    config = train.OptimConfig(learning_rate=1.0, warmup_epochs=5, epochs=105, steps_per_epoch=10)
    lr = lambda step: float(train.learning_rate_at(config, step))
    assert lr(0) == pytest.approx(0.1 + 0.9 / 5) and lr(49) == pytest.approx(1.0)
    assert lr(50) == pytest.approx(1.0) and lr(50 + 500) == pytest.approx(0.01 + 0.99 * 0.5)
    assert lr(10_000) == pytest.approx(0.01)
    with pytest.raises(ValueError, match="warmup_epochs"):
        train.OptimConfig(warmup_epochs=200)


def test_the_optimiser_configuration_refuses_what_the_schedule_and_the_update_cannot_use():
    """Refused when the configuration is made rather than met in a trace: a floor above η (min_lr_ratio > 1) would
    make the cosine rise, zero steps per epoch divides by zero in the schedule (an integer division, which under jit
    gives a number rather than an error), an infinite learning rate makes every update non-finite and an infinite
    clip norm clips nothing. The edges (ratio 0 and 1, no warm-up, one epoch) are allowed."""
    for fields, name in [({"min_lr_ratio": 1.5}, "min_lr_ratio"), ({"min_lr_ratio": -0.1}, "min_lr_ratio"),
                         ({"weight_decay": -1e-4}, "weight_decay"), ({"steps_per_epoch": 0}, "steps_per_epoch"),
                         ({"learning_rate": float("inf")}, "learning_rate"), ({"learning_rate": 0.0}, "learning_rate"),
                         ({"clip_norm": float("inf")}, "clip_norm"), ({"clip_norm": float("nan")}, "clip_norm"),
                         ({"warmup_epochs": 100}, "warmup_epochs")]:  # all warm-up (epochs=100): no cosine at all
        with pytest.raises(ValueError, match=name):
            train.OptimConfig(**fields)
    for ratio in (0.0, 1.0):
        train.OptimConfig(min_lr_ratio=ratio, warmup_epochs=0, epochs=1)
    train.OptimConfig(warmup_epochs=99, epochs=100)  # one cosine epoch


def test_the_cosine_ends_at_min_lr_ratio_times_the_learning_rate():
    """The floor is a fraction of η, not an absolute rate (the schedule test above uses η = 1, where the two
    coincide)."""
    config = train.OptimConfig(learning_rate=2e-4, warmup_epochs=5, epochs=105, steps_per_epoch=10,
                               min_lr_ratio=0.01)
    lr = lambda step: float(train.learning_rate_at(config, step))
    assert lr(10_000) == pytest.approx(2e-6, rel=1e-5)
    # Half-way through the cosine (epoch 5 + 50): the mean of η and the floor.
    assert lr(550) == pytest.approx(0.5 * (2e-4 + 2e-6), rel=1e-5)


def _first_update(config, params, grads):
    optimizer = train.make_optimizer(config)
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    return updates


def test_coupled_l2_goes_through_adam_and_decoupled_decay_bypasses_it():
    """Adam's first step moves each weight by -η·g/|g| (bias-corrected moments g and g²). Coupled L2 (the default,
    the authors' Adam) adds λw to the gradient *before* Adam, so every weight with a non-zero g + λw moves by η;
    AdamW adds λw *after* Adam, so a weight without gradient moves by η·λw only."""
    params, grads = {"w": jnp.ones(3)}, {"w": jnp.asarray([1.0, 0.0, -1.0])}
    base = dict(learning_rate=1.0, weight_decay=0.1, warmup_epochs=0)
    coupled = _first_update(train.OptimConfig(**base), params, grads)["w"]
    decoupled = _first_update(train.OptimConfig(**base, decoupled_weight_decay=True), params, grads)["w"]
    # g + λw = (1.1, 0.1, -0.9): Adam's sign step.
    np.testing.assert_allclose(coupled, [-1.0, -1.0, 1.0], rtol=1e-5)
    # Adam of g = (1, 0, -1) is (1, 0, -1), plus λw = 0.1.
    np.testing.assert_allclose(decoupled, [-1.1, -0.1, 0.9], rtol=1e-5)


@pytest.mark.parametrize("decoupled", [False, True])
def test_the_raveled_adam_updates_as_one_adam_per_parameter(decoupled):
    """make_optimizer ravels each group's parameters into one vector for Adam: over several steps of gradients
    that change (some clipped, some not), the updates and the parameters are those of Adam kept per parameter array,
    for both groups, a parameter tree of one group (no heads), and a group without parameters; the moments are one
    vector per group, in the order of the group's leaves."""
    config = train.OptimConfig(learning_rate=0.1, weight_decay=0.01, warmup_epochs=1, epochs=10, steps_per_epoch=2,
                               clip_norm=5.0, decoupled_weight_decay=decoupled)
    keys = iter(jax.random.split(jax.random.key(3), 100))
    draw = lambda shape, scale=1.0: scale * jax.random.normal(next(keys), shape, jnp.float32)
    trees = {"two groups": (({"conv": draw((3, 3, 2, 4)), "bias": draw((4,))}, {"head": draw((4, 5))}), 2),
             "one group": ({"a": draw((2, 3)), "b": draw((7,))}, 1),
             "no heads": (({"a": draw((5,))}, {}), 1)}  # (parameters, groups with parameters)
    for name, (params, groups) in trees.items():
        raveled, per_parameter = train.make_optimizer(config), train.make_optimizer(config, ravel=False)
        states = raveled.init(params), per_parameter.init(params)
        moved = {"raveled": params, "per_parameter": params}
        for step in range(6):
            grads = jax.tree.map(lambda leaf: draw(leaf.shape, scale=0.5 + 3 * (step % 2)), params)
            new_raveled, raveled_state = raveled.update(grads, states[0], moved["raveled"])
            new_per_parameter, per_parameter_state = per_parameter.update(grads, states[1], moved["per_parameter"])
            states = raveled_state, per_parameter_state
            for a, b in zip(jax.tree.leaves(new_raveled), jax.tree.leaves(new_per_parameter), strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=f"{name}, step {step}")
            moved = {"raveled": optax.apply_updates(moved["raveled"], new_raveled),
                     "per_parameter": optax.apply_updates(moved["per_parameter"], new_per_parameter)}
        for a, b in zip(*map(jax.tree.leaves, moved.values()), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=name)
        is_adam = lambda node: isinstance(node, optax.ScaleByAdamState)
        raveled_moments = [node.mu for node in jax.tree.leaves(states[0], is_leaf=is_adam) if is_adam(node)]
        per_parameter_moments = [node.mu for node in jax.tree.leaves(states[1], is_leaf=is_adam) if is_adam(node)]
        raveled_moments = [moment for moment in raveled_moments if jax.tree.leaves(moment)]  # not the empty group's
        assert len(raveled_moments) == groups and all(moment.ndim == 1 for moment in raveled_moments), name
        np.testing.assert_allclose(np.concatenate(raveled_moments), np.concatenate(
            [np.ravel(leaf) for moments in per_parameter_moments for leaf in jax.tree.leaves(moments)]),
            rtol=1e-5, atol=1e-7, err_msg=name)


def test_weight_decay_reaches_the_shared_parameters_and_the_heads():
    """Both parameter groups get the decay (each its own Adam state): with no gradient at all, coupled L2 alone moves
    every weight by Adam's sign step, η."""
    params = ({"backbone": jnp.ones(2)}, {"heads": -jnp.ones(2)})
    grads = jax.tree.map(jnp.zeros_like, params)
    updates = _first_update(train.OptimConfig(learning_rate=0.5, weight_decay=0.1, warmup_epochs=0), params, grads)
    np.testing.assert_allclose(updates[0]["backbone"], [-0.5, -0.5], rtol=1e-5)
    np.testing.assert_allclose(updates[1]["heads"], [0.5, 0.5], rtol=1e-5)


def test_the_configured_clip_norm_clips_the_gradient_before_the_coupled_decay():
    """clip_norm is the optimiser's, not a fixed 10: g = (30, 40) (norm 50) clipped to norm 1 is (0.6, 0.8); with
    coupled L2 λw = (-1, -1) the sum (-0.4, -0.2) makes Adam step up by η; clipped at 10 it would be (6, 8) - 1 > 0,
    a step down."""
    params, grads = {"w": -jnp.ones(2)}, {"w": jnp.asarray([30.0, 40.0])}
    config = lambda clip: train.OptimConfig(learning_rate=1.0, weight_decay=1.0, clip_norm=clip, warmup_epochs=0)
    np.testing.assert_allclose(_first_update(config(1.0), params, grads)["w"], [1.0, 1.0], rtol=1e-5)
    np.testing.assert_allclose(_first_update(config(10.0), params, grads)["w"], [-1.0, -1.0], rtol=1e-5)


def test_the_optimiser_steps_by_the_scheduled_learning_rate():
    """The first step is in the first warm-up epoch, η(0.1 + 0.9/W); Adam's first step is the sign of g times it.
    (The schedule's own test reads learning_rate_at, not the optimiser.)"""
    config = train.OptimConfig(learning_rate=1.0, weight_decay=0.0, warmup_epochs=5, epochs=10)
    updates = _first_update(config, {"w": jnp.zeros(2)}, {"w": jnp.asarray([2.0, -3.0])})
    np.testing.assert_allclose(updates["w"], [-0.28, 0.28], rtol=1e-5)


# counterfactual_loss on a stand-in model: the pass's wiring, without compiling the dual-stream model.

class StandInConfig(NamedTuple):
    """The one field of a model's config that the steps read."""

    tasks: tuple


class _Counterfactual(nnx.Module):
    """A stand-in with the interface counterfactual_loss uses: the counterfactual image is the semantic map plus the
    residual code; its 'prediction' is that image through a BatchNorm (running statistics 0 and 1 at init, so in
    eval mode it divides by sqrt(1 + 1e-5); in train mode it would normalise by the batch's statistics)."""

    def __init__(self):
        self.config = StandInConfig((("depth", 1),))
        self.norm = nnx.BatchNorm(1, rngs=nnx.Rngs(0))

    def counterfactual_image(self, semantic_map, residual_code, image_size, features=None):
        return semantic_map + residual_code[:, None, None, :]

    def predict(self, images):
        out = self.norm(images)
        return {"depth": out}, {"semantic_map": out, "residual_code": jnp.mean(out ** 3, axis=(1, 2))}

    def task_loss(self, name, prediction, batch):
        return jnp.mean(jnp.abs(prediction - batch[name]))


def _eq12_bracket(out, depth, depth_weight=1.0):
    """Eq (12)'s bracket by hand for _Counterfactual's pass, from its eval-mode output ``out`` (float64): the depth
    task's L1 against the original labels plus 0.1 CKA of its semantic map and residual code."""
    cka = float(losses.independence_loss(jnp.asarray(out), jnp.asarray(np.mean(out ** 3, axis=(1, 2)))))
    return depth_weight * np.mean(np.abs(out - np.asarray(depth))) + 0.1 * cka


def _counterfactual_loss(semantic, residual, depth, weights, key):
    graphdef, shared, heads, batch_stats, rest = nnx.split(_Counterfactual(), train.SHARED, train.HEADS,
                                                           nnx.BatchStat, ...)
    aux = {"semantic_map": semantic, "residual_code": residual, "features": None}
    return float(train.counterfactual_loss(graphdef, (shared, heads), batch_stats, rest, aux,
                                           {"images": semantic, "depth": depth}, key, weights))


def test_the_counterfactual_pass_swaps_residual_codes_runs_in_eval_mode_and_weighs_all_by_lambda_cfa():
    """Eq (12) by hand: x̃_i = D(ẑ_s,i, ẑ_r,π(i)), scored against the original labels in eval mode, the whole
    bracket (task loss + 0.1 CKA) times λ_cfa. With every residual code equal, the shuffle changes nothing, so the
    loss is that of the unshuffled images whatever π is; with every semantic map equal it must change."""
    rng = np.random.default_rng(0)
    key = jax.random.key(1)
    assert not np.array_equal(np.asarray(jax.random.permutation(key, 4)), np.arange(4))  # π moves something
    semantic = jnp.asarray(rng.normal(size=(4, 3, 3, 1)), jnp.float32)
    depth = jnp.asarray(rng.normal(size=(4, 3, 3, 1)), jnp.float32)
    weights = dataclasses.replace(losses.PRESETS["nyuv2"], counterfactual=0.5, depth=2.0)
    scale = 1 / np.sqrt(1 + 1e-5)  # BatchNorm's running statistics at init, eval mode

    def by_hand(images):
        return 0.5 * _eq12_bracket(np.asarray(images, np.float64) * scale, depth, depth_weight=2.0)

    same_residual = jnp.full((4, 1), 0.3, jnp.float32)
    expected = by_hand(semantic + 0.3)
    assert _counterfactual_loss(semantic, same_residual, depth, weights, key) == pytest.approx(expected, rel=1e-4)
    # Equal semantic maps, different residual codes: the shuffle shows.
    flat = jnp.broadcast_to(semantic[:1], semantic.shape)
    residual = jnp.asarray(rng.normal(size=(4, 1)), jnp.float32)
    unshuffled = by_hand(flat + residual[:, None, None, :])
    assert _counterfactual_loss(flat, residual, depth, weights, key) != pytest.approx(unshuffled, rel=1e-3)


def test_the_counterfactual_shuffle_is_the_permutation_drawn_from_the_steps_key():
    """π is ``jax.random.permutation(key, B)`` of the key the step is given, so each step draws its own: with equal
    semantic maps and distinct residual codes the loss is the hand-made one for that π, for each of three keys whose
    permutations differ (a fixed π would match one of them at most). Same stand-in and formula (_eq12_bracket)."""
    rng = np.random.default_rng(2)
    flat = jnp.broadcast_to(jnp.asarray(rng.normal(size=(1, 3, 3, 1)), jnp.float32), (4, 3, 3, 1))
    residual = jnp.asarray(rng.normal(size=(4, 1)), jnp.float32)
    depth = jnp.asarray(rng.normal(size=(4, 3, 3, 1)), jnp.float32)
    weights = dataclasses.replace(losses.PRESETS["nyuv2"], counterfactual=1.0, depth=1.0)
    keys = [jax.random.key(seed) for seed in (1, 2, 3)]
    permutations = [np.asarray(jax.random.permutation(key, 4)) for key in keys]
    assert len({tuple(permutation) for permutation in permutations}) == 3
    scale = 1 / np.sqrt(1 + 1e-5)  # BatchNorm's running statistics at init, eval mode
    for key, permutation in zip(keys, permutations):
        out = (np.asarray(flat, np.float64) + np.asarray(residual, np.float64)[permutation, None, None, :]) * scale
        expected = _eq12_bracket(out, depth)
        assert _counterfactual_loss(flat, residual, depth, weights, key) == pytest.approx(expected, rel=1e-4)


class _DualStreamStandIn(DualStreamModel):
    """A stand-in that core_objective accepts (a DualStreamModel with no decoders, so its only grounding work is the
    counterfactual pass): the train pass's prediction is the images through a BatchNorm of momentum 0.9 (Flax's
    convention: it keeps 0.9 of the running statistics); the counterfactual image and pass are _Counterfactual's."""

    makes_counterfactuals = True
    geometry_decoder = appearance_decoder = decoder = None

    def __init__(self):
        self.config = StandInConfig((("depth", 1),))
        self.norm = nnx.BatchNorm(1, momentum=0.9, rngs=nnx.Rngs(0))

    def __call__(self, images):
        return {"depth": self.norm(images)}, {"semantic_map": images, "residual_code": images[:, 0, 0, :],
                                               "features": None}

    counterfactual_image = _Counterfactual.counterfactual_image
    predict = _Counterfactual.predict


def test_the_counterfactual_pass_reads_the_statistics_its_steps_train_pass_just_updated():
    """As the authors' loop: pass 1 (train mode) updates BatchNorm's running statistics, then the model switches to
    eval for the counterfactual pass, which normalises with those updated statistics, not the ones the step started
    from. By hand, in float64: after the train pass (Flax's BatchNorm: biased batch variance) mean 0.1·m and
    variance 0.9 + 0.1·v from 0 and 1; x̃_i = ẑ_s,i + ẑ_r,π(i) normalised with them, then Eq (12)."""
    model = _DualStreamStandIn()
    graphdef, shared, heads, batch_stats, rest = nnx.split(model, train.SHARED, train.HEADS, nnx.BatchStat, ...)
    rng = np.random.default_rng(3)
    images = jnp.asarray(rng.normal(2.0, 1.5, size=(4, 3, 3, 1)), jnp.float32)  # a mean far from the initial 0
    depth = jnp.asarray(rng.normal(size=(4, 3, 3, 1)), jnp.float32)
    weights = dataclasses.replace(losses.PRESETS["nyuv2"], counterfactual=1.0, depth=1.0, edge=0.0)
    key = jax.random.key(1)
    objective = jax.jit(functools.partial(train.core_objective, graphdef, weights=weights, independence_weight=0.0,
                                          counterfactual=True))
    _, (new_stats, _, terms) = objective((shared, heads), batch_stats, rest, {"images": images, "depth": depth}, key)
    x = np.asarray(images, np.float64)
    mean, variance = 0.1 * x.mean(), 0.9 + 0.1 * x.var()
    np.testing.assert_allclose(new_stats["norm"]["mean"][...], [mean], rtol=1e-5)
    np.testing.assert_allclose(new_stats["norm"]["var"][...], [variance], rtol=1e-5)
    permutation = np.asarray(jax.random.permutation(key, 4))
    out = (x + x[permutation, :1, :1, :] - mean) / np.sqrt(variance + 1e-5)
    assert float(terms["counterfactual"]) == pytest.approx(_eq12_bracket(out, depth), rel=1e-4)


def test_the_objectives_pass_is_in_train_mode_whatever_mode_the_model_was_split_in():
    """A model split after ``model.eval()`` (evaluated, or restored for more training) keeps its eval flags in the
    graph definition; core_objective must still run its pass in train mode, normalising by the batch and updating
    BatchNorm's running statistics (from 0 and 1: 0.1·mean and 0.9 + 0.1·variance, Flax's biased variance). With
    λ_cfa = 0 (an ablation), a step the coin sent to the counterfactual pass runs none and reports no such term."""
    model = _DualStreamStandIn()
    model.eval()
    graphdef, shared, heads, batch_stats, rest = nnx.split(model, train.SHARED, train.HEADS, nnx.BatchStat, ...)
    images = jnp.asarray(np.random.default_rng(4).normal(2.0, 1.5, size=(4, 3, 3, 1)), jnp.float32)
    weights = dataclasses.replace(losses.PRESETS["nyuv2"], counterfactual=0.0, edge=0.0)
    _, (new_stats, _, terms) = train.core_objective(graphdef, (shared, heads), batch_stats, rest,
                                                    {"images": images, "depth": images}, jax.random.key(0), weights,
                                                    0.0, True)
    assert "counterfactual" not in terms
    x = np.asarray(images, np.float64)
    np.testing.assert_allclose(new_stats["norm"]["mean"][...], [0.1 * x.mean()], rtol=1e-5)
    np.testing.assert_allclose(new_stats["norm"]["var"][...], [0.9 + 0.1 * x.var()], rtol=1e-5)


class _ScaledDualStream(_DualStreamStandIn):
    """The dual-stream stand-in with its depth prediction times ``scale`` (a constant, not a parameter)."""

    def __init__(self, scale):
        super().__init__()
        self.scale = scale

    def __call__(self, images):
        predictions, aux = super().__call__(images)
        return {"depth": self.scale * predictions["depth"]}, aux


def test_core_step_refuses_a_gradient_beyond_float32s_range_though_clipping_would_make_its_update_finite():
    """With the prediction scaled by 1e30 the loss is finite (about 1e30) and so is every gradient, but their global
    norm is beyond float32's range: a diverged step. Clipping would turn it into a finite update of zeros, so
    core_step's guard must read the gradients: the state stays as it was. At scale 1 the step is taken."""
    optimizer = train.make_optimizer(train.OptimConfig(warmup_epochs=0))
    weights = dataclasses.replace(losses.PRESETS["nyuv2"], counterfactual=0.0, edge=0.0)
    images = jnp.asarray(np.random.default_rng(7).normal(size=(4, 3, 3, 1)), jnp.float32)
    batch = {"images": images, "depth": jnp.ones_like(images)}
    for scale, accepted in ((1.0, True), (1e30, False)):
        graphdef, state = train.split_model(_ScaledDualStream(scale), optimizer)
        new_state, metrics = jax.jit(functools.partial(train.core_step, graphdef, optimizer, weights=weights))(
            state, batch, jax.random.key(0), independence_weight=0.0)
        assert np.isfinite(float(metrics["loss"])) and bool(metrics["finite"]) == accepted, scale
        assert int(new_state.step) == int(accepted), scale
        same = [np.array_equal(a, b) for a, b in zip(comparable_leaves(new_state), comparable_leaves(state))]
        assert all(same) != accepted, scale


def test_a_tiny_model_overfits_one_batch(setup):
    _, _, state, step = setup
    batch = make_batch()
    history = []
    for i in range(100):  # steps are cheap next to the compilation
        state, metrics = step(state, batch, jax.random.key(i), independence_weight=0.0)
        assert bool(metrics["finite"])
        history.append({k: float(metrics[k]) for k in ("segmentation", "depth", "normal", "geometry",
                                                          "appearance_l1", "image")})
    # The mean of the last steps: Adam at 1e-2 on a 6-channel semantic map shared with the grounding decoders has
    # the odd spike.
    last = {k: np.mean([h[k] for h in history[-10:]]) for k in history[0]}
    for task in ("segmentation", "depth", "normal"):
        assert last[task] < 0.7 * history[0][task], (task, history[0][task], last[task])
    for term in ("geometry", "appearance_l1", "image"):  # the grounding decoders learn too
        assert last[term] < history[0][term], (term, history[0][term], last[term])


def test_a_step_keeps_its_passs_batch_norm_statistics_and_advances_the_dropout_streams(setup):
    """The state a step returns carries what its train-mode pass left: BatchNorm's running statistics (else
    evaluation would read the initial 0 and 1 for ever) and each dropout stream advanced once (else every step would
    draw the same masks). The stem's BatchNorm against its definition, in float64 numpy: the pass normalises
    conv1(x) (7×7, stride 2, padding 3, no bias) with the batch's statistics and, from mean 0 and variance 1 with
    Flax's momentum 0.9, stores 0.1·mean and 0.9 + 0.1·(unbiased variance), as PyTorch's BatchNorm does. Tolerance:
    float32 convolution of a 147-term sum against float64."""
    _, _, state, step = setup
    batch = make_batch()
    new_state, metrics = step(state, batch, jax.random.key(0), independence_weight=0.0)
    assert bool(metrics["finite"])
    before, after = state.batch_stats["backbone"]["bn1"], new_state.batch_stats["backbone"]["bn1"]
    np.testing.assert_array_equal(before["mean"][...], 0.0)
    np.testing.assert_array_equal(before["var"][...], 1.0)
    images = np.pad(np.asarray(batch["images"], np.float64), ((0, 0), (3, 3), (3, 3), (0, 0)))
    windows = np.lib.stride_tricks.sliding_window_view(images, (7, 7), axis=(1, 2))[:, ::2, ::2]
    kernel = np.asarray(state.params[0]["backbone"]["conv1"]["kernel"][...], np.float64)
    stem = np.einsum("bhwcij,ijco->bhwo", windows, kernel).reshape(-1, kernel.shape[-1])
    np.testing.assert_allclose(after["mean"][...], 0.1 * stem.mean(axis=0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(after["var"][...], 0.9 + 0.1 * stem.var(axis=0, ddof=1), rtol=1e-4, atol=1e-6)
    is_count = lambda variable: isinstance(variable, nnx.RngCount)
    old_counts = [np.asarray(v[...]) for v in jax.tree.leaves(state.rest, is_leaf=is_count) if is_count(v)]
    new_counts = [np.asarray(v[...]) for v in jax.tree.leaves(new_state.rest, is_leaf=is_count) if is_count(v)]
    assert len(old_counts) == len(TINY.tasks)  # each head's dropout
    assert [int(new) - int(old) for new, old in zip(new_counts, old_counts)] == [1] * len(TINY.tasks)


def test_the_counterfactual_flag_adds_exactly_the_counterfactual_term_without_a_cond(setup):
    """The step compiles once per value of its static flag, with no ``lax.cond`` (whose closed branch would still
    fill a buffer for each value the open one saves): from the same state, batch and key, the step with the pass
    has the loss of the step without it plus its counterfactual term; without it the term is reported as 0."""
    graphdef, optimizer, state, closed_step = setup
    open_step = compiled_core_step(TINY, counterfactual=True)[3]
    batch, key = make_batch(), jax.random.key(3)
    _, closed = closed_step(state, batch, key, independence_weight=1.0)
    new_state, opened = open_step(state, batch, key, independence_weight=1.0)
    assert bool(opened["finite"]) and int(new_state.step) == 1
    assert float(closed["counterfactual"]) == 0 and float(opened["counterfactual"]) > 0.05 * float(closed["loss"])
    np.testing.assert_allclose(float(opened["loss"]), float(closed["loss"]) + float(opened["counterfactual"]),
                               rtol=1e-5)
    for name in closed:
        if name not in ("loss", "counterfactual"):  # the rest is one and the same forward pass
            np.testing.assert_allclose(opened[name], closed[name], rtol=1e-5, err_msg=name)
    for program in (closed_step, open_step):
        assert " conditional(" not in program.as_text()
    with pytest.raises(TypeError, match="counterfactual must be a Python bool"):
        jax.jit(functools.partial(train.core_step, graphdef, optimizer, weights=losses.PRESETS["nyuv2"]))(
            state, batch, key, independence_weight=1.0, counterfactual=True)  # traced, not static


def test_a_batch_of_one_never_runs_the_counterfactual_pass(monkeypatch):
    """Nothing to shuffle in a batch of one (π is the identity, x̃ the plain reconstruction): core_step hands
    core_objective ``counterfactual=False`` for it whatever the flag, and the flag itself for a larger batch.
    core_objective is replaced by a recorder of that argument, so no model is traced."""
    seen = []

    def recorder(graphdef, params, batch_stats, rest, batch, key, weights, independence_weight, counterfactual,
                 task_scale, perceptual):
        seen.append((batch["images"].shape[0], counterfactual))
        return jnp.sum(params[0]["w"] ** 2), (batch_stats, rest, {})

    monkeypatch.setattr(train, "core_objective", recorder)
    optimizer = train.make_optimizer(train.OptimConfig(warmup_epochs=0))
    params = ({"w": jnp.ones(2)}, {"head": jnp.ones(1)})
    state = train.TrainState(params, {}, {}, optimizer.init(params), jnp.zeros((), jnp.int32))
    step = functools.partial(train.core_step, None, optimizer, weights=losses.PRESETS["nyuv2"],
                             independence_weight=0.0, counterfactual=True)
    for size in (1, 2):
        jax.eval_shape(step, state, {"images": jnp.zeros((size, 2, 2, 3))}, jax.random.key(0))
    assert seen == [(1, False), (2, True)]


def test_a_non_finite_batch_leaves_the_state_unchanged(setup):
    _, _, state, step = setup
    bad = make_batch()
    bad["images"] = bad["images"].at[0, 0, 0, 0].set(jnp.nan)
    guarded, metrics = step(state, bad, jax.random.key(3), independence_weight=1.0)
    assert not bool(metrics["finite"])
    for a, b in zip(comparable_leaves(guarded), comparable_leaves(state)):
        np.testing.assert_array_equal(a, b)


def test_the_guard_rejects_any_non_finite_gradient_even_with_a_finite_loss():
    """The step's guard (one global norm, shared with the clipping) against a gradient tree with one bad entry."""
    old, new = {"w": jnp.zeros(3), "b": jnp.zeros(())}, {"w": jnp.ones(3), "b": jnp.ones(())}
    for bad_value, accepted in ((1.0, True), (jnp.nan, False), (jnp.inf, False), (-jnp.inf, False),
                                (1e30, False)):  # a norm beyond float32's range: a diverged step
        grads = ({"w": jnp.asarray([0.5, bad_value, 0.5], jnp.float32)}, jnp.ones((2, 2), jnp.float32))
        kept, finite = train._guarded(old, new, jnp.float32(1.0), grads)
        assert bool(finite) == accepted, bad_value
        np.testing.assert_array_equal(kept["w"], (new if accepted else old)["w"])
    assert not bool(train._guarded(old, new, jnp.float32(jnp.nan), grads[1:])[1])


def test_the_counterfactual_pass_reads_but_never_updates_batch_norm_statistics():
    model = DualStreamModel(TINY, nnx.Rngs(2))
    statistics = lambda: comparable_leaves(nnx.state(model, nnx.BatchStat))  # a snapshot, not live variables
    initial = statistics()
    batch = make_batch(seed=4)
    model.train()
    # nnx.jit writes the BatchNorm statistics a call updates back into the model object, as an eager call would.
    call = nnx.jit(lambda model, images: model(images))
    _, aux = call(model, batch["images"])
    after_train_pass = statistics()
    graphdef, shared, heads, batch_stats, rest = nnx.split(model, train.SHARED, train.HEADS, nnx.BatchStat, ...)
    probes = {k: aux[k] for k in ("semantic_map", "residual_code", "features")}
    cf_loss = functools.partial(train.counterfactual_loss, graphdef, weights=losses.PRESETS["nyuv2"])
    arguments = ((shared, heads), batch_stats, rest, probes, batch, jax.random.key(0))
    loss, grads = compiled(jax.value_and_grad(cf_loss), *arguments)(*arguments)
    # The same eval-mode pass on the model object itself: the statistics stay as they were.
    model.eval()
    call(model, batch["images"])
    synthesise = lambda model, *streams: (model.render(*streams, (16, 16)),
                                          model.counterfactual_image(*streams[:2], (16, 16)))
    nnx.jit(synthesise)(model, aux["semantic_map"], aux["residual_code"], aux["features"])
    for a, b in zip(statistics(), after_train_pass):
        np.testing.assert_array_equal(a, b)
    assert not all(np.array_equal(a, b) for a, b in zip(after_train_pass, initial))  # train mode does update
    assert np.isfinite(float(loss)) and float(loss) > 0
    assert any(np.abs(g).max() > 0 for g in jax.tree.leaves(grads))  # gradients still flow
    # ... but not into the decoder that made the counterfactuals: its inputs and output are detached.
    assert all(np.abs(g).max() == 0 for g in jax.tree.leaves(grads[0]["appearance_decoder"]))


def test_soft_grounding_trains_the_generic_decoders_and_runs_the_counterfactual_pass():
    _, _, state, step = compiled_core_step(dataclasses.replace(TINY, grounding="soft"))
    batch = make_batch()
    soft_terms = ("geometry", "geometry_aux", "appearance_l1", "appearance_aux")
    history = []
    for i in range(100):
        state, metrics = step(state, batch, jax.random.key(i), independence_weight=0.0)
        assert bool(metrics["finite"])
        history.append(metrics)
    assert set(soft_terms) <= set(history[0]) and "image" not in history[0]  # no physical terms without it
    mean_of_last = lambda name: np.mean([float(h[name]) for h in history[-10:]])
    assert mean_of_last("loss") < 0.5 * float(history[0]["loss"])
    for name in soft_terms:
        assert mean_of_last(name) < float(history[0][name]), name
    # The counterfactual pass runs on the soft model's appearance decoder too.
    open_step = compiled_core_step(dataclasses.replace(TINY, grounding="soft"), counterfactual=True)[3]
    counterfactual = float(open_step(state, batch, jax.random.key(0), independence_weight=1.0)[1]["counterfactual"])
    assert np.isfinite(counterfactual) and counterfactual > 0
