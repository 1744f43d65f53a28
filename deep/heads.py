"""Task heads: DeepLabV3's ASPP (rates 12/24/36, 256 channels, image pooling, dropout 0.5), as LibMTL's NYUv2 example.

``ASPPHead``: five parallel branches — a 1×1 convolution, three 3×3 convolutions at dilations ``rates``, and image
pooling (global average → 1×1 convolution, broadcast back) — each followed by BatchNorm and ReLU, concatenated,
projected by a 1×1 convolution with BatchNorm, ReLU and dropout, then a 3×3 convolution, BatchNorm, ReLU and the
1×1 classifier to ``out_channels``, at the feature map's resolution (upsampling to the image is the model's job).
Broadcasting the pooled branch is what PyTorch's bilinear upsampling of a 1×1 map does. Surface-normal heads are
unit-normalised by the model, not here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def _conv_bn(in_channels, out_channels, kernel, rngs, dilation=1):
    padding = dilation * (kernel - 1) // 2
    conv = nnx.Conv(in_channels, out_channels, (kernel, kernel), kernel_dilation=(dilation, dilation),
                    padding=((padding, padding), (padding, padding)), use_bias=False, rngs=rngs)
    return conv, nnx.BatchNorm(out_channels, momentum=0.9, epsilon=1e-5, rngs=rngs)


class ASPPHead(nnx.Module):
    """DeepLabV3 head: ``[B, H, W, in_channels]`` -> ``[B, H, W, out_channels]``."""

    def __init__(self, in_channels: int, out_channels: int, rngs: nnx.Rngs, channels: int = 256,
                 rates: tuple[int, ...] = (12, 24, 36), dropout: float = 0.5):
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must lie in [0, 1); got {dropout}")
        self.branch_1x1 = nnx.List(_conv_bn(in_channels, channels, 1, rngs))
        self.branches_atrous = nnx.List([nnx.List(_conv_bn(in_channels, channels, 3, rngs, dilation=r))
                                         for r in rates])
        self.branch_pool = nnx.List(_conv_bn(in_channels, channels, 1, rngs))
        self.project = nnx.List(_conv_bn(channels * (len(rates) + 2), channels, 1, rngs))
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.refine = nnx.List(_conv_bn(channels, channels, 3, rngs))
        self.classifier = nnx.Conv(channels, out_channels, (1, 1), rngs=rngs)

    def __call__(self, features: jax.Array) -> jax.Array:
        apply = lambda pair, x: jax.nn.relu(pair[1](pair[0](x)))
        pooled = apply(self.branch_pool, jnp.mean(features, axis=(1, 2), keepdims=True))
        branches = [apply(self.branch_1x1, features)] + [apply(b, features) for b in self.branches_atrous]
        branches.append(jnp.broadcast_to(pooled, branches[0].shape))
        x = self.dropout(apply(self.project, jnp.concatenate(branches, axis=-1)))
        return self.classifier(apply(self.refine, x))
