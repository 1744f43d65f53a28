r"""The training augmentations of the authors' NYUv2 pipeline, as one jittable function of a batch and a key.

In the authors' order (``reference/official_implementation.md``, "NYUv2"), independently per example:

1. **Random scale-crop** (LibMTL's ``RandomScaleCrop``): pick :math:`s` uniformly from ``scales``, crop
   :math:`h \times w = \lfloor H/s \rfloor \times \lfloor W/s \rfloor` at a uniform position :math:`(i, j)`,
   :math:`0 \le i \le H - h`, and resize back to :math:`H \times W`: image and normals bilinear with
   ``align_corners=True``, labels and depth nearest (PyTorch's legacy rule); depth is divided by :math:`s` (the
   scene looks :math:`s` times closer; a disparity, ``depth_is_disparity``, is multiplied by :math:`s`) and normals
   are *not* renormalised, as in LibMTL.
2. **Horizontal flip** with probability 1/2; the normals' x component changes sign.
3. **Colour jitter** of the RGB image only (torchvision's ``ColorJitter``): brightness, contrast, saturation and
   hue factors drawn uniformly from :math:`[\max(0, 1-b), 1+b]` (hue from :math:`[-h, h]`), applied in a random
   order, each clipped to [0, 1].

Crop and resize are a single sampling of the original at computed coordinates, so every shape is static under
``jit`` whatever the scale drawn: output row :math:`y` of the crop reads the source row

.. math:: r_{\rm bilinear}(y) = i + y\,\frac{h - 1}{H - 1}, \qquad
          r_{\rm nearest}(y) = i + \min\big(\lfloor y\, h / H \rfloor, h - 1\big),

and columns likewise. This is exactly crop-then-``F.interpolate``; at :math:`s = 1` it is the identity. The flip
rides on the same coordinates (output column x reads the crop's column for W - 1 - x), so it costs nothing there.
Against PyTorch on 288x384 (LibMTL's crop for every scale, corner and flip; torchvision's ``adjust_*`` in random
orders) the differences were at most 7e-5 for the bilinear fields, 0 for labels and depth, 2e-6 for the jitter.

The randomness of a batch is one draw of ``[B, 12]`` uniforms from ``key`` (three for the crop, one for the flip,
eight for the jitter), a row per example; one random-bits kernel keeps compilation short.

A batch is a dict with ``images [B, H, W, 3]`` and any of ``segmentation [B, H, W]`` (int), ``depth [B, H, W, 1]``
and ``normal [B, H, W, 3]`` (Cityscapes and GTA5 have no normals). Dtypes and shapes are preserved.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from deep.data.color import blend, grayscale

__all__ = ["AugmentConfig", "augment", "random_scale_crop", "hflip", "color_jitter", "BATCH_KEYS"]

BATCH_KEYS = ("images", "segmentation", "depth", "normal")
_CROP_DRAWS = 3     # scale, row offset, column offset
_JITTER_DRAWS = 8   # four factors, four sort keys for the order


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """What :func:`augment` does (defaults: the authors' NYUv2 training augmentations).

    Attributes:
        scales: the crop scales s >= 1 to draw from; ``(1.0,)`` turns the scale-crop off.
        flip: a horizontal flip with probability 1/2.
        color_jitter: ``(brightness, contrast, saturation, hue)`` strengths, each >= 0, hue <= 0.5; all 0 turns
            the jitter off. GTA5 training (flip only) is ``AugmentConfig(scales=(1.0,), color_jitter=(0, 0, 0, 0))``.
        depth_is_disparity: the batch's ``depth`` is an inverse depth (Cityscapes' disparity), which a zoom by
            :math:`s` multiplies by :math:`s` rather than divides.
    """

    scales: tuple[float, ...] = (1.0, 1.2, 1.5)
    flip: bool = True
    color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    depth_is_disparity: bool = False

    def __post_init__(self):
        try:
            scales = tuple(float(s) for s in self.scales)
            jitter = tuple(float(j) for j in self.color_jitter)
        except (TypeError, ValueError):
            raise ValueError(f"scales and color_jitter must be sequences of numbers; got {self.scales!r} and "
                             f"{self.color_jitter!r}") from None
        if not scales or not all(math.isfinite(s) and s >= 1.0 for s in scales):
            raise ValueError(f"scales must be one or more numbers >= 1 (crop H/s x W/s); got {self.scales!r}")
        if len(jitter) != 4 or not all(math.isfinite(j) and j >= 0 for j in jitter):
            raise ValueError(f"color_jitter must be 4 numbers >= 0 (brightness, contrast, saturation, hue); got "
                             f"{self.color_jitter!r}")
        if jitter[3] > 0.5:
            raise ValueError(f"color_jitter's hue must be in [0, 0.5]; got {jitter[3]}")
        for name in ("flip", "depth_is_disparity"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False; got {getattr(self, name)!r}")
        object.__setattr__(self, "scales", scales)
        object.__setattr__(self, "color_jitter", jitter)


# ----------------------------------------------------------------------------------------------- scale-crop


def _bilinear_rows(x: jax.Array, source: jax.Array) -> jax.Array:
    """Linear interpolation of ``x [n, ...]`` along axis 0 at fractional positions ``source [m]`` -> ``[m, ...]``."""
    low = jnp.clip(jnp.floor(source).astype(jnp.int32), 0, x.shape[0] - 1)
    high = jnp.minimum(low + 1, x.shape[0] - 1)
    fraction = (source - low.astype(source.dtype)).astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
    return jnp.take(x, low, axis=0) * (1 - fraction) + jnp.take(x, high, axis=0) * fraction


def _bilinear(x: jax.Array, rows: jax.Array, columns: jax.Array) -> jax.Array:
    """Samples ``x [H, W, C]`` at ``rows [H']`` x ``columns [W']`` (separable bilinear)."""
    x = _bilinear_rows(x, rows)
    return jnp.swapaxes(_bilinear_rows(jnp.swapaxes(x, 0, 1), columns), 0, 1)


def _uniform_index(u: jax.Array, count) -> jax.Array:
    """``floor(u * count)`` for u uniform in [0, 1): a uniform integer in 0..count-1."""
    return jnp.minimum(jnp.floor(u * count).astype(jnp.int32), jnp.asarray(count, jnp.int32) - 1)


def _scale_crop(example: dict[str, jax.Array], scales: tuple[float, ...], uniforms: jax.Array,
                flip: jax.Array | bool = False, depth_is_disparity: bool = False) -> dict[str, jax.Array]:
    """The scale-crop driven by three uniforms in [0, 1): scale, row offset, column offset; then, where ``flip``,
    the horizontal flip, folded into the sampling: output column x reads the crop's column for W - 1 - x."""
    height, width = example["images"].shape[:2]
    # Crop sizes in Python (float64) exactly as LibMTL's int(H / s): in float32, 288 / 1.2 would floor to 239.
    crop_heights = jnp.asarray([int(height / s) for s in scales], jnp.int32)
    crop_widths = jnp.asarray([int(width / s) for s in scales], jnp.int32)
    choice = _uniform_index(uniforms[0], len(scales))
    scale = jnp.asarray(scales, jnp.float32)[choice]
    crop_height, crop_width = crop_heights[choice], crop_widths[choice]
    top = _uniform_index(uniforms[1], height - crop_height + 1)
    left = _uniform_index(uniforms[2], width - crop_width + 1)

    def linear_source(start, crop, positions, size):
        # align_corners=True: output 0 and size-1 land on the crop's first and last pixels.
        ratio = (crop - 1).astype(jnp.float32) / max(size - 1, 1)
        return start.astype(jnp.float32) + positions * ratio

    def nearest_source(start, crop, positions, size):
        # PyTorch's legacy "nearest": floor(dst * in / out) in float32, clamped to the crop.
        ratio = crop.astype(jnp.float32) / size
        return start + jnp.minimum(jnp.floor(positions * ratio).astype(jnp.int32), crop - 1)

    row_positions = jnp.arange(height, dtype=jnp.float32)
    column_positions = jnp.arange(width, dtype=jnp.float32)
    column_positions = jnp.where(flip, (width - 1) - column_positions, column_positions)
    rows = linear_source(top, crop_height, row_positions, height)
    columns = linear_source(left, crop_width, column_positions, width)
    near_rows = nearest_source(top, crop_height, row_positions, height)
    near_columns = nearest_source(left, crop_width, column_positions, width)
    out = dict(example)
    out["images"] = _bilinear(example["images"], rows, columns)
    if "normal" in example:
        normal = _bilinear(example["normal"], rows, columns)
        out["normal"] = normal * jnp.where(flip, jnp.asarray([-1, 1, 1], normal.dtype), 1)
    if "segmentation" in example:
        out["segmentation"] = jnp.take(jnp.take(example["segmentation"], near_rows, axis=0), near_columns, axis=1)
    if "depth" in example:
        depth = jnp.take(jnp.take(example["depth"], near_rows, axis=0), near_columns, axis=1)
        out["depth"] = (depth * scale if depth_is_disparity else depth / scale).astype(example["depth"].dtype)
    return out


