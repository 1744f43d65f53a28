"""The dilated ResNet backbone: shapes, torchvision's dilation pattern and parameter count, key names, BN modes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deep.backbone import RESNET18, BackboneConfig, ResNet, batch_norm, torchvision_key

TINY = BackboneConfig(depths=(1, 1, 2, 2), width=4)


@pytest.fixture(scope="module")
def tiny_model():
    return ResNet(TINY, nnx.Rngs(0))


def test_output_shapes_and_stride_8(tiny_model):
    c1, c2, c3, c4 = tiny_model(jnp.ones((2, 40, 56, 3), jnp.float32))
    assert c1.shape == (2, 10, 14, 16) and c2.shape == (2, 5, 7, 32)
    assert c3.shape == (2, 5, 7, 64) and c4.shape == (2, 5, 7, 128)
    undilated = BackboneConfig(replace_stride_with_dilation=(False, False, False))
    assert TINY.output_stride == 8 and undilated.output_stride == 32


def test_dilation_pattern_is_torchvisions(tiny_model):
    dilations = [[block.conv2.kernel_dilation[0] for block in stage]
                 for stage in (tiny_model.layer1, tiny_model.layer2, tiny_model.layer3, tiny_model.layer4)]
    strides = [[block.conv2.strides[0] for block in stage]
               for stage in (tiny_model.layer1, tiny_model.layer2, tiny_model.layer3, tiny_model.layer4)]
    assert dilations == [[1], [1], [1, 2], [2, 4]]
    assert strides == [[1], [2], [1, 1], [1, 1]]
    assert tiny_model.layer3[0].conv2.padding == ((1, 1), (1, 1)) and tiny_model.layer4[1].conv2.padding == ((4, 4),
                                                                                                          (4, 4))


def test_dilating_layer2_too_keeps_the_stride_4_grid_with_torchvisions_dilations():
    """``replace_stride_with_dilation=(True, True, True)`` (output stride 4), the first flag's only use: torchvision's
    rule holds there as in layers 3-4 (a stage's first block at the previous dilation, the others at twice it), every
    stage stays on c1's grid, and ``output_stride`` says 4. Shapes only (``jax.eval_shape``): nothing is computed."""
    config = BackboneConfig(depths=(1, 2, 2, 2), width=2, replace_stride_with_dilation=(True, True, True))
    model = nnx.eval_shape(lambda: ResNet(config, nnx.Rngs(0)))
    stages = (model.layer1, model.layer2, model.layer3, model.layer4)
    assert [[block.conv2.kernel_dilation[0] for block in stage] for stage in stages] == [[1], [1, 2], [2, 4], [4, 8]]
    assert all(block.conv2.strides == (1, 1) for stage in stages for block in stage)
    assert config.output_stride == 4
    assert BackboneConfig(replace_stride_with_dilation=(False, True, False)).output_stride == 16
    shapes = jax.eval_shape(lambda x: ResNet(config, nnx.Rngs(0))(x), jax.ShapeDtypeStruct((1, 40, 56, 3), jnp.float32))
    assert [shape.shape[1:3] for shape in shapes] == [(10, 14)] * 4


def test_full_resnet50_has_torchvisions_parameter_count():
    model = nnx.eval_shape(lambda: ResNet(BackboneConfig(), nnx.Rngs(0)))
    params = nnx.state(model, nnx.Param)
    assert sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params)) == 23_508_032  # resnet50 minus its fc layer


def test_resnet18_has_torchvisions_parameter_count_and_output_stride_32():
    model = nnx.eval_shape(lambda: ResNet(RESNET18, nnx.Rngs(0)))
    params = nnx.state(model, nnx.Param)
    assert sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params)) == 11_176_512  # resnet18 minus its fc layer
    assert RESNET18.output_stride == 32 and RESNET18.output_channels == (64, 128, 256, 512)
    assert model.layer2[0].conv1.strides == (2, 2) and model.layer2[0].downsample is not None
    assert model.layer1[0].downsample is None  # 64 -> 64 channels at stride 1: the identity shortcut


def test_basic_blocks_refuse_dilation():
    with pytest.raises(ValueError, match="basic blocks .* no dilated form"):
        BackboneConfig(block="basic")  # the default dilates stages 3 and 4
    with pytest.raises(ValueError, match="block must be one of bottleneck, basic"):
        BackboneConfig(block="wide")


def test_variables_map_to_torchvision_state_dict_keys(tiny_model):
    keys = {torchvision_key(path) for path, _ in nnx.to_flat_state(nnx.state(tiny_model))}
    assert {"conv1.weight", "bn1.running_var", "layer1.0.downsample.0.weight", "layer1.0.downsample.1.weight",
            "layer3.1.conv2.weight", "layer4.0.bn3.running_mean"} <= keys
    assert not any("downsample.conv" in k or "downsample.bn" in k for k in keys)
    with pytest.raises(ValueError, match="no torchvision counterpart"):
        torchvision_key(("conv1", "unknown"))


