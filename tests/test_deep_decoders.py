"""The grounding decoders. Hard: albedo from ẑ_r, normals from ẑ_s, lighting from features, rendered through the SH
model. Soft: the generic geometry decoder (ẑ_s → depth) and the AdaIN appearance decoder (ẑ_s, ẑ_r → image)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deep import losses
from deep.decoders import (AdaIN, AlbedoHead, AppearanceDecoder, GeometryDecoder, LightHead, NormalHead,
                           PhysicalDecoder, SelfAttention, instance_norm)
from deep.model import initialise_like_pytorch
from deep.resize import resize_bilinear
from deep.shading import lambertian_shading, render
from test_deep_functional import reference_resize_axis


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


def bilinear_reference(x, size):
    """PyTorch's ``F.interpolate(mode="bilinear", align_corners=False)`` of ``x [B, H, W, C]`` to ``size``, in
    float64 (test_deep_functional's per-axis rule, along the height then the width)."""
    x = np.asarray(x, np.float64)
    return reference_resize_axis(reference_resize_axis(x, 1, size[0], False), 2, size[1], False)


def test_physical_heads_compute_the_authors_layers():
    """What the wiring test cannot see, since it compares the decoder with itself: each ×2 block is bilinear
    (align_corners=False) → conv → BN → ReLU in that order; the albedo is sigmoid(conv(blocks(ReLU(dense(ẑ_r)))))
    on a ``seed·2^(len(widths)−1)`` square, resized to the image with align_corners=False; the normals stay unit even
    where the raw output is tiny (ε 1e-6, as the authors); the light head is Linear → ReLU → Linear → ReLU →
    LayerNorm(ε 1e-5, PyTorch's, not Flax's 1e-6) → Linear, recomputed here in float64 numpy; under a bright light
    the rendering is clip(A ⊙ S, 0, 1) (the decoder test's tiny light never makes A ⊙ S exceed 1)."""
    keys = jax.random.split(jax.random.key(7), 4)
    decoder = PhysicalDecoder(6, 3, 8, nnx.Rngs(0), widths=(4, 4, 4), albedo_seed=2, light_hidden=8)
    initialise_like_pytorch(decoder, jax.random.key(1))  # non-zero biases: no exactly-zero normals
    residual = jax.random.normal(keys[0], (2, 3), jnp.float32)
    close = lambda actual, expected: np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)

    # One ×2 block (train mode: BN's batch statistics, so a ReLU before the BN would show).
    block = decoder.albedo.blocks[0]
    x = jax.random.normal(keys[1], (2, 3, 5, 4), jnp.float32)
    up = jnp.asarray(bilinear_reference(x, (6, 10)), jnp.float32)
    close(block(x), jax.nn.relu(block.bn(block.conv(up))))

    # The albedo head: seed 2, two ×2 blocks -> an 8×8 map in (0, 1).
    head = decoder.albedo
    albedo = head(residual)
    assert albedo.shape == (2, 8, 8, 3)
    seed = jax.nn.relu(head.dense(residual)).reshape(2, 2, 2, 4)
    close(albedo, jax.nn.sigmoid(head.out(head.blocks[1](head.blocks[0](seed)))))
    # ... resized to the image as PyTorch's interpolate (8×8 -> 12×20: not an integer factor along the width).
    semantic_map = jax.random.normal(keys[2], (2, 1, 2, 6), jnp.float32)
    pooled = jax.random.normal(keys[3], (2, 8), jnp.float32)
    _, parts = decoder(semantic_map, residual, pooled, (12, 20))
    close(parts["albedo"], bilinear_reference(head(residual), (12, 20)))

    # Unit normals where the raw output is 1e-4 long: an ε above that would shorten them.
    decoder.normals.out.kernel[...] = 1e-4 * decoder.normals.out.kernel[...]
    decoder.normals.out.bias[...] = 1e-4 * decoder.normals.out.bias[...]
    np.testing.assert_allclose(jnp.linalg.norm(decoder.normals(semantic_map), axis=-1), 1.0, rtol=1e-5)

    # The light head, with fc2 scaled down so that LayerNorm's ε (1e-5 against a variance near 1e-6) shows.
    light = decoder.light
    light.fc2.kernel[...] = 1e-3 * light.fc2.kernel[...]
    light.fc2.bias[...] = 1e-3 * light.fc2.bias[...]
    p = lambda variable: np.asarray(variable[...], np.float64)
    h = np.maximum(np.asarray(pooled, np.float64) @ p(light.fc1.kernel) + p(light.fc1.bias), 0)
    h = np.maximum(h @ p(light.fc2.kernel) + p(light.fc2.bias), 0)
    h = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-5) * p(light.norm.scale) + p(
        light.norm.bias)
    expected = (h @ p(light.fc3.kernel) + p(light.fc3.bias)).reshape(2, 3, 9)
    np.testing.assert_allclose(light(pooled), expected, rtol=1e-4, atol=1e-5)

    # A bright light (a large constant SH term per colour): A ⊙ S exceeds 1 and the rendering clips it to [0, 1].
    light.fc3.bias[...] = light.fc3.bias[...].at[jnp.array([0, 9, 18])].add(20.0)
    rendered, parts = decoder(semantic_map, residual, pooled, (12, 20))
    product = np.asarray(parts["albedo"], np.float64) * np.asarray(parts["shading"], np.float64)
    assert product.max() > 1.5
    np.testing.assert_allclose(rendered, np.clip(product, 0.0, 1.0), rtol=1e-6, atol=1e-7)


