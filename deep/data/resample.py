r"""Resampling conventions of the input pipelines, written out so they are exact and testable.

Two families are needed:

* **PIL's** ``Image.resize`` (the authors' GTA5 loader, ImageNet-C's ``pixelate``): a separable filter whose
  support widens with the downscale factor (antialiasing). With :math:`\sigma = n_{in}/n_{out}` and
  :math:`\varphi = \max(\sigma, 1)`, output pixel :math:`i` is

  .. math:: y_i = \frac{\sum_j k\big((j + \tfrac12 - (i + \tfrac12)\sigma)/\varphi\big)\, x_j}
                       {\sum_j k\big((j + \tfrac12 - (i + \tfrac12)\sigma)/\varphi\big)},

  over the source pixels :math:`j = 0..n_{in}-1`, with the triangle :math:`k(t) = \max(0, 1 - |t|)` for
  ``BILINEAR`` and the box :math:`k(t) = [-\tfrac12 < t \le \tfrac12]` for ``BOX``. It is a matrix
  :math:`W \in \mathbb R^{n_{out}\times n_{in}}` per axis (:func:`pil_weights`).
  PIL's ``NEAREST`` copies source pixel :math:`\lfloor (i + \tfrac12)\sigma \rfloor` (:func:`pil_nearest_indices`).
* **PyTorch's** ``F.interpolate`` (LibMTL's ``RandomScaleCrop``): bilinear with ``align_corners=True`` and the legacy
  ``"nearest"`` rule :math:`\lfloor i\,\sigma \rfloor`; those live in :mod:`deep.data.augmentation` and
  :mod:`deep.resize`, because the crop folds them into one sampling.

The weight matrices are numpy (they are constants, built once per shape on the host) and are applied with
``einsum`` by numpy at the I/O edge or by JAX inside jitted code.
"""

from __future__ import annotations

import numpy as np

__all__ = ["pil_weights", "pil_nearest_indices", "pil_resize"]

KERNELS = ("bilinear", "box")


def _kernel(name: str, t: np.ndarray) -> np.ndarray:
    if name == "bilinear":
        return np.maximum(0.0, 1.0 - np.abs(t))
    if name == "box":
        return ((t > -0.5) & (t <= 0.5)).astype(np.float64)
    raise ValueError(f"kernel must be one of {', '.join(KERNELS)}; got {name!r}")


def pil_weights(size_in: int, size_out: int, kernel: str = "bilinear") -> np.ndarray:
    """PIL's resampling matrix along one axis, ``[size_out, size_in]`` float32 with rows summing to 1.

    Raises:
        ValueError: for a size below 1 or an unknown kernel.
    """
    if size_in < 1 or size_out < 1:
        raise ValueError(f"sizes must be >= 1; got {size_in} -> {size_out}")
    scale = size_in / size_out
    support_scale = max(scale, 1.0)
    centres = (np.arange(size_out, dtype=np.float64) + 0.5) * scale
    # PIL's window of taps and its order of floating-point operations, so that taps exactly on the box's edge fall
    # the same way as in PIL (the box kernel is discontinuous there; the triangle is 0 there, so it cannot matter).
    support = 0.5 * support_scale if kernel == "box" else support_scale
    first = np.maximum(np.trunc(centres - support + 0.5), 0)[:, None]
    end = np.minimum(np.trunc(centres + support + 0.5), size_in)[:, None]
    taps = np.arange(size_in, dtype=np.float64)[None, :]
    offsets = ((taps - centres[:, None]) + 0.5) * (1.0 / support_scale)
    weights = np.where((taps >= first) & (taps < end), _kernel(kernel, offsets), 0.0)
    # Never zero: the window is at least one pixel wide and always holds the tap nearest the centre.
    totals = weights.sum(axis=1, keepdims=True)
    return (weights / totals).astype(np.float32)


def pil_nearest_indices(size_in: int, size_out: int) -> np.ndarray:
    """The source index of each output pixel under PIL's ``NEAREST``: ``floor((i + 1/2) n_in / n_out)``.

    PIL walks the positions by repeated addition of :math:`n_{in}/n_{out}` (not by multiplication), which rounds
    differently where :math:`(i + \tfrac12) n_{in}/n_{out}` is an integer; the same running sum is used here.
    """
    if size_in < 1 or size_out < 1:
        raise ValueError(f"sizes must be >= 1; got {size_in} -> {size_out}")
    step = size_in / size_out
    positions = np.add.accumulate(np.concatenate([[0.5 * step], np.full(size_out - 1, step)]))
    return np.minimum(np.floor(positions).astype(np.int64), size_in - 1)


def pil_resize(image: np.ndarray, size: tuple[int, int], kernel: str = "bilinear") -> np.ndarray:
    """Resizes ``image`` ``[H, W]`` or ``[H, W, C]`` to ``size = (height, width)`` as PIL would, in float32."""
    rows = pil_weights(image.shape[0], size[0], kernel)
    columns = pil_weights(image.shape[1], size[1], kernel)
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 2:
        return np.einsum("ih,hw,jw->ij", rows, image, columns, optimize=True)
    return np.einsum("ih,hwc,jw->ijc", rows, image, columns, optimize=True)
