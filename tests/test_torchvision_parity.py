"""The backbone against torchvision itself: same weights, same features.

Needs torch and torchvision, which are not dependencies of this project (``pip install torch torchvision``, or the
``torch`` extra for the converter alone); without them these tests are skipped, and the README says where they ran.
Random weights stand in for the ImageNet ones (nothing downloads): a torchvision ResNet-50 dilated to output
stride 8, with randomised BatchNorm statistics, is saved as a ``.pth``, converted with ``deep.weights``, loaded into
``deep.backbone.ResNet``, and both compute the four stage outputs of the same image in eval mode.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from deep.backbone import BackboneConfig, ResNet  # noqa: E402
from deep.weights import convert_pth_to_npz, load_torchvision_npz  # noqa: E402


def torchvision_stages(model, images_nchw):
    x = model.maxpool(model.relu(model.bn1(model.conv1(images_nchw))))
    outputs = []
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        x = layer(x)
        outputs.append(x)
    return outputs


def test_converted_torchvision_resnet50_gives_the_same_features(tmp_path):
    torch.manual_seed(0)
    reference = torchvision.models.resnet50(weights=None, replace_stride_with_dilation=[False, True, True])
    with torch.no_grad():  # non-trivial BatchNorm statistics and affine parameters, so eval mode is really tested
        for module in reference.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    reference.eval()
    torch.save(reference.state_dict(), tmp_path / "resnet50.pth")
    convert_pth_to_npz(tmp_path / "resnet50.pth", tmp_path / "resnet50.npz")

    backbone = ResNet(BackboneConfig(), nnx.Rngs(0))
    load_torchvision_npz(backbone, tmp_path / "resnet50.npz")
    backbone.eval()

    images = np.random.default_rng(0).uniform(size=(2, 64, 80, 3)).astype(np.float32)
    with torch.no_grad():
        expected = [t.permute(0, 2, 3, 1).numpy() for t in torchvision_stages(reference,
                                                                            torch.from_numpy(images).permute(0, 3, 1, 2))]
    with jax.default_matmul_precision("highest"):
        got = [np.asarray(x) for x in backbone(jnp.asarray(images))]
    for stage, (g, e) in enumerate(zip(got, expected), start=1):
        assert g.shape == e.shape, f"layer{stage}: {g.shape} vs torchvision {e.shape}"
        relative = np.linalg.norm(g - e) / np.linalg.norm(e)
        assert relative < 1e-4, f"layer{stage}: relative difference {relative:.2e} from torchvision"
