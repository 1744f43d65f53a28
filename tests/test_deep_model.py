"""The assembled dual-stream model on a tiny configuration."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deep import losses, train, weights
from deep.backbone import BackboneConfig
from deep.layers import conv, dense, drawn_later
from deep.model import LIGHT_INPUTS, VARIANTS, DualStreamModel, ModelConfig, initialise_like_pytorch, task_prediction
from deep.trainer import MODEL_SIZES
from test_deep_train import compiled, make_batch

TINY = ModelConfig(backbone=BackboneConfig(depths=(1, 1, 1, 1), width=2), semantic_channels=6, residual_channels=3,
                   head_channels=4, aspp_rates=(1, 2, 3), decoder_widths=(4, 4), albedo_seed=4, light_hidden=8,
                   generic_width=8)
# The authors' architecture (multi-scale fusion, DeepLabV3+ heads reading F and c1) at the tiny size.
AUTHORS = dataclasses.replace(TINY, **VARIANTS["authors"], fusion_channels=4, skip_channels=4, skip_groups=2,
                              decoder_groups=2)
STREAM_KEYS = {"semantic_map", "residual_code", "features", "low_level"}
PHYSICAL_KEYS = {"rendered", "albedo", "normals", "shading", "lighting"}
GENERIC_KEYS = {"reconstruction", "reconstruction_aux", "geometry", "geometry_aux"}


@pytest.fixture(scope="module")
def model():
    return DualStreamModel(TINY, nnx.Rngs(0))


def test_output_shapes_and_unit_normals(model):
    images = jax.random.uniform(jax.random.key(0), (2, 32, 40, 3), jnp.float32)
    graphdef, state = nnx.split(model)
    predictions, aux = jax.jit(lambda state, images: nnx.merge(graphdef, state)(images))(state, images)
    assert predictions["segmentation"].shape == (2, 32, 40, 13)
    assert predictions["depth"].shape == (2, 32, 40, 1)
    norms = np.asarray(jnp.linalg.norm(predictions["normal"], axis=-1))
    # Unit length, except where a tiny random head outputs exactly 0 (ReLU-dead inputs): 0 stays 0.
    assert np.all(np.isclose(norms, 1.0, rtol=1e-5) | (norms == 0)) and np.mean(norms > 0) > 0.5
    assert aux["semantic_map"].shape == (2, 4, 5, 6) and aux["residual_code"].shape == (2, 3)
    assert all(p.dtype == jnp.float32 for p in predictions.values())
    assert aux["rendered"].shape == (2, 32, 40, 3) and aux["lighting"].shape == (2, 3, 9)
    assert float(aux["rendered"].min()) >= 0 and float(aux["rendered"].max()) <= 1


def test_a_subset_of_tasks_runs_only_those_heads_and_unknown_names_are_refused(model):
    """``predict_from_streams(..., tasks=...)`` (each baseline task through its own head): the same predictions for
    the named tasks as all of them, nothing for the others, and a misspelt name refused, not silently empty."""
    images = jax.random.uniform(jax.random.key(0), (2, 32, 40, 3), jnp.float32)
    graphdef, state = nnx.split(model)

    @jax.jit
    def predict(state, images):
        model = nnx.merge(graphdef, state)
        model.eval()  # the same dropout (none) for both calls
        streams = model.encode(images)
        return (model.predict_from_streams(**streams, image_size=(32, 40)),
                model.predict_from_streams(**streams, image_size=(32, 40), tasks=("depth", "normal")))

    every, some = predict(state, images)
    assert set(some) == {"depth", "normal"}
    for name in some:
        np.testing.assert_array_equal(some[name], every[name])
    streams = nnx.merge(graphdef, state).encode(images)
    for tasks, message in ((("dpeth",), "tasks must be among the model's, segmentation, depth, normal; got dpeth"),
                           ("depth", "tasks must be a tuple of task names, such as \\('depth',\\); got the string")):
        with pytest.raises(ValueError, match=message):
            nnx.merge(graphdef, state).predict_from_streams(**streams, image_size=(32, 40), tasks=tasks)


def every_task(predictions: dict) -> jax.Array:
    """Σ_t <W_t, prediction_t> with fixed random W_t: its gradient with respect to an input is zero (with probability
    one) only where every task's Jacobian is."""
    return sum(jnp.sum(value * jax.random.normal(jax.random.fold_in(jax.random.key(11), index), value.shape))
               for index, (_, value) in enumerate(sorted(predictions.items())))


@pytest.mark.parametrize("heads_read, grounding, depends_on_features",
                         [("semantic", "hard", False), ("semantic+backbone", "hard", True),
                          ("semantic", "soft", False)])
def test_heads_read_only_the_semantic_stream_in_the_paper_mode(heads_read, grounding, depends_on_features):
    config = dataclasses.replace(TINY, heads_read=heads_read, grounding=grounding)
    model = DualStreamModel(config, nnx.Rngs(1))
    model.eval()
    images = jax.random.uniform(jax.random.key(1), (1, 16, 16, 3), jnp.float32)
    _, aux = nnx.jit(lambda model, images: model.predict(images))(model, images)  # no grounding decoder runs
    assert set(aux) == STREAM_KEYS

    def predictions_from(residual_code, features):
        return every_task(model.predict_from_streams(aux["semantic_map"], residual_code, features, (16, 16)))

    grad_residual, grad_features = jax.jit(jax.grad(predictions_from, argnums=(0, 1)))(aux["residual_code"],
                                                                                        aux["features"])
    np.testing.assert_array_equal(grad_residual, 0.0)  # the residual code never reaches a head
    assert bool(jnp.any(grad_features != 0)) == depends_on_features


