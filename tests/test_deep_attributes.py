"""The CelebA attribute model (deep.attributes): shapes, the heads' inputs, the loss, the CORE-MTL step, the
baselines' per-attribute Jacobian, and the attribute accuracy metric."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deep import train
from deep.attributes import (AttributeLossWeights, AttributeModel, AttributeModelConfig, attribute_loss,
                             attribute_model_config, attribute_step, evaluate_attributes, predict_logits_function,
                             stacked_logits)
from deep.backbone import RESNET18
from deep.data import Loader
from deep.metrics import IGNORED_LABELS, AttributeAccuracy
from theory.measures import linear_cka
from test_deep_baselines import assert_same_jacobian_step, whole_model_jacobian
from test_deep_train import compiled, copied
from theory.balancing import make

ATTRIBUTES = ("Smiling", "Young", "Male")
TINY = AttributeModelConfig(backbone=dataclasses.replace(RESNET18, width=8, depths=(1, 1, 1, 1)),
                            attributes=ATTRIBUTES, semantic_channels=16, residual_channels=4, hidden_channels=8,
                            decoder_widths=(8, 8, 8, 8, 8))
OPTIM = train.OptimConfig(learning_rate=2e-3, weight_decay=0.0, decoupled_weight_decay=True, warmup_epochs=0,
                          epochs=1000)


def make_batch(size: int = 8, seed: int = 0) -> dict:
    """Images whose attributes show: attribute t brightens one third of the image's rows by 0.5."""
    rng = np.random.default_rng(seed)
    attributes = rng.integers(0, 2, size=(size, len(ATTRIBUTES))).astype(np.int32)
    images = rng.uniform(0.0, 0.4, size=(size, 64, 64, 3)).astype(np.float32)
    for t in range(len(ATTRIBUTES)):
        images[attributes[:, t] == 1, 21 * t:21 * (t + 1)] += 0.5
    return {"images": jnp.asarray(images), "attributes": jnp.asarray(attributes)}


@pytest.fixture(scope="module")
def model():
    return AttributeModel(TINY, nnx.Rngs(0))


def test_shapes_and_outputs(model):
    predictions, aux = model(make_batch()["images"])
    assert set(predictions) == set(ATTRIBUTES) and all(p.shape == (8,) for p in predictions.values())
    assert aux["semantic_map"].shape == (8, 2, 2, 16) and aux["residual_map"].shape == (8, 2, 2, 4)  # stride 32
    assert aux["semantic_code"].shape == (8, 16) and aux["residual_code"].shape == (8, 4)
    assert aux["reconstruction"].shape == (8, 64, 64, 3)
    assert float(aux["reconstruction"].min()) > 0 and float(aux["reconstruction"].max()) < 1  # a sigmoid
    assert TINY.tasks == (("Smiling", 1), ("Young", 1), ("Male", 1))
    baseline = AttributeModel(dataclasses.replace(TINY, grounding="none"), nnx.Rngs(0))
    assert baseline.decoder is None and "reconstruction" not in baseline(make_batch()["images"])[1]


def test_the_heads_read_only_the_semantic_stream(model):
    """Neither the residual projector nor the decoder changes a prediction (eval mode: no dropout)."""
    images = make_batch()["images"]
    graphdef, state = nnx.split(model)
    changed = nnx.merge(graphdef, jax.tree.map(jnp.copy, state))
    changed.residual.conv.kernel[...] = changed.residual.conv.kernel[...] + 1.0
    changed.decoder.out.kernel[...] = changed.decoder.out.kernel[...] + 1.0
    model.eval(), changed.eval()
    try:
        for name, value in model(images)[0].items():
            np.testing.assert_array_equal(value, changed(images)[0][name])
        assert not np.allclose(model(images)[1]["residual_code"], changed(images)[1]["residual_code"])
    finally:
        model.train()


def test_encode_then_predict_is_the_forward_pass(model):
    images = make_batch()["images"]
    model.eval()
    try:
        whole = model(images)[0]
        parts = model.predict_from_streams(**model.encode(images), tasks=("Young",))
    finally:
        model.train()
    assert set(parts) == {"Young"}
    np.testing.assert_allclose(parts["Young"], whole["Young"], rtol=1e-6)
    with pytest.raises(ValueError, match="tasks must be among the model's"):
        model.predict_from_streams(**model.encode(images), tasks=("Bald",))


