"""The assembled dual-stream model on a tiny configuration."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deep.backbone import BackboneConfig
from deep.model import DualStreamModel, ModelConfig

TINY = ModelConfig(backbone=BackboneConfig(depths=(1, 1, 1, 1), width=2), semantic_channels=6, residual_channels=3,
                   head_channels=4, aspp_rates=(1, 2, 3), decoder_widths=(4, 4), albedo_seed=4, light_hidden=8,
                   generic_width=8)
STREAM_KEYS = {"semantic_map", "residual_code", "features", "low_level"}
PHYSICAL_KEYS = {"rendered", "albedo", "normals", "shading", "lighting"}
GENERIC_KEYS = {"reconstruction", "reconstruction_aux", "geometry", "geometry_aux"}


@pytest.fixture(scope="module")
def model():
    return DualStreamModel(TINY, nnx.Rngs(0))


def test_output_shapes_and_unit_normals(model):
    images = jax.random.uniform(jax.random.key(0), (2, 32, 40, 3), jnp.float32)
    predictions, aux = model(images)
    assert predictions["segmentation"].shape == (2, 32, 40, 13)
    assert predictions["depth"].shape == (2, 32, 40, 1)
    norms = np.asarray(jnp.linalg.norm(predictions["normal"], axis=-1))
    # Unit length, except where a tiny random head outputs exactly 0 (ReLU-dead inputs): 0 stays 0.
    assert np.all(np.isclose(norms, 1.0, rtol=1e-5) | (norms == 0)) and np.mean(norms > 0) > 0.5
    assert aux["semantic_map"].shape == (2, 4, 5, 6) and aux["residual_code"].shape == (2, 3)
    assert all(p.dtype == jnp.float32 for p in predictions.values())
    assert aux["rendered"].shape == (2, 32, 40, 3) and aux["lighting"].shape == (2, 3, 9)
    assert float(aux["rendered"].min()) >= 0 and float(aux["rendered"].max()) <= 1


@pytest.mark.parametrize("heads_read, grounding, depends_on_features",
                         [("semantic", "hard", False), ("semantic+backbone", "hard", True), ("semantic", "soft", False)])
def test_heads_read_only_the_semantic_stream_in_the_paper_mode(heads_read, grounding, depends_on_features):
    model = DualStreamModel(dataclasses.replace(TINY, heads_read=heads_read, grounding=grounding), nnx.Rngs(1))
    model.eval()
    images = jax.random.uniform(jax.random.key(1), (1, 16, 16, 3), jnp.float32)
    _, aux = model.predict(images)  # the streams, without running the grounding decoders
    assert set(aux) == STREAM_KEYS

    def depth_from(residual_code, features):
        return model.predict_from_streams(aux["semantic_map"], residual_code, features, (16, 16))["depth"].sum()

    grad_residual, grad_features = jax.grad(depth_from, argnums=(0, 1))(aux["residual_code"], aux["features"])
    np.testing.assert_array_equal(grad_residual, 0.0)  # the residual code never reaches a head
    assert bool(jnp.any(grad_features != 0)) == depends_on_features


def test_bad_head_input_is_rejected():
    with pytest.raises(ValueError, match="heads_read"):
        ModelConfig(heads_read="residual")
    with pytest.raises(ValueError, match="grounding"):
        ModelConfig(grounding="soft-ish")
    with pytest.raises(ValueError, match="generic_width"):
        ModelConfig(generic_width=12)


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
    image = model.counterfactual_image(semantic_map, residual, (32, 40))
    # Hard grounding has both decoders; the counterfactual is the appearance decoder's, as the authors' CFA.
    np.testing.assert_array_equal(image, model.appearance_decoder(semantic_map, residual, (32, 40))[0])
    assert float(image.min()) >= 0 and float(image.max()) <= 1
    assert not np.allclose(model.counterfactual_image(semantic_map, residual[::-1], (32, 40)), image)
    # A non-zero Jacobian with respect to the residual code (its product with a direction, one JVP).
    _, tangent = jax.jvp(lambda r: model.counterfactual_image(semantic_map, r, (32, 40)), (residual,),
                         (jnp.ones_like(residual),))
    assert float(jnp.abs(tangent).max()) > 0


def test_without_an_appearance_decoder_the_counterfactual_is_the_physical_rendering():
    model = abstract_model(TINY)
    model.appearance_decoder = None  # no configuration builds this today; the fallback must still work
    semantic_map = jax.ShapeDtypeStruct((2, 4, 5, 6), jnp.float32)
    residual = jax.ShapeDtypeStruct((2, 3), jnp.float32)
    features = jax.ShapeDtypeStruct((2, 4, 5, 64), jnp.float32)
    image = output_shapes(model, lambda m, s, r, f: m.counterfactual_image(s, r, (32, 40), features=f),
                          semantic_map, residual, features)
    assert image.shape == (2, 32, 40, 3)
    with pytest.raises(ValueError, match="features"):
        output_shapes(model, lambda m, s, r: m.counterfactual_image(s, r, (32, 40)), semantic_map, residual)


def test_the_generic_decoders_follow_the_compute_dtype_and_return_float32():
    model = abstract_model(dataclasses.replace(TINY, grounding="soft", compute_dtype="bfloat16"))
    assert model.appearance_decoder.trunk.attention.query.dtype == jnp.bfloat16
    assert model.geometry_decoder.blocks[2].conv2.dtype == jnp.bfloat16
    assert model.appearance_decoder.blocks[0].adain1.style.dtype == jnp.bfloat16
    _, aux = output_shapes(model, lambda m, x: m(x), jax.ShapeDtypeStruct((2, 32, 40, 3), jnp.float32))
    assert all(value.dtype == jnp.float32 for value in aux.values())