@pytest.mark.parametrize("light_reads", ["residual", "backbone"])
def test_the_lighting_reads_the_residual_code_in_the_paper_mode(light_reads):
    """The paper's residual stream predicts albedo and illumination: the light head reads ẑ_r, so the backbone's
    features never reach the lighting. The authors' light head reads the pooled backbone features instead, and the
    residual code reaches only the albedo."""
    model = DualStreamModel(dataclasses.replace(TINY, light_reads=light_reads), nnx.Rngs(1))
    model.eval()  # running BatchNorm statistics: a pure function to differentiate
    keys = jax.random.split(jax.random.key(3), 3)
    semantic_map = jax.random.normal(keys[0], (2, 4, 5, 6), jnp.float32)
    residual_code = jax.random.normal(keys[1], (2, 3), jnp.float32)
    features = jax.random.normal(keys[2], (2, 4, 5, TINY.backbone.output_channels[-1]), jnp.float32)

    def lighting_from(residual_code, features):
        return model.render(semantic_map, residual_code, features, (32, 40))[1]["lighting"].sum()

    grad_residual, grad_features = jax.jit(jax.grad(lighting_from, argnums=(0, 1)))(residual_code, features)
    assert model.decoder.light.fc1.in_features == (
        TINY.residual_channels if light_reads == "residual" else features.shape[-1])
    assert bool(jnp.any(grad_residual != 0)) == (light_reads == "residual")
    assert bool(jnp.any(grad_features != 0)) == (light_reads == "backbone")


def test_bad_head_input_is_rejected():
    with pytest.raises(ValueError, match="heads_read"):
        ModelConfig(heads_read="residual")
    with pytest.raises(ValueError, match="fusion must be one of c4, multiscale"):
        ModelConfig(fusion="c1")
    with pytest.raises(ValueError, match="fusion_channels"):
        ModelConfig(fusion="multiscale", fusion_channels=0)
    with pytest.raises(ValueError, match="head must be one of aspp, deeplabv3plus"):
        ModelConfig(head="fpn")
    with pytest.raises(ValueError, match="heads_read must be 'semantic\\+backbone'"):
        ModelConfig(head="deeplabv3plus")  # its skip reads c1: it cannot be the paper's semantic-only head
    with pytest.raises(ValueError, match="decoder_groups .* divide head_channels \\(256\\); got 24"):
        ModelConfig.variant("authors", decoder_groups=24)
    with pytest.raises(ValueError, match="skip_groups"):
        dataclasses.replace(AUTHORS, skip_groups=3)
    with pytest.raises(ValueError, match=r"skip_groups \(GroupNorm groups\) must be >= 1 .*; got 0"):
        dataclasses.replace(AUTHORS, skip_groups=0)  # a ValueError that names it, not Python's modulo by zero
    with pytest.raises(ValueError, match="skip_channels must be >= 1; got 0"):
        dataclasses.replace(AUTHORS, skip_channels=0)  # GroupNorm's divisibility alone lets 0 through
    with pytest.raises(ValueError, match="variant must be one of paper, authors"):
        ModelConfig.variant("theirs")
    with pytest.raises(ValueError, match="grounding"):
        ModelConfig(grounding="soft-ish")
    with pytest.raises(ValueError, match="generic_width"):
        ModelConfig(generic_width=12)


def test_sizes_and_tasks_are_checked_when_the_config_is_made():
    """Mistakes that used to pass here and fail later, deep in a trace or at the first loss."""
    for field, value, message in [
            ("semantic_channels", 0, "semantic_channels must be an integer >= 1; got 0"),
            ("head_channels", -1, "head_channels must be an integer >= 1; got -1"),
            ("aspp_rates", (), r"aspp_rates must be a non-empty tuple of integers >= 1; got \(\)"),
            ("aspp_rates", (0,), "aspp_rates must be a non-empty tuple"),
            ("tasks", [("depth", 1)], r"tasks must be a non-empty tuple of \(name, output channels >= 1\) pairs"),
            ("tasks", (("depth", 1), ("depth", 1)), "tasks must have distinct names; got depth, depth"),
            ("tasks", (("normal", 1),), r"task 'normal' predicts 3 channel\(s\); got 1"),
            # A 3-channel depth would pass silently: its L1 broadcasts against the [..., 1] labels.
            ("tasks", (("depth", 3),), r"task 'depth' predicts 1 channel\(s\); got 3"),
            # Each size of the streams and of the physical decoder, which would otherwise fail in a trace.
            ("residual_channels", 0, "residual_channels must be an integer >= 1; got 0"),
            ("albedo_seed", 0, "albedo_seed must be an integer >= 1; got 0"),
            ("light_hidden", 0, "light_hidden must be an integer >= 1; got 0"),
            ("decoder_widths", (4, 0), r"decoder_widths must be a non-empty tuple of integers >= 1; got \(4, 0\)")]:
        with pytest.raises(ValueError, match=message):
            dataclasses.replace(TINY, **{field: value})
    # Any integer type will do: NumPy's, or a JAX scalar.
    dataclasses.replace(TINY, semantic_channels=np.int64(6), aspp_rates=(np.int32(1), jnp.int32(2)),
                        tasks=(("depth", np.int64(1)),))


