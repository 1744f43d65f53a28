r"""Cityscapes-C style corruptions generated in code: the ImageNet-C definitions (Hendrycks & Dietterich, ICLR 2019).

Each corruption is a function of a batch ``[N, H, W, 3]`` in [0, 1], a severity 1..5 that selects a parameter from
the published table (:data:`SEVERITY_PARAMETERS`), and an explicit key for the random ones; the output is clipped to
[0, 1]. ``name`` and ``severity`` are Python values, so each pair compiles to its own function:
``jax.jit(corrupt, static_argnames=("name", "severity"))``.

============== ===================================================================== ===========================
name           definition (x clean, per image)                                        parameter by severity 1..5
============== ===================================================================== ===========================
gaussian_noise :math:`x + c\,\epsilon`, :math:`\epsilon \sim N(0, 1)`                 c = .08 .12 .18 .26 .38
shot_noise     :math:`\mathrm{Poisson}(c\,x) / c`                                     c = 60 25 12 5 3
impulse_noise  salt-and-pepper: a fraction c of the values set to 0 or 1 (half each) c = .03 .06 .09 .17 .27
speckle_noise  :math:`x + x\,c\,\epsilon`                                             c = .15 .2 .35 .45 .6
gaussian_blur  Gaussian filter of std c pixels (truncated at 4c, edge padding)       c = 1 2 3 4 6
defocus_blur   disk of radius r (aliased, then Gaussian-smoothed with std a),         (r, a) = (3, .1) (4, .5)
               reflect padding                                                        (6, .5) (8, .5) (10, .5)
pixelate       PIL box-downsample by c, box-upsample back                             c = .6 .5 .4 .3 .25
brightness     HSV value :math:`V \to \mathrm{clip}(V + c, 0, 1)`                     c = .1 .2 .3 .4 .5
contrast       :math:`(x - \bar x) c + \bar x`, :math:`\bar x` the per-channel mean   c = .4 .3 .2 .1 .05
fog            :math:`(x + c_1 P)\, m / (m + c_1)`, P a plasma fractal in [0, 1]      (c_1, d) = (1.5, 2) (2, 2)
               with roughness d, m = max x                                            (2.5, 1.7) (2.5, 1.5) (3, 1.4)
============== ===================================================================== ===========================

The paper reports four of them on Cityscapes-C (:data:`PAPER_CORRUPTIONS`: contrast, defocus blur, fog, Gaussian
noise; its Appendix J). Spatial parameters are in pixels of the image given, as ImageNet-C's are at 224x224 (a
scale close to LibMTL's 128x256 Cityscapes). Cityscapes-C proper was rendered at 2048x1024 and downsampled, which at
128x256 (PIL's bilinear filter, as in the authors' loader) narrows blur eightfold and divides the noise's standard
deviation by 12; to mimic that, corrupt the full-resolution image and resize. The corruptions that need external
tools or image files (motion blur, glass blur, snow, frost, JPEG, elastic) are not included.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from deep.data.resample import pil_weights
from scm.linear_gaussian import check_count

__all__ = ["CORRUPTIONS", "PAPER_CORRUPTIONS", "SEVERITY_PARAMETERS", "corrupt",
           "plasma_fractal", "defocus_kernel", "gaussian_kernel"]

SEVERITY_PARAMETERS = {
    "gaussian_noise": (0.08, 0.12, 0.18, 0.26, 0.38),
    "shot_noise": (60.0, 25.0, 12.0, 5.0, 3.0),
    "impulse_noise": (0.03, 0.06, 0.09, 0.17, 0.27),
    "speckle_noise": (0.15, 0.2, 0.35, 0.45, 0.6),
    "gaussian_blur": (1.0, 2.0, 3.0, 4.0, 6.0),
    "defocus_blur": ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)),
    "pixelate": (0.6, 0.5, 0.4, 0.3, 0.25),
    "brightness": (0.1, 0.2, 0.3, 0.4, 0.5),
    "contrast": (0.4, 0.3, 0.2, 0.1, 0.05),
    "fog": ((1.5, 2.0), (2.0, 2.0), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4)),
}
CORRUPTIONS = tuple(SEVERITY_PARAMETERS)
# The four the paper reports on Cityscapes-C (its Appendix J, Tables 13-15).
PAPER_CORRUPTIONS = ("contrast", "defocus_blur", "fog", "gaussian_noise")


# ------------------------------------------------------------------------------------------------------ kernels


def gaussian_kernel(sigma: float, truncate: float = 4.0) -> np.ndarray:
    """The normalised 1-D Gaussian of scipy.ndimage (radius ``int(truncate * sigma + 0.5)``), float32."""
    radius = int(truncate * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    weights = np.exp(-0.5 * (offsets / sigma) ** 2)
    return (weights / weights.sum()).astype(np.float32)


def defocus_kernel(radius: int, alias_blur: float) -> np.ndarray:
    """ImageNet-C's defocus kernel, ``[k, k]`` float32 summing to 1.

    The aliased disk :math:`x^2 + y^2 \\le r^2` on the grid :math:`-\\max(8, r)..\\max(8, r)`, normalised, then
    smoothed by a Gaussian of std ``alias_blur`` over 3x3 (5x5 when r > 8) taps with reflect-101 borders (OpenCV's
    ``GaussianBlur``), and renormalised so the blur preserves the mean.
    """
    extent = max(8, radius)
    offsets = np.arange(-extent, extent + 1, dtype=np.float64)
    disk = (offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius**2).astype(np.float64)
    disk /= disk.sum()
    half = 1 if radius <= 8 else 2
    taps = np.exp(-0.5 * (np.arange(-half, half + 1) / alias_blur) ** 2)
    taps /= taps.sum()
    padded = np.pad(disk, half, mode="reflect")
    smooth = sum(taps[i] * padded[i:i + disk.shape[0], half:half + disk.shape[1]] for i in range(2 * half + 1))
    padded = np.pad(smooth, ((0, 0), (half, half)), mode="reflect")
    smooth = sum(taps[i] * padded[:, i:i + disk.shape[1]] for i in range(2 * half + 1))
    return (smooth / smooth.sum()).astype(np.float32)


def _depthwise(images: jax.Array, kernel: np.ndarray, pad_mode: str) -> jax.Array:
    """Filters each channel of ``[N, H, W, C]`` with ``kernel [kh, kw]`` (odd sizes), the borders padded."""
    kh, kw = kernel.shape
    padded = jnp.pad(images, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)), mode=pad_mode)
    channels = images.shape[-1]
    weights = jnp.broadcast_to(jnp.asarray(kernel, images.dtype)[:, :, None, None], (kh, kw, 1, channels))
    return jax.lax.conv_general_dilated(padded, weights, (1, 1), "VALID",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=channels)


# ---------------------------------------------------------------------------------------------------- fractal


def plasma_fractal(key: jax.Array, mapsize: int, roughness: float) -> jax.Array:
    """A diamond-square plasma fractal on a torus, ``[mapsize, mapsize]`` float32 rescaled to [0, 1].

    Starting from a zero grid with spacing ``mapsize``, each level sets the centre of every square to the mean of
    its four corners and then the middle of every edge to the mean of its four diamond neighbours, each plus a
    displacement uniform in :math:`\\pm w_k^2`, with :math:`w_0 = 100` and :math:`w_{k+1} = w_k / d` (ImageNet-C's
    ``wibbledecay`` d = ``roughness``; larger is smoother); the spacing halves until it is 1.

    Args:
        key: the randomness of the displacements.
        mapsize: a power of two >= 2.
        roughness: the decay d > 0 of the displacement per level (a float or a traced scalar).
    """
    if mapsize < 2 or mapsize & (mapsize - 1):
        raise ValueError(f"mapsize must be a power of two >= 2; got {mapsize}")
    # All displacements come from one draw, sliced level by level: one random-bits kernel instead of three per
    # level, which keeps compilation short. Level k (spacing mapsize / 2^k) needs 3 blocks of 4^k values.
    levels = int(math.log2(mapsize))
    uniforms = jax.random.uniform(key, (sum(3 * 4**k for k in range(levels)),), jnp.float32, -1.0, 1.0)
    grid = jnp.zeros((mapsize, mapsize), jnp.float32)
    offset = 0
    for level in range(levels):
        step, half, count = mapsize >> level, mapsize >> (level + 1), 1 << level
        amplitude = 1e4 / jnp.asarray(roughness, jnp.float32) ** (2 * level)  # w_k^2 = (100 / d^k)^2

        def displaced(total, block, offset=offset, count=count, amplitude=amplitude):
            start = offset + block * count * count
            noise = uniforms[start:start + count * count].reshape(count, count)
            return total / 4 + amplitude * noise

        corners = grid[0::step, 0::step]
        # Squares: the centre (half + i step, half + j step) averages corners (i, j), (i+1, j), (i, j+1), (i+1, j+1).
        square_sum = corners + jnp.roll(corners, -1, axis=0)
        square_sum = square_sum + jnp.roll(square_sum, -1, axis=1)
        centres = displaced(square_sum, 0)
        grid = grid.at[half::step, half::step].set(centres)
        # Diamonds on the rows of corners, (i step, half + j step): corners left and right, centres above and below.
        row_sum = corners + jnp.roll(corners, -1, axis=1) + centres + jnp.roll(centres, 1, axis=0)
        grid = grid.at[0::step, half::step].set(displaced(row_sum, 1))
        # Diamonds on the columns of corners, (half + i step, j step): corners above and below, centres left, right.
        column_sum = corners + jnp.roll(corners, -1, axis=0) + centres + jnp.roll(centres, 1, axis=1)
        grid = grid.at[half::step, 0::step].set(displaced(column_sum, 2))
        offset += 3 * count * count
    grid = grid - grid.min()
    return grid / jnp.maximum(grid.max(), 1e-12)


# ------------------------------------------------------------------------------------------------ corruptions


def _gaussian_noise(images, key, c):
    return images + c * jax.random.normal(key, images.shape, jnp.float32)


def _shot_noise(images, key, c):
    counts = jax.random.poisson(key, images * c, images.shape, dtype=jnp.int32)
    return counts.astype(jnp.float32) / c


def _impulse_noise(images, key, c):
    # Each value is hit with probability c; a hit is salt or pepper with probability 1/2. The draws do not depend
    # on c, so a higher severity corrupts a superset of the values of a lower one (with the same key).
    hit_key, salt_key = jax.random.split(key)
    hit = jax.random.uniform(hit_key, images.shape, jnp.float32) < c
    salt = jax.random.uniform(salt_key, images.shape, jnp.float32) < 0.5
    return jnp.where(hit, salt.astype(jnp.float32), images)


def _speckle_noise(images, key, c):
    return images + images * c * jax.random.normal(key, images.shape, jnp.float32)


def _gaussian_blur(images, key, sigma):
    taps = gaussian_kernel(sigma)
    blurred = _depthwise(images, taps[:, None], "edge")
    return _depthwise(blurred, taps[None, :], "edge")


def _defocus_blur(images, key, parameters):
    radius, alias_blur = parameters
    return _depthwise(images, defocus_kernel(radius, alias_blur), "reflect")


def _pixelate(images, key, c):
    height, width = images.shape[1:3]
    small = (max(1, int(height * c)), max(1, int(width * c)))
    # PIL's box filter down, then up: the composition is one [H, H] and one [W, W] matrix.
    rows = pil_weights(small[0], height, "box") @ pil_weights(height, small[0], "box")
    columns = pil_weights(small[1], width, "box") @ pil_weights(width, small[1], "box")
    return jnp.einsum("ih,nhwc,jw->nijc", jnp.asarray(rows), images, jnp.asarray(columns))


def _brightness(images, key, c):
    # Every channel is V times a function of (H, S), so raising V rescales the pixel; black pixels (V = 0, S = 0)
    # become grey V'. This equals the HSV round trip of ImageNet-C without computing the hue.
    value = jnp.max(images, axis=-1, keepdims=True)
    new_value = jnp.clip(value + c, 0.0, 1.0)
    return jnp.where(value > 0, images * (new_value / jnp.where(value > 0, value, 1.0)), new_value)


def _contrast(images, key, c):
    means = jnp.mean(images, axis=(1, 2), keepdims=True)
    return (images - means) * c + means


def _fog(images, key, parameters):
    strength, roughness = parameters[0], parameters[1]
    height, width = images.shape[1:3]
    # The smallest power-of-two square that covers the image, cropped. ImageNet-C draws at 256 and crops: the
    # same for 224 x 224 and 128 x 256. Below 129 pixels this draws a smaller map, so a small image spans more of
    # the fractal's large-scale structure than a crop of a 256 map would; above 256, a larger map, where
    # ImageNet-C's would not cover the image.
    mapsize = 2 ** max(1, math.ceil(math.log2(max(height, width))))
    keys = jax.random.split(key, images.shape[0])
    fog = jax.vmap(lambda k: plasma_fractal(k, mapsize, roughness)[:height, :width])(keys)
    peak = jnp.max(images, axis=(1, 2, 3), keepdims=True)
    return (images + strength * fog[..., None]) * peak / (peak + strength)


# The corruptions whose severity only changes a number are compiled once per name, with the number as an argument;
# the others (kernel sizes depend on the severity) are traced per severity.
_FUNCTIONS = {"gaussian_noise": _gaussian_noise, "shot_noise": _shot_noise, "impulse_noise": _impulse_noise,
              "speckle_noise": _speckle_noise, "gaussian_blur": _gaussian_blur, "defocus_blur": _defocus_blur,
              "pixelate": _pixelate, "brightness": _brightness, "contrast": _contrast, "fog": _fog}
_KERNEL_CORRUPTIONS = ("gaussian_blur", "defocus_blur", "pixelate")
_NUMERIC = {name: jax.jit(function) for name, function in _FUNCTIONS.items() if name not in _KERNEL_CORRUPTIONS}


def corrupt(images: jax.Array, name: str, severity: int, key: jax.Array) -> jax.Array:
    """Applies corruption ``name`` at ``severity`` to a batch.

    Args:
        images: ``[N, H, W, 3]`` RGB in [0, 1].
        name: one of :data:`CORRUPTIONS`.
        severity: 1..5.
        key: the randomness (noise, the fog's fractal; one fractal per image); unused by the deterministic ones.

    Returns:
        ``[N, H, W, 3]`` float32 in [0, 1].

    Raises:
        ValueError: for an unknown name, a severity outside 1..5 or images not of shape ``[N, H, W, 3]``.
    """
    if name not in _FUNCTIONS:
        raise ValueError(f"corruption must be one of {', '.join(CORRUPTIONS)}; got {name!r}")
    severity = check_count("severity", severity, 1, 5)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must have shape [N, H, W, 3]; got {images.shape}")
    images = jnp.asarray(images, jnp.float32)
    parameter = SEVERITY_PARAMETERS[name][int(severity) - 1]
    if name in _KERNEL_CORRUPTIONS:
        corrupted = _FUNCTIONS[name](images, key, parameter)
    else:
        corrupted = _NUMERIC[name](images, key, jnp.asarray(parameter, jnp.float32))
    return jnp.clip(corrupted, 0.0, 1.0).astype(jnp.float32)
