r"""The grounding decoders of the dual-stream model.

**Hard grounding** (Eq (13)): albedo from the residual code, normals from the semantic map, lighting from the
residual code (the paper) or pooled backbone features (the authors' code), composed by the SH shading model into a
rendered image. Shapes follow the authors' physics path, with widths configurable for tests:

* ``AlbedoHead``: ẑ_r ``[B, C_r]`` → dense → ``[B, s, s, w]`` → ``upsamples`` × (bilinear ×2 → 3×3 conv → BN → ReLU)
  → 3×3 conv → sigmoid: a square albedo map (128×128 in the authors' code), resized to the image by the model.
* ``NormalHead``: ẑ_s map → ``upsamples`` × (bilinear ×2 → 3×3 conv → BN → ReLU) → 3×3 conv → unit normals.
* ``LightHead``: the residual code or pooled backbone features → MLP (ReLU, ReLU, LayerNorm) → 27 SH coefficients
  (9 per colour).

**Soft grounding** (the paper's Eq (15); the generic-decoder terms of the authors' dense-task loss, Eq (14)):
generic decoders that reconstruct the geometry from the semantic map alone and the image from the semantic map
(content) and the residual code (style),

.. math:: \mathcal L_{\rm geo} = \|D_{\rm geo}(\hat z_s) - d\|_1, \qquad
          \mathcal L_{\rm app} = \|D_{\rm app}(\hat z_s, \hat z_r) - x\|_1,

built as the authors' ``ResNetDecoderWithDeepSupervision`` (``reference/official_implementation.md`` §2):

* a trunk on the 1/8 grid: 3×3 conv to ``width`` → InstanceNorm → ReLU → SAGAN self-attention (:class:`SelfAttention`);
* three ×2 upsampling residual blocks ``width → width/2 → width/4 → width/8``, which reach full resolution;
* deep supervision: an auxiliary 3×3 conv on the second block's output (1/2 resolution), and a final 3×3 conv.

``GeometryDecoder`` uses plain residual blocks and raw outputs; ``AppearanceDecoder`` modulates its blocks by
:class:`AdaIN` from the residual code and squashes both outputs with a sigmoid. The authors run these decoders in
every model, next to the physics path; :mod:`deep.model` selects them with ``grounding``.

Bilinear ×2 upsampling uses ``align_corners=False`` (:func:`deep.resize.resize_bilinear`), as PyTorch's default.
Normalisation statistics (InstanceNorm, AdaIN) are reduced in float32 whatever the compute dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from deep.backbone import batch_norm
from deep.layers import conv, dense
from deep.resize import resize_bilinear
from deep.shading import NUM_SH, lambertian_shading, render, unit_vectors


class _UpBlock(nnx.Module):
    def __init__(self, in_channels: int, out_channels: int, rngs: nnx.Rngs):
        self.conv = conv(in_channels, out_channels, (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                         rngs=rngs)
        self.bn = batch_norm(out_channels, rngs)

    def __call__(self, x):
        x = resize_bilinear(x, (2 * x.shape[1], 2 * x.shape[2]))
        return jax.nn.relu(self.bn(self.conv(x)))


class AlbedoHead(nnx.Module):
    """ẑ_r ``[B, C_r]`` → albedo ``[B, S, S, 3]`` in [0, 1], with ``S = seed_size · 2^(len(widths) - 1)``."""

    def __init__(self, residual_channels: int, rngs: nnx.Rngs, seed_size: int = 16,
                 widths: tuple[int, ...] = (128, 128, 64, 32)):
        self.seed_size, self.seed_width = seed_size, widths[0]
        self.dense = dense(residual_channels, seed_size * seed_size * widths[0], rngs=rngs)
        self.blocks = nnx.List([_UpBlock(a, b, rngs) for a, b in zip(widths[:-1], widths[1:])])
        self.out = conv(widths[-1], 3, (3, 3), padding=((1, 1), (1, 1)), rngs=rngs)

    def __call__(self, residual_code):
        x = jax.nn.relu(self.dense(residual_code))
        x = x.reshape(-1, self.seed_size, self.seed_size, self.seed_width)
        for block in self.blocks:
            x = block(x)
        return jax.nn.sigmoid(self.out(x))


class NormalHead(nnx.Module):
    """Semantic map ``[B, h, w, C_s]`` → unit normals ``[B, h·2^n, w·2^n, 3]`` (n = ``len(widths)``)."""

    def __init__(self, semantic_channels: int, rngs: nnx.Rngs, widths: tuple[int, ...] = (128, 128, 64, 32)):
        channels = (semantic_channels, *widths)
        self.blocks = nnx.List([_UpBlock(a, b, rngs) for a, b in zip(channels[:-1], channels[1:])])
        self.out = conv(widths[-1], 3, (3, 3), padding=((1, 1), (1, 1)), rngs=rngs)

    def __call__(self, semantic_map):
        x = semantic_map
        for block in self.blocks:
            x = block(x)
        normals = self.out(x)
        return unit_vectors(normals, 1e-6)


class LightHead(nnx.Module):
    """A vector per image ``[B, C]`` (the residual code, or pooled features) → SH lighting ``[B, 3, 9]``."""

    def __init__(self, in_channels: int, rngs: nnx.Rngs, hidden: int = 128):
        self.fc1 = dense(in_channels, hidden, rngs=rngs)
        self.fc2 = dense(hidden, hidden, rngs=rngs)
        self.norm = nnx.LayerNorm(hidden, epsilon=1e-5, rngs=rngs)
        self.fc3 = dense(hidden, 3 * NUM_SH, rngs=rngs)

    def __call__(self, pooled):
        x = self.norm(jax.nn.relu(self.fc2(jax.nn.relu(self.fc1(pooled)))))
        return self.fc3(x).reshape(-1, 3, NUM_SH)


class PhysicalDecoder(nnx.Module):
    """Hard grounding: ``(semantic_map, residual_code, light_input, image_size) → (rendered, parts)``.

    ``light_input`` ``[B, light_channels]`` is what the light head reads: the residual code again in the paper
    ("the residual stream predicts photometric factors such as albedo and illumination"), the spatial mean of the
    backbone's features in the authors' code. ``parts`` holds ``albedo``, ``normals``, ``shading`` (each at the
    image size) and ``lighting``.
    """

    def __init__(self, semantic_channels: int, residual_channels: int, light_channels: int, rngs: nnx.Rngs,
                 widths: tuple[int, ...] = (128, 128, 64, 32), albedo_seed: int = 16, light_hidden: int = 128):
        self.albedo = AlbedoHead(residual_channels, rngs, albedo_seed, widths)
        self.normals = NormalHead(semantic_channels, rngs, widths)
        self.light = LightHead(light_channels, rngs, light_hidden)

    def __call__(self, semantic_map, residual_code, light_input, image_size):
        albedo = resize_bilinear(self.albedo(residual_code), image_size)
        normals_full = self.normals(semantic_map)
        lighting = self.light(light_input)
        shading = resize_bilinear(lambertian_shading(normals_full, lighting), image_size)
        normals = resize_bilinear(normals_full, image_size)  # not renormalised, as the authors' code
        return render(albedo, shading), {"albedo": albedo, "normals": normals, "shading": shading,
                                         "lighting": lighting}


# ------------------------------------------------------------------------------------------------ soft grounding


def _upsample2(x: jax.Array) -> jax.Array:
    """Bilinear ×2, ``align_corners=False`` (PyTorch's ``scale_factor=2`` default)."""
    return resize_bilinear(x, (2 * x.shape[1], 2 * x.shape[2]))


def _conv3x3(in_channels: int, out_channels: int, rngs: nnx.Rngs, use_bias: bool = True) -> nnx.Conv:
    return conv(in_channels, out_channels, (3, 3), padding=((1, 1), (1, 1)), use_bias=use_bias, rngs=rngs)


def instance_norm(x: jax.Array, epsilon: float = 1e-5) -> jax.Array:
    r"""PyTorch's ``InstanceNorm2d`` with its defaults (no affine parameters, no running statistics):

    .. math:: \mathrm{IN}(x)_{bhwc} = \frac{x_{bhwc} - \mu_{bc}}{\sqrt{\sigma^2_{bc} + \epsilon}},

    with the mean and the *biased* variance over the spatial positions of each sample and channel.

    Args:
        x: ``[B, H, W, C]``.
        epsilon: added to the variance.

    Returns:
        ``[B, H, W, C]`` in ``x``'s dtype (the statistics are reduced in float32).
    """
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=(1, 2), keepdims=True)
    variance = jnp.mean(jnp.square(x32 - mean), axis=(1, 2), keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(variance + epsilon)).astype(x.dtype)