def test_images_in_another_layout_or_type_are_refused_before_any_work(model):
    """Channels first, one unbatched image or 8-bit values: one line that says what the model reads, for every
    architecture (MTAN and the attribute model share the ResNet's stem, which checks)."""
    with pytest.raises(ValueError, match=r"images must be \[B, H, W, 3\] \(a batch, channels last\); got shape "
                                         r"\(2, 3, 32, 40\) \(channels first\? the layout is channels last\)"):
        model(jnp.zeros((2, 3, 32, 40)))
    with pytest.raises(ValueError, match=r"got shape \(32, 40, 3\)$"):
        model(jnp.zeros((32, 40, 3)))
    with pytest.raises(ValueError, match=r"images must be floating point, in \[0, 1\] .* got uint8 \(8-bit images: "
                                         r"divide by 255\)"):
        model(jnp.zeros((2, 32, 40, 3), jnp.uint8))
    from deep.mtan import MTAN, MTANConfig

    mtan = nnx.eval_shape(lambda: MTAN(MTANConfig(backbone=TINY.backbone, tasks=TINY.tasks, head_channels=4,
                                                  aspp_rates=(1, 2, 3)), nnx.Rngs(0)))
    with pytest.raises(ValueError, match="channels first"):
        mtan.shared_stages(jnp.zeros((2, 3, 32, 40)))


def test_fresh_parameters_start_as_the_authors_pytorch_models_do():
    """Pooled over the layers of a fresh model: the backbone ResNet's convolutions are N(0, 2 / fan-out)
    (torchvision), every other convolution's and dense layer's weights and biases U(+-1/sqrt(fan-in)) (PyTorch's
    default; MTAN's transition bottlenecks too, as LibMTL builds them outside its ResNet; Flax's own weights would be
    sqrt(3) wider, its biases 0). Variances within 5 standard errors of the pooled estimates; per layer, the bound
    is reached to within half and the biases are drawn; an abstract model (nnx.eval_shape) is still built."""
    from deep.backbone import ResNet
    from deep.mtan import MTAN, MTANConfig

    config = dataclasses.replace(TINY, grounding="hard")
    for model in (DualStreamModel(config, nnx.Rngs(3)),
                  MTAN(MTANConfig(backbone=TINY.backbone, head_channels=4, aspp_rates=(1, 2, 3)), nnx.Rngs(3))):
        resnet = {id(layer) for _, block in nnx.iter_graph(model) if isinstance(block, ResNet)
                  for _, layer in nnx.iter_graph(block) if isinstance(layer, nnx.Conv)}
        normal, uniform = [], []
        for _, layer in nnx.iter_graph(model):
            if isinstance(layer, (nnx.Conv, nnx.Linear)):
                kernel = np.asarray(layer.kernel[...], np.float64)
                if id(layer) in resnet:
                    fan_out = kernel.shape[-1] * kernel.shape[0] * kernel.shape[1]
                    normal.append(kernel.ravel() / np.sqrt(2.0 / fan_out))
                else:
                    bound = 1.0 / np.sqrt(np.prod(kernel.shape[:-1]))
                    uniform.append(kernel.ravel() / bound)
                    # A layer of another fan-in would miss its bound (P(max < bound / 2) = 2^-n for n >= 16 draws).
                    assert kernel.size < 16 or np.max(np.abs(kernel)) > 0.5 * bound, kernel.shape
                    if layer.bias is not None:
                        assert np.all(np.asarray(layer.bias[...]) != 0), kernel.shape
                        uniform.append(np.asarray(layer.bias[...], np.float64) / bound)
        normal, uniform = np.concatenate(normal), np.concatenate(uniform)
        assert np.max(np.abs(uniform)) <= 1.0 and len(normal) > 1000 and len(uniform) > 1000
        # Sample variances: of N(0, 1), SE sqrt(2 / n); of U(-1, 1) (variance 1/3), SE sqrt((1/5 - 1/9) / n).
        assert abs(normal.var() - 1.0) < 5 * np.sqrt(2 / len(normal)), normal.var()
        assert abs(uniform.var() - 1 / 3) < 5 * np.sqrt((1 / 5 - 1 / 9) / len(uniform)), uniform.var()
    assert isinstance(abstract_model(config), DualStreamModel)