def random_scale_crop(key: jax.Array, example: dict[str, jax.Array], scales: tuple[float, ...],
                      depth_is_disparity: bool = False) -> dict[str, jax.Array]:
    """LibMTL's ``RandomScaleCrop`` on one example (no batch axis), as one static-shaped sampling.

    Args:
        key: the randomness (scale and position).
        example: ``images [H, W, 3]`` and any of ``segmentation [H, W]``, ``depth [H, W, 1]``, ``normal [H, W, 3]``.
        scales: the scales to draw from (each >= 1).

    Returns:
        The example, same shapes and dtypes: crop of ``floor(H/s) x floor(W/s)`` resized back; depth divided by s
        (a disparity, with ``depth_is_disparity``, multiplied by s).
    """
    return _scale_crop(example, tuple(scales), jax.random.uniform(key, (_CROP_DRAWS,), jnp.float32),
                       depth_is_disparity=depth_is_disparity)


# ----------------------------------------------------------------------------------------------------- flip


def hflip(example: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Mirrors one example left-right (axis 1 of ``[H, W, ...]``); the normals' x component changes sign."""
    out = {name: jnp.flip(value, axis=1) for name, value in example.items()}
    if "normal" in out:
        out["normal"] = out["normal"] * jnp.asarray([-1, 1, 1], out["normal"].dtype)
    return out


# ------------------------------------------------------------------------------------------------ colour


def _jitter(image: jax.Array, strengths: tuple[float, float, float, float], uniforms: jax.Array) -> jax.Array:
    """The colour jitter driven by 8 uniforms in [0, 1): four factors, then four sort keys for the order.

    Brightness, contrast and saturation are all blends :math:`\\mathrm{clip}(f x + (1 - f) T(x), 0, 1)` with the
    target T = 0, the mean grey level, or the grey level, and a factor f = 1 is the identity on [0, 1]. So the
    random order is run as: the blends ranked before the hue rotation, the hue rotation, the blends ranked after
    it, each blend slot a single generic blend whose target and factor are selected per example. Under vmap this
    evaluates six cheap blends and one hue rotation per image, where a switch over the four adjustments at each
    of four positions would evaluate all sixteen.
    """
    brightness, contrast, saturation, hue = strengths
    dtype = image.dtype

    def factor(u, strength):
        low = max(0.0, 1.0 - strength)
        return low + (1.0 + strength - low) * u

    # Factor per blend (brightness, contrast, saturation); a disabled one is exactly 1.
    factors = jnp.stack([factor(uniforms[0], brightness), factor(uniforms[1], contrast),
                         factor(uniforms[2], saturation)])
    hue_shift = hue * (2.0 * uniforms[3] - 1.0)
    # torchvision applies the four in a uniformly random order (randperm); ranking four uniforms is one.
    rank = jnp.argsort(jnp.argsort(uniforms[4:8]))     # position of adjustment k (0-2 blends, 3 hue)
    blend_order = jnp.argsort(rank[:3])                 # the blends in the order they run

    def blend_slot(x, adjustment, active):
        gray = grayscale(x)
        target = jnp.where(adjustment == 0, 0.0, jnp.where(adjustment == 1, jnp.mean(gray), gray))
        return blend(x, target, jnp.where(active, factors[adjustment], 1.0))

    def blends(x, before_hue: bool | None):
        for slot in range(3):
            adjustment = blend_order[slot]
            if before_hue is None:
                active = True
            elif before_hue:
                active = rank[adjustment] < rank[3]
            else:
                active = rank[adjustment] > rank[3]
            x = blend_slot(x, adjustment, active)
        return x

    if not any(strengths[:3]):
        image = _rotate_hue(image, hue_shift)
    elif not hue:
        image = blends(image, None)
    else:
        image = blends(_rotate_hue(blends(image, True), hue_shift), False)
    return image.astype(dtype)


def _rotate_hue(image: jax.Array, shift: jax.Array) -> jax.Array:
    """torchvision's ``adjust_hue``: the HSV hue plus ``shift`` (|shift| <= 1/2), modulo 1; ``[..., 3]``.

    The same map as ``hsv_to_rgb`` after ``rgb_to_hsv`` with the hue shifted, written in sixths of a turn and with
    the chroma :math:`C = VS`, so that it needs no division by V and no modulo: each channel is
    :math:`V - C\\,\\mathrm{clip}(\\min(k_n, 4 - k_n), 0, 1)`, :math:`k_n = (n + 6H) \\bmod 6`.
    """
    red, green, blue = image[..., 0], image[..., 1], image[..., 2]
    value = jnp.maximum(jnp.maximum(red, green), blue)
    chroma = value - jnp.minimum(jnp.minimum(red, green), blue)
    safe_chroma = jnp.where(chroma > 0, chroma, 1.0)
    sixths = jnp.where(value == red, (green - blue) / safe_chroma,
                       jnp.where(value == green, (blue - red) / safe_chroma + 2.0, (red - green) / safe_chroma + 4.0))
    sixths = sixths + 6.0 * shift                                          # in (-4, 8)
    sixths = jnp.where(sixths < 0, sixths + 6.0, jnp.where(sixths >= 6.0, sixths - 6.0, sixths))
    k = sixths[..., None] + jnp.asarray([5.0, 3.0, 1.0], image.dtype)      # in [1, 11)
    k = jnp.where(k >= 6.0, k - 6.0, k)
    return value[..., None] - chroma[..., None] * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0)


