"""Dilated convolutions computed as undilated ones (deep/atrous.py): the same function and gradients as
lax.conv_general_dilated, whatever the rates and sizes, and the model unchanged by the choice."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from deep import atrous
from deep.model import DualStreamModel, ModelConfig
from deep.trainer import MODEL_SIZES

IMPLEMENTATIONS = ["space_to_batch", "shifted_matmul", "auto"]


def _numbers(x, kernel):
    return lax.conv_dimension_numbers(x.shape, kernel.shape, ("NHWC", "HWIO", "NHWC"))


def _same_dilated(function, rates, kernel_size):
    padding = tuple((r * (k - 1) // 2,) * 2 for r, k in zip(rates, kernel_size))
    return lambda x, kernel: function(x, kernel, (1, 1), padding, rhs_dilation=rates,
                                      dimension_numbers=_numbers(x, kernel))


def _relative(a, b):
    return float(jnp.linalg.norm((a - b).ravel()) / jnp.linalg.norm(b.ravel()))


# (height, width, rates, kernel): multiples of the rate, sizes that are not, taps that only read padding
# (rate >= height, as DeepLabV3's 36 on NYUv2's 36x48 grid), a 5x5 kernel, different rates per axis.
CASES = [(12, 16, (2, 2), 3), (9, 12, (4, 4), 3), (7, 10, (3, 3), 3), (6, 8, (6, 6), 3), (5, 9, (6, 6), 3),
         (6, 7, (9, 9), 3), (11, 13, (2, 3), 5), (8, 6, (3, 1), 3)]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("height, width, rates, k", CASES)
def test_value_and_gradients_equal_the_dilated_convolution(implementation, height, width, rates, k):
    keys = jax.random.split(jax.random.key(height * 100 + width), 3)
    x = jax.random.normal(keys[0], (2, height, width, 5))
    kernel = jax.random.normal(keys[1], (k, k, 5, 4))
    cotangent = jax.random.normal(keys[2], (2, height, width, 4))
    reference = _same_dilated(lax.conv_general_dilated, rates, (k, k))
    candidate = _same_dilated(atrous.DILATED_CONVS[implementation], rates, (k, k))
    assert _relative(candidate(x, kernel), reference(x, kernel)) < 1e-5
    pull = lambda f: jax.grad(lambda x, w: jnp.vdot(f(x, w), cotangent), argnums=(0, 1))(x, kernel)
    for got, expected in zip(pull(candidate), pull(reference)):
        assert _relative(got, expected) < 1e-5


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_calls_they_do_not_cover_are_passed_through_unchanged(implementation):
    x = jax.random.normal(jax.random.key(0), (2, 9, 11, 4))
    kernel = jax.random.normal(jax.random.key(1), (3, 3, 4, 6))
    function = atrous.DILATED_CONVS[implementation]
    calls = [dict(window_strides=(2, 2), padding=((2, 2), (2, 2)), rhs_dilation=(2, 2)),  # strided
             dict(window_strides=(1, 1), padding=((0, 0), (0, 0)), rhs_dilation=(2, 2)),  # not "same"
             dict(window_strides=(1, 1), padding=((1, 1), (1, 1)), rhs_dilation=(1, 1))]  # undilated
    for call in calls:
        expected = lax.conv_general_dilated(x, kernel, dimension_numbers=_numbers(x, kernel), **call)
        np.testing.assert_array_equal(function(x, kernel, dimension_numbers=_numbers(x, kernel), **call), expected)
    grouped = jax.random.normal(jax.random.key(2), (3, 3, 2, 6))
    call = dict(window_strides=(1, 1), padding=((2, 2), (2, 2)), rhs_dilation=(2, 2), feature_group_count=2)
    np.testing.assert_array_equal(function(x, grouped, dimension_numbers=_numbers(x, grouped), **call),
                                  lax.conv_general_dilated(x, grouped, dimension_numbers=_numbers(x, grouped), **call))


def _convolution_kernels(function, x, kernel):
    """The kernel shapes of the convolutions in ``function``'s jaxpr, and whether it has matrix products."""
    jaxpr = jax.make_jaxpr(function)(x, kernel).jaxpr
    kernels = [tuple(e.invars[1].aval.shape) for e in jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
    dilations = [e.params["rhs_dilation"] for e in jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
    return kernels, dilations, any(e.primitive.name == "dot_general" for e in jaxpr.eqns)


def test_space_to_batch_drops_the_taps_that_only_read_padding_and_convolves_undilated():
    x, kernel = jnp.ones((1, 36, 48, 4)), jnp.ones((3, 3, 4, 2))
    # Rate 36 on a 36-row grid: the off-centre rows of the kernel never meet the image.
    kernels, dilations, _ = _convolution_kernels(_same_dilated(atrous.space_to_batch_conv, (36, 36), (3, 3)), x,
                                                 kernel)
    assert kernels == [(1, 3, 4, 2)] and dilations == [(1, 1)]
    kernels, dilations, _ = _convolution_kernels(_same_dilated(atrous.space_to_batch_conv, (4, 4), (3, 3)), x,
                                                 kernel)
    assert kernels == [(3, 3, 4, 2)] and dilations == [(1, 1)]


def test_useful_fraction_and_the_automatic_choice():
    # DeepLabV3's rates on NYUv2's 36x48 grid: 65 %, 37 % and 17 % of the dense taps read the image.
    fraction = lambda rate: atrous.dense_fraction(36, 3, rate) * atrous.dense_fraction(48, 3, rate)
    np.testing.assert_allclose([fraction(12), fraction(24), fraction(36)], [0.6481, 0.3704, 0.1667], atol=1e-4)
    assert atrous.dense_fraction(36, 3, 1) == (36 + 35 + 35) / (3 * 36)  # even rate 1 pads one row each side
    x, kernel = jnp.ones((1, 36, 48, 4)), jnp.ones((3, 3, 4, 2))
    for rate, uses_products in ((2, False), (12, False), (24, True), (36, True)):
        kernels, dilations, products = _convolution_kernels(_same_dilated(atrous.auto_conv, (rate, rate), (3, 3)),
                                                            x, kernel)
        assert products == uses_products and (kernels == []) == uses_products
        assert all(d == (1, 1) for d in dilations)


def test_the_model_computes_the_same_function_with_every_implementation():
    base = ModelConfig(**{**MODEL_SIZES["tiny"], "aspp_rates": (1, 2, 6)}, grounding="none")
    images = jax.random.uniform(jax.random.key(0), (2, 24, 32, 3))
    outputs = {}
    for implementation in ("xla", *IMPLEMENTATIONS):
        model = DualStreamModel(dataclasses.replace(base, dilated_conv=implementation), nnx.Rngs(0))
        model.eval()
        outputs[implementation] = nnx.jit(lambda m, x: m(x)[0])(model, images)
    for implementation in IMPLEMENTATIONS:
        for task in outputs["xla"]:
            np.testing.assert_allclose(outputs[implementation][task], outputs["xla"][task], atol=2e-5, rtol=1e-4)


def test_unknown_implementation_is_rejected_in_one_line():
    with pytest.raises(ValueError, match="dilated_conv must be one of xla, space_to_batch, shifted_matmul, auto"):
        ModelConfig(dilated_conv="fft")


def test_on_accelerators_only_the_sparsest_convolutions_use_per_tap_products(monkeypatch):
    # The H200's measurements: sub-images win at rate 24 (37 % useful taps), products at rate 36 (17 %).
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    x, kernel = jnp.ones((1, 36, 48, 4)), jnp.ones((3, 3, 4, 2))
    for rate, uses_products in ((12, False), (24, False), (36, True)):
        _, _, products = _convolution_kernels(_same_dilated(atrous.auto_conv, (rate, rate), (3, 3)), x, kernel)
        assert products == uses_products


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_bfloat16_inputs_give_bfloat16_outputs_within_its_rounding(implementation):
    keys = jax.random.split(jax.random.key(7), 2)
    x = jax.random.normal(keys[0], (2, 12, 16, 32))
    kernel = jax.random.normal(keys[1], (3, 3, 32, 8)) / np.sqrt(9 * 32)
    convolution = lambda f, x, w: f(x, w, (1, 1), ((4, 4), (4, 4)), None, (4, 4), _numbers(x, w))  # positional
    got = convolution(atrous.DILATED_CONVS[implementation], x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16))
    assert got.dtype == jnp.bfloat16
    assert _relative(got.astype(jnp.float32), convolution(lax.conv_general_dilated, x, kernel)) < 1e-2
    with pytest.raises(TypeError, match="same dtypes"):  # mixed dtypes are refused, as lax refuses them
        convolution(atrous.DILATED_CONVS[implementation], x.astype(jnp.bfloat16), kernel.astype(jnp.float32))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_bfloat16_taps_are_summed_in_float32_and_a_preferred_type_is_honoured(implementation):
    """The forward pass of the per-tap products adds the taps in float32 (module docstring: rounding each tap's
    product to bfloat16, but not each partial sum), so every addition in its program is a float32 one; and
    ``preferred_element_type=float32`` gives a float32 result, as ``lax.conv_general_dilated`` does, by every
    implementation (rate 36 on a 36×48 grid: per-tap products in ``auto`` too)."""
    x, kernel = jnp.ones((1, 36, 48, 4), jnp.bfloat16), jnp.ones((3, 3, 4, 2), jnp.bfloat16)
    call = dict(window_strides=(1, 1), padding=((36, 36), (36, 36)), rhs_dilation=(36, 36),
                dimension_numbers=_numbers(x, kernel))
    jaxpr = jax.make_jaxpr(lambda x, w: atrous.DILATED_CONVS[implementation](x, w, **call))(x, kernel).jaxpr
    additions = [e for e in jaxpr.eqns if e.primitive.name == "add"]
    assert all(e.outvars[0].aval.dtype == jnp.float32 for e in additions), [str(e.outvars[0].aval) for e in additions]
    expected = lax.conv_general_dilated(x, kernel, preferred_element_type=jnp.float32, **call)
    got = atrous.DILATED_CONVS[implementation](x, kernel, preferred_element_type=jnp.float32, **call)
    assert got.dtype == expected.dtype == jnp.float32
    np.testing.assert_array_equal(got, expected)  # sums of small integers: exact either way


def _dilations_in(function, *args) -> list[tuple[int, ...]]:
    """The kernel dilation of every convolution in ``function``'s lowered program (nested calls included)."""
    program = jax.jit(function).lower(*args).as_text()
    return [tuple(int(d) for d in found.split(","))
            for found in re.findall(r"stablehlo\.convolution.*?rhs_dilate = \[([\d, ]+)\]", program)]


@pytest.mark.parametrize("architecture", ["shared", "mtan"])
def test_the_configured_implementation_reaches_every_convolution_of_the_model(architecture):
    from deep.trainer import build_model

    config = ModelConfig(**{**MODEL_SIZES["tiny"], "aspp_rates": (1, 2, 6)}, grounding="none")
    images = jnp.ones((1, 24, 32, 3))
    dilations = {}
    for implementation in ("xla", "auto"):
        model = build_model(dataclasses.replace(config, dilated_conv=implementation), architecture, seed=0)
        model.eval()
        graphdef, state = nnx.split(model)
        dilations[implementation] = _dilations_in(lambda s, x: nnx.merge(graphdef, s)(x)[0], state, images)
    assert any(d != (1, 1) for d in dilations["xla"])  # the backbone and heads do dilate
    assert dilations["auto"] and all(d == (1, 1) for d in dilations["auto"])


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_bfloat16_products_take_bfloat16_operands_forward_and_backward(implementation):
    # A float32 operand in the backward pass would make the GPU compute that product in float32: JAX's transpose
    # of a product whose preferred type is float32 meets a float32 cotangent and widens the other operand.
    x = jnp.ones((2, 36, 48, 8), jnp.bfloat16)
    kernel = jnp.ones((3, 3, 8, 4), jnp.bfloat16)
    for rate in (2, 24, 36):  # sub-images throughout on CPUs; per-tap products at 24 and 36
        convolution = _same_dilated(atrous.DILATED_CONVS[implementation], (rate, rate), (3, 3))
        loss = lambda x, w: jnp.sum(convolution(x, w).astype(jnp.float32))
        jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(x, kernel).jaxpr
        products = [e for e in jaxpr.eqns if e.primitive.name in ("dot_general", "conv_general_dilated")]
        assert products
        assert all(v.aval.dtype == jnp.bfloat16 for e in products for v in e.invars), [
            (e.primitive.name, [str(v.aval) for v in e.invars]) for e in products]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_same_sized_calls_that_are_not_symmetric_nhwc_same_convolutions_are_passed_through(implementation):
    """Calls the forms must not take for a "same" dilated convolution although each has a dilated kernel: one-sided
    padding along one axis (as many rows in all as "same" padding, so the output keeps the input's height but is
    shifted; or "same" on one side only), an even kernel, input dilation, a batch-grouped call and a channels-first
    layout. Each must give ``lax``'s own result."""
    x = jax.random.normal(jax.random.key(3), (2, 9, 11, 3))
    kernel = jax.random.normal(jax.random.key(4), (3, 3, 3, 4))
    even = jax.random.normal(jax.random.key(5), (4, 4, 3, 4))
    function = atrous.DILATED_CONVS[implementation]
    calls = [(x, kernel, dict(padding=((4, 0), (2, 2)), rhs_dilation=(2, 2))),
             (x, kernel, dict(padding=((2, 0), (2, 2)), rhs_dilation=(2, 2))),
             (x, even, dict(padding=((2, 2), (2, 2)), rhs_dilation=(2, 2))),
             (x, kernel, dict(padding=((2, 2), (2, 2)), lhs_dilation=(2, 2), rhs_dilation=(2, 2))),
             (x, kernel, dict(padding=((2, 2), (2, 2)), rhs_dilation=(2, 2), batch_group_count=2))]
    for lhs, rhs, call in calls:
        numbers = _numbers(lhs, rhs)
        expected = lax.conv_general_dilated(lhs, rhs, (1, 1), dimension_numbers=numbers, **call)
        np.testing.assert_array_equal(function(lhs, rhs, (1, 1), dimension_numbers=numbers, **call), expected)
    # Channels first (NCHW, OIHW), 3 channels and 3 outputs: read as NHWC, HWIO it would look like a 3×3 kernel.
    lhs, rhs = x.transpose(0, 3, 1, 2), kernel[..., :3].transpose(3, 2, 0, 1)
    numbers = lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NCHW", "OIHW", "NCHW"))
    call = dict(padding=((2, 2), (2, 2)), rhs_dilation=(2, 2), dimension_numbers=numbers)
    np.testing.assert_array_equal(function(lhs, rhs, (1, 1), **call), lax.conv_general_dilated(lhs, rhs, (1, 1),
                                                                                               **call))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_a_requested_precision_reaches_every_product(implementation):
    """``nnx.Conv`` hands its ``precision`` on. The CPU computes float32 products alike at every precision, so the
    program is what can be checked: on a GPU a product left at the default precision would silently round its
    float32 operands (TF32 on NVIDIA GPUs). Sub-images at rate 2, per-tap products at 24 and 36 (for ``auto``)."""
    x, kernel = jnp.ones((1, 36, 48, 4)), jnp.ones((3, 3, 4, 2))
    for rate in (2, 24, 36):
        call = dict(window_strides=(1, 1), padding=((rate, rate), (rate, rate)), rhs_dilation=(rate, rate),
                    dimension_numbers=_numbers(x, kernel), precision=lax.Precision.HIGHEST)
        jaxpr = jax.make_jaxpr(lambda x, w: atrous.DILATED_CONVS[implementation](x, w, **call))(x, kernel).jaxpr
        products = [e for e in jaxpr.eqns if e.primitive.name in ("dot_general", "conv_general_dilated")]
        assert products
        assert all(e.params["precision"] == (lax.Precision.HIGHEST,) * 2 for e in products), rate


def test_conv_flops_counts_every_tap_of_the_dense_convolution():
    # bench_atrous reports GFLOP/s against it: 2 · B · H · W · kh · kw · C_in · C_out, padding taps included.
    assert atrous.conv_flops((2, 36, 48, 8), (3, 5, 8, 4)) == 2 * 2 * 36 * 48 * 3 * 5 * 8 * 4