def test_layers_left_to_be_drawn_later_start_as_if_flax_had_drawn_them_first(monkeypatch):
    """The models build their convolutions and dense layers with zero placeholders (deep.layers.drawn_later), which
    initialise_like_pytorch replaces: every parameter and random stream equals a build where Flax draws them first,
    so no layer is left at zero and the streams advance as before (the dual-stream model of the authors' variant with
    both groundings' decoders, and MTAN)."""
    import contextlib

    from deep import mtan
    from deep import model as model_module

    def leaves(module):
        return [np.asarray(jax.random.key_data(leaf) if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)
                           else leaf) for leaf in jax.tree.leaves(nnx.state(module))]

    mtan_config = mtan.MTANConfig(backbone=BackboneConfig(depths=(1, 1, 1, 1), width=2), head_channels=4,
                                  aspp_rates=(1, 2, 3))
    builders = (lambda: DualStreamModel(AUTHORS, nnx.Rngs(4)), lambda: mtan.MTAN(mtan_config, nnx.Rngs(4)))
    placeheld = [leaves(build()) for build in builders]
    placeheld_shapes = [jax.tree.leaves(nnx.state(nnx.eval_shape(build))) for build in builders]
    monkeypatch.setattr(model_module, "drawn_later", contextlib.nullcontext)
    monkeypatch.setattr(mtan, "drawn_later", contextlib.nullcontext)
    for build, expected, expected_shapes in zip(builders, placeheld, placeheld_shapes, strict=True):
        drawn = leaves(build())
        assert len(drawn) == len(expected)
        for a, b in zip(drawn, expected):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)
        # Built in a trace (nnx.eval_shape), the placeholders are zeros of the trace, of Flax's shapes and dtypes.
        assert jax.tree.leaves(nnx.state(nnx.eval_shape(build))) == expected_shapes


def abstract_model(config: ModelConfig) -> DualStreamModel:
    """The model with shape-only parameters: tracing it is cheap, nothing is initialised or run."""
    return nnx.eval_shape(lambda: DualStreamModel(config, nnx.Rngs(0)))


def output_shapes(model: DualStreamModel, fn, *inputs):
    """``fn(model, *inputs)`` traced (never run) on the abstract ``model``; returns its output's shapes."""
    graphdef, state = nnx.split(model)
    return jax.eval_shape(lambda s, *xs: fn(nnx.merge(graphdef, s), *xs), state, *inputs)


@pytest.mark.parametrize("grounding, decoder_keys", [("hard", PHYSICAL_KEYS | GENERIC_KEYS), ("soft", GENERIC_KEYS),
                                                     ("none", set())])
def test_grounding_selects_the_decoders_and_their_outputs(grounding, decoder_keys):
    model = abstract_model(dataclasses.replace(TINY, grounding=grounding))
    images = jax.ShapeDtypeStruct((2, 32, 40, 3), jnp.float32)
    _, aux = output_shapes(model, lambda m, x: m(x), images)
    assert set(aux) == STREAM_KEYS | decoder_keys
    if GENERIC_KEYS <= decoder_keys:
        assert aux["geometry"].shape == (2, 32, 40, 1) and aux["geometry_aux"].shape == (2, 16, 20, 1)
        assert aux["reconstruction"].shape == (2, 32, 40, 3) and aux["reconstruction_aux"].shape == (2, 16, 20, 3)
    assert model.makes_counterfactuals == (grounding != "none")
    if grounding == "none":
        with pytest.raises(ValueError, match="no decoder"):
            model.counterfactual_image(jnp.zeros((2, 4, 5, 6)), jnp.zeros((2, 3)), (32, 40))


def test_the_counterfactual_image_comes_from_the_appearance_decoder_and_reads_the_residual_code(model):
    keys = jax.random.split(jax.random.key(2))
    semantic_map = jax.random.normal(keys[0], (2, 4, 5, 6), jnp.float32)
    residual = jax.random.normal(keys[1], (2, 3), jnp.float32)
    counterfactual = jax.jit(lambda s, r: model.counterfactual_image(s, r, (32, 40)))
    image = counterfactual(semantic_map, residual)
    # Hard grounding has both decoders; the counterfactual is the appearance decoder's, as the authors' CFA.
    appearance = jax.jit(lambda s, r: model.appearance_decoder(s, r, (32, 40))[0])
    np.testing.assert_array_equal(image, appearance(semantic_map, residual))
    assert float(image.min()) >= 0 and float(image.max()) <= 1
    assert not np.allclose(counterfactual(semantic_map, residual[::-1]), image)
    # A non-zero Jacobian with respect to the residual code (its product with a direction, one JVP).
    _, tangent = jax.jit(lambda r: jax.jvp(lambda r: counterfactual(semantic_map, r), (r,), (jnp.ones_like(r),)))(
        residual)
    assert float(jnp.abs(tangent).max()) > 0


def test_without_an_appearance_decoder_the_counterfactual_is_the_physical_rendering():
    semantic_map = jax.ShapeDtypeStruct((2, 4, 5, 6), jnp.float32)
    residual = jax.ShapeDtypeStruct((2, 3), jnp.float32)
    features = jax.ShapeDtypeStruct((2, 4, 5, 64), jnp.float32)
    for light_reads in LIGHT_INPUTS:
        model = _without_appearance(dataclasses.replace(TINY, light_reads=light_reads))
        image = output_shapes(model, lambda m, s, r, f: m.counterfactual_image(s, r, (32, 40), features=f),
                              semantic_map, residual, features)
        assert image.shape == (2, 32, 40, 3)
    # The paper's lighting comes from the (swapped) residual code; the authors' needs the backbone features.
    image = output_shapes(_without_appearance(TINY), lambda m, s, r: m.counterfactual_image(s, r, (32, 40)),
                          semantic_map, residual)
    assert image.shape == (2, 32, 40, 3)
    with pytest.raises(ValueError, match="features"):
        output_shapes(_without_appearance(dataclasses.replace(TINY, light_reads="backbone")),
                      lambda m, s, r: m.counterfactual_image(s, r, (32, 40)), semantic_map, residual)


