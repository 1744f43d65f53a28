r"""The authors' perceptual reconstruction loss: LPIPS v0.1 on VGG16 (Zhang et al. 2018, "The Unreasonable
Effectiveness of Deep Features as a Perceptual Metric"), in JAX, with weights read from a local ``.npz`` only.

The distance is what the ``lpips`` package computes for ``LPIPS(net='vgg', version='0.1', lpips=True,
spatial=False)`` in eval mode (its default, so the linear layers' dropout is off), for images :math:`x, y` in
:math:`[-1, 1]`:

.. math:: d(x, y) = \sum_{l=1}^{5} \frac{1}{H_l W_l} \sum_{h,w} \sum_c w_{l,c}
          \big(\hat f^l_{hwc}(x) - \hat f^l_{hwc}(y)\big)^2, \qquad
          \hat f^l_{hw\cdot} = \frac{f^l_{hw\cdot}}{\|f^l_{hw\cdot}\|_2 + 10^{-10}},

where :math:`f^l` are the VGG16 activations relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3 of the input
after the ScalingLayer :math:`(x - \mathrm{shift}) / \mathrm{scale}` (ImageNet statistics mapped to
:math:`[-1, 1]`), the normalisation is over channels at each pixel, and :math:`w_l \ge 0` are the 1×1
convolutions ``lin0..lin4`` (no bias) learned on the BAPPS judgements. The authors use it as
:math:`\mathcal L_{LPIPS} = \frac1B\sum_i d(2\hat x_i - 1, 2x_i - 1)` on images in :math:`[0, 1]`
(:func:`lpips_loss`), inside :math:`\beta_{app}` in Eq (16) (``reference/official_implementation.md`` §3).

Weights (nothing is ever downloaded, ``reference/ecosystem.md`` §4.6) follow :mod:`deep.weights`' two steps:

1. :func:`convert_lpips_pth_to_npz` (or
   ``python -m deep.perceptual convert vgg16-397923af.pth vgg.pth OUT.npz``) takes torchvision's VGG16 state
   dict (its ``features.*``; the classifier is dropped) and the lpips package's v0.1 linear layers
   (``lpips/weights/v0.1/vgg.pth``) and writes one ``.npz`` in PyTorch's layouts. It needs PyTorch
   (``pip install 'core-mtl-toolkit[torch]'``), imported inside the function only.
2. :func:`load_lpips_npz` reads that file with numpy, checks every key and shape (a missing, misshapen or
   unexpected key is an error naming it; ``python -m deep.perceptual check OUT.npz`` does only the check)
   and returns :class:`LPIPSWeights`, a plain pytree of arrays.

The weights are constants of the loss, never trained: they are a pytree passed as an argument to pure
functions (not an NNX module, so they are in no model state that the optimiser, weight decay or checkpoints
see), and :func:`lpips_distance` wraps them in ``stop_gradient``. Passing them as a jit argument rather than
closing over them also keeps 59 MB of constants out of the compiled program.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from deep.cli import OneLineArgumentParser, run_command
from deep.weights import (HWIO_FROM_OIHW, OIHW_FROM_HWIO, check_state_arrays, read_npz, read_pth_state_dict,
                          write_npz)

__all__ = ["LPIPSWeights", "VGG16_BLOCKS", "VGG16_CONV_INDICES", "LPIPS_CHANNELS", "LPIPS_SHIFT",
           "LPIPS_SCALE", "lpips_shapes", "check_lpips_arrays", "weights_from_arrays", "arrays_from_weights",
           "load_lpips_npz", "save_lpips_npz", "check_lpips_npz", "convert_lpips_pth_to_npz",
           "vgg16_features", "lpips_distance", "lpips_loss", "main"]

# Output channels of VGG16's 3x3 convolutions, by block; a 2x2 max pool (stride 2) separates the blocks, and
# the last ReLU of each block is an LPIPS tap. torchvision numbers the layers of ``vgg16().features`` in this
# order, one index per conv, ReLU and pool.
VGG16_BLOCKS: tuple[tuple[int, ...], ...] = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512),
                                             (512, 512, 512))


def _torchvision_conv_indices(blocks: tuple[tuple[int, ...], ...]) -> tuple[int, ...]:
    indices, index = [], 0
    for block, widths in enumerate(blocks):
        index += 1 if block else 0  # the max pool before every block but the first
        for _ in widths:
            indices.append(index)
            index += 2  # the conv and its ReLU
    return tuple(indices)


VGG16_CONV_INDICES: tuple[int, ...] = _torchvision_conv_indices(VGG16_BLOCKS)  # 0, 2, 5, ..., 28
LPIPS_CHANNELS: tuple[int, ...] = tuple(widths[-1] for widths in VGG16_BLOCKS)  # 64, 128, 256, 512, 512
# lpips' ScalingLayer (v0.1): the ImageNet mean and std expressed for inputs in [-1, 1].
LPIPS_SHIFT: tuple[float, float, float] = (-0.030, -0.088, -0.188)
LPIPS_SCALE: tuple[float, float, float] = (0.458, 0.448, 0.450)

_NETWORK = "LPIPS network"


class LPIPSWeights(NamedTuple):
    """VGG16's convolutions and LPIPS v0.1's linear layers, as a pytree of arrays.

    Attributes:
        kernels: 13 convolution kernels, ``[3, 3, C_in, C_out]`` (HWIO), in torchvision's order
            (``features.{0, 2, 5, ..., 28}.weight``).
        biases: their biases, ``[C_out]``.
        linear: the five nonnegative channel weights ``[C_l]`` of ``lin0..lin4`` (``lin{l}.model.1.weight``,
            ``[1, C_l, 1, 1]`` in PyTorch).
    """

    kernels: tuple[jax.Array, ...]
    biases: tuple[jax.Array, ...]
    linear: tuple[jax.Array, ...]


def _conv_keys(index: int) -> tuple[str, str]:
    return f"features.{index}.weight", f"features.{index}.bias"


def _linear_key(layer: int) -> str:
    return f"lin{layer}.model.1.weight"


def lpips_shapes() -> dict[str, tuple[int, ...]]:
    """The key -> shape (PyTorch layout: OIHW kernels) of every array an LPIPS-VGG ``.npz`` must hold: 13 × 2
    torchvision ``features.*`` arrays and 5 ``lin*`` weights."""
    shapes, in_channels = {}, 3
    out_channels = [width for widths in VGG16_BLOCKS for width in widths]
    for index, channels in zip(VGG16_CONV_INDICES, out_channels):
        weight, bias = _conv_keys(index)
        shapes[weight], shapes[bias] = (channels, in_channels, 3, 3), (channels,)
        in_channels = channels
    for layer, channels in enumerate(LPIPS_CHANNELS):
        shapes[_linear_key(layer)] = (1, channels, 1, 1)
    return shapes


def check_lpips_arrays(arrays: dict[str, np.ndarray], source: str = "weights") -> None:
    """Raises a one-line ``ValueError`` naming the key unless ``arrays`` holds exactly :func:`lpips_shapes`'
    keys and shapes with floating dtypes, and the linear weights are nonnegative (lpips clamps them to
    ``>= 0`` while learning them: a negative entry means the wrong file)."""
    check_state_arrays(lpips_shapes(), arrays, source, _NETWORK)
    for layer in range(len(LPIPS_CHANNELS)):
        key = _linear_key(layer)
        values = arrays[key]
        if not (np.all(np.isfinite(values)) and np.min(values) >= 0):
            raise ValueError(f"{source}: key {key!r} has a negative or non-finite entry (min "
                             f"{float(np.min(values)):g}); LPIPS v0.1's linear weights are finite and >= 0")


def weights_from_arrays(arrays: dict[str, np.ndarray], dtype=jnp.float32) -> LPIPSWeights:
    """:class:`LPIPSWeights` from PyTorch-layout arrays keyed as :func:`lpips_shapes` (not checked here: see
    :func:`check_lpips_arrays`); kernels OIHW -> HWIO, linear weights ``[1, C, 1, 1]`` -> ``[C]``."""
    kernels, biases = [], []
    for index in VGG16_CONV_INDICES:
        weight, bias = _conv_keys(index)
        kernels.append(jnp.asarray(np.transpose(arrays[weight], HWIO_FROM_OIHW), dtype))
        biases.append(jnp.asarray(arrays[bias], dtype))
    linear = [jnp.asarray(np.reshape(arrays[_linear_key(layer)], (-1,)), dtype)
              for layer in range(len(LPIPS_CHANNELS))]
    return LPIPSWeights(tuple(kernels), tuple(biases), tuple(linear))


def arrays_from_weights(weights: LPIPSWeights) -> dict[str, np.ndarray]:
    """The inverse of :func:`weights_from_arrays`: PyTorch-layout numpy arrays keyed as
    :func:`lpips_shapes`."""
    arrays = {}
    for index, kernel, bias in zip(VGG16_CONV_INDICES, weights.kernels, weights.biases, strict=True):
        weight_key, bias_key = _conv_keys(index)
        arrays[weight_key] = np.transpose(np.asarray(jax.device_get(kernel)), OIHW_FROM_HWIO)
        arrays[bias_key] = np.asarray(jax.device_get(bias))
    for layer, linear in enumerate(weights.linear):
        arrays[_linear_key(layer)] = np.asarray(jax.device_get(linear)).reshape(1, -1, 1, 1)
    return arrays


def load_lpips_npz(path: str | os.PathLike, dtype=jnp.float32) -> LPIPSWeights:
    """Reads LPIPS-VGG weights from a local ``.npz`` (see :func:`convert_lpips_pth_to_npz`), checking every
    key and shape first.

    Args:
        path: an ``.npz`` with torchvision's ``features.{i}.weight``/``.bias`` (OIHW) for
            ``i`` in :data:`VGG16_CONV_INDICES` and ``lin0..lin4.model.1.weight`` ``[1, C, 1, 1]``, nothing
            else.
        dtype: of the returned arrays.

    Returns:
        The weights as device arrays, to pass to :func:`lpips_loss` (and as ``perceptual=`` to
        :func:`deep.train.core_step`).

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: on an unreadable file, a missing, misshapen, non-floating or unexpected key, or a negative
            linear weight; the message names the key.
    """
    arrays = read_npz(path)
    check_lpips_arrays(arrays, source=f"weights file {path}")
    return weights_from_arrays(arrays, dtype)


def save_lpips_npz(weights: LPIPSWeights, path: str | os.PathLike) -> None:
    """Writes ``weights`` as an ``.npz`` in the layout :func:`load_lpips_npz` reads, atomically (a missing folder
    is created)."""
    arrays = arrays_from_weights(weights)
    write_npz(path, arrays)


def check_lpips_npz(path: str | os.PathLike) -> int:
    """Checks an ``.npz`` as :func:`load_lpips_npz` does, without loading it to a device; returns the number
    of arrays (31)."""
    check_lpips_arrays(read_npz(path), source=f"weights file {path}")
    return len(lpips_shapes())


def convert_lpips_pth_to_npz(vgg_pth: str | os.PathLike, lpips_pth: str | os.PathLike,
                             out_npz: str | os.PathLike) -> int:
    """Builds an LPIPS-VGG ``.npz`` from torchvision's VGG16 state dict (e.g. ``vgg16-397923af.pth``, the
    ``IMAGENET1K_V1`` weights the lpips package loads) and the lpips package's ``weights/v0.1/vgg.pth``,
    atomically.

    The VGG file may hold ``features.*`` and ``classifier.*`` (dropped), the LPIPS file ``lin*`` keys; the
    result is checked as :func:`load_lpips_npz` checks it before anything is written. Needs PyTorch, imported
    here only (files are read with ``torch.load(weights_only=True)``, so no code in them runs).

    Returns:
        The number of arrays written (31).

    Raises:
        ImportError: if PyTorch is not installed.
        FileNotFoundError: if an input file does not exist.
        ValueError: if an input is not a state dict of tensors, holds a key of neither kind, or the
            combination misses or misshapes a key (named).
    """
    arrays = {}
    for pth, allowed, kind in ((vgg_pth, ("features.", "classifier."), "torchvision VGG16"),
                               (lpips_pth, ("lin",), "lpips v0.1 linear-layer")):
        for key, value in read_pth_state_dict(pth).items():
            if not key.startswith(allowed):
                expected = " or ".join(f"{prefix}*" for prefix in allowed)
                raise ValueError(f"{pth}: key {key!r} is not a {kind} key (expected {expected}; are the two "
                                 "files swapped?)")
            if not key.startswith("classifier."):
                arrays[key] = value
    check_lpips_arrays(arrays, source=f"{vgg_pth} + {lpips_pth}")
    write_npz(out_npz, arrays)
    return len(arrays)


def _conv3x3(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    # torch's Conv2d(padding=1) is a cross-correlation with one zero on each side, as lax's convolution.
    y = jax.lax.conv_general_dilated(x, kernel.astype(x.dtype), window_strides=(1, 1),
                                     padding=((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + bias.astype(x.dtype)


def _max_pool(x: jax.Array) -> jax.Array:
    # MaxPool2d(2, 2) with ceil_mode=False: "VALID" windows drop an odd last row or column, as torch's floor. The
    # initial value stays a Python float (weakly typed, so it takes x's dtype): under tracing, lax only recognises a
    # concrete -inf as max's identity and uses its differentiable max pool; a jnp array gives the generic
    # reduce_window, which has no reverse-mode rule (tried: the loss's gradient then fails).
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


def vgg16_features(weights: LPIPSWeights, x: jax.Array) -> tuple[jax.Array, ...]:
    """The LPIPS taps of torchvision's ``vgg16().features``: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.

    Each block is 3×3 convolutions (padding 1) each followed by a ReLU, after a 2×2 max pool of stride 2 for
    every block but the first; the final pool (index 30) feeds no tap and is not run.

    Args:
        weights: the convolutions (``linear`` is unused here).
        x: ``[B, H, W, 3]``, already through the ScalingLayer.

    Returns:
        Five arrays ``[B, H / 2^l, W / 2^l, C_l]`` (floor division), ``C = 64, 128, 256, 512, 512``.
    """
    taps, layer = [], 0
    for block, widths in enumerate(VGG16_BLOCKS):
        if block:
            x = _max_pool(x)
        for _ in widths:
            x = jax.nn.relu(_conv3x3(x, weights.kernels[layer], weights.biases[layer]))
            layer += 1
        taps.append(x)
    return tuple(taps)


def _unit_normalise(features: jax.Array, epsilon: float = 1e-10) -> jax.Array:
    r""":math:`f / (\|f\|_2 + \epsilon)` over the channels of each pixel (lpips' ``normalize_tensor``)."""
    return features / (jnp.sqrt(jnp.sum(features**2, axis=-1, keepdims=True)) + epsilon)


def lpips_distance(weights: LPIPSWeights, x: jax.Array, y: jax.Array,
                   compute_dtype: str | jnp.dtype | None = None) -> jax.Array:
    r"""LPIPS v0.1 (VGG) between images in :math:`[-1, 1]`, per image (:math:`d(x, y)` of the module
    docstring).

    Args:
        weights: from :func:`load_lpips_npz`; held constant (``stop_gradient``).
        x, y: ``[B, H, W, 3]`` in :math:`[-1, 1]`, ``H, W >= 16`` (relu5_3 is at 1/16 resolution).
        compute_dtype: the VGG's convolutions' dtype (default ``x``'s), as the model's ``compute_dtype``: in
            bfloat16 they take its tensor-core rate, the 3 TFLOP a NYUv2 step spends here; the taps are
            normalised and compared in ``x``'s dtype. bfloat16's rounding of the features sets a floor near
            identical images, where their differences cancel (with random full-width weights: 0.5 % off at a
            reconstruction within noise 0.03 of its target, 6 % at 0.01, 66 % at 0.003); use float32 where
            reconstructions come that close.

    Returns:
        ``[B]``, :math:`\ge 0`, 0 for identical images; differentiable in ``x`` and ``y``.
    """
    if x.shape != y.shape or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"LPIPS compares two [batch, height, width, 3] images of one shape; got {x.shape} "
                         f"and {y.shape}")
    if min(x.shape[1:3]) < 16:
        raise ValueError(f"LPIPS-VGG needs images of at least 16 x 16 pixels (four 2x2 pools before "
                         f"relu5_3); got {x.shape[1]} x {x.shape[2]}")
    # Constants of the loss: even a caller that differentiates with respect to every argument cannot train
    # them.
    weights = jax.lax.stop_gradient(weights)
    shift, scale = jnp.asarray(LPIPS_SHIFT, x.dtype), jnp.asarray(LPIPS_SCALE, x.dtype)
    # Two passes rather than one over the concatenated batch: a target that needs no gradient then costs a
    # forward pass only.
    dtype = x.dtype if compute_dtype is None else jnp.dtype(compute_dtype)
    taps_x = vgg16_features(weights, ((x - shift) / scale).astype(dtype))
    taps_y = vgg16_features(weights, ((y - shift) / scale).astype(dtype))
    distance = jnp.zeros(x.shape[0], x.dtype)
    for tap_x, tap_y, linear in zip(taps_x, taps_y, weights.linear, strict=True):
        squared = (_unit_normalise(tap_x.astype(x.dtype)) - _unit_normalise(tap_y.astype(x.dtype))) ** 2
        # lin_l (a 1x1 conv without bias) then lpips' spatial_average.
        per_pixel = jnp.einsum("bhwc,c->bhw", squared, linear.astype(x.dtype))
        distance = distance + jnp.mean(per_pixel, axis=(1, 2))
    return distance


