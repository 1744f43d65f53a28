"""Hard grounding: albedo from ẑ_r, normals from ẑ_s, lighting from features, rendered through the SH model."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deep.decoders import PhysicalDecoder
from deep.shading import lambertian_shading, render


def test_physical_decoder_shapes_ranges_and_which_stream_feeds_what():
    decoder = PhysicalDecoder(6, 3, 8, nnx.Rngs(0), widths=(4, 4, 4), albedo_seed=4, light_hidden=8)
    keys = jax.random.split(jax.random.key(0), 3)
    semantic_map = jax.random.normal(keys[0], (2, 4, 5, 6), jnp.float32)
    residual = jax.random.normal(keys[1], (2, 3), jnp.float32)
    pooled = jax.random.normal(keys[2], (2, 8), jnp.float32)
    rendered, parts = decoder(semantic_map, residual, pooled, (16, 20))
    assert rendered.shape == parts["albedo"].shape == parts["shading"].shape == (2, 16, 20, 3)
    assert parts["lighting"].shape == (2, 3, 9)
    assert float(rendered.min()) >= 0 and float(rendered.max()) <= 1
    assert float(parts["albedo"].min()) >= 0 and float(parts["albedo"].max()) <= 1
    assert float(parts["shading"].min()) >= 0
    # The albedo depends on the residual code only; the normals on the semantic map only.
    decoder.eval()
    albedo_of = lambda s, r: decoder(s, r, pooled, (16, 20))[1]["albedo"].sum()
    normals_of = lambda s, r: decoder(s, r, pooled, (16, 20))[1]["normals"].sum()
    ga_s, ga_r = jax.grad(albedo_of, argnums=(0, 1))(semantic_map, residual)
    gn_s, gn_r = jax.grad(normals_of, argnums=(0, 1))(semantic_map, residual)
    assert float(jnp.abs(ga_s).max()) == 0.0 and float(jnp.abs(ga_r).max()) > 0
    assert float(jnp.abs(gn_r).max()) == 0.0 and float(jnp.abs(gn_s).max()) > 0


def test_rendering_composes_albedo_and_shading():
    normals = jnp.zeros((1, 2, 2, 3)).at[..., 2].set(1.0)
    lighting = jnp.zeros((1, 3, 9)).at[:, :, 0].set(1.0 / 0.282095).at[:, :, 2].set(1.0 / 0.488603)
    shading = lambertian_shading(normals, lighting)  # 1 + n_z = 2 everywhere
    np.testing.assert_allclose(shading, 2.0, rtol=1e-5)
    np.testing.assert_allclose(render(jnp.full((1, 2, 2, 3), 0.3), shading), 0.6, rtol=1e-5)