def _without_appearance(config: ModelConfig) -> DualStreamModel:
    """The abstract model with the physical decoder alone: no configuration builds this today, but the
    counterfactual's fallback must still work."""
    model = abstract_model(config)
    model.appearance_decoder = None
    return model


def test_the_generic_decoders_follow_the_compute_dtype_and_return_float32():
    model = abstract_model(dataclasses.replace(TINY, grounding="soft", compute_dtype="bfloat16"))
    assert model.appearance_decoder.trunk.attention.query.dtype == jnp.bfloat16
    assert model.geometry_decoder.blocks[2].conv2.dtype == jnp.bfloat16
    assert model.appearance_decoder.blocks[0].adain1.style.dtype == jnp.bfloat16
    _, aux = output_shapes(model, lambda m, x: m(x), jax.ShapeDtypeStruct((2, 32, 40, 3), jnp.float32))
    assert all(value.dtype == jnp.float32 for value in aux.values())
    # The counterfactual image too (as its docstring says): the CFA pass feeds it back to the model as an image.
    image = output_shapes(model, lambda m, s, r: m.counterfactual_image(s, r, (32, 40)),
                          jax.ShapeDtypeStruct((2, 4, 5, 6), jnp.float32), jax.ShapeDtypeStruct((2, 3), jnp.float32))
    assert image.shape == (2, 32, 40, 3) and image.dtype == jnp.float32


def test_the_variants_name_the_paper_default_and_the_authors_architecture():
    assert ModelConfig.variant("paper") == ModelConfig()
    authors = ModelConfig.variant("authors", grounding="soft", **MODEL_SIZES["tiny"])
    assert (authors.fusion, authors.heads_read, authors.head, authors.light_reads) == (
        "multiscale", "semantic+backbone", "deeplabv3plus", "backbone")
    assert ModelConfig().light_reads == "residual"
    assert authors.grounding == "soft" and authors.fusion_channels == MODEL_SIZES["tiny"]["fusion_channels"]
    full = ModelConfig.variant("authors")
    assert (full.fusion_channels, full.skip_channels, full.skip_groups, full.decoder_groups) == (
        1024, 48, 4, 32)
    reduced = ModelConfig.variant("authors", **MODEL_SIZES["reduced"])  # the sizes' group counts divide
    assert reduced.head_channels % reduced.decoder_groups == 0
    assert reduced.fusion_channels < full.fusion_channels
    # A field given to variant() wins over the variant's own, architecture fields included.
    mixed = ModelConfig.variant("authors", light_reads="residual", fusion="c4")
    assert (mixed.light_reads, mixed.fusion, mixed.head) == ("residual", "c4", "deeplabv3plus")
    assert ModelConfig.variant("paper", heads_read="semantic+backbone").heads_read == "semantic+backbone"