class AdaIN(nnx.Module):
    r"""Adaptive instance normalisation: the residual code sets each channel's scale and shift,

    .. math:: (\gamma, \beta) = W \hat z_r + b, \qquad
              \mathrm{AdaIN}(x, \hat z_r)_{bhwc} = (1 + \gamma_{bc})\,
              \frac{x_{bhwc} - \mu_{bc}}{s_{bc} + 10^{-8}} + \beta_{bc},

    with :math:`\mu_{bc}` the spatial mean and :math:`s_{bc}` the **unbiased** spatial standard deviation
    (denominator :math:`HW - 1`, ``torch.std``'s default) of each sample and channel, as the authors' block.

    Departure: where a channel is constant (:math:`s = 0`) the gradient through :math:`s` is taken as 0, where
    PyTorch's would be NaN (the derivative of the square root at 0 times a zero); the value is the same.

    Call:
        ``(x [B, H, W, C], style [B, C_r]) -> [B, H, W, C]`` in ``x``'s dtype (statistics in float32), with
        ``H·W >= 2``: the unbiased deviation needs two positions.
    """

    def __init__(self, style_channels: int, channels: int, rngs: nnx.Rngs):
        self.style = dense(style_channels, 2 * channels, rngs=rngs)

    def __call__(self, x: jax.Array, style: jax.Array) -> jax.Array:
        positions = x.shape[1] * x.shape[2]
        if positions < 2:
            raise ValueError(f"AdaIN needs at least 2 spatial positions for an unbiased deviation; got a "
                             f"{x.shape[1]}×{x.shape[2]} map")
        gamma, beta = jnp.split(self.style(style).astype(jnp.float32)[:, None, None, :], 2, axis=-1)
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=(1, 2), keepdims=True)
        variance = jnp.sum(jnp.square(x32 - mean), axis=(1, 2), keepdims=True) / (positions - 1)
        # The double `where` keeps the gradient finite at a constant channel (see the docstring).
        positive = variance > 0
        deviation = jnp.where(positive, jnp.sqrt(jnp.where(positive, variance, 1.0)), 0.0)
        normalised = (x32 - mean) / (deviation + 1e-8)
        return ((1.0 + gamma) * normalised + beta).astype(x.dtype)