def color_jitter(key: jax.Array, image: jax.Array, strengths: tuple[float, float, float, float]) -> jax.Array:
    """torchvision's ``ColorJitter(brightness, contrast, saturation, hue)`` on one image ``[H, W, 3]`` in [0, 1].

    Factors are drawn uniformly from :math:`[\\max(0, 1-b), 1+b]` (the hue shift from :math:`[-h, h]`) and the four
    adjustments run in a random order; a zero strength makes its adjustment the identity. Brightness scales the
    image, contrast blends it with the mean of its grey level, saturation with its grey level, and hue rotates the
    HSV hue; each step clips to [0, 1].
    """
    if not any(strengths):
        return image
    return _jitter(image, tuple(strengths), jax.random.uniform(key, (_JITTER_DRAWS,), jnp.float32))


# ----------------------------------------------------------------------------------------------------- batch


def _augment_example(example: dict[str, jax.Array], uniforms: jax.Array, config: AugmentConfig
                     ) -> dict[str, jax.Array]:
    crop_uniforms, flip_uniform, jitter_uniforms = (uniforms[:_CROP_DRAWS], uniforms[_CROP_DRAWS],
                                                    uniforms[_CROP_DRAWS + 1:])
    flip = config.flip & (flip_uniform < 0.5)
    if config.scales != (1.0,):
        # The flip rides on the crop's sampling coordinates: a select between flipped and unflipped copies
        # after a gather makes XLA recompute the gather (several times slower on CPUs).
        example = _scale_crop(example, config.scales, crop_uniforms, flip, config.depth_is_disparity)
    elif config.flip:
        flipped = hflip(example)
        example = {name: jnp.where(flip, flipped[name], value) for name, value in example.items()}
    if any(config.color_jitter):
        example = dict(example, images=_jitter(example["images"], config.color_jitter, jitter_uniforms))
    return example