@pytest.mark.parametrize("size, image_size", [("tiny", (32, 40)), ("reduced", (35, 45))])
def test_the_authors_variant_output_shapes(size, image_size):
    config = ModelConfig.variant("authors", **MODEL_SIZES[size])
    model = abstract_model(config)
    images = jax.ShapeDtypeStruct((2, *image_size, 3), jnp.float32)
    predictions, aux = output_shapes(model, lambda m, x: m(x), images)
    assert {name: p.shape for name, p in predictions.items()} == {
        name: (2, *image_size, channels) for name, channels in config.tasks}
    # The stem and layer1 halve the size twice (ceil), layer2 once more: odd sizes give an odd c1 grid here.
    low = tuple((((n + 1) // 2) + 1) // 2 for n in image_size)
    grid = tuple((n + 1) // 2 for n in low)
    assert aux["low_level"].shape == (2, *low, config.backbone.output_channels[0])
    assert aux["features"].shape == (2, *grid, 4 * config.fusion_channels)  # F: four adapted stages
    assert aux["semantic_map"].shape == (2, *grid, config.semantic_channels)
    assert aux["rendered"].shape == (2, *image_size, 3)
    assert model.decoder.light.fc1.in_features == config.fusion_channels  # it pools the adapted c4


@pytest.fixture(scope="module")
def authors_model():
    """One task and no decoders: compiling three heads and the decoders would more than double these tests'
    time. The light head's input is checked by the shape test above (a light head fed all of F would not
    trace), the other heads by that test too, and the counterfactual pass's pieces (``predict``,
    ``counterfactual_image``) by the tests here and above."""
    return DualStreamModel(dataclasses.replace(AUTHORS, tasks=(("depth", 1),), grounding="none"), nnx.Rngs(3))


def test_the_authors_heads_read_f_and_the_c1_skip_but_never_the_residual_code(authors_model):
    """The authors' heads see F (which carries residual information), every stage of it, and c1; the residual
    code itself reaches no head."""
    graphdef, state = nnx.split(authors_model)
    images = jnp.asarray(np.random.default_rng(1).uniform(size=(1, 16, 16, 3)), jnp.float32)

    def gradients(state, images):
        model = nnx.merge(graphdef, state)
        model.eval()
        _, aux = model.predict(images)
        semantic_map = aux["semantic_map"]

        def predictions_from(residual_code, features, low_level):
            return every_task(model.predict_from_streams(semantic_map, residual_code, features, (16, 16),
                                                         low_level=low_level))

        inputs = aux["residual_code"], aux["features"], aux["low_level"]
        return jax.grad(predictions_from, argnums=(0, 1, 2))(*inputs)

    grad_residual, grad_features, grad_low_level = compiled(gradients, state, images)(state, images)
    np.testing.assert_array_equal(grad_residual, 0.0)
    stage_blocks = np.split(np.asarray(grad_features), 4, axis=-1)  # F = [A1 c1; A2 c2; A3 c3; A4 c4]
    assert all(np.abs(block).max() > 0 for block in stage_blocks)
    assert float(jnp.abs(grad_low_level).max()) > 0
    with pytest.raises(ValueError, match="low_level"):
        authors_model.predict_from_streams(jnp.zeros((1, 2, 2, 6)), jnp.zeros((1, 3)),
                                           jnp.zeros((1, 2, 2, 16)), (16, 16))


def test_bfloat16_compute_reaches_group_norm_and_the_new_convolutions():
    model = abstract_model(dataclasses.replace(AUTHORS, compute_dtype="bfloat16", grounding="none"))
    head = model.heads["depth"]
    layers = (head.skip_norm, head.fuse_norm, head.project_features, head.project_semantic, head.skip,
              head.fuse, *model.fusion.adapters)
    assert all(layer.dtype == jnp.bfloat16 for layer in layers)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))
    as_float32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    normalised = output_shapes(model, lambda m, x: m.heads["depth"].skip_norm(x), as_float32(2, 8, 10, 4))
    fused = output_shapes(model, lambda m, *stages: m.fusion(stages), as_float32(2, 8, 10, 8),
                          as_float32(2, 4, 5, 16), as_float32(2, 4, 5, 32), as_float32(2, 4, 5, 64))
    head_out = output_shapes(model, lambda m, s, f, c1: m.heads["depth"](s, f, c1), as_float32(2, 4, 5, 6),
                             as_float32(2, 4, 5, 16), as_float32(2, 8, 10, 8))
    assert normalised.dtype == fused.dtype == head_out.dtype == jnp.bfloat16
    predictions, aux = output_shapes(model, lambda m, x: m(x), as_float32(2, 32, 40, 3))
    assert all(value.dtype == jnp.float32 for value in (*predictions.values(), *aux.values()))


def test_bfloat16_compute_reaches_every_layer_with_parameters_and_predict_returns_float32():
    """Mixed precision as configure_layers documents it, over every layer of both variants with both groundings'
    decoders: each layer holding a kernel or a normalisation scale (convolutions, dense layers, BatchNorm, GroupNorm,
    the light head's LayerNorm) computes in bfloat16, its parameters stay float32. ``predict`` (what the
    counterfactual pass scores and evaluation reads) returns float32 as ``__call__`` does, so those losses and
    metrics are not taken in bfloat16. The authors' variant with hard grounding has every kind of layer; traced
    only, on an abstract model."""
    model = abstract_model(dataclasses.replace(AUTHORS, compute_dtype="bfloat16"))
    layers = [module for _, module in nnx.iter_graph(model)
              if isinstance(getattr(module, "kernel", None), nnx.Param)
              or isinstance(getattr(module, "scale", None), nnx.Param)]
    kinds = {type(layer).__name__ for layer in layers}
    assert {"Conv", "Linear", "BatchNorm", "GroupNorm", "LayerNorm"} <= kinds, kinds
    wrong = sorted({type(layer).__name__ for layer in layers if layer.dtype != jnp.bfloat16})
    assert not wrong, wrong
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))
    predictions, aux = output_shapes(model, lambda m, x: m.predict(x), jax.ShapeDtypeStruct((2, 32, 40, 3),
                                                                                             jnp.float32))
    dtypes = {name: value.dtype for name, value in {**predictions, **aux}.items()}
    assert dtypes == dict.fromkeys(dtypes, jnp.float32), dtypes


def test_a_model_drawn_inside_a_trace_draws_every_layer_afresh_by_the_same_rules():
    """initialise_like_pytorch under a trace (a model built under jit; nnx.eval_shape) draws with JAX's generator, one
    key per draw: two layers of the same shape must not start equal (a shared key would make them identical, a
    symmetry no step could break), and the rules stay torchvision's N(0, 2/fan-out) for the ResNet's convolutions
    and PyTorch's U(+-1/sqrt(fan-in)) for the rest. Variances within 5 standard errors, as in the eager test above."""
    from deep.backbone import ResNet
    from deep.model import initialise_like_pytorch

    class ResNetStandIn(ResNet):  # what the rule looks for is the ResNet type; two equal convolutions are enough
        def __init__(self, rngs):
            self.a, self.b = (conv(16, 32, (3, 3), use_bias=False, rngs=rngs) for _ in range(2))

    class Twins(nnx.Module):
        def __init__(self, rngs):
            with drawn_later():
                self.resnet = ResNetStandIn(rngs)
                self.dense_a, self.dense_b = (dense(64, 64, rngs=rngs) for _ in range(2))

    @jax.jit
    def drawn(key):  # the key is a tracer here, which selects the traced branch
        twins = Twins(nnx.Rngs(0))
        initialise_like_pytorch(twins, key)
        return nnx.state(twins, nnx.Param)

    params = jax.tree.map(lambda leaf: np.asarray(leaf, np.float64), drawn(jax.random.key(5)))
    normal = [params["resnet"][name]["kernel"][...] for name in ("a", "b")]
    uniform = [params[name][part][...] for name in ("dense_a", "dense_b") for part in ("kernel", "bias")]
    assert not np.array_equal(normal[0], normal[1])
    assert not np.array_equal(uniform[0], uniform[2]) and not np.array_equal(uniform[1], uniform[3])
    normal = np.concatenate([kernel.ravel() for kernel in normal]) / np.sqrt(2.0 / (3 * 3 * 32))
    uniform = np.concatenate([value.ravel() for value in uniform]) * np.sqrt(64.0)
    assert abs(normal.var() - 1.0) < 5 * np.sqrt(2 / len(normal)), normal.var()
    assert np.max(np.abs(uniform)) <= 1.0
    assert abs(uniform.var() - 1 / 3) < 5 * np.sqrt((1 / 5 - 1 / 9) / len(uniform)), uniform.var()