def test_evaluation_keeps_the_attributes_order(model):
    """The attributes are not in sorted order here (a dict leaving jit comes back sorted): the evaluation's columns
    are still the model's, and its accuracies the hand-counted ones."""
    assert list(ATTRIBUTES) != sorted(ATTRIBUTES)
    batch = make_batch()
    graphdef, params, batch_stats, rest = train.split_states(model)
    state = train.TrainState(params, batch_stats, rest, (), jnp.zeros((), jnp.int32))
    logits = predict_logits_function(graphdef)(state, batch["images"])
    model.eval()
    try:
        predictions, _ = model(batch["images"])
    finally:
        model.train()
    for index, name in enumerate(ATTRIBUTES):
        np.testing.assert_allclose(logits[:, index], predictions[name], rtol=1e-5, atol=1e-6)
    # Batches of 3 over the 8 examples, the last one filled up with one unlabelled row, as the script evaluates.
    loader = Loader({k: np.asarray(v) for k, v in batch.items()}, 3, seed=0, shuffle=False, drop_last=False,
                    fill_last={"attributes": IGNORED_LABELS["attributes"]})
    result = evaluate_attributes(predict_logits_function(graphdef), state, loader.epoch(0), ATTRIBUTES)
    right = (np.asarray(logits) > 0) == (np.asarray(batch["attributes"]) == 1)
    for index, name in enumerate(ATTRIBUTES):
        assert result[f"attributes/{name}"] == pytest.approx(right[:, index].mean())


def test_the_heads_are_the_last_layer_alone(model):
    """What the baselines treat as task-specific (deep.train's HEADS filter): one logit per attribute."""
    heads = nnx.to_flat_state(nnx.state(model, train.HEADS))
    assert {path for path, _ in heads} == {("heads", "kernel"), ("heads", "bias")}
    assert model.heads.kernel[...].shape == (TINY.hidden_channels, len(ATTRIBUTES))


def test_the_soft_decoder_and_the_attribute_features_in_eval_mode_written_out_in_numpy(model):
    """The authors' CelebA decoder and head trunk (official_implementation.md, CelebA model) in float64 numpy from the
    layers' parameters (drawn with numpy), with every BatchNorm's affine parameters and running statistics random:

    * each decoder block is PyTorch's bilinear ×2 with ``align_corners=False`` (``nn.Upsample``'s default) → 3×3
      convolution without bias → BN → ReLU; where the doublings miss the image size (3×4 → 12×16 here, for a 13×15
      image) a final half-pixel resize to it, then the 1×1 convolution → sigmoid;
    * the heads' shared features are ReLU(BN(Linear(spatial mean of ẑ_s))) (dropout off in eval mode).

    Both run compiled. Tolerance: float32 against float64, 1e-5 relative to the largest value."""
    from deep.attributes import SoftDecoder
    from deep.layers import drawn_later
    from test_deep_functional import reference_resize_axis
    from test_deep_heads_streams import _batch_norm_eval, _conv_same, _np, _randomise_normalisation, _relu

    rng = np.random.default_rng(11)
    with drawn_later():  # zeros, filled below with numpy draws: no program compiled per parameter shape
        decoder = SoftDecoder(5, (4, 3), nnx.Rngs(11))
    for _, layer in nnx.iter_graph(decoder):
        if isinstance(layer, nnx.Conv):
            layer.kernel.set_value(jnp.asarray(rng.standard_normal(layer.kernel[...].shape) / 3, jnp.float32))
            if layer.bias is not None:
                layer.bias.set_value(jnp.asarray(rng.standard_normal(layer.bias[...].shape), jnp.float32))
    _randomise_normalisation(decoder, seed=11)
    decoder.eval()
    maps = rng.standard_normal((2, 3, 4, 5))
    got = np.asarray(nnx.jit(lambda d, x: d(x, (13, 15)))(decoder, jnp.asarray(maps, jnp.float32)), np.float64)

    def resize(x, size):
        return reference_resize_axis(reference_resize_axis(x, 1, size[0], False), 2, size[1], False)

    x = maps
    for block in decoder.blocks:
        x = resize(x, (2 * x.shape[1], 2 * x.shape[2]))
        x = _relu(_batch_norm_eval(_conv_same(x, _np(block.conv.kernel[...])), block.bn))
    x = _conv_same(resize(x, (13, 15)), _np(decoder.out.kernel[...]), _np(decoder.out.bias[...]))
    expected = 1 / (1 + np.exp(-x))
    assert got.shape == expected.shape == (2, 13, 15, 3)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)

    copy = nnx.clone(model)  # new variables: the module fixture stays as it was
    _randomise_normalisation(copy.hidden_bn, seed=12)
    copy.eval()
    semantic = rng.standard_normal((3, 2, 2, TINY.semantic_channels))
    features = nnx.jit(lambda m, x: m._features(x))(copy, jnp.asarray(semantic, jnp.float32))
    hidden = semantic.mean(axis=(1, 2)) @ _np(copy.hidden.kernel[...]) + _np(copy.hidden.bias[...])
    expected = _relu(_batch_norm_eval(hidden, copy.hidden_bn))
    np.testing.assert_allclose(np.asarray(features, np.float64), expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_bfloat16_computes_in_bfloat16_and_returns_float32():
    """The compute dtype reaches every convolution and dense layer, while the parameters, the logits (which the
    cross-entropy and the accuracy read) and every aux entry stay float32. Traced only."""
    model = nnx.eval_shape(lambda: AttributeModel(dataclasses.replace(TINY, compute_dtype="bfloat16"), nnx.Rngs(0)))
    layers = [m for _, m in nnx.iter_graph(model) if isinstance(m, (nnx.Conv, nnx.Linear))]
    assert layers and all(layer.dtype == jnp.bfloat16 for layer in layers)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    graphdef, state = nnx.split(model)
    predictions, aux = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state,
                                      jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32))
    assert set(aux) == {"semantic_map", "residual_map", "semantic_code", "residual_code", "features", "reconstruction"}
    assert {leaf.dtype for leaf in jax.tree.leaves((predictions, aux))} == {jnp.dtype(jnp.float32)}


