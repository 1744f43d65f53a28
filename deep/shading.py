r"""The physical shading model of hard grounding (Eq (13), ``reference/theory.md`` §7).

Lambertian shading with second-order real spherical harmonics and RGB lighting :math:`L \in \mathbb R^{3\times 9}`:

.. math:: S_c(p) = \max\Big(0, \sum_{k=1}^{9} L_{c,k}\, Y_k(\mathbf n_p)\Big), \qquad
          \hat I_{\rm phys} = \mathrm{clip}(A \odot S, 0, 1),

with the orthonormal real SH basis in the authors' order
:math:`Y = (0.282095,\ 0.488603\,(n_y, n_z, n_x),\ 1.092548\,n_xn_y,\ 1.092548\,n_yn_z,\ 0.315392(3n_z^2-1),\
1.092548\,n_xn_z,\ 0.546274(n_x^2-n_y^2))`. The clamped-cosine factors are absorbed into the learned ``L``.
Albedo :math:`A` comes from the residual stream, normals from the semantic stream, and lighting by default from the
residual code (the authors' variant reads backbone features; :mod:`deep.decoders`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

# 1/(2 sqrt(pi)), sqrt(3/(4 pi)), sqrt(15/pi)/2, sqrt(5/pi)/4, sqrt(15/pi)/4: the orthonormal constants.
SH_C0 = 0.5 / math.sqrt(math.pi)
SH_C1 = math.sqrt(3.0 / (4.0 * math.pi))
SH_C2 = 0.5 * math.sqrt(15.0 / math.pi)
SH_C3 = 0.25 * math.sqrt(5.0 / math.pi)
SH_C4 = 0.25 * math.sqrt(15.0 / math.pi)
NUM_SH = 9


def sh_basis(normals: jax.Array) -> jax.Array:
    """The nine real SH basis functions at unit normals ``[..., 3]`` (x, y, z) -> ``[..., 9]``."""
    x, y, z = normals[..., 0], normals[..., 1], normals[..., 2]
    return jnp.stack([
        jnp.full_like(x, SH_C0),
        SH_C1 * y, SH_C1 * z, SH_C1 * x,
        SH_C2 * x * y, SH_C2 * y * z,
        SH_C3 * (3.0 * z * z - 1.0),
        SH_C2 * x * z,
        SH_C4 * (x * x - y * y),
    ], axis=-1)


def lambertian_shading(normals: jax.Array, lighting: jax.Array) -> jax.Array:
    """Per-pixel RGB shading :math:`\\max(0, L\\,Y(\\mathbf n))`.

    Args:
        normals: ``[B, H, W, 3]`` unit normals.
        lighting: ``[B, 3, 9]`` SH coefficients per colour channel (or ``[B, 27]``, reshaped).

    Returns:
        ``[B, H, W, 3]`` non-negative shading.
    """
    lighting = lighting.reshape(lighting.shape[0], 3, NUM_SH)
    return jax.nn.relu(jnp.einsum("bhwk,bck->bhwc", sh_basis(normals), lighting))


def render(albedo: jax.Array, shading: jax.Array) -> jax.Array:
    """:math:`\\hat I = \\mathrm{clip}(A \\odot S, 0, 1)`, ``[B, H, W, 3]``."""
    return jnp.clip(albedo * shading, 0.0, 1.0)


def srgb_to_linear(image: jax.Array) -> jax.Array:
    """The standard sRGB decoding curve, applied to values clamped to [0, 1]."""
    image = jnp.clip(image, 0.0, 1.0)
    return jnp.where(image <= 0.04045, image / 12.92, ((image + 0.055) / 1.055) ** 2.4)


def unit_vectors(x: jax.Array, epsilon: float) -> jax.Array:
    """``x / max(‖x‖, ε)`` along the last axis, with a finite gradient at ``x = 0`` (``jnp.linalg.norm``'s is NaN)."""
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), epsilon**2))
