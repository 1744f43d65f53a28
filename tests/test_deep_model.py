"""The assembled dual-stream model on a tiny configuration."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deep.backbone import BackboneConfig
from deep.model import DualStreamModel, ModelConfig

TINY = ModelConfig(backbone=BackboneConfig(depths=(1, 1, 1, 1), width=2), semantic_channels=6, residual_channels=3,
                   head_channels=4, aspp_rates=(1, 2, 3), decoder_widths=(4, 4), albedo_seed=4, light_hidden=8)


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


@pytest.mark.parametrize("heads_read, depends_on_features", [("semantic", False), ("semantic+backbone", True)])
def test_heads_read_only_the_semantic_stream_in_the_paper_mode(heads_read, depends_on_features):
    model = DualStreamModel(ModelConfig(**{**TINY.__dict__, "heads_read": heads_read}), nnx.Rngs(1))
    model.eval()
    images = jax.random.uniform(jax.random.key(1), (1, 16, 16, 3), jnp.float32)
    _, aux = model(images)

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
