r"""Dilated ("atrous") convolutions computed as ordinary ones: the same function, cheaper kernels.

A stride-1 convolution with dilation :math:`r` and "same" padding :math:`r(k-1)/2` reads, at output row
:math:`i = r i' + p`, only input rows :math:`r(i' + a - c) + p` — rows of the same residue :math:`p` mod :math:`r`.
So it splits into :math:`r^2` independent undilated convolutions, one per residue pair, on the sub-images
:math:`x[p::r, q::r]` (TensorFlow's ``atrous_conv2d`` "space to batch"):

.. math:: y[r i' + p,\ r j' + q] = \sum_{a,b} w_{ab}\ x_p[i' + a - c,\ j' + b - c], \qquad
          x_p[i', j'] = x[r i' + p,\ r j' + q],

with zero padding 1·c on each sub-image exactly where the dilated convolution pads with zeros. Sizes that are not a
multiple of :math:`r` are padded with zero rows at the end first; those only ever meet the zero padding anyway.

Taps that can never land inside the image are dropped first: with :math:`r \ge H` every off-centre row tap of a
3×3 kernel reads padding (DeepLabV3's rate 36 on NYUv2's 36×48 grid), so the kernel shrinks to 1×3 there. Their
gradient is zero either way, so the parameters and their gradients are those of the dilated convolution.

Why: GPU convolution libraries have their fastest kernels for undilated convolutions; dilated ones (a third of
the backbone's and most of the ASPP heads' FLOPs at output stride 8) fall back to slower ones.
``bench/bench_atrous.py`` measures the two on the model's shapes.

:func:`space_to_batch_conv` has :func:`jax.lax.conv_general_dilated`'s signature, so an ``nnx.Conv`` takes it as its
``conv_general_dilated``; any call it does not cover (strides, input dilation, groups, other padding or layouts)
goes to ``lax.conv_general_dilated`` unchanged.

Precision: in float32 all forms agree with ``lax`` to rounding (tests). In bfloat16 the sub-image form differs from
cuDNN's dilated convolutions by about 3·10⁻⁴ relative (``bench_atrous``, H200). :func:`shifted_matmul_conv` takes
bfloat16 operands in every product of both passes, but rounds each tap's product to bfloat16 before summing the taps
in float32, and sums the taps' partial input gradients in bfloat16. On a CPU (36×48 grid, 256 channels, rates 24
and 36) its output is within 2.4·10⁻³ of the float32 result and its input gradient within 3.5·10⁻³, against
1.7·10⁻³ and 2.3·10⁻³ for ``lax``'s own bfloat16 convolution: bfloat16's rounding either way.

Limitation: under explicit sharding (``jax.sharding.AxisType.Explicit``) the sub-image reshapes of a batch-sharded
input are rejected by JAX; use ``dilated_conv="xla"`` there. The automatic sharding of a batch split over the mesh
of :mod:`deep.devices` keeps the batch dimension major through them (no collective is added).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

_NHWC = ("NHWC", "HWIO", "NHWC")


def _axis_plan(size: int, kernel: int, rate: int, padding: tuple[int, int]):
    """``(first tap, last tap + 1, factor, sub-image padding)`` for one spatial axis, or None when the call is not
    a "same" dilated convolution along it."""
    centre = (kernel - 1) // 2
    if kernel % 2 == 0 or tuple(padding) != (rate * centre, rate * centre):
        return None
    reach = min(centre, (size - 1) // rate)  # taps further out only ever read the zero padding
    factor = rate if reach > 0 else 1
    return centre - reach, centre + reach + 1, factor, reach


def _same_dilated_plans(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                        feature_group_count, batch_group_count, kwargs):
    """Both axes' :func:`_axis_plan` when the call is a 2-D "same" dilated convolution (NHWC, HWIO, stride 1, no
    input dilation, groups or output sharding) that the implementations here compute; None for any other call."""
    rates = tuple(rhs_dilation or (1,) * (lhs.ndim - 2))
    if (lhs.ndim != 4 or all(rate == 1 for rate in rates) or tuple(window_strides) != (1, 1)
            or any(d != 1 for d in (lhs_dilation or (1, 1))) or feature_group_count != 1
            or batch_group_count != 1 or isinstance(padding, str) or kwargs.get("out_sharding") is not None
            or dimension_numbers != lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)):
        return None
    plans = [_axis_plan(size, k, rate, pad) for size, k, rate, pad in zip(lhs.shape[1:3], rhs.shape[:2], rates,
                                                                              padding)]
    return None if any(plan is None for plan in plans) else plans


def space_to_batch_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                        dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
                        preferred_element_type=None, **kwargs):
    """:func:`jax.lax.conv_general_dilated`, computing 2-D "same" dilated convolutions (NHWC, HWIO, stride 1) as
    undilated convolutions of sub-images (module docstring); every other call is passed through."""
    plans = _same_dilated_plans(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                                feature_group_count, batch_group_count, kwargs)
    if plans is None:
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
            dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
            batch_group_count=batch_group_count, precision=precision,
            preferred_element_type=preferred_element_type, **kwargs)
    batch, height, width, _ = lhs.shape
    (top, bottom, rh, ph), (left, right, rw, pw) = plans
    kernel = rhs[top:bottom, left:right]
    sub_h, sub_w = -(-height // rh), -(-width // rw)
    x = jnp.pad(lhs, ((0, 0), (0, sub_h * rh - height), (0, sub_w * rw - width), (0, 0)))
    x = x.reshape(batch, sub_h, rh, sub_w, rw, -1).transpose(0, 2, 4, 1, 3, 5).reshape(batch * rh * rw, sub_h,
                                                                                        sub_w, -1)
    y = lax.conv_general_dilated(x, kernel, (1, 1), ((ph, ph), (pw, pw)), dimension_numbers=_NHWC,
                                 precision=precision, preferred_element_type=preferred_element_type)
    y = y.reshape(batch, rh, rw, sub_h, sub_w, -1).transpose(0, 3, 1, 4, 2, 5).reshape(batch, sub_h * rh,
                                                                                        sub_w * rw, -1)
    return y[:, :height, :width]


def _valid_range(size: int, offset: int) -> tuple[int, int]:
    """Output positions ``[start, stop)`` whose input position ``i + offset`` lies inside ``[0, size)``."""
    return max(0, -offset), min(size, size - offset)


def shifted_matmul_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                        dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
                        preferred_element_type=None, **kwargs):
    r""":func:`jax.lax.conv_general_dilated`, computing 2-D "same" dilated convolutions (NHWC, HWIO, stride 1) as a
    sum over the kernel's taps of matrix products on the overlap of the image with its shifted copy,

    .. math:: y[i, j] = \sum_{a, b} x[i + r_h(a - c),\ j + r_w(b - c)]\, W_{ab} \quad
              \text{over the } (i, j) \text{ where the shifted position lies inside the image,}

    so no work is spent on the zero padding: at a large rate most of a dilated convolution's taps read padding
    (DeepLabV3's rates 24 and 36 on a 36×48 grid do 37 % and 17 % of the dense work). Each tap's product is
    computed in the operands' type, forward and backward; the forward pass sums the taps in float32 (or wider) and
    casts back to the input's type (see the module docstring on bfloat16). Every other call is passed through."""
    if lhs.dtype != rhs.dtype or _same_dilated_plans(
            lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count,
            batch_group_count, kwargs) is None:  # (lax rejects mixed dtypes; so do we, by passing them on)
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
            dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
            batch_group_count=batch_group_count, precision=precision,
            preferred_element_type=preferred_element_type, **kwargs)
    rates = tuple(rhs_dilation)
    _, height, width, _ = lhs.shape
    kh, kw = rhs.shape[:2]
    accumulate = jnp.promote_types(jnp.float32, jnp.result_type(lhs, rhs))
    out = None
    for a in range(kh):
        dy = (a - (kh - 1) // 2) * rates[0]
        top, bottom = _valid_range(height, dy)
        for b in range(kw):
            dx = (b - (kw - 1) // 2) * rates[1]
            left, right = _valid_range(width, dx)
            if top >= bottom or left >= right:
                continue  # this tap reads only the zero padding
            # Each product in the operands' type (its own sum runs in float32 on GPUs and CPUs), then widened:
            # with a float32 preferred type instead, JAX's backward pass would widen the bfloat16 operands and
            # compute both gradient products in float32.
            part = jnp.einsum("bhwc,co->bhwo", lhs[:, top + dy:bottom + dy, left + dx:right + dx], rhs[a, b],
                              precision=precision).astype(accumulate)
            part = jnp.pad(part, ((0, 0), (top, height - bottom), (left, width - right), (0, 0)))
            out = part if out is None else out + part
    return out.astype(preferred_element_type or jnp.result_type(lhs, rhs))


def dense_fraction(size: int, kernel: int, rate: int) -> float:
    """The fraction of a "same" dilated convolution's taps along one axis that read the image, not padding:
    ``sum over taps of the valid output positions / (kernel · size)``."""
    centre = (kernel - 1) // 2
    valid = sum(max(0, size - abs((a - centre) * rate)) for a in range(kernel))
    return valid / (kernel * size)


# Below this fraction of useful work, one product per tap beats sub-image convolutions (bench_atrous). On an H200
# (bfloat16, NYUv2's 36×48 grid) the taps win at rate 36 (17 % useful: 0.58 against 0.81 ms) and lose at rate 24
# (37 %: 1.04 against 0.88 ms); on CPUs the 2×2 sub-images of rate 24 are ~90× slower than the taps.
SHIFTED_MATMUL_BELOW = {"cpu": 0.5}
SHIFTED_MATMUL_BELOW_ACCELERATOR = 0.25


def auto_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
              feature_group_count=1, batch_group_count=1, precision=None, preferred_element_type=None, **kwargs):
    """The faster exact form measured for each dilated convolution on the default backend:
    :func:`shifted_matmul_conv` where most of the dense work would read zero padding (useful fraction below
    :data:`SHIFTED_MATMUL_BELOW`: 0.5 on CPUs, 0.25 on accelerators — DeepLabV3's rate 36 on a 36×48 grid, and
    rate 24 on CPUs), :func:`space_to_batch_conv` otherwise (undilated convolutions of sub-images, about twice as
    fast as cuDNN's dilated ones on an H200). Other calls go to ``lax.conv_general_dilated`` unchanged."""
    rates = tuple(rhs_dilation or (1,) * (lhs.ndim - 2))
    convolution = space_to_batch_conv
    if lhs.ndim == 4 and rhs.ndim == 4 and any(rate > 1 for rate in rates):
        fraction = 1.0
        for size, k, rate in zip(lhs.shape[1:3], rhs.shape[:2], rates):
            fraction *= dense_fraction(size, k, rate)
        if fraction < SHIFTED_MATMUL_BELOW.get(jax.default_backend(), SHIFTED_MATMUL_BELOW_ACCELERATOR):
            convolution = shifted_matmul_conv
    return convolution(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
                       dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
                       batch_group_count=batch_group_count, precision=precision,
                       preferred_element_type=preferred_element_type, **kwargs)


DILATED_CONVS = {"xla": lax.conv_general_dilated, "space_to_batch": space_to_batch_conv,
                 "shifted_matmul": shifted_matmul_conv, "auto": auto_conv}


def set_dilated_conv(module, implementation: str) -> None:
    """Make every ``nnx.Conv`` inside ``module`` compute with ``implementation`` (a key of
    :data:`DILATED_CONVS`); undilated convolutions are unaffected either way."""
    from flax import nnx

    if implementation not in DILATED_CONVS:
        raise ValueError(f"dilated_conv must be one of {', '.join(DILATED_CONVS)}; got {implementation!r}")
    for _, layer in nnx.iter_graph(module):
        if isinstance(layer, nnx.Conv):
            if not hasattr(layer, "conv_general_dilated"):  # Flax versions whose Conv has no such hook
                raise ValueError("this Flax version's nnx.Conv has no conv_general_dilated attribute; use "
                                 "dilated_conv='xla'")
            layer.conv_general_dilated = DILATED_CONVS[implementation]


def conv_flops(x_shape, kernel_shape) -> float:
    """Multiply-adds ×2 of a "same" stride-1 convolution of an ``[B, H, W, C]`` input with an ``[kh, kw, C, O]``
    kernel, counting every tap, also those that read the zero padding (XLA's cost analysis counts only the taps
    that read the image: ``conv_flops × dense_fraction`` per axis)."""
    batch, height, width, _ = x_shape
    kh, kw, cin, cout = kernel_shape
    return 2.0 * batch * height * width * kh * kw * cin * cout
