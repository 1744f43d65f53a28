"""Bilinear resizing with PyTorch's two conventions, for layouts ``[batch, height, width, channels]``.

``jax.image.resize`` uses half-pixel centres and antialiases when it downsamples; PyTorch's ``F.interpolate`` never
antialiases and offers ``align_corners=True`` (corner pixels map to corner pixels), which DeepLab-style heads use.
Porting the authors' model needs both conventions exactly, so this module implements them directly: a separable
linear interpolation whose source coordinate is

* ``align_corners=False``: :math:`x_{src} = (x_{dst} + \\tfrac12)\\,\\frac{n_{in}}{n_{out}} - \\tfrac12`, clamped to
  :math:`[0, n_{in}-1]`;
* ``align_corners=True``: :math:`x_{src} = x_{dst}\\,\\frac{n_{in}-1}{n_{out}-1}` (0 when :math:`n_{out} = 1`).

No gathers: their gradient is a scatter-add, which on GPUs took a third of a CORE-MTL training step (the decoders
upsample full-resolution maps four times). Half-pixel resizes by an integer factor — the decoders' ×2, the
multi-scale fusion's and the losses' ×1/2 — are slices and weighted sums of neighbours; any other ratio (the heads'
``align_corners=True`` upsampling, the albedo's square map) is a product with the interpolation matrix along
each axis, in float32. Sizes are static, so the choice is made at trace time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def _source_coordinates(size_in: int, size_out: int, align_corners: bool) -> np.ndarray:
    positions = np.arange(size_out, dtype=np.float64)
    if align_corners:
        scale = (size_in - 1) / (size_out - 1) if size_out > 1 else 0.0
        return positions * scale
    return np.clip((positions + 0.5) * (size_in / size_out) - 0.5, 0.0, size_in - 1)


def _shift(x: jax.Array, axis: int, offset: int) -> jax.Array:
    """``x`` moved by ``offset`` along ``axis`` with its edge values repeated: element ``i`` of the result is
    ``x[clip(i + offset, 0, n - 1)]`` (``|offset| <= 1``)."""
    n = x.shape[axis]
    if offset == 0:
        return x
    edge = lax.slice_in_dim(x, 0, 1, axis=axis) if offset < 0 else lax.slice_in_dim(x, n - 1, n, axis=axis)
    body = lax.slice_in_dim(x, 0, n - 1, axis=axis) if offset < 0 else lax.slice_in_dim(x, 1, n, axis=axis)
    return jnp.concatenate([edge, body] if offset < 0 else [body, edge], axis=axis)


def _upsample_integer(x: jax.Array, axis: int, factor: int) -> jax.Array:
    r"""Half-pixel upsampling by an integer ``factor``: output ``k i + p`` reads input ``i + δ_p`` with
    :math:`\delta_p = (p + \tfrac12)/k - \tfrac12 \in (-\tfrac12, \tfrac12)`, i.e. two neighbours with fixed
    weights; the edge clamp is the repeated edge of :func:`_shift`. Slices, weighted sums and an interleave."""
    phases = []
    for p in range(factor):
        delta = (p + 0.5) / factor - 0.5
        if delta == 0:
            phases.append(x)
            continue
        neighbour = _shift(x, axis, -1 if delta < 0 else 1)
        phases.append(x * jnp.asarray(1 - abs(delta), x.dtype) + neighbour * jnp.asarray(abs(delta), x.dtype))
    out = jnp.stack(phases, axis=axis + 1)
    return out.reshape(*x.shape[:axis], factor * x.shape[axis], *x.shape[axis + 1:])


def _downsample_integer(x: jax.Array, axis: int, factor: int) -> jax.Array:
    """Half-pixel downsampling by an integer ``factor``: output ``d`` reads input ``k d + (k - 1)/2`` — one pixel for
    odd ``k``, the mean of the two middle pixels of each block of ``k`` for even ``k``."""
    blocks = x.reshape(*x.shape[:axis], x.shape[axis] // factor, factor, *x.shape[axis + 1:])
    middle = lax.slice_in_dim(blocks, (factor - 1) // 2, factor // 2 + 1, axis=axis + 1)
    if factor % 2:
        return jnp.squeeze(middle, axis + 1)
    return jnp.mean(middle, axis=axis + 1, dtype=jnp.promote_types(jnp.float32, x.dtype)).astype(x.dtype)


def _interpolation_matrix(size_in: int, size_out: int, align_corners: bool) -> np.ndarray:
    """``[size_out, size_in]``: each row holds the two weights of one output position."""
    source = _source_coordinates(size_in, size_out, align_corners)
    low = np.floor(source).astype(np.int64)
    high = np.minimum(low + 1, size_in - 1)
    fraction = source - low
    matrix = np.zeros((size_out, size_in))
    rows = np.arange(size_out)
    np.add.at(matrix, (rows, low), 1 - fraction)
    np.add.at(matrix, (rows, high), fraction)
    return matrix


def _interpolate_axis(x: jax.Array, axis: int, size_out: int, align_corners: bool) -> jax.Array:
    size_in = x.shape[axis]
    if size_in == size_out:
        return x
    if not align_corners and size_out % size_in == 0:
        return _upsample_integer(x, axis, size_out // size_in)
    if not align_corners and size_in % size_out == 0:
        return _downsample_integer(x, axis, size_in // size_out)
    # Any other ratio: a product with the (small, banded) interpolation matrix, in float32 (or wider) at full
    # precision.
    dtype = jnp.promote_types(jnp.float32, x.dtype)
    matrix = jnp.asarray(_interpolation_matrix(size_in, size_out, align_corners), dtype)
    out = jnp.tensordot(matrix, x.astype(dtype), axes=((1,), (axis,)), precision=lax.Precision.HIGHEST)
    return jnp.moveaxis(out, 0, axis).astype(x.dtype)


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
