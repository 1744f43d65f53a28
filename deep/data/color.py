r"""Colour-space helpers shared by the augmentations and the corruptions, on RGB in [0, 1] ``[..., 3]``.

HSV as torchvision and scikit-image define it: :math:`V = \max(r, g, b)`, :math:`S = (V - \min)/V` (0 where
:math:`V = 0`), and the hue :math:`H \in [0, 1)` from the sector of the largest channel. The inverse uses the
closed form :math:`c_n = V - V S\, \mathrm{clip}(\min(k_n, 4 - k_n), 0, 1)` with
:math:`k_n = (n + 6H) \bmod 6` and :math:`n = 5, 3, 1` for r, g, b.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["GRAY_WEIGHTS", "grayscale", "rgb_to_hsv", "hsv_to_rgb", "blend"]

# ITU-R 601-2 luma, the weights of PIL's and torchvision's rgb_to_grayscale.
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)


def grayscale(image: jax.Array) -> jax.Array:
    """Luma ``[..., 1]`` of RGB ``[..., 3]``."""
    # Written as three products rather than a reduction over the channel axis, which XLA's CPU backend does not
    # fuse with its neighbours (about 15x slower there).
    red, green, blue = GRAY_WEIGHTS
    return red * image[..., 0:1] + green * image[..., 1:2] + blue * image[..., 2:3]


def rgb_to_hsv(image: jax.Array) -> jax.Array:
    """RGB ``[..., 3]`` in [0, 1] -> HSV ``[..., 3]``, each in [0, 1]."""
    red, green, blue = image[..., 0], image[..., 1], image[..., 2]
    value = jnp.max(image, axis=-1)
    chroma = value - jnp.min(image, axis=-1)
    saturation = jnp.where(value > 0, chroma / jnp.where(value > 0, value, 1), 0)
    safe_chroma = jnp.where(chroma > 0, chroma, 1)
    hue_sector = jnp.where(value == red, jnp.mod((green - blue) / safe_chroma, 6.0),
                           jnp.where(value == green, (blue - red) / safe_chroma + 2.0,
                                     (red - green) / safe_chroma + 4.0))
    hue = jnp.where(chroma > 0, hue_sector / 6.0, 0.0)
    return jnp.stack([hue, saturation, value], axis=-1).astype(image.dtype)


def hsv_to_rgb(hsv: jax.Array) -> jax.Array:
    """HSV ``[..., 3]`` -> RGB ``[..., 3]`` (the hue is taken modulo 1)."""
    hue, saturation, value = hsv[..., 0:1], hsv[..., 1:2], hsv[..., 2:3]
    n = jnp.asarray([5.0, 3.0, 1.0], hsv.dtype)
    k = jnp.mod(n + 6.0 * jnp.mod(hue, 1.0), 6.0)
    return value - value * saturation * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0)


def blend(image: jax.Array, other: jax.Array | float, ratio: jax.Array | float) -> jax.Array:
    """torchvision's ``_blend``: :math:`\\mathrm{clip}(r\\,x + (1 - r)\\,y, 0, 1)`."""
    return jnp.clip(ratio * image + (1.0 - ratio) * other, 0.0, 1.0)