def test_sample_panels_are_the_eval_mode_reconstruction_and_the_previous_images_residual_map(model):
    """``swapped[i]`` decodes image i's semantic map with image i - 1's residual map (rolled by one over the batch),
    both from the eval-mode pass (running statistics: a fresh model's are 0 and 1, which a train-mode pass would
    replace by the batch's)."""
    from deep.attributes import sample_panels

    images = make_batch(size=3)["images"][:, :32, :32]
    graphdef, params, batch_stats, rest = train.split_states(model)
    state = train.TrainState(params, batch_stats, rest, (), jnp.zeros((), jnp.int32))
    panels = sample_panels(graphdef, state, images)
    model.eval()
    try:
        _, aux = model(images)
        swapped = model.reconstruct(aux["semantic_map"], aux["residual_map"][jnp.array([2, 0, 1])], (32, 32))
    finally:
        model.train()
    assert {name: value.dtype for name, value in panels.items()} == {"reconstruction": np.float32,
                                                                     "swapped": np.float32}
    np.testing.assert_allclose(panels["reconstruction"], aux["reconstruction"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(panels["swapped"], swapped, rtol=1e-5, atol=1e-6)
    assert not np.allclose(panels["swapped"], panels["reconstruction"])  # the residual map shows


def test_attribute_loss_is_binary_cross_entropy_over_the_labelled_entries():
    logits = jnp.array([[2.0, -1.0], [0.5, 3.0]])
    labels = jnp.array([[1, 0], [0, -1]])
    sigmoid = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    expected = -(np.log(sigmoid(2.0)) + np.log(1 - sigmoid(-1.0)) + np.log(1 - sigmoid(0.5))) / 3
    np.testing.assert_allclose(attribute_loss(logits, labels), expected, rtol=1e-6)
    # One attribute's column with fewer labelled entries than rows (the evaluation's filler rows are -1): the mean
    # over the two labelled entries, not over the four rows.
    column = attribute_loss(jnp.array([[2.0], [0.5], [-3.0], [1.0]]), jnp.array([[1], [-1], [0], [-1]]))
    np.testing.assert_allclose(column, -(np.log(sigmoid(2.0)) + np.log(1 - sigmoid(-3.0))) / 2, rtol=1e-6)
    # A column with no label at all (an attribute missing from every row of a filler batch) weighs nothing: 0, with a
    # zero gradient, not 0/0.
    value, grad = jax.value_and_grad(attribute_loss)(jnp.array([[2.0], [-1.0]]), jnp.array([[-1], [-1]]))
    assert float(value) == 0.0 and np.all(np.asarray(grad) == 0.0)
    # Each attribute's task loss is its column's; their mean is the loss over all entries when all are labelled.
    model, batch = AttributeModel(TINY, nnx.Rngs(1)), make_batch()
    predictions, _ = model(batch["images"])
    per_task = [model.task_loss(name, predictions[name], batch) for name in ATTRIBUTES]
    np.testing.assert_allclose(np.mean(per_task), attribute_loss(stacked_logits(predictions, ATTRIBUTES),
                                                                 batch["attributes"]), rtol=1e-6)
    np.testing.assert_allclose(per_task[1], attribute_loss(predictions["Young"][:, None],
                                                           batch["attributes"][:, 1:2]), rtol=1e-6)


def test_the_core_step_learns_the_attributes_and_the_reconstruction():
    """Dropout off, so that the falling loss is the fit, not the noise: the attributes' cross-entropy falls far
    below its start (log 2 ≈ 0.69 for a fresh head), and so does the reconstruction error."""
    config = dataclasses.replace(TINY, dropout=0.0)
    optimizer = train.make_optimizer(dataclasses.replace(OPTIM, learning_rate=1e-2))
    graphdef, state = train.split_model(AttributeModel(config, nnx.Rngs(0)), optimizer)
    batch = make_batch()
    step = jax.jit(functools.partial(attribute_step, graphdef, optimizer, weights=AttributeLossWeights()))
    first = None
    for _ in range(60):
        state, metrics = step(state, batch)
        first = first or {k: float(v) for k, v in metrics.items()}
    assert bool(metrics["finite"]) and int(state.step) == 60
    assert float(metrics["attributes"]) < 0.2 * first["attributes"], (first, metrics)
    assert float(metrics["appearance_l1"]) < 0.7 * first["appearance_l1"], (first, metrics)
    assert {"loss", "attributes", "independence", "appearance_l1"} <= set(metrics)


def test_the_objective_weighs_its_terms_as_the_authors_config():
    """loss = λ_attr·BCE + λ_ind·CKA + β_app·λ_l1·L1 (no LPIPS weights given: no perceptual term)."""
    optimizer = train.make_optimizer(OPTIM)
    graphdef, state = train.split_model(AttributeModel(TINY, nnx.Rngs(0)), optimizer)
    weights = AttributeLossWeights(attributes=2.0, independence=0.25, appearance=3.0, appearance_l1=0.5)
    _, metrics = jax.jit(functools.partial(attribute_step, graphdef, optimizer, weights=weights))(state, make_batch())
    expected = 2.0 * metrics["attributes"] + 0.25 * metrics["independence"] + 3.0 * 0.5 * metrics["appearance_l1"]
    np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-6)
    assert "appearance_perceptual" not in metrics
    assert AttributeLossWeights() == AttributeLossWeights(attributes=1.0, independence=0.5, appearance=5.0,
                                                          appearance_l1=1.0)  # the authors' 5celeba.yaml
    # The CKA term is between the spatially pooled streams of the same train-mode pass (the dropout stream and the
    # BatchNorm statistics start where the step started).
    model = nnx.merge(graphdef, *state.params, *jax.tree.map(jnp.copy, (state.batch_stats, state.rest)))
    model.train()
    _, aux = model(make_batch()["images"])
    np.testing.assert_allclose(metrics["independence"], linear_cka(jnp.mean(aux["semantic_map"], axis=(1, 2)),
                                                                   jnp.mean(aux["residual_map"], axis=(1, 2))),
                               rtol=1e-5)


def test_the_perceptual_term_enters_inside_beta(monkeypatch):
    """β_app·(λ_L1·L1 + LPIPS), with LPIPS replaced by a constant to see where it enters."""
    import deep.attributes

    monkeypatch.setattr(deep.attributes, "lpips_loss", lambda weights, reconstruction, images: jnp.float32(0.75))
    optimizer = train.make_optimizer(OPTIM)
    graphdef, state = train.split_model(AttributeModel(TINY, nnx.Rngs(0)), optimizer)
    weights = AttributeLossWeights(attributes=1.0, independence=0.0, appearance=3.0, appearance_l1=0.5)
    step = jax.jit(functools.partial(attribute_step, graphdef, optimizer, weights=weights, perceptual=()))
    _, metrics = step(state, make_batch())  # compiled: run op by op, the step took 26 s of the suite
    assert float(metrics["appearance_perceptual"]) == 0.75
    np.testing.assert_allclose(metrics["loss"], metrics["attributes"] + 3.0 * (0.5 * metrics["appearance_l1"] + 0.75),
                               rtol=1e-6)
    with pytest.raises(ValueError, match="loss weight independence must be a finite number >= 0"):
        AttributeLossWeights(independence=-1.0)


def test_the_baselines_per_attribute_jacobian_equals_the_whole_model_pull_back():
    """T tasks with linear heads on one shared representation: each attribute's gradient of the shared parameters
    from one forward pass (the dropout mask drawn once, as in the whole pass)."""
    optimizer = train.make_optimizer(OPTIM)
    graphdef, state = train.split_model(AttributeModel(dataclasses.replace(TINY, grounding="none"), nnx.Rngs(0)),
                                        optimizer)
    batch = make_batch()
    got = compiled(functools.partial(train.task_jacobian_step, graphdef), state, batch)(state, batch)
    assert got[1].shape[0] == len(ATTRIBUTES)
    assert_same_jacobian_step(got, whole_model_jacobian(graphdef, state, batch, TINY.tasks))


def test_the_jacobian_in_chunks_is_the_jacobian_at_once():
    """Pull-backs through the encoder two at a time (lax.map) give what all three at once (vmap) give."""
    optimizer = train.make_optimizer(OPTIM)
    graphdef, state = train.split_model(AttributeModel(dataclasses.replace(TINY, grounding="none"), nnx.Rngs(0)),
                                        optimizer)
    batch = make_batch()
    at_once, in_chunks = (jax.jit(functools.partial(train.task_jacobian_step, graphdef, chunk=chunk))(state, batch)
                          for chunk in (None, 2))
    scale = float(jnp.abs(at_once[1]).max())
    np.testing.assert_allclose(in_chunks[1], at_once[1], rtol=0, atol=1e-5 * scale)  # float32 sums in another order
    np.testing.assert_array_equal(in_chunks[0], at_once[0])
    # The step passes the chunk on: its program gains the loop of lax.map. (Its update is not compared: Adam's first
    # step, -lr·g/(|g| + ε), turns the rounding of a near-zero gradient into a difference of order lr.)
    balancer = make("pcgrad")
    programs = [jax.jit(functools.partial(train.balanced_step, graphdef, optimizer, balancer, jacobian_chunk=chunk))
                .lower(state, balancer.init(len(ATTRIBUTES)), batch, jax.random.key(0)).as_text()
                for chunk in (None, 2)]
    assert programs[1].count("stablehlo.while") > programs[0].count("stablehlo.while")


def test_make_attribute_step_hands_the_chunk_and_the_lpips_weights_to_the_steps(monkeypatch):
    """A baseline's step gets ``jacobian_chunk`` (how many pull-backs run at once), CORE-MTL's the LPIPS weights:
    stand-ins for the two steps record what they are given."""
    import deep.attributes

    given = {}

    def make_step(method, graphdef, optimizer, weights, perceptual=None, jacobian_chunk=None):
        given.update(method=method, jacobian_chunk=jacobian_chunk)
        return "balancer", lambda *args: args

    monkeypatch.setattr(deep.attributes.trainer, "make_step", make_step)
    balancer, step = deep.attributes.make_attribute_step("pcgrad", None, None, AttributeLossWeights(), jacobian_chunk=2)
    assert given == {"method": "pcgrad", "jacobian_chunk": 2} and balancer == "balancer"
    assert step("state", "balancer state", "batch", "key") == ("state", "balancer state", "batch", "key", None)

    def attribute_step(graphdef, optimizer, state, batch, weights, perceptual=None):
        return state + 1, {"perceptual": perceptual}

    monkeypatch.setattr(deep.attributes, "attribute_step", attribute_step)
    balancer, step = deep.attributes.make_attribute_step("core", None, None, AttributeLossWeights(),
                                                         perceptual=jnp.float32(0.25))
    state, balancer_state, metrics = step(jnp.zeros(()), (), jnp.zeros(()), None)
    assert balancer == () and balancer_state == () and float(state) == 1 and float(metrics["perceptual"]) == 0.25


@pytest.mark.parametrize("method", ["ew", "pcgrad", "graddrop", "dwa"])
def test_a_baseline_step_runs_on_the_attribute_model(method):
    optimizer = train.make_optimizer(OPTIM)
    graphdef, state = train.split_model(AttributeModel(dataclasses.replace(TINY, grounding="none"), nnx.Rngs(0)),
                                        optimizer)
    balancer = make(method)
    step = jax.jit(functools.partial(train.balanced_step, graphdef, optimizer, balancer))
    new_state, _, metrics = step(copied(state), balancer.init(len(ATTRIBUTES)), make_batch(), jax.random.key(0))
    assert bool(metrics["finite"]) and {f"weight/{name}" for name in ATTRIBUTES} <= set(metrics)
    moved = [not np.allclose(a, b) for a, b in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(state.params))]
    assert all(moved[-2:]) and sum(moved) > len(moved) // 2  # the heads and most shared leaves