def test_batch_norm_train_and_eval_modes():
    model = ResNet(TINY, nnx.Rngs(1))
    x = jax.random.normal(jax.random.key(0), (4, 24, 24, 3), jnp.float32)
    before = np.asarray(model.bn1.mean[...])
    model.eval()
    eval_out = model(x)[3]
    np.testing.assert_array_equal(model.bn1.mean[...], before)  # running statistics untouched in eval mode
    model.train()
    train_out = model(x)[3]
    assert not np.allclose(model.bn1.mean[...], before)  # updated with momentum 0.9
    assert not np.allclose(eval_out, train_out)


@pytest.mark.parametrize("shape", [(16, 1, 1, 5), (3, 4, 6, 5), (2, 1, 1, 5)])
def test_batch_norm_keeps_pytorchs_running_statistics(shape):
    """PyTorch's BatchNorm2d (momentum 0.1): the running variance averages the batch's unbiased variance, the output
    is normalised with the biased one; eval mode reads the running statistics. Flax's own BatchNorm would store the
    biased variance, 15/16 of this at the image-pooling shape (16, 1, 1, C)."""
    norm = batch_norm(shape[-1], nnx.Rngs(0))
    norm.scale[...] = jnp.linspace(0.5, 1.5, shape[-1], dtype=jnp.float32)  # the suite runs with x64 on
    norm.bias[...] = jnp.linspace(-1.0, 1.0, shape[-1], dtype=jnp.float32)
    rng = np.random.default_rng(0)
    running_mean, running_var = np.zeros(shape[-1]), np.ones(shape[-1])
    for step in range(3):
        x = rng.normal(2.0, 3.0, size=shape).astype(np.float32)
        flat = x.reshape(-1, shape[-1]).astype(np.float64)
        mean, biased = flat.mean(axis=0), flat.var(axis=0)
        expected = (x - mean) / np.sqrt(biased + 1e-5) * np.asarray(norm.scale[...]) + np.asarray(norm.bias[...])
        np.testing.assert_allclose(norm(jnp.asarray(x), use_running_average=False), expected, rtol=1e-4, atol=1e-4)
        running_mean = 0.9 * running_mean + 0.1 * mean
        running_var = 0.9 * running_var + 0.1 * flat.var(axis=0, ddof=1)
        np.testing.assert_allclose(norm.mean[...], running_mean, rtol=1e-5)
        np.testing.assert_allclose(norm.var[...], running_var, rtol=1e-5)
    x = rng.normal(size=shape).astype(np.float32)
    expected = ((x - running_mean) / np.sqrt(running_var + 1e-5) * np.asarray(norm.scale[...])
                + np.asarray(norm.bias[...]))
    np.testing.assert_allclose(norm(jnp.asarray(x), use_running_average=True), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(norm.var[...], running_var, rtol=1e-5)  # eval mode leaves it


# Flax's own layer, the reference here, stores a float64 batch's statistics into float32 with a scatter that warns.
@pytest.mark.filterwarnings("ignore:scatter inputs have incompatible types:FutureWarning")
@pytest.mark.parametrize("layer_dtype, input_dtype", [(None, jnp.float32), (jnp.bfloat16, jnp.float32),
                                                      (jnp.bfloat16, jnp.bfloat16), (None, jnp.float64)])
def test_batch_norm_computes_as_flax_does_and_keeps_its_statistics_dtype(layer_dtype, input_dtype):
    """The call is written out (not inherited, see the class docstring): against ``nnx.BatchNorm`` with the same
    settings, the same output and output dtype in training and eval mode, Flax's running mean, Flax's running
    variance times n/(n − 1), and statistics still stored in float32 (a float64 batch, as x64 allows, would
    otherwise turn them into float64 and change the state's structure after one step)."""
    ours, flax_norm = batch_norm(5, nnx.Rngs(0)), nnx.BatchNorm(5, momentum=0.9, epsilon=1e-5, rngs=nnx.Rngs(0))
    for norm in (ours, flax_norm):
        norm.dtype = layer_dtype
        norm.scale.set_value(jnp.linspace(0.5, 1.5, 5, dtype=jnp.float32))
        norm.bias.set_value(jnp.linspace(-1.0, 1.0, 5, dtype=jnp.float32))
    x = jnp.asarray(np.random.default_rng(0).normal(2.0, 3.0, (3, 4, 6, 5)), input_dtype)
    n = 3 * 4 * 6
    for _ in range(2):
        got, expected = ours(x, use_running_average=False), flax_norm(x, use_running_average=False)
        assert got.dtype == expected.dtype
        np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(expected, np.float64), rtol=1e-6, atol=1e-6)
    assert ours.mean.get_value().dtype == ours.var.get_value().dtype == jnp.float32
    np.testing.assert_allclose(ours.mean.get_value(), flax_norm.mean.get_value(), rtol=1e-6)
    # After two steps from 1: Flax's 0.81 + 0.19 v, PyTorch's 0.81 + 0.19 v n/(n - 1).
    flax_batch_part = flax_norm.var.get_value() - 0.81
    np.testing.assert_allclose(ours.var.get_value() - 0.81, flax_batch_part * n / (n - 1), rtol=1e-5)
    got, expected = ours(x, use_running_average=True), nnx.BatchNorm.__call__(ours, x, use_running_average=True)
    assert got.dtype == expected.dtype
    np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(expected, np.float64), rtol=1e-6, atol=1e-6)


