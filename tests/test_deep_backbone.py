"""The dilated ResNet backbone: shapes, torchvision's dilation pattern and parameter count, key names, BN modes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deep.backbone import BackboneConfig, ResNet, torchvision_key

TINY = BackboneConfig(depths=(1, 1, 2, 2), width=4)


@pytest.fixture(scope="module")
def tiny_model():
    return ResNet(TINY, nnx.Rngs(0))


def test_output_shapes_and_stride_8(tiny_model):
    c1, c2, c3, c4 = tiny_model(jnp.ones((2, 40, 56, 3), jnp.float32))
    assert c1.shape == (2, 10, 14, 16) and c2.shape == (2, 5, 7, 32)
    assert c3.shape == (2, 5, 7, 64) and c4.shape == (2, 5, 7, 128)
    assert TINY.output_stride == 8 and BackboneConfig(replace_stride_with_dilation=(False, False, False)).output_stride \
        == 32


def test_dilation_pattern_is_torchvisions(tiny_model):
    dilations = [[block.conv2.kernel_dilation[0] for block in stage]
                 for stage in (tiny_model.layer1, tiny_model.layer2, tiny_model.layer3, tiny_model.layer4)]
    strides = [[block.conv2.strides[0] for block in stage]
               for stage in (tiny_model.layer1, tiny_model.layer2, tiny_model.layer3, tiny_model.layer4)]
    assert dilations == [[1], [1], [1, 2], [2, 4]]
    assert strides == [[1], [2], [1, 1], [1, 1]]
    assert tiny_model.layer3[0].conv2.padding == ((1, 1), (1, 1)) and tiny_model.layer4[1].conv2.padding == ((4, 4),
                                                                                                          (4, 4))


def test_full_resnet50_has_torchvisions_parameter_count():
    model = nnx.eval_shape(lambda: ResNet(BackboneConfig(), nnx.Rngs(0)))
    params = nnx.state(model, nnx.Param)
    assert sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params)) == 23_508_032  # resnet50 minus its fc layer


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