def test_gradient_cosines_are_those_of_the_per_term_gradients(monkeypatch):
    """The probes of Figs. 4 and 5 against gradients taken one by one with jax.grad of each term. LPIPS is replaced
    by a differentiable stand-in (its weight times the mean squared error), so that the reconstruction term's
    gradient, β(λ_L1·L1 + LPIPS), shows where each part enters; λ_L1 = 0.5 is not the default for the same reason."""
    import deep.attributes
    from jax.flatten_util import ravel_pytree

    from deep.attributes import gradient_cosines

    monkeypatch.setattr(deep.attributes, "lpips_loss",
                        lambda weights, reconstruction, images: weights * jnp.mean((reconstruction - images) ** 2))
    optimizer = train.make_optimizer(OPTIM)
    graphdef, state = train.split_model(AttributeModel(dataclasses.replace(TINY, dropout=0.0), nnx.Rngs(0)),
                                        optimizer)
    batch, weights = make_batch(), AttributeLossWeights(appearance_l1=0.5)
    probes = jax.jit(functools.partial(gradient_cosines, graphdef, weights=weights))(state, batch,
                                                                                     perceptual=jnp.float32(2.0))
    shared, heads = state.params

    def gradients(*picks):
        """Each term's gradient of the shared parameters, raveled, from one jitted program (differentiated eagerly,
        every operation would be compiled on its own)."""
        def term(shared, pick):
            model = nnx.merge(graphdef, shared, heads, *jax.tree.map(jnp.copy, (state.batch_stats, state.rest)))
            model.train()
            return pick(model, *model(batch["images"]))

        taken = jax.jit(lambda shared: [ravel_pytree(jax.grad(functools.partial(term, pick=pick))(shared))[0]
                                        for pick in picks])(shared)
        return [np.asarray(gradient, np.float64) for gradient in taken]

    def reconstruction_term(model, predictions, aux):
        difference = aux["reconstruction"] - batch["images"]
        return 5.0 * (0.5 * jnp.mean(jnp.abs(difference)) + 2.0 * jnp.mean(difference**2))

    *tasks, reconstruction, independence = gradients(
        *(lambda model, p, aux, t=t: model.task_loss(t, p[t], batch) for t in ATTRIBUTES), reconstruction_term,
        lambda model, p, aux: linear_cka(aux["semantic_code"], aux["residual_code"]))
    cosine = lambda a, b: a @ b / np.sqrt((a @ a) * (b @ b))  # noqa: E731
    expected = np.array([[cosine(a, b) for b in tasks] for a in tasks])
    np.testing.assert_allclose(probes["task_task"], expected, atol=1e-5)
    np.testing.assert_allclose(np.diag(probes["task_task"]), 1.0, atol=1e-5)
    np.testing.assert_allclose(probes["task_reconstruction"], [cosine(t, reconstruction) for t in tasks], atol=1e-5)
    np.testing.assert_allclose(probes["task_independence"], [cosine(t, independence) for t in tasks], atol=1e-5)
    baseline = AttributeModel(dataclasses.replace(TINY, grounding="none"), nnx.Rngs(0))
    graphdef, state = train.split_model(baseline, optimizer)
    assert set(jax.jit(functools.partial(gradient_cosines, graphdef, weights=weights))(state, batch)) == {"task_task"}