def augment(key: jax.Array, batch: dict[str, jax.Array], config: AugmentConfig = AugmentConfig()
            ) -> dict[str, jax.Array]:
    """Augments a batch, each example with its own randomness drawn from ``key``; jittable (``config`` is static).

    Args:
        key: the randomness of the whole batch.
        batch: ``images [B, H, W, 3]`` in [0, 1], and any of ``segmentation [B, H, W]``, ``depth [B, H, W, 1]``,
            ``normal [B, H, W, 3]``.
        config: which augmentations run.

    Returns:
        A batch with the same keys, shapes and dtypes.

    Raises:
        ValueError: for a key other than :data:`BATCH_KEYS`, a missing ``images`` or a shape that does not match.
    """
    unknown = sorted(set(batch) - set(BATCH_KEYS))
    if unknown or "images" not in batch:
        raise ValueError(f"batch keys must be images and any of segmentation, depth, normal; got {sorted(batch)}")
    images = batch["images"]
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must have shape [B, H, W, 3]; got {images.shape}")
    expected = {"segmentation": images.shape[:3], "depth": (*images.shape[:3], 1), "normal": images.shape}
    for name, shape in expected.items():
        if name in batch and tuple(batch[name].shape) != tuple(shape):
            raise ValueError(f"batch[{name!r}] must have shape {tuple(shape)} to match the images; got "
                             f"{tuple(batch[name].shape)}")
    # One draw for the whole batch, a row of uniforms per example: one random-bits kernel instead of a dozen
    # (compilation is dominated by them), and every example still gets its own independent randomness.
    uniforms = jax.random.uniform(key, (images.shape[0], _CROP_DRAWS + 1 + _JITTER_DRAWS), jnp.float32)
    return jax.vmap(lambda example, u: _augment_example(example, u, config))(dict(batch), uniforms)