def test_adain_normalises_a_small_deviation_and_refuses_a_single_position():
    """AdaIN divides by the unbiased deviation + 1e-8 (the authors'): a channel of deviation 1e-4 still comes out
    with deviation |1 + γ| (an ε of 1e-5, or the 1e-8 under the square root, would shrink it by 9 % / 29 %). A 1×1
    map has no unbiased deviation and is refused rather than turned into NaN."""
    adain = AdaIN(3, 5, nnx.Rngs(0))
    keys = jax.random.split(jax.random.key(8))
    x = 1e-4 * jax.random.normal(keys[0], (2, 3, 4, 5), jnp.float32)
    style = jax.random.normal(keys[1], (2, 3), jnp.float32)
    out = np.asarray(adain(x, style), np.float64)
    gamma, beta = np.split(np.asarray(adain.style(style), np.float64), 2, axis=-1)
    np.testing.assert_allclose(out.mean(axis=(1, 2)), beta, atol=1e-5)
    np.testing.assert_allclose(out.std(axis=(1, 2), ddof=1), np.abs(1 + gamma), rtol=1e-3)
    with pytest.raises(ValueError, match="at least 2 spatial positions"):
        adain(x[:, :1, :1], style)


def test_normalisation_and_attention_statistics_stay_float32_under_bfloat16():
    """The module docstring: InstanceNorm's and AdaIN's statistics are reduced in float32 whatever the compute dtype,
    and the attention logits are kept in float32. On bfloat16 maps of mean 100 (bfloat16's spacing there is 0.5),
    a mean rounded to bfloat16 would move the normalised values by up to 0.25; bfloat16 logits near 100 would move
    the attention weights by up to e^0.25. References: float64 numpy on the same bfloat16 values."""
    keys = jax.random.split(jax.random.key(9), 3)
    x = (100.0 + jax.random.normal(keys[0], (2, 4, 4, 3), jnp.float32)).astype(jnp.bfloat16)
    x64 = np.asarray(x, np.float64)
    centred = x64 - x64.mean(axis=(1, 2), keepdims=True)
    out = instance_norm(x)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float64),
                               centred / np.sqrt(np.mean(centred**2, axis=(1, 2), keepdims=True) + 1e-5), atol=0.03)

    adain = AdaIN(2, 3, nnx.Rngs(0))
    style = jax.random.normal(keys[1], (2, 2), jnp.float32)
    gamma, beta = np.split(np.asarray(adain.style(style), np.float64)[:, None, None], 2, axis=-1)
    normalised = centred / x64.std(axis=(1, 2), ddof=1, keepdims=True)
    np.testing.assert_allclose(np.asarray(adain(x, style), np.float64), (1 + gamma) * normalised + beta,
                               atol=0.03 * (1 + np.abs(gamma).max()))

    attention = SelfAttention(8, nnx.Rngs(1))
    for layer in (attention.query, attention.key, attention.value):
        layer.dtype = jnp.bfloat16  # what configure_layers sets for compute_dtype="bfloat16"
    # Logits near 100 (large biases) that vary by a few units over the keys (a small key kernel): a soft softmax
    # whose weights move if the logits are rounded to bfloat16 (spacing 0.5 there).
    attention.query.bias[...] = jnp.full_like(attention.query.bias[...], 10.0)
    attention.key.bias[...] = jnp.full_like(attention.key.bias[...], 10.0)
    attention.key.kernel[...] = 0.1 * attention.key.kernel[...]
    attention.gamma[...] = jnp.asarray(1.0, jnp.float32)
    tokens_in = jax.random.normal(keys[2], (1, 3, 4, 8), jnp.float32).astype(jnp.bfloat16)
    tokens = lambda conv: np.asarray(conv(tokens_in), np.float64).reshape(1, 12, -1)
    q, k, v = tokens(attention.query), tokens(attention.key), tokens(attention.value)
    logits = np.einsum("bic,bjc->bij", q, k)
    assert logits.min() > 50  # large enough for bfloat16 rounding to matter
    weights = np.exp(logits - logits.max(axis=-1, keepdims=True))
    weights /= weights.sum(axis=-1, keepdims=True)
    expected = np.asarray(tokens_in, np.float64) + np.einsum("bij,bjc->bic", weights, v).reshape(1, 3, 4, 8)
    # Measured: 0.007 from bfloat16's rounding of q, k, v, the weights and the sum; 0.11 with bfloat16 logits.
    np.testing.assert_allclose(np.asarray(attention(tokens_in), np.float64), expected, atol=0.03)