def lpips_loss(weights: LPIPSWeights, reconstruction: jax.Array, images: jax.Array,
               compute_dtype: str | jnp.dtype | None = None) -> jax.Array:
    r"""The authors' perceptual term :math:`\frac1B\sum_i d(2\hat x_i - 1, 2x_i - 1)` for images in
    :math:`[0, 1]`.

    Args:
        weights: from :func:`load_lpips_npz`.
        reconstruction: :math:`\hat x`, ``[B, H, W, 3]`` in :math:`[0, 1]` (differentiated).
        images: :math:`x`, the same shape.
        compute_dtype: the VGG's dtype (:func:`lpips_distance`).

    Returns:
        A scalar.
    """
    return jnp.mean(lpips_distance(weights, 2.0 * reconstruction - 1.0, 2.0 * images - 1.0, compute_dtype))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m deep.perceptual convert VGG16.pth LPIPS_VGG_V01.pth OUT.npz`` or ``check OUT.npz``:
    one-line errors, exit status 2 on bad input."""
    parser = OneLineArgumentParser(prog="python -m deep.perceptual",
                                   description="Offline LPIPS (VGG16, v0.1) weights for the perceptual loss.")
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("convert", help="combine torchvision VGG16 and lpips v0.1 .pth files into "
                                                  "an .npz (needs torch)")
    convert.add_argument("vgg_pth", type=Path, help="torchvision VGG16 state dict (e.g. vgg16-397923af.pth)")
    convert.add_argument("lpips_pth", type=Path, help="lpips v0.1 linear layers (lpips/weights/v0.1/vgg.pth)")
    convert.add_argument("npz", type=Path, help="output .npz")
    check = commands.add_parser("check", help="check an .npz against LPIPS-VGG's keys and shapes (no torch "
                                              "needed)")
    check.add_argument("npz", type=Path, help="the .npz to check")
    arguments = parser.parse_args(argv)

    def command() -> str:
        if arguments.command == "convert":
            count = convert_lpips_pth_to_npz(arguments.vgg_pth, arguments.lpips_pth, arguments.npz)
            return f"wrote {count} arrays to {arguments.npz}"
        count = check_lpips_npz(arguments.npz)
        return f"{arguments.npz}: all {count} LPIPS-VGG arrays present with the right shapes"

    return run_command(parser.prog, command)


if __name__ == "__main__":
    sys.exit(main())