def test_attribute_accuracy_over_a_split_fed_in_batches():
    accuracy = AttributeAccuracy(("a", "b"))
    accuracy.update(jnp.array([[1.0, -1.0], [-2.0, 0.5]]), jnp.array([[1, 1], [0, 1]]))  # a: 2/2, b: 1/2
    # a: 0/1, b: 1/1; the second row has no label.
    accuracy.update(jnp.array([[0.3, -0.1], [0.0, 9.0]]), jnp.array([[0, 0], [-1, -1]]))
    result = accuracy.result()
    assert result["attributes/a"] == pytest.approx(2 / 3) and result["attributes/b"] == pytest.approx(2 / 3)
    assert result["attributes/mean_accuracy"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="1 attribute labels are none of 0, 1 and -1"):
        accuracy.update(jnp.zeros((1, 2)), jnp.array([[2, 0]]))
    with pytest.raises(ValueError, match=r"attribute logits must be \[batch, 2\]; got shape \(1, 3\)"):
        accuracy.update(jnp.zeros((1, 3)), jnp.zeros((1, 2), jnp.int32))
    diverged = AttributeAccuracy(("a", "b"))
    diverged.update(jnp.array([[jnp.nan, 1.0], [jnp.nan, -1.0]]), jnp.array([[0, 1], [-1, 0]]))
    result = diverged.result()  # a NaN logit is no "absent": the attribute's accuracy and the mean are NaN
    assert np.isnan(result["attributes/a"]) and np.isnan(result["attributes/mean_accuracy"])
    assert result["attributes/b"] == 1.0
    # A NaN logit on a row with no label (a last batch's filler) is skipped like the row: the accuracy stays a number.
    filler = AttributeAccuracy(("a",))
    filler.update(jnp.array([[jnp.nan], [1.0]]), jnp.array([[-1], [1]]))
    assert filler.result()["attributes/a"] == 1.0
    empty = AttributeAccuracy(("a",))
    empty.update(jnp.zeros((1, 1)), jnp.array([[-1]]))
    with pytest.raises(ValueError, match="no labelled example of a was seen"):
        empty.result()
    # The authors' threshold is a sigmoid above 0.5, a logit above 0: a logit of exactly 0 predicts "absent".
    boundary = AttributeAccuracy(("a",))
    boundary.update(jnp.zeros((2, 1)), jnp.array([[0], [0]]))
    assert boundary.result()["attributes/a"] == 1.0
    with pytest.raises(ValueError, match="attributes must be distinct names"):
        AttributeAccuracy(("a", "b", "a"))