def test_generic_decoder_widths_halve_three_times_and_the_image_is_resized_after_its_sigmoid():
    """``width → width/2 → width/4 → width/8`` (the authors' 512 → 256 → 128 → 64), with deep supervision on the
    second block's width/4 output and the final conv on width/8 (layer shapes only: an abstract build). On a grid that
    is not 1/8 of the image, the appearance decoder's image is its exact-grid image (sigmoid included) resized
    bilinearly: the sigmoid comes before the resize, as documented."""
    for build in (lambda: GeometryDecoder(6, nnx.Rngs(0), width=16),
                  lambda: AppearanceDecoder(6, 3, nnx.Rngs(0), width=16)):
        decoder = nnx.eval_shape(build)
        assert decoder.trunk.conv.kernel.shape == (3, 3, 6, 16)
        assert [block.conv1.kernel.shape[2:] for block in decoder.blocks] == [(16, 8), (8, 4), (4, 2)]
        assert [block.shortcut.kernel.shape[2:] for block in decoder.blocks] == [(16, 8), (8, 4), (4, 2)]
        assert decoder.aux_head.kernel.shape[2] == 4 and decoder.final.kernel.shape[2] == 2

    keys = jax.random.split(jax.random.key(10))
    semantic_map = jax.random.normal(keys[0], (1, 2, 3, 6), jnp.float32)
    residual = jax.random.normal(keys[1], (1, 3), jnp.float32)
    appearance = AppearanceDecoder(6, 3, nnx.Rngs(1), width=8)
    call = nnx.jit(lambda decoder, size: decoder(semantic_map, residual, size)[0], static_argnames="size")
    exact = call(appearance, (16, 24))
    np.testing.assert_allclose(call(appearance, (13, 19)), bilinear_reference(exact, (13, 19)), rtol=1e-5,
                               atol=1e-6)


def test_the_heads_and_decoders_default_to_the_authors_sizes():
    """The documented defaults (reference/official_implementation.md §2), on abstract builds: a 128×128 albedo from a
    16×16 seed of 128 channels; four ×2 normal blocks 128, 128, 64, 32; a light MLP of 128 hidden units; generic
    decoders of width 512 whose attention keys have 64 channels."""
    albedo = jax.eval_shape(lambda: AlbedoHead(256, nnx.Rngs(0))(jnp.zeros((1, 256))))
    assert albedo.shape == (1, 128, 128, 3)
    normals = nnx.eval_shape(lambda: NormalHead(512, nnx.Rngs(0)))
    assert [block.conv.kernel.shape[3] for block in normals.blocks] == [128, 128, 64, 32]
    light = nnx.eval_shape(lambda: LightHead(1024, nnx.Rngs(0)))
    assert light.fc1.kernel.shape == (1024, 128) and light.fc3.kernel.shape == (128, 27)
    geometry = nnx.eval_shape(lambda: GeometryDecoder(512, nnx.Rngs(0)))
    assert geometry.trunk.conv.kernel.shape[3] == 512 and geometry.trunk.attention.query.kernel.shape[3] == 64