class SelfAttention(nnx.Module):
    r"""SAGAN self-attention over all positions of a map (Zhang et al., 2019), as the authors' trunk:

    .. math:: A_{ij} = \mathrm{softmax}_j\big(q_i^\top k_j\big), \qquad
              y_i = \gamma \sum_j A_{ij}\, v_j + x_i,

    with :math:`q, k` 1×1 convolutions to ``key_channels`` (default :math:`C/8`: 64 for 512), :math:`v` a 1×1
    convolution to :math:`C`, the softmax over the keys :math:`j` (no :math:`1/\sqrt d` scaling, as SAGAN) and the
    learnable scalar :math:`\gamma` initialised to 0, so the block starts as the identity.

    Shapes: ``[B, H, W, C] -> [B, H, W, C]``; memory grows as :math:`(HW)^2` (1728² per image on NYUv2's 1/8 grid).
    """

    def __init__(self, channels: int, rngs: nnx.Rngs, key_channels: int | None = None):
        key_channels = key_channels or max(channels // 8, 1)
        self.query = conv(channels, key_channels, (1, 1), rngs=rngs)
        self.key = conv(channels, key_channels, (1, 1), rngs=rngs)
        self.value = conv(channels, channels, (1, 1), rngs=rngs)
        self.gamma = nnx.Param(jnp.zeros((), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        batch, height, width, _ = x.shape
        tokens = lambda conv: conv(x).reshape(batch, height * width, -1)
        query, key, value = tokens(self.query), tokens(self.key), tokens(self.value)
        # Logits accumulated and kept in float32 under bfloat16: unscaled (SAGAN), they can be large, and rounding
        # them to bfloat16 before the softmax would move the attention weights.
        logits = jnp.einsum("bic,bjc->bij", query, key,
                            preferred_element_type=jnp.promote_types(query.dtype, jnp.float32))
        attention = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
        attended = jnp.einsum("bij,bjc->bic", attention, value).reshape(x.shape)
        return self.gamma[...].astype(attended.dtype) * attended + x.astype(attended.dtype)


class _Trunk(nnx.Module):
    """3×3 conv to ``width`` (no bias: the normalisation removes it) → InstanceNorm → ReLU → self-attention."""

    def __init__(self, in_channels: int, width: int, rngs: nnx.Rngs):
        self.conv = _conv3x3(in_channels, width, rngs, use_bias=False)
        self.attention = SelfAttention(width, rngs)

    def __call__(self, x):
        return self.attention(jax.nn.relu(instance_norm(self.conv(x))))


class _ResidualUpBlock(nnx.Module):
    r""":math:`\mathrm{ReLU}\big(\mathrm{conv}_{1\times1}(\uparrow x) + \mathrm{IN}(\mathrm{conv}_{3\times3}(
    \mathrm{ReLU}(\mathrm{IN}(\mathrm{conv}_{3\times3}(\uparrow x)))))\big)`, with :math:`\uparrow` bilinear ×2.

    No convolution has a bias, as in the authors' ``ResidualBlock`` (``bias=False`` on all three; before an
    InstanceNorm the normalisation would remove one exactly anyway)."""

    def __init__(self, in_channels: int, out_channels: int, rngs: nnx.Rngs):
        self.shortcut = conv(in_channels, out_channels, (1, 1), use_bias=False, rngs=rngs)
        self.conv1 = _conv3x3(in_channels, out_channels, rngs, use_bias=False)
        self.conv2 = _conv3x3(out_channels, out_channels, rngs, use_bias=False)

    def __call__(self, x):
        up = _upsample2(x)
        main = instance_norm(self.conv2(jax.nn.relu(instance_norm(self.conv1(up)))))
        return jax.nn.relu(self.shortcut(up) + main)


class _AdaINUpBlock(nnx.Module):
    r""":math:`\mathrm{conv}_{1\times1}(\uparrow x) + \mathrm{conv}_{3\times3}(\mathrm{ReLU}(\mathrm{AdaIN}(
    \mathrm{conv}_{3\times3}(\uparrow\mathrm{ReLU}(\mathrm{AdaIN}(x, z_r))), z_r)))`, no final ReLU.

    No convolution has a bias, as in the authors' ``AdaINResidualBlock`` (``bias=False`` on all three; the second
    AdaIN's mean subtraction would remove the first one's exactly anyway)."""

    def __init__(self, in_channels: int, out_channels: int, style_channels: int, rngs: nnx.Rngs):
        self.adain1 = AdaIN(style_channels, in_channels, rngs)
        self.conv1 = _conv3x3(in_channels, out_channels, rngs, use_bias=False)
        self.adain2 = AdaIN(style_channels, out_channels, rngs)
        self.conv2 = _conv3x3(out_channels, out_channels, rngs, use_bias=False)
        self.shortcut = conv(in_channels, out_channels, (1, 1), use_bias=False, rngs=rngs)

    def __call__(self, x, style):
        main = self.conv1(_upsample2(jax.nn.relu(self.adain1(x, style))))
        main = self.conv2(jax.nn.relu(self.adain2(main, style)))
        return self.shortcut(_upsample2(x)) + main


def _decoder_widths(width: int) -> tuple[int, int, int, int]:
    if width < 8 or width % 8:
        raise ValueError(f"the generic decoders' width must be a positive multiple of 8; got {width}")
    return width, width // 2, width // 4, width // 8


class GeometryDecoder(nnx.Module):
    r"""Soft grounding's geometry decoder :math:`D_{\rm geo}(\hat z_s)` (the authors' ``decoder_geom``).

    Trunk on the semantic map, three plain residual ×2 blocks (``width → width/2 → width/4 → width/8``), an
    auxiliary 3×3 conv on the second block's output and a final 3×3 conv; both outputs are raw (no activation).
    From the 1/8 grid the blocks reach the image's resolution; when the grid is not exactly 1/8 of the image the
    main output is resized to ``image_size`` (bilinear, ``align_corners=False``), which the authors' code never needs.

    Call:
        ``(semantic_map [B, h, w, C_s], image_size (H, W)) -> (geometry [B, H, W, out], aux [B, 4h, 4w, out])``.
    """

    def __init__(self, semantic_channels: int, rngs: nnx.Rngs, width: int = 512, out_channels: int = 1):
        widths = _decoder_widths(width)
        self.trunk = _Trunk(semantic_channels, width, rngs)
        self.blocks = nnx.List([_ResidualUpBlock(a, b, rngs) for a, b in zip(widths[:-1], widths[1:])])
        self.aux_head = _conv3x3(widths[2], out_channels, rngs)
        self.final = _conv3x3(widths[3], out_channels, rngs)

    def __call__(self, semantic_map: jax.Array, image_size: tuple[int, int]) -> tuple[jax.Array, jax.Array]:
        x = self.blocks[1](self.blocks[0](self.trunk(semantic_map)))
        aux = self.aux_head(x)  # deep supervision at 1/2 resolution
        return resize_bilinear(self.final(self.blocks[2](x)), image_size), aux


class AppearanceDecoder(nnx.Module):
    r"""Soft grounding's appearance decoder :math:`D_{\rm app}(\hat z_s, \hat z_r)` (the authors' ``decoder_app``):
    content from the semantic map, style from the residual code through :class:`AdaIN`.

    Trunk on the semantic map, three AdaIN residual ×2 blocks (``width → width/2 → width/4 → width/8``), an
    auxiliary 3×3 conv on the second block's output and a final 3×3 conv, each followed by a sigmoid (the authors
    apply it in the model), so both images lie in [0, 1]. The main output is resized to ``image_size`` when the
    grid is not exactly 1/8 of the image (as :class:`GeometryDecoder`).

    Call:
        ``(semantic_map [B, h, w, C_s], residual_code [B, C_r], image_size) -> (image [B, H, W, out],
        aux [B, 4h, 4w, out])``.
    """

    def __init__(self, semantic_channels: int, residual_channels: int, rngs: nnx.Rngs, width: int = 512,
                 out_channels: int = 3):
        widths = _decoder_widths(width)
        self.trunk = _Trunk(semantic_channels, width, rngs)
        self.blocks = nnx.List([_AdaINUpBlock(a, b, residual_channels, rngs)
                                for a, b in zip(widths[:-1], widths[1:])])
        self.aux_head = _conv3x3(widths[2], out_channels, rngs)
        self.final = _conv3x3(widths[3], out_channels, rngs)

    def __call__(self, semantic_map: jax.Array, residual_code: jax.Array,
                 image_size: tuple[int, int]) -> tuple[jax.Array, jax.Array]:
        x = self.trunk(semantic_map)
        x = self.blocks[1](self.blocks[0](x, residual_code), residual_code)
        aux = jax.nn.sigmoid(self.aux_head(x))  # deep supervision at 1/2 resolution
        image = jax.nn.sigmoid(self.final(self.blocks[2](x, residual_code)))
        return resize_bilinear(image, image_size), aux