def test_the_variants_backbones():
    """The paper's ResNet-50 without dilation and the authors' ResNet-18, both at output stride 32."""
    paper, authors = (attribute_model_config(variant, "full") for variant in ("paper", "authors"))
    assert paper.backbone.block == "bottleneck" and paper.backbone.depths == (3, 4, 6, 3)
    assert authors.backbone == RESNET18 and paper.backbone.output_stride == authors.backbone.output_stride == 32
    assert paper.attributes == authors.attributes and len(paper.attributes) == 40
    tiny = attribute_model_config("paper", "tiny", attributes=ATTRIBUTES)
    assert tiny.backbone.depths == (1, 1, 1, 1) and tiny.backbone.block == "bottleneck" and tiny.tasks == TINY.tasks
    with pytest.raises(ValueError, match="variant must be one of paper, authors"):
        attribute_model_config("theirs", "full")


def test_config_refuses_bad_values():
    with pytest.raises(ValueError, match="attributes must be distinct names"):
        AttributeModelConfig(attributes=("a", "a"))
    with pytest.raises(ValueError, match="grounding must be one of soft, none"):
        AttributeModelConfig(grounding="hard")
    with pytest.raises(ValueError, match=r"dropout must lie in \[0, 1\)"):
        AttributeModelConfig(dropout=1.0)
    with pytest.raises(ValueError, match="hidden_channels must be >= 1; got 0"):
        AttributeModelConfig(hidden_channels=0)


def test_the_attribute_streams_are_projected_through_a_relu():
    """``proj_zs`` and ``proj_zp`` end in BatchNorm → ReLU (official_implementation.md, CelebA model): both stream maps
    are nonnegative, and in training mode, where BatchNorm centres each channel over the batch (fresh offset 0),
    every channel of each map has some exact zeros."""
    model = AttributeModel(TINY, nnx.Rngs(0))
    _, aux = model(make_batch()["images"])  # the shapes of the other tests' eager passes: no new compiles
    for name in ("semantic_map", "residual_map"):
        values = np.asarray(aux[name])
        assert values.min() >= 0.0, name
        assert np.all(np.any(values == 0.0, axis=(0, 1, 2))), name