def test_one_core_step_of_the_authors_variant_is_finite_and_trains_the_fusion(authors_model):
    optimizer = train.make_optimizer(train.OptimConfig(learning_rate=1e-2, warmup_epochs=0, epochs=1000))
    graphdef, state = train.split_model(authors_model, optimizer)
    batch = make_batch()
    core_step = functools.partial(train.core_step, graphdef, optimizer, weights=losses.PRESETS["nyuv2"])
    arguments = (state, batch, jax.random.key(0))
    controls = dict(independence_weight=1.0)
    new_state, metrics = compiled(core_step, *arguments, **controls)(*arguments, **controls)
    assert bool(metrics["finite"]) and np.isfinite(float(metrics["loss"]))
    assert np.isfinite(float(metrics["depth"])) and np.isfinite(float(metrics["independence"]))
    shared, heads = state.params
    new_shared, new_heads = new_state.params
    for before, after in ((shared["fusion"], new_shared["fusion"]), (heads, new_heads)):
        assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))


def test_torchvision_weights_fill_the_backbone_and_leave_the_fusion_alone(tmp_path, authors_model):
    model = nnx.clone(authors_model)
    expected = weights.torchvision_shapes(model)
    assert not any("fusion" in key or "adapters" in key for key in expected)  # not part of torchvision's
    rng = np.random.default_rng(0)
    arrays = {key: rng.uniform(0.5, 2.0, size=shape).astype(np.float32) for key, shape in expected.items()}
    np.savez(tmp_path / "tiny.npz", **arrays)
    fusion_before = [np.asarray(leaf) for leaf in jax.tree.leaves(nnx.state(model.fusion))]
    weights.load_torchvision_npz(model, tmp_path / "tiny.npz")
    np.testing.assert_array_equal(model.backbone.conv1.kernel.get_value(),
                                  arrays["conv1.weight"].transpose(2, 3, 1, 0))
    for before, after in zip(fusion_before, jax.tree.leaves(nnx.state(model.fusion))):
        np.testing.assert_array_equal(before, after)


def test_predictions_are_upsampled_with_align_corners_true_and_normals_unit_normalised():
    """A head output that is linear in the pixel position, upsampled from 3×4 to 5×7 with ``align_corners=True``
    (LibMTL's and the authors' convention), is the same linear function sampled at ``linspace(0, n_in - 1, n_out)``
    exactly: the corners map to the corners. ``align_corners=False`` would give interior samples at other places
    (e.g. 0.4 instead of 0.5 for the second of five rows). Normals come back of unit length."""
    rows, cols = np.arange(3.0), np.arange(4.0)
    ramp = 10.0 * rows[:, None] + cols[None, :]
    out = task_prediction("depth", jnp.asarray(ramp[None, :, :, None], jnp.float32), (5, 7))
    expected = 10.0 * np.linspace(0, 2, 5)[:, None] + np.linspace(0, 3, 7)[None, :]
    np.testing.assert_allclose(np.asarray(out)[0, :, :, 0], expected, rtol=1e-6, atol=1e-5)
    vectors = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 4, 3)) + 2.0, jnp.float32)
    norms = jnp.linalg.norm(task_prediction("normal", vectors, (5, 7)), axis=-1)
    np.testing.assert_allclose(norms, 1.0, rtol=1e-5)
    # F.normalize's epsilon, 1e-12 (LibMTL's and the authors'): an output of norm 1e-8 is still made a unit vector.
    norms = jnp.linalg.norm(task_prediction("normal", 1e-8 * vectors, (5, 7)), axis=-1)
    np.testing.assert_allclose(norms, 1.0, rtol=1e-5)


def test_encode_gives_c1_only_to_the_deeplabv3plus_head():
    """``encode`` documents its keys: the streams and the projectors' input, plus ``low_level`` (c1, the largest map
    of all) only for the DeepLabV3+ head, which alone reads it; the Jacobian steps differentiate every key of it, so
    an extra one costs a per-task pull-back of c1. Traced only, on abstract models."""
    images = jax.ShapeDtypeStruct((2, 32, 40, 3), jnp.float32)
    paper = output_shapes(abstract_model(TINY), lambda model, x: model.encode(x), images)
    authors = output_shapes(abstract_model(AUTHORS), lambda model, x: model.encode(x), images)
    assert set(paper) == {"semantic_map", "residual_code", "features"}
    assert set(authors) == {"semantic_map", "residual_code", "features", "low_level"}
    assert authors["low_level"].shape[1:3] == (8, 10)  # c1 at 1/4 of the image


