r"""What the streams read, and the two streams: a semantic map ẑ_s and a global residual code ẑ_r.

Both projectors are 1×1 convolutions with bias and no normalisation, as in the authors' code. The residual map is
pooled at once to a vector: ẑ_r is a global style code (the authors broadcast it back to a map that carries no spatial
content). The semantic map keeps its resolution; its spatial mean is what the independence loss compares with ẑ_r.
Paper defaults: 512 semantic and 256 residual channels (NYUv2, Cityscapes).

The projectors read either the backbone's last stage c4 (the paper) or the authors' multi-scale fusion
(:class:`MultiScaleFusion`):

.. math:: F = \big[\,A_1(\mathrm{resize}(c_1));\ A_2(c_2);\ A_3(c_3);\ A_4(c_4)\,\big],

each :math:`A_j` a 1×1 convolution with bias to ``channels`` (1024 in the authors' code), every stage brought
to c4's grid (1/8) by bilinear resizing with ``align_corners=False`` — for c1 an exact ×2 downsampling, which
equals 2×2 average pooling.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from deep.layers import conv
from deep.resize import resize_bilinear


class MultiScaleFusion(nnx.Module):
    """``(c1, c2, c3, c4) -> F [B, h, w, 4 × channels]`` on c4's grid ``(h, w)``; stages in that order along
    the channels, so the adapted c4 (what the authors' light head pools) is the last ``channels``."""

    def __init__(self, stage_channels: tuple[int, ...], rngs: nnx.Rngs, channels: int = 1024):
        if channels < 1:
            raise ValueError(f"fusion channels must be >= 1; got {channels}")
        self.channels = channels
        self.adapters = nnx.List([conv(c, channels, (1, 1), rngs=rngs) for c in stage_channels])

    def __call__(self, stages: tuple[jax.Array, ...]) -> jax.Array:
        grid = stages[-1].shape[1:3]
        # Resampling before the 1×1 convolution: the two linear maps commute (bilinear weights sum to one, so
        # the bias passes through unchanged), and the convolution then runs on the smaller grid.
        adapted = [adapt(resize_bilinear(stage, grid)) for adapt, stage in zip(self.adapters, stages)]
        return jnp.concatenate(adapted, axis=-1)

    def adapted_last_stage(self, fused: jax.Array) -> jax.Array:
        """The adapted c4 ``[B, h, w, channels]`` inside ``F``."""
        return fused[..., -self.channels:]


class DualStream(nnx.Module):
    """``features [B, H, W, C] -> (semantic_map [B, H, W, C_s], residual_code [B, C_r])``."""

    def __init__(self, in_channels: int, rngs: nnx.Rngs, semantic_channels: int = 512, residual_channels: int = 256):
        if semantic_channels < 1 or residual_channels < 1:
            raise ValueError(f"semantic_channels and residual_channels must be >= 1; got {semantic_channels}, "
                             f"{residual_channels}")
        self.semantic = conv(in_channels, semantic_channels, (1, 1), rngs=rngs)
        self.residual = conv(in_channels, residual_channels, (1, 1), rngs=rngs)

    def __call__(self, features: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.semantic(features), jnp.mean(self.residual(features), axis=(1, 2))
