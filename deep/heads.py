r"""Task heads: DeepLabV3's ASPP (rates 12/24/36, 256 channels, image pooling, dropout 0.5) in two heads.

``ASPP``, the atrous spatial pyramid pooling both heads share: five parallel branches — a 1×1 convolution,
three 3×3 convolutions at dilations ``rates``, and image pooling (global average → 1×1 convolution, broadcast
back) — each followed by BatchNorm and ReLU, concatenated, projected by a 1×1 convolution with BatchNorm, ReLU
and dropout 0.5. Broadcasting the pooled branch is what PyTorch's bilinear upsampling of a 1×1 map does.

``ASPPHead`` (the default, as LibMTL's NYUv2 example): the ASPP, then a 3×3 convolution, BatchNorm, ReLU and
the 1×1 classifier to ``out_channels``, at the feature map's resolution.

``DeepLabV3PlusHead`` (the authors' ``TaskHead``): the input is :math:`[\,P_F(F);\ P_s(\hat z_s)\,]` (two 1×1
convolutions to ``channels`` each), then the ASPP; the decoder adds a low-level skip from c1 (1×1 convolution
to ``skip_channels`` without bias → GroupNorm(``skip_groups``) → ReLU), onto which the ASPP output is
upsampled bilinearly with ``align_corners=True``; their concatenation goes through a 3×3 convolution without
bias → GroupNorm(``decoder_groups``) → ReLU → dropout 0.1 → the 1×1 classifier, at c1's resolution (1/4).
GroupNorm uses PyTorch's epsilon (1e-5).

Upsampling to the image is the model's job; so is unit-normalising surface normals.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from deep.backbone import batch_norm
from deep.layers import conv
from deep.resize import resize_bilinear


def _conv_bn(in_channels, out_channels, kernel, rngs, dilation=1):
    padding = dilation * (kernel - 1) // 2
    layer = conv(in_channels, out_channels, (kernel, kernel), kernel_dilation=(dilation, dilation),
                 padding=((padding, padding), (padding, padding)), use_bias=False, rngs=rngs)
    return layer, batch_norm(out_channels, rngs)


def _conv_bn_relu(pair: nnx.List, x: jax.Array) -> jax.Array:
    layer, norm = pair
    return jax.nn.relu(norm(layer(x)))


def _check_dropout(dropout: float, name: str = "dropout") -> None:
    if not 0 <= dropout < 1:
        raise ValueError(f"{name} must lie in [0, 1); got {dropout}")


class ASPP(nnx.Module):
    """Atrous spatial pyramid pooling: ``[B, H, W, in_channels]`` -> ``[B, H, W, channels]``."""

    def __init__(self, in_channels: int, rngs: nnx.Rngs, channels: int = 256,
                 rates: tuple[int, ...] = (12, 24, 36), dropout: float = 0.5):
        _check_dropout(dropout)
        self.branch_1x1 = nnx.List(_conv_bn(in_channels, channels, 1, rngs))
        self.branches_atrous = nnx.List([nnx.List(_conv_bn(in_channels, channels, 3, rngs, dilation=r))
                                         for r in rates])
        self.branch_pool = nnx.List(_conv_bn(in_channels, channels, 1, rngs))
        self.project = nnx.List(_conv_bn(channels * (len(rates) + 2), channels, 1, rngs))
        self.dropout = nnx.Dropout(dropout, rngs=rngs)

    def __call__(self, features: jax.Array) -> jax.Array:
        pooled = _conv_bn_relu(self.branch_pool, jnp.mean(features, axis=(1, 2), keepdims=True))
        branches = [_conv_bn_relu(self.branch_1x1, features)]
        branches += [_conv_bn_relu(branch, features) for branch in self.branches_atrous]
        branches.append(jnp.broadcast_to(pooled, branches[0].shape))
        return self.dropout(_conv_bn_relu(self.project, jnp.concatenate(branches, axis=-1)))


class ASPPHead(ASPP):
    """DeepLabV3 head: ``[B, H, W, in_channels]`` -> ``[B, H, W, out_channels]``.

    A subclass rather than a holder of an :class:`ASPP`, so that its parameters keep the paths they had before
    the ASPP was shared (``heads/<task>/branch_1x1/...``) and existing checkpoints still restore.
    """

    def __init__(self, in_channels: int, out_channels: int, rngs: nnx.Rngs, channels: int = 256,
                 rates: tuple[int, ...] = (12, 24, 36), dropout: float = 0.5):
        super().__init__(in_channels, rngs, channels, rates, dropout)
        self.refine = nnx.List(_conv_bn(channels, channels, 3, rngs))
        self.classifier = conv(channels, out_channels, (1, 1), rngs=rngs)

    def __call__(self, features: jax.Array) -> jax.Array:
        return self.classifier(_conv_bn_relu(self.refine, super().__call__(features)))


def group_norm(channels: int, groups: int, rngs: nnx.Rngs) -> nnx.GroupNorm:
    """PyTorch's ``nn.GroupNorm(groups, channels)``: epsilon 1e-5 (Flax's default is 1e-6)."""
    return nnx.GroupNorm(channels, num_groups=groups, epsilon=1e-5, rngs=rngs)


class DeepLabV3PlusHead(nnx.Module):
    """The authors' task head: ``(semantic_map [B, h, w, C_s], features [B, h, w, C_F],
    low_level [B, H_1, W_1, C_1]) -> [B, H_1, W_1, out_channels]``, at the resolution of ``low_level`` (c1,
    1/4 of the image)."""

    def __init__(self, semantic_channels: int, feature_channels: int, low_level_channels: int,
                 out_channels: int, rngs: nnx.Rngs, channels: int = 256,
                 rates: tuple[int, ...] = (12, 24, 36), skip_channels: int = 48, skip_groups: int = 4,
                 decoder_groups: int = 32, dropout: float = 0.5, decoder_dropout: float = 0.1):
        if skip_channels % skip_groups or channels % decoder_groups:
            raise ValueError(f"skip_channels ({skip_channels}) must divide by skip_groups ({skip_groups}) "
                             f"and channels ({channels}) by decoder_groups ({decoder_groups})")
        _check_dropout(decoder_dropout, "decoder_dropout")
        self.project_features = conv(feature_channels, channels, (1, 1), rngs=rngs)
        self.project_semantic = conv(semantic_channels, channels, (1, 1), rngs=rngs)
        self.aspp = ASPP(2 * channels, rngs, channels, rates, dropout)
        self.skip = conv(low_level_channels, skip_channels, (1, 1), use_bias=False, rngs=rngs)
        self.skip_norm = group_norm(skip_channels, skip_groups, rngs)
        self.fuse = conv(channels + skip_channels, channels, (3, 3), padding=((1, 1), (1, 1)),
                         use_bias=False, rngs=rngs)
        self.fuse_norm = group_norm(channels, decoder_groups, rngs)
        self.decoder_dropout = nnx.Dropout(decoder_dropout, rngs=rngs)
        self.classifier = conv(channels, out_channels, (1, 1), rngs=rngs)

    def __call__(self, semantic_map: jax.Array, features: jax.Array, low_level: jax.Array) -> jax.Array:
        x = jnp.concatenate([self.project_features(features), self.project_semantic(semantic_map)], axis=-1)
        x = self.aspp(x)
        skip = jax.nn.relu(self.skip_norm(self.skip(low_level)))
        # To c1's own grid rather than by a factor 2: for odd sizes the 1/8 grid is not half the 1/4 one.
        x = resize_bilinear(x, low_level.shape[1:3], align_corners=True)
        x = jax.nn.relu(self.fuse_norm(self.fuse(jnp.concatenate([x, skip], axis=-1))))
        return self.classifier(self.decoder_dropout(x))