def test_layers_built_inside_drawn_later_start_at_zero_and_outside_as_flax_draws_them():
    """``drawn_later`` (deep/layers.py) promises zero parameters inside, so no per-shape initialiser program is
    compiled for draws that ``initialise_like_pytorch`` throws away (23 of the 26 s the full model took to
    build); outside, Flax's own draws (LeCun-normal kernels, nonzero)."""
    with drawn_later():
        inside = conv(3, 4, (3, 3), rngs=nnx.Rngs(0)), dense(3, 2, rngs=nnx.Rngs(0))
    outside = conv(3, 4, (3, 3), rngs=nnx.Rngs(0))
    for layer in inside:
        assert not np.any(np.asarray(layer.kernel[...])) and not np.any(np.asarray(layer.bias[...]))
    assert np.all(np.asarray(outside.kernel[...]) != 0)


def test_drawn_later_ends_with_its_block_also_when_the_block_raises():
    """A model whose build fails inside drawn_later (a bad configuration, caught by the caller) must not leave every
    layer built afterwards at zero."""
    with pytest.raises(ValueError, match="a bad configuration"):
        with drawn_later():
            raise ValueError("a bad configuration")
    assert np.all(np.asarray(conv(3, 4, (3, 3), rngs=nnx.Rngs(0)).kernel[...]) != 0)


def test_the_authors_lighting_reads_the_spatial_mean_of_the_adapted_c4():
    """With the multi-scale fusion and light_reads="backbone" (the authors' variant), the light head reads h, the
    spatial mean of the adapted c4: the last fusion_channels channels of F (reference §2), not all of F, and a mean,
    not a max."""
    model = DualStreamModel(AUTHORS, nnx.Rngs(1))
    model.eval()
    assert AUTHORS.light_reads == "backbone" and AUTHORS.grounding == "hard"
    assert model.decoder.light.fc1.in_features == AUTHORS.fusion_channels
    keys = jax.random.split(jax.random.key(12), 3)
    semantic_map = jax.random.normal(keys[0], (2, 4, 5, AUTHORS.semantic_channels), jnp.float32)
    residual = jax.random.normal(keys[1], (2, AUTHORS.residual_channels), jnp.float32)
    fused = jax.random.normal(keys[2], (2, 4, 5, 4 * AUTHORS.fusion_channels), jnp.float32)
    lighting = nnx.jit(lambda m, s, r, f: m.render(s, r, f, (32, 40))[1]["lighting"])(model, semantic_map, residual,
                                                                                        fused)
    h = jnp.mean(fused[..., -AUTHORS.fusion_channels:], axis=(1, 2))
    np.testing.assert_allclose(lighting, model.decoder.light(h), rtol=1e-5, atol=1e-6)


def test_the_physical_decoder_takes_the_configured_sizes():
    """decoder_widths, albedo_seed and light_hidden size the physical decoder (TINY's 4, 4 / 4 / 8, not the
    authors' 128, 128, 64, 32 / 16 / 128 defaults of the heads), each in its own place."""
    decoder = abstract_model(TINY).decoder
    assert (decoder.albedo.seed_size, decoder.albedo.seed_width) == (TINY.albedo_seed, TINY.decoder_widths[0])
    assert tuple(block.conv.kernel.shape[3] for block in decoder.normals.blocks) == TINY.decoder_widths
    assert tuple(block.conv.kernel.shape[3] for block in decoder.albedo.blocks) == TINY.decoder_widths[1:]
    assert decoder.light.fc1.out_features == TINY.light_hidden


def test_initialisation_follows_the_key():
    """An eager build draws from the key it is given: the same key gives the same parameters (reproducible runs),
    another key others (seeds of a sweep differ)."""
    def drawn(key):
        layer = dense(16, 16, rngs=nnx.Rngs(0))
        initialise_like_pytorch(layer, jax.random.key(key))
        return np.asarray(layer.kernel[...])

    np.testing.assert_array_equal(drawn(0), drawn(0))
    assert not np.any(drawn(0) == drawn(1))


def test_the_generic_decoders_take_the_configured_width():
    """generic_width sizes both generic decoders' trunks (and, halved, their blocks), not their 512 default."""
    model = abstract_model(TINY)
    for decoder in (model.geometry_decoder, model.appearance_decoder):
        assert decoder.trunk.conv.kernel.shape[3] == TINY.generic_width
        assert decoder.final.kernel.shape[2] == TINY.generic_width // 8


def test_layers_drawn_later_keep_the_parameter_dtype_asked_for():
    """The zero placeholders take the dtype Flax asks its initialisers for (``param_dtype``), as Flax's own draws
    would: a bfloat16-parameter layer built inside ``drawn_later`` must not come back with float32 parameters."""
    with drawn_later():
        layers = (conv(3, 4, (3, 3), param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0)),
                  dense(3, 2, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    for layer in layers:
        assert layer.kernel[...].dtype == layer.bias[...].dtype == jnp.bfloat16
