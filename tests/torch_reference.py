"""What PyTorch's own code computes, recorded once, so that every test run checks the port against it without
torch (``tests/test_torch_reference.py``).

``python tests/torch_reference.py`` rewrites ``tests/data/torch_reference.npz``; it needs torch, torchvision and
lpips (``pip install torch torchvision lpips``), and nothing downloads: the weights are random. Every weight and
input is generated here with numpy from fixed seeds (uniform draws, which numpy's generators keep stable across
versions), so the tests rebuild them bit for bit; torch only computes the outputs. Recorded:

- ``backbone_layer1..4``: torchvision's ``resnet50(replace_stride_with_dilation=[False, True, True])`` in eval mode,
  with random weights and BatchNorm statistics, on two 48×64 images: each stage's output ``[B, H, W, C]`` times a
  fixed random ``[C, 16]`` matrix (:func:`projection`). A wrong channel, tap, stride, dilation or padding changes
  it, and the file stays small.
- ``lpips_distance``: ``lpips.LPIPS(net="vgg", version="0.1")`` with random VGG16 and linear weights, for three
  pairs of 40×56 images in [-1, 1].
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "tests" / "data" / "torch_reference.npz"
PROJECTED_CHANNELS = 16
STAGES = ("layer1", "layer2", "layer3", "layer4")


def _generator(seed: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(seed))


def _he_uniform(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """A PyTorch-layout kernel ``[C_out, C_in, kH, kW]`` at He scale, so activations neither vanish nor explode."""
    bound = np.sqrt(6.0 / np.prod(shape[1:]))
    return rng.uniform(-bound, bound, size=shape)


def backbone_arrays() -> dict[str, np.ndarray]:
    """ResNet-50's 265 torchvision backbone arrays (``fc`` and ``num_batches_tracked`` aside), keyed and shaped as
    torchvision's state dict: He-scaled kernels, BatchNorm statistics and affine parameters far from the
    identity (so eval mode is really exercised)."""
    from flax import nnx

    from deep.backbone import resnet50
    from deep.weights import torchvision_shapes

    shapes = torchvision_shapes(nnx.eval_shape(lambda: resnet50(nnx.Rngs(0))))
    rng, arrays = _generator(50), {}
    for key in sorted(shapes):
        shape, leaf = shapes[key], key.rsplit(".", 1)[1]
        if len(shape) == 4:
            value = _he_uniform(rng, shape)
        else:  # a BatchNorm's
            low, high = {"running_mean": (-0.5, 0.5), "running_var": (0.5, 2.0), "weight": (0.5, 1.5),
                         "bias": (-0.2, 0.2)}[leaf]
            value = rng.uniform(low, high, size=shape)
        arrays[key] = value.astype(np.float32)
    return arrays


def backbone_images() -> np.ndarray:
    """Two ``[48, 64, 3]`` images in [0, 1] (NHWC): a non-square grid, so swapped axes show."""
    return _generator(1).uniform(size=(2, 48, 64, 3)).astype(np.float32)


def lpips_arrays() -> dict[str, np.ndarray]:
    """LPIPS-VGG's 31 arrays, keyed and shaped as :func:`deep.perceptual.lpips_shapes`: He-scaled VGG16 kernels,
    small biases, nonnegative linear weights."""
    from deep.perceptual import lpips_shapes

    rng, arrays = _generator(16), {}
    for key, shape in sorted(lpips_shapes().items()):
        if key.startswith("lin"):
            value = rng.uniform(0.0, 1.0, size=shape)
        elif len(shape) == 4:
            value = _he_uniform(rng, shape)
        else:
            value = rng.uniform(-0.1, 0.1, size=shape)
        arrays[key] = value.astype(np.float32)
    return arrays


def lpips_images() -> tuple[np.ndarray, np.ndarray]:
    """Three pairs of ``[40, 56, 3]`` images in [-1, 1] (NHWC), the second a perturbed copy of the first."""
    rng = _generator(2)
    x = rng.uniform(-1.0, 1.0, size=(3, 40, 56, 3))
    y = np.clip(x + rng.uniform(-0.6, 0.6, size=x.shape), -1.0, 1.0)
    return x.astype(np.float32), y.astype(np.float32)


def projection(channels: int) -> np.ndarray:
    """The fixed ``[channels, 16]`` matrix a stage's output is recorded through (float64)."""
    return _generator(channels).uniform(-1.0, 1.0, size=(channels, PROJECTED_CHANNELS)) / np.sqrt(channels)


def project(stage_output: np.ndarray) -> np.ndarray:
    """``[B, H, W, C]`` -> ``[B, H, W, 16]``, in float64."""
    return np.asarray(stage_output, np.float64) @ projection(stage_output.shape[-1])


def compute_reference() -> dict[str, np.ndarray]:
    """The recorded arrays, computed now with torch (float32, on the CPU)."""
    from importlib.metadata import version

    import lpips
    import torch
    import torchvision

    reference = {"versions": np.array(f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
                                      f"lpips {version('lpips')}")}

    resnet = torchvision.models.resnet50(weights=None, replace_stride_with_dilation=[False, True, True])
    reference.update({f"backbone_{stage}": project(output)
                      for stage, output in zip(STAGES, _torchvision_stages(torch, resnet))})

    model = lpips.LPIPS(pretrained=False, net="vgg", version="0.1", pnet_rand=True, verbose=False)
    arrays, state, used = lpips_arrays(), model.state_dict(), set()
    for name in state:
        if name.startswith("net.slice"):  # net.slice<k>.<torchvision index>.<leaf> -> features.<index>.<leaf>
            _, _, index, leaf = name.split(".")
            key = f"features.{index}.{leaf}"
        elif name.startswith(("lin", "lins.")):  # lins.<l>.* is the same module as lin<l>.*
            key = name.replace("lins.", "lin", 1)
        else:
            continue  # the ScalingLayer's constants
        state[name] = torch.from_numpy(arrays[key])
        used.add(key)
    assert used == set(arrays), f"arrays LPIPS has no place for: {sorted(set(arrays) - used)}"
    model.load_state_dict(state)
    model.eval()
    x, y = lpips_images()
    with torch.no_grad():
        distance = model(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(y).permute(0, 3, 1, 2))
    reference["lpips_distance"] = distance.numpy().reshape(-1).astype(np.float64)
    return reference


def _torchvision_stages(torch, resnet) -> list[np.ndarray]:
    arrays, state = backbone_arrays(), resnet.state_dict()
    unused = {key for key in state if key.startswith("fc.") or key.endswith("num_batches_tracked")}
    assert set(arrays) == set(state) - unused, set(arrays) ^ (set(state) - unused)
    resnet.load_state_dict({**state, **{key: torch.from_numpy(value) for key, value in arrays.items()}})
    resnet.eval()
    x = torch.from_numpy(backbone_images()).permute(0, 3, 1, 2)
    outputs = []
    with torch.no_grad():
        x = resnet.maxpool(resnet.relu(resnet.bn1(resnet.conv1(x))))
        for stage in STAGES:
            x = getattr(resnet, stage)(x)
            outputs.append(x.permute(0, 2, 3, 1).numpy())
    return outputs


def main() -> int:
    sys.path.insert(0, str(ROOT))
    from deep.weights import write_atomically

    reference = compute_reference()
    REFERENCE.parent.mkdir(exist_ok=True)
    write_atomically(REFERENCE, lambda file: np.savez_compressed(file, **reference))
    print(f"wrote {REFERENCE.relative_to(ROOT)} ({REFERENCE.stat().st_size} bytes; {reference['versions']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
