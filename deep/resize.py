"""Bilinear resizing with PyTorch's two conventions, for layouts ``[batch, height, width, channels]``.

``jax.image.resize`` uses half-pixel centres and antialiases when it downsamples; PyTorch's ``F.interpolate`` never
antialiases and offers ``align_corners=True`` (corner pixels map to corner pixels), which DeepLab-style heads use.
Porting the authors' model needs both conventions exactly, so this module implements them directly: a separable
linear interpolation whose source coordinate is

* ``align_corners=False``: :math:`x_{src} = (x_{dst} + \\tfrac12)\\,\\frac{n_{in}}{n_{out}} - \\tfrac12`, clamped to
  :math:`[0, n_{in}-1]`;
* ``align_corners=True``: :math:`x_{src} = x_{dst}\\,\\frac{n_{in}-1}{n_{out}-1}` (0 when :math:`n_{out} = 1`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _source_coordinates(size_in: int, size_out: int, align_corners: bool) -> jax.Array:
    positions = jnp.arange(size_out, dtype=jnp.float32)
    if align_corners:
        scale = (size_in - 1) / (size_out - 1) if size_out > 1 else 0.0
        return positions * scale
    return jnp.clip((positions + 0.5) * (size_in / size_out) - 0.5, 0.0, size_in - 1)


def _interpolate_axis(x: jax.Array, axis: int, size_out: int, align_corners: bool) -> jax.Array:
    size_in = x.shape[axis]
    if size_in == size_out:
        return x
    source = _source_coordinates(size_in, size_out, align_corners)
    low = jnp.floor(source).astype(jnp.int32)
    high = jnp.minimum(low + 1, size_in - 1)
    fraction = (source - low).astype(x.dtype)
    shape = [1] * x.ndim
    shape[axis] = size_out
    fraction = fraction.reshape(shape)
    return jnp.take(x, low, axis=axis) * (1 - fraction) + jnp.take(x, high, axis=axis) * fraction


def resize_bilinear(x: jax.Array, size: tuple[int, int], align_corners: bool = False) -> jax.Array:
    """Bilinear resize of ``x`` ``[B, H, W, C]`` to ``size = (height, width)``, without antialiasing.

    Raises:
        ValueError: for a non-4-D input or a non-positive size.
    """
    if x.ndim != 4:
        raise ValueError(f"x must have shape [batch, height, width, channels]; got shape {x.shape}")
    height, width = size
    if height < 1 or width < 1:
        raise ValueError(f"size must be two positive integers; got {size}")
    x = _interpolate_axis(x, 1, int(height), align_corners)
    return _interpolate_axis(x, 2, int(width), align_corners)
