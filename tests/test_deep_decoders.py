"""The grounding decoders. Hard: albedo from ẑ_r, normals from ẑ_s, lighting from features, rendered through the SH
model. Soft: the generic geometry decoder (ẑ_s → depth) and the AdaIN appearance decoder (ẑ_s, ẑ_r → image)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deep import losses
from deep.decoders import AdaIN, AppearanceDecoder, GeometryDecoder, PhysicalDecoder, SelfAttention, instance_norm
from deep.model import initialise_like_pytorch
from deep.resize import resize_bilinear
from deep.shading import lambertian_shading, render


def test_physical_decoder_shapes_ranges_and_which_stream_feeds_what():
    decoder = PhysicalDecoder(6, 3, 8, nnx.Rngs(0), widths=(4, 4, 4), albedo_seed=4, light_hidden=8)
    # The model's initialisation (Flax's zero biases would leave the normals exactly 0 where ReLU zeroes a patch).
    initialise_like_pytorch(decoder, jax.random.key(1))
    keys = jax.random.split(jax.random.key(0), 3)
    semantic_map = jax.random.normal(keys[0], (2, 4, 5, 6), jnp.float32)
    residual = jax.random.normal(keys[1], (2, 3), jnp.float32)
    pooled = jax.random.normal(keys[2], (2, 8), jnp.float32)
    rendered, parts = nnx.jit(lambda decoder, *inputs: decoder(*inputs, (16, 20)))(decoder, semantic_map, residual,
                                                                                   pooled)
    assert rendered.shape == parts["albedo"].shape == parts["shading"].shape == (2, 16, 20, 3)
    assert parts["lighting"].shape == (2, 3, 9)
    assert float(rendered.min()) >= 0 and float(rendered.max()) <= 1
    assert float(parts["albedo"].min()) >= 0 and float(parts["albedo"].max()) <= 1
    assert float(parts["shading"].min()) >= 0
    # Eq (13)'s wiring: unit normals from the semantic map, SH shading at their resolution resized to the image,
    # the light head on the pooled input, image = clip(albedo ⊙ shading).
    normals_full = decoder.normals(semantic_map)
    np.testing.assert_allclose(jnp.linalg.norm(normals_full, axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(parts["lighting"], decoder.light(pooled), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(parts["shading"], resize_bilinear(lambertian_shading(normals_full, parts["lighting"]),
                                                                 (16, 20)), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(parts["normals"], resize_bilinear(normals_full, (16, 20)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rendered, render(parts["albedo"], parts["shading"]), rtol=1e-6)
    # The albedo depends on the residual code only; the normals on the semantic map only.
    decoder.eval()
    albedo_of = lambda s, r: decoder(s, r, pooled, (16, 20))[1]["albedo"].sum()
    normals_of = lambda s, r: decoder(s, r, pooled, (16, 20))[1]["normals"].sum()
    ga_s, ga_r = jax.jit(jax.grad(albedo_of, argnums=(0, 1)))(semantic_map, residual)
    gn_s, gn_r = jax.jit(jax.grad(normals_of, argnums=(0, 1)))(semantic_map, residual)
    assert float(jnp.abs(ga_s).max()) == 0.0 and float(jnp.abs(ga_r).max()) > 0
    assert float(jnp.abs(gn_r).max()) == 0.0 and float(jnp.abs(gn_s).max()) > 0


def test_rendering_composes_albedo_and_shading():
    normals = jnp.zeros((1, 2, 2, 3)).at[..., 2].set(1.0)
    lighting = jnp.zeros((1, 3, 9)).at[:, :, 0].set(1.0 / 0.282095).at[:, :, 2].set(1.0 / 0.488603)
    shading = lambertian_shading(normals, lighting)  # 1 + n_z = 2 everywhere
    np.testing.assert_allclose(shading, 2.0, rtol=1e-5)
    np.testing.assert_allclose(render(jnp.full((1, 2, 2, 3), 0.3), shading), 0.6, rtol=1e-5)


def test_adain_sets_each_instance_and_channel_to_mean_beta_and_unbiased_std_one_plus_gamma():
    adain = AdaIN(3, 5, nnx.Rngs(0))
    keys = jax.random.split(jax.random.key(2))
    # A 3×4 map: the biased and unbiased deviations differ by sqrt(12/11), 4 %, far above the tolerance.
    x = 3.0 + 2.0 * jax.random.normal(keys[0], (2, 3, 4, 5), jnp.float32)
    style = jax.random.normal(keys[1], (2, 3), jnp.float32)
    out = adain(x, style)
    gamma, beta = np.split(np.asarray(adain.style(style)), 2, axis=-1)
    np.testing.assert_allclose(np.mean(out, axis=(1, 2)), beta, atol=1e-5)
    np.testing.assert_allclose(np.std(np.asarray(out), axis=(1, 2), ddof=1), np.abs(1 + gamma), rtol=1e-5)
    # Pixel by pixel (the moments above cannot see a sign flip of the normalised map).
    x_np = np.asarray(x, np.float64)
    normalised = (x_np - x_np.mean(axis=(1, 2), keepdims=True)) / x_np.std(axis=(1, 2), ddof=1, keepdims=True)
    np.testing.assert_allclose(out, (1 + gamma[:, None, None]) * normalised + beta[:, None, None], atol=1e-5)
    # A constant channel normalises to 0 (then shifts to β) with a finite gradient.
    constant = x.at[..., 0].set(1.0)
    np.testing.assert_allclose(adain(constant, style)[..., 0], np.broadcast_to(beta[:, None, None, 0], (2, 3, 4)),
                               atol=1e-6)
    assert bool(jnp.all(jnp.isfinite(jax.grad(lambda z: adain(z, style).sum())(constant))))


def test_instance_norm_standardises_each_instance_and_channel():
    x = 1.0 + 3.0 * jax.random.normal(jax.random.key(3), (2, 4, 4, 3), jnp.float32)
    out = np.asarray(instance_norm(x))
    np.testing.assert_allclose(out.mean(axis=(1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(out.std(axis=(1, 2)), 1.0, rtol=1e-4)  # biased, eps 1e-5 on a variance near 9


def test_self_attention_starts_as_the_identity_and_attends_over_keys():
    attention = SelfAttention(16, nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(4), (2, 3, 4, 16), jnp.float32)
    assert attention.query.out_features == attention.key.out_features == 2  # C/8
    np.testing.assert_array_equal(attention(x), x)  # γ = 0 at initialisation
    attention.gamma[...] = jnp.asarray(0.7, jnp.float32)
    tokens = lambda conv: np.asarray(conv(x)).reshape(2, 12, -1)
    q, k, v = tokens(attention.query), tokens(attention.key), tokens(attention.value)
    logits = np.einsum("bic,bjc->bij", q, k)
    weights = np.exp(logits - logits.max(axis=-1, keepdims=True))
    weights /= weights.sum(axis=-1, keepdims=True)  # softmax over the keys j
    expected = np.asarray(x) + 0.7 * np.einsum("bij,bjc->bic", weights, v).reshape(x.shape)
    np.testing.assert_allclose(attention(x), expected, rtol=1e-5, atol=1e-5)


def test_generic_decoders_compose_their_blocks_as_documented():
    """The wiring of the trunk, both residual ×2 blocks and both decoders, written out from their docstrings with
    the modules' own layers (each layer's values are tested on its own: convolutions are Flax's, instance_norm,
    AdaIN and SelfAttention above, resize_bilinear against jax.image.resize)."""
    from deep.decoders import _AdaINUpBlock, _ResidualUpBlock, _Trunk

    relu, up = jax.nn.relu, lambda x: resize_bilinear(x, (2 * x.shape[1], 2 * x.shape[2]))
    keys = jax.random.split(jax.random.key(6), 3)
    x = jax.random.normal(keys[0], (2, 3, 4, 8), jnp.float32)
    style = jax.random.normal(keys[1], (2, 3), jnp.float32)
    close = lambda actual, expected: np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)

    trunk = _Trunk(8, 16, nnx.Rngs(0))
    trunk.attention.gamma[...] = jnp.asarray(0.7, jnp.float32)  # 0 at initialisation would hide the attention
    close(trunk(x), trunk.attention(relu(instance_norm(trunk.conv(x)))))
    assert not np.allclose(trunk(x), relu(instance_norm(trunk.conv(x))), atol=1e-3)

    block = _ResidualUpBlock(8, 4, nnx.Rngs(1))
    close(block(x), relu(block.shortcut(up(x)) + instance_norm(block.conv2(relu(instance_norm(block.conv1(up(x))))))))

    adain_block = _AdaINUpBlock(8, 4, 3, nnx.Rngs(2))
    main = adain_block.conv1(up(relu(adain_block.adain1(x, style))))
    close(adain_block(x, style),
          adain_block.shortcut(up(x)) + adain_block.conv2(relu(adain_block.adain2(main, style))))

    semantic_map = jax.random.normal(keys[2], (2, 3, 4, 6), jnp.float32)
    geometry = GeometryDecoder(6, nnx.Rngs(3), width=16)
    geometry.trunk.attention.gamma[...] = jnp.asarray(0.5, jnp.float32)
    middle = geometry.blocks[1](geometry.blocks[0](geometry.trunk(semantic_map)))
    depth, depth_aux = geometry(semantic_map, (20, 30))
    close(depth, resize_bilinear(geometry.final(geometry.blocks[2](middle)), (20, 30)))
    close(depth_aux, geometry.aux_head(middle))

    appearance = AppearanceDecoder(6, 3, nnx.Rngs(4), width=16)
    appearance.trunk.attention.gamma[...] = jnp.asarray(0.5, jnp.float32)
    middle = appearance.blocks[1](appearance.blocks[0](appearance.trunk(semantic_map), style), style)
    image, image_aux = appearance(semantic_map, style, (24, 32))  # the exact 8x grid: no resize
    close(image, jax.nn.sigmoid(appearance.final(appearance.blocks[2](middle, style))))
    close(image_aux, jax.nn.sigmoid(appearance.aux_head(middle)))


def test_generic_decoders_shapes_ranges_and_the_style_code_reaches_the_image():
    keys = jax.random.split(jax.random.key(5), 2)
    semantic_map = jax.random.normal(keys[0], (2, 4, 5, 6), jnp.float32)
    residual = jax.random.normal(keys[1], (2, 3), jnp.float32)
    geometry = GeometryDecoder(6, nnx.Rngs(0), width=8)
    appearance = AppearanceDecoder(6, 3, nnx.Rngs(1), width=8)
    call = nnx.jit(lambda decoder, *inputs, size: decoder(*inputs, size), static_argnames="size")
    depth, depth_aux = call(geometry, semantic_map, size=(32, 40))  # an exact 1/8 grid: no resize
    assert depth.shape == (2, 32, 40, 1) and depth_aux.shape == (2, 16, 20, 1)
    assert float(depth.min()) < 0 < float(depth.max())  # raw, not squashed
    assert call(geometry, semantic_map, size=(30, 37))[0].shape == (2, 30, 37, 1)  # not exactly 1/8: resized
    image, image_aux = call(appearance, semantic_map, residual, size=(32, 40))
    assert image.shape == (2, 32, 40, 3) and image_aux.shape == (2, 16, 20, 3)
    for output in (image, image_aux):
        assert float(output.min()) >= 0 and float(output.max()) <= 1
    # The style code reaches the image (the model's test checks the Jacobian of the counterfactual image).
    assert not np.allclose(call(appearance, semantic_map, residual[::-1], size=(32, 40))[0], image)
    with pytest.raises(ValueError, match="multiple of 8"):
        GeometryDecoder(6, nnx.Rngs(0), width=12)


def test_deep_supervision_targets_follow_pytorch_downsampling():
    depth = jnp.arange(16.0, dtype=jnp.float32).reshape(1, 4, 4, 1)
    # Nearest at ×1/2 keeps the even rows and columns (PyTorch's floor(i·n_in/n_out)); bilinear averages 2×2 blocks.
    np.testing.assert_array_equal(losses.resize_nearest(depth, (2, 2))[0, ..., 0], [[0.0, 2.0], [8.0, 10.0]])
    assert float(losses.geometry_aux_loss(jnp.asarray([[0.0, 2.0], [8.0, 10.0]]).reshape(1, 2, 2, 1), depth)) == 0
    image = jnp.tile(depth, (1, 1, 1, 3)) / 16
    block_means = jnp.asarray([[2.5, 4.5], [10.5, 12.5]])[None, ..., None] / 16
    assert float(losses.appearance_aux_loss(jnp.tile(block_means, (1, 1, 1, 3)), image)) < 1e-7