def test_batch_norm_refuses_the_options_it_does_not_implement():
    from deep.backbone import BatchNorm

    with pytest.raises(ValueError, match="BatchNorm here supports nnx.BatchNorm's defaults for axis_name, use_bias"):
        BatchNorm(4, axis_name="batch", use_bias=False, rngs=nnx.Rngs(0))


def test_config_refuses_shapes_it_cannot_build():
    """Each check of ``BackboneConfig``: a stage of no blocks, three stages, a zero width or input channels, and two
    dilation flags (layer4's flag would be looked up out of range when the ResNet is built)."""
    for bad in (dict(depths=(1, 1, 0, 1)), dict(depths=(1, 1, 1))):
        with pytest.raises(ValueError, match="depths must be four integers >= 1"):
            BackboneConfig(**bad)
    for bad in (dict(width=0), dict(input_channels=0)):
        with pytest.raises(ValueError, match="width and input_channels must be >= 1"):
            BackboneConfig(**bad)
    with pytest.raises(ValueError, match="must hold three booleans"):
        BackboneConfig(replace_stride_with_dilation=(True, True))


def test_a_strided_block_projects_its_shortcut_even_when_its_channels_do_not_change():
    """torchvision's rule: a projection shortcut when the stride is not 1 *or* the channels change. Inside the ResNet
    every strided block also changes its channels, so only blocks built on their own show the first half (an identity
    shortcut there would add a map of twice the size). Abstract modules: nothing is drawn."""
    from deep.backbone import BasicBlock, Bottleneck

    bottleneck = nnx.eval_shape(lambda: Bottleneck(16, 4, 2, 1, nnx.Rngs(0)))  # 16 -> 4 × 4 channels, stride 2
    basic = nnx.eval_shape(lambda: BasicBlock(8, 8, 2, 1, nnx.Rngs(0)))
    for block in (bottleneck, basic):
        assert block.downsample is not None and block.downsample.conv.strides == (2, 2)
    assert nnx.eval_shape(lambda: Bottleneck(16, 4, 1, 2, nnx.Rngs(0))).downsample is None  # same size: identity


def test_an_explicit_use_running_average_overrides_the_layers_mode():
    """The call's ``use_running_average`` wins over ``model.train()`` / ``model.eval()`` either way: asked for the
    batch's statistics in eval mode the layer normalises with them and updates its running ones; asked for the
    running ones in training mode it reads them (fresh: mean 0, variance 1) and leaves them."""
    norm = batch_norm(3, nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(1).normal(2.0, 3.0, (2, 3, 4, 3)), jnp.float32)
    norm.eval()
    out = norm(x, use_running_average=False)
    np.testing.assert_allclose(np.asarray(out).mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(norm.mean[...], 0.1 * np.asarray(x).mean(axis=(0, 1, 2)), rtol=1e-5)
    norm = batch_norm(3, nnx.Rngs(0))
    norm.train()
    np.testing.assert_allclose(norm(x, use_running_average=True), x / np.sqrt(1 + 1e-5), rtol=1e-6)
    np.testing.assert_array_equal(norm.mean[...], 0.0)


def test_batch_norm_trains_on_constant_channels_and_on_one_value_per_channel():
    """Two edge cases of the batch statistics. A constant channel: E[x²] − E[x]² rounds below zero in float32 (about
    −7.6e-5 at 10.1, past epsilon), which the clip at 0 keeps from giving NaN; such a channel comes out as its bias.
    One value per channel (batch 1 in the ASPP's image-pooling branch): there is no unbiased variance (n − 1 = 0), so
    the biased one, 0, enters the running variance (PyTorch refuses such a batch instead)."""
    norm = batch_norm(2, nnx.Rngs(0))
    norm.bias.set_value(jnp.asarray([0.5, -0.5], jnp.float32))
    varying = np.random.default_rng(2).normal(size=(4, 3, 5))
    x = jnp.asarray(np.stack([np.full((4, 3, 5), 10.1), varying], axis=-1), jnp.float32)
    out = np.asarray(norm(x, use_running_average=False))
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out[..., 0], 0.5, atol=1e-3)
    single = batch_norm(2, nnx.Rngs(0))
    out = single(jnp.asarray([[[[3.0, -1.0]]]], jnp.float32), use_running_average=False)
    np.testing.assert_allclose(out, 0.0, atol=1e-6)  # x − mean = 0, times scale 1, plus bias 0
    np.testing.assert_allclose(single.var[...], 0.9, rtol=1e-6)  # 0.9 · 1 + 0.1 · 0
    np.testing.assert_allclose(single.mean[...], [0.3, -0.1], rtol=1e-6)
