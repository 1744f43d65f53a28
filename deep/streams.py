"""The two streams on top of the backbone: a semantic map ẑ_s and a global residual code ẑ_r.

Both projectors are 1×1 convolutions with bias and no normalisation, as in the authors' code. The residual map is
pooled at once to a vector: ẑ_r is a global style code (the authors broadcast it back to a map that carries no spatial
content). The semantic map keeps its resolution; its spatial mean is what the independence loss compares with ẑ_r.
Paper defaults: 512 semantic and 256 residual channels (NYUv2, Cityscapes).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class DualStream(nnx.Module):
    """``features [B, H, W, C] -> (semantic_map [B, H, W, C_s], residual_code [B, C_r])``."""

    def __init__(self, in_channels: int, rngs: nnx.Rngs, semantic_channels: int = 512, residual_channels: int = 256):
        if semantic_channels < 1 or residual_channels < 1:
            raise ValueError(f"semantic_channels and residual_channels must be >= 1; got {semantic_channels}, "
                             f"{residual_channels}")
        self.semantic = nnx.Conv(in_channels, semantic_channels, (1, 1), rngs=rngs)
        self.residual = nnx.Conv(in_channels, residual_channels, (1, 1), rngs=rngs)

    def __call__(self, features: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.semantic(features), jnp.mean(self.residual(features), axis=(1, 2))
