"""What PyTorch's own code computes, recorded once, so that every test run checks the port against it without
torch (``tests/test_torch_reference.py``).

``python tests/torch_reference.py`` rewrites ``tests/data/torch_reference.npz``; it needs torch, torchvision, lpips
and LibMTL (``pip install torch torchvision lpips`` and ``pip install --no-deps LibMTL==1.1.5``, PyPI's latest,
whose pinned dependencies are years old), and nothing downloads: the weights are random. Every weight and input is
generated here with numpy from fixed seeds (uniform draws from PCG64, which have not changed across numpy
versions so far; numpy does not promise it, and a change would fail the tests loudly, not pass them), so the tests
rebuild them; torch only computes the outputs. Recorded:

- ``backbone_layer1..4``: torchvision's ``resnet50(replace_stride_with_dilation=[False, True, True])`` in eval mode,
  with random weights and BatchNorm statistics, on two 48×64 images: each stage's output ``[B, H, W, C]`` times a
  fixed random ``[C, 16]`` matrix (:func:`projection`). A wrong channel, tap, stride, dilation or padding changes
  it, and the file stays small. ``resnet18_layer1..4``: torchvision's ``resnet18()`` (basic blocks, output stride
  32, the CelebA backbone), the same way. LibMTL's own dilated ResNet-50 (``LibMTL.model.resnet_dilated``, MTAN's
  ``_nostride_dilate``), the backbone of LibMTL's published NYUv2 numbers, gives the same stages bit for bit with
  the same weights; recording asserts it.
- ``mtan_<task>``: LibMTL's MTAN encoder (``LibMTL.architecture.MTAN._transform_resnet_MTAN`` around the same
  torchvision ResNet-50) in eval mode, with random weights throughout, in float64: each task's attended stage-4 map
  (what its head reads) for two 48×64 images, projected as the backbone's stages are.
- ``lpips_distance``: ``lpips.LPIPS(net="vgg", version="0.1")`` with random VGG16 and linear weights, for three
  pairs of 40×56 images in [-1, 1].
- ``aspp_head``: torchvision's DeepLabV3 ``ASPP`` (rates 12/24/36, image pooling) followed by the tail of LibMTL's
  ``DeepLabHead`` (3×3 conv, BN, ReLU, 1×1 classifier; transcribed, since it lives in LibMTL's NYUv2 example and not
  in its package) in eval mode, on a 20×28 grid where most of the rate-24 and rate-36 taps read padding, as on
  NYUv2's 36×48.
- ``resize_<i>``, ``nearest_<i>``: ``F.interpolate`` (bilinear, ``align_corners`` False and True; nearest) at the
  ratios the port uses (:data:`RESIZE_CASES`, :data:`NEAREST_CASES`), computed in float64.
- ``batch_norm_<n>_*``: ``nn.BatchNorm2d`` (momentum 0.1, eps 1e-5) from random running statistics: one training
  step (its output and the running mean and unbiased variance it leaves), then eval mode on another input; for
  ``[4, 6, 8, 3]`` inputs and for ``[4, 1, 1, 3]``, the ASPP's image-pooling case where n = 4 makes the unbiased
  variance 4/3 of the biased one.
- ``instance_norm``: ``F.instance_norm`` (eps 1e-5, no affine, biased variance), on an input of variance 1e-4 so
  that the epsilon matters.
- ``group_norm``: ``F.group_norm`` (8 channels in 4 groups, affine, eps 1e-5), as the authors' DeepLabV3+ heads
  use; the input's variance is 1e-4 here too.
- ``cross_entropy``: ``F.cross_entropy(ignore_index=-1)`` over a map with ignored pixels.
- ``adam_l2``, ``adamw``: 12 steps (6 epochs of 2, warm-up 2) of ``torch.optim.Adam(weight_decay)`` (coupled L2,
  the authors') and ``torch.optim.AdamW`` after ``clip_grad_norm_``, with the authors' per-epoch learning rate:
  the warm-up set by hand, then ``CosineAnnealingLR(T_max=E-W, eta_min=0.01·lr)`` stepped after each epoch
  (reference/official_implementation.md; the warm-up is a transcription of the authors' formula, the clipping,
  Adam, AdamW and cosine annealing are torch's own); the parameters after every step, in float64.
- ``libmtl_<method>``: the update direction LibMTL's own weighting code (``LibMTL.weighting``, 1.1.5) leaves in the
  shared parameters' gradient, in float64, for losses whose gradients are the rows of a fixed Jacobian
  (:func:`balancing_inputs`): MGDA with each ``mgda_gn``, CAGrad with each ``rescale`` (K = 3, which 1.1.5's
  CAGrad hard-codes), IMTL, GLS, PCGrad (K = 2, where its random task order cannot matter), three steps of
  GradVac (K = 2; its targets carry over), DWA with one and two steps per epoch (``period`` 1 and 2) and three
  steps of UW (its log-variances stepped by SGD), with losses that change from step to step. For these, LibMTL's
  GitHub head differs from 1.1.5 only by MGDA's iteration cap, PCGrad's 1e-8 in a denominator and UW's
  log-variances held as a tensor that requires gradients instead of a ``Parameter`` (the same rule).
- ``libmtl_delta_p``: LibMTL's ``utils.count_improvement`` (its Δp, a fraction) for NYUv2's nine metrics with the
  ``weight`` lists of LibMTL's NYUv2 example (:data:`LIBMTL_NYUV2_METRICS`), between two made-up result sets.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "tests" / "data" / "torch_reference.npz"
PROJECTED_CHANNELS = 16
STAGES = ("layer1", "layer2", "layer3", "layer4")
ASPP_HEAD = (32, 16, 5)  # input channels, ASPP channels, classes; rates 12, 24, 36
# (input size, output size, align_corners): the port's ratios, on small grids.
RESIZE_CASES = (((9, 12), (18, 24), False),  # the decoders' x2
                ((18, 24), (9, 12), False),  # x1/2: the fusion's c1, the deep-supervision targets
                ((5, 6), (40, 48), False),  # x8
                ((16, 16), (36, 48), False),  # the albedo's square map to the image: x2.25, x3
                ((9, 12), (18, 24), True),  # the heads' 1/8 -> 1/4
                ((9, 12), (36, 48), True),  # and 1/4 -> the image
                ((5, 7), (12, 4), True),  # up along one axis, down along the other
                ((5, 7), (12, 4), False))
NEAREST_CASES = (((18, 24), (9, 12)), ((9, 12), (20, 30)), ((7, 5), (3, 11)))  # (input size, output size)
BATCH_NORM_SHAPES = ((4, 6, 8, 3), (4, 1, 1, 3))
OPTIMISER = {"learning_rate": 0.05, "weight_decay": 0.01, "clip_norm": 1.0, "epochs": 6, "warmup_epochs": 2,
             "steps_per_epoch": 2, "steps": 12}


def _generator(seed: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(seed))


def _he_uniform(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """A PyTorch-layout kernel ``[C_out, C_in, kH, kW]`` at He scale, so activations neither vanish nor explode."""
    bound = np.sqrt(6.0 / np.prod(shape[1:]))
    return rng.uniform(-bound, bound, size=shape)


def random_torch_arrays(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
    """Random float32 arrays for a PyTorch state dict's ``key -> shape`` (PyTorch layout), drawn in key order:
    He-scaled kernels, BatchNorm statistics and affine parameters far from the identity (so eval mode is really
    exercised; a module is a BatchNorm when it has a ``running_mean``), small convolution biases."""
    rng, arrays = _generator(seed), {}
    for key in sorted(shapes):
        shape, (module, leaf) = shapes[key], key.rsplit(".", 1)
        if len(shape) == 4:
            value = _he_uniform(rng, shape)
        elif f"{module}.running_mean" in shapes:
            low, high = {"running_mean": (-0.5, 0.5), "running_var": (0.5, 2.0), "weight": (0.5, 1.5),
                         "bias": (-0.2, 0.2)}[leaf]
            value = rng.uniform(low, high, size=shape)
        else:
            value = rng.uniform(-0.1, 0.1, size=shape)
        arrays[key] = value.astype(np.float32)
    return arrays


def backbone_arrays() -> dict[str, np.ndarray]:
    """ResNet-50's 265 torchvision backbone arrays (``fc`` and ``num_batches_tracked`` aside), keyed and shaped as
    torchvision's state dict (:func:`random_torch_arrays`)."""
    from flax import nnx

    from deep.backbone import resnet50
    from deep.weights import torchvision_shapes

    return random_torch_arrays(torchvision_shapes(nnx.eval_shape(lambda: resnet50(nnx.Rngs(0)))), seed=50)


def resnet18_arrays() -> dict[str, np.ndarray]:
    """ResNet-18's torchvision backbone arrays (``fc`` and ``num_batches_tracked`` aside), as
    :func:`backbone_arrays`."""
    from flax import nnx

    from deep.backbone import resnet18
    from deep.weights import torchvision_shapes

    return random_torch_arrays(torchvision_shapes(nnx.eval_shape(lambda: resnet18(nnx.Rngs(0)))), seed=18)


MTAN_TASKS = (("segmentation", 13), ("depth", 1))
_ATTENTION_INDEX = {"conv1": 0, "bn1": 1, "conv2": 3, "bn2": 4}  # LibMTL's Sequential(conv, BN, ReLU, conv, BN, σ)


def mtan_key(path: tuple) -> str | None:
    """The key in LibMTL's MTAN encoder of a :class:`deep.mtan.MTAN` variable's NNX path (``None`` for the ASPP
    heads, which LibMTL keeps outside the encoder)."""
    from deep.backbone import TORCH_LEAF, BackboneConfig, torchvision_key

    part, rest = path[0], path[1:]
    if part == "backbone":
        key = torchvision_key(rest)
        if key.startswith(("conv1.", "bn1.")):
            return f"shared_conv.{0 if key.startswith('conv1.') else 1}.{key.split('.', 1)[1]}"
        layer, block, tail = key.split(".", 2)  # layer<i>.<block>.<rest>: layer[:-1] then layer[-1]
        stage, last = int(layer[len("layer"):]) - 1, BackboneConfig().depths[int(layer[len("layer"):]) - 1] - 1
        return f"shared_layer.{stage}.0.{block}.{tail}" if int(block) < last else f"shared_layer.{stage}.1.{tail}"
    if part == "transitions":
        return f"encoder_block_att.{rest[0]}.{torchvision_key(rest[1:])}"
    task, kind = rest[0], rest[1]
    if kind != "attention":
        return None
    stage, module, leaf = rest[2], rest[3], rest[4]
    task_index = [name for name, _ in MTAN_TASKS].index(task)
    leaf = TORCH_LEAF[leaf]
    return f"encoder_att.{stage}.{task_index}.{_ATTENTION_INDEX[module]}.{leaf}"


def mtan_arrays() -> dict[str, np.ndarray]:
    """Every array of LibMTL's MTAN encoder for :data:`MTAN_TASKS`, keyed as its state dict (shapes from
    :class:`deep.mtan.MTAN` through :func:`mtan_key`; the recording checks them against LibMTL's own)."""
    from flax import nnx

    from deep.mtan import MTAN, MTANConfig
    from deep.weights import torch_shapes

    abstract = nnx.eval_shape(lambda: MTAN(MTANConfig(tasks=MTAN_TASKS), nnx.Rngs(0)))
    return random_torch_arrays(torch_shapes(abstract, mtan_key), seed=40)


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


def aspp_head_arrays() -> dict[str, np.ndarray]:
    """A DeepLabV3 head of :data:`ASPP_HEAD` (in, channels, classes), keyed as torchvision's ``ASPP`` inside
    LibMTL's ``DeepLabHead`` (``0.convs.*``, ``0.project.*``, ``1``, ``2``, ``4``; shapes from
    :class:`deep.heads.ASPPHead` through :func:`aspp_head_key`; the recording checks them against torchvision's)."""
    from flax import nnx

    from deep.heads import ASPPHead
    from deep.weights import torch_shapes

    in_channels, channels, classes = ASPP_HEAD
    abstract = nnx.eval_shape(lambda: ASPPHead(in_channels, classes, nnx.Rngs(0), channels=channels,
                                               rates=(12, 24, 36)))
    return random_torch_arrays(torch_shapes(abstract, aspp_head_key), seed=36)


def aspp_head_key(path: tuple) -> str:
    """The torchvision key of a :class:`deep.heads.ASPPHead` variable's NNX path (kernels HWIO there, OIHW here)."""
    from deep.backbone import TORCH_LEAF

    module, *index, leaf = path
    leaf = TORCH_LEAF[leaf]
    if module == "classifier":
        return f"4.{leaf}"
    conv_or_norm = index[-1]  # each branch is a (conv, BatchNorm) pair
    prefix = {"branch_1x1": lambda: f"0.convs.0.{conv_or_norm}",
              "branches_atrous": lambda: f"0.convs.{index[0] + 1}.{conv_or_norm}",
              "branch_pool": lambda: f"0.convs.4.{conv_or_norm + 1}",  # after the AdaptiveAvgPool2d
              "project": lambda: f"0.project.{conv_or_norm}",
              "refine": lambda: str(conv_or_norm + 1)}[module]()  # after the ASPP
    return f"{prefix}.{leaf}"


def aspp_head_features() -> np.ndarray:
    """Two ``[20, 28, in]`` feature maps (NHWC)."""
    return _generator(3).uniform(-1.0, 2.0, size=(2, 20, 28, ASPP_HEAD[0])).astype(np.float32)


def resize_input(index: int, size: tuple[int, int]) -> np.ndarray:
    """``[1, *size, 2]`` in [0, 1], float64."""
    return _generator(100 + index).uniform(size=(1, *size, 2))


def batch_norm_inputs(shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """The BatchNorm case of ``shape`` (NHWC): affine parameters, running statistics and two inputs, float64."""
    rng, channels = _generator(200 + int(np.prod(shape))), shape[-1]
    return {"weight": rng.uniform(0.5, 1.5, channels), "bias": rng.uniform(-0.2, 0.2, channels),
            "running_mean": rng.uniform(-0.5, 0.5, channels), "running_var": rng.uniform(0.5, 2.0, channels),
            "train_input": rng.uniform(-1.0, 3.0, shape), "eval_input": rng.uniform(-1.0, 3.0, shape)}


def instance_norm_input() -> np.ndarray:
    """``[2, 5, 7, 3]`` of variance about 1e-4, small enough that another epsilon shows."""
    return _generator(4).uniform(-0.01, 0.03, size=(2, 5, 7, 3))


def group_norm_inputs() -> dict[str, np.ndarray]:
    """An input ``[2, 5, 7, 8]`` and the affine parameters of its 8 channels (4 groups), float32. The input's
    variance (about 1e-4) is small enough that another epsilon (Flax's default 1e-6) shows."""
    rng = _generator(7)
    return {"input": rng.uniform(-0.01, 0.03, size=(2, 5, 7, 8)).astype(np.float32),
            "weight": rng.uniform(0.5, 1.5, 8).astype(np.float32), "bias": rng.uniform(-0.2, 0.2, 8).astype(np.float32)}


def cross_entropy_inputs() -> tuple[np.ndarray, np.ndarray]:
    """Logits ``[2, 5, 6, 7]`` (NHWC) and labels ``[2, 5, 6]`` in -1..6, about a sixth of them -1."""
    rng = _generator(5)
    labels = np.floor(rng.uniform(-1.5, 7.0, size=(2, 5, 6))).astype(np.int64)
    return rng.uniform(-3.0, 3.0, size=(2, 5, 6, 7)), np.maximum(labels, -1)


def optimiser_inputs() -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    """Initial parameters ``{"a": [4, 3], "b": [5]}`` and one gradient per step, float64 (large enough that clipping
    to norm 1 acts)."""
    rng = _generator(6)
    params = {"a": rng.uniform(-1.0, 1.0, (4, 3)), "b": rng.uniform(-1.0, 1.0, 5)}
    grads = [{"a": rng.uniform(-2.0, 2.0, (4, 3)), "b": rng.uniform(-2.0, 2.0, 5)} for _ in range(OPTIMISER["steps"])]
    return params, grads


def balancing_inputs() -> dict[str, np.ndarray]:
    """Jacobians ``[K, P]`` with conflicting rows and positive losses, float64: ``jacobian_3``/``losses_3`` (K = 3,
    P = 6), ``jacobian_2``/``losses_2`` (K = 2, P = 5), GradVac's later steps: ``jacobian_2_aligned``, whose
    rows agree (no correction, so only a target that moves on every visit moves), and ``jacobian_2_next``, in
    conflict again (its correction reads the targets); and ``losses_3_sequence`` ``[7, 3]``, the losses of
    successive steps for the methods that remember losses (DWA, UW)."""
    rng = _generator(9)
    jacobian_3 = rng.uniform(-1.0, 1.0, (3, 6))
    jacobian_3[1] -= 0.8 * jacobian_3[0]
    losses_3 = rng.uniform(0.5, 2.0, 3)
    jacobian_2 = rng.uniform(-1.0, 1.0, (2, 5))
    jacobian_2[1] -= 1.2 * jacobian_2[0]
    losses_2 = rng.uniform(0.5, 2.0, 2)
    aligned = rng.uniform(-1.0, 1.0, (2, 5))
    aligned[1] = aligned[0] + 0.5 * aligned[1]
    following = jacobian_2 + rng.uniform(-0.3, 0.3, jacobian_2.shape)
    return {"jacobian_3": jacobian_3, "losses_3": losses_3, "jacobian_2": jacobian_2, "losses_2": losses_2,
            "jacobian_2_aligned": aligned, "jacobian_2_next": following,
            "losses_3_sequence": rng.uniform(0.5, 2.0, (7, 3))}


def balancing_steps(method: str, tasks: int, inputs: dict[str, np.ndarray],
                    period: int = 1) -> list[tuple[np.ndarray, np.ndarray]]:
    """The ``(Jacobian, losses)`` of each step a case takes, from :func:`balancing_inputs`: GradVac three (its
    targets carry over), DWA three epochs of ``period`` steps and one step more (it weighs from the third epoch on,
    by the mean losses of the two before: two weighted epochs, since a constant shift of every ratio leaves the
    weights unchanged), UW three (its log-variances move), each of these two with losses that
    change from step to step; the others one."""
    if method == "GradVac":
        return [(inputs[name], inputs["losses_2"]) for name in ("jacobian_2", "jacobian_2_aligned", "jacobian_2_next")]
    if method in ("DWA", "UW"):
        count = 3 * period + 1 if method == "DWA" else 3
        return [(inputs["jacobian_3"], losses) for losses in inputs["losses_3_sequence"][:count]]
    return [(inputs[f"jacobian_{tasks}"], inputs[f"losses_{tasks}"])]


# name -> (LibMTL class, K, LibMTL's keyword arguments, this library's method and options).
LIBMTL_CASES = {
    **{f"mgda_{gn}": ("MGDA", 3, {"mgda_gn": gn}, "mgda", {"normalization": gn})
       for gn in ("none", "l2", "loss", "loss+")},
    **{f"cagrad_rescale_{rescale}": ("CAGrad", 3, {"calpha": 0.5, "rescale": rescale}, "cagrad",
                                     {"calpha": 0.5, "rescale": rescale}) for rescale in (0, 1, 2)},
    "imtl": ("IMTL", 3, {}, "imtl", {}),
    "gls": ("GLS", 3, {}, "gls", {}),
    "pcgrad": ("PCGrad", 2, {}, "pcgrad", {}),
    "gradvac": ("GradVac", 2, {"beta": 0.5}, "gradvac", {"beta": 0.5, "target_update": "on_conflict"}),
    # DWA with one training step per LibMTL epoch (period=1), and with two (period=2: LibMTL's epoch-mean losses are
    # then the means of two steps'); UW's log-variances stepped by plain SGD, the optimiser of ours.
    "dwa": ("DWA", 3, {"T": 2.0}, "dwa", {"temperature": 2.0, "period": 1}),
    "dwa_period_2": ("DWA", 3, {"T": 2.0}, "dwa", {"temperature": 2.0, "period": 2}),
    "uw": ("UW", 3, {}, "uw", {"learning_rate": 0.05}),
}


# LibMTL's NYUv2 example: each task's metrics in order, and its `weight` lists (1 where higher is better).
LIBMTL_NYUV2_METRICS = {"segmentation": (("miou", "pixel_accuracy"), (1, 1)),
                        "depth": (("abs_err", "rel_err"), (0, 0)),
                        "normal": (("mean", "median", "within_11.25", "within_22.5", "within_30"), (0, 0, 1, 1, 1))}


def nyuv2_results() -> tuple[dict[str, float], dict[str, float]]:
    """A baseline and a method's NYUv2 metrics (``"<task>/<metric>"``), made up near LibMTL's published EW row."""
    rng = _generator(10)
    baseline = {"segmentation/miou": 0.54, "segmentation/pixel_accuracy": 0.76, "depth/abs_err": 0.38,
                "depth/rel_err": 0.16, "normal/mean": 23.5, "normal/median": 17.2, "normal/within_11.25": 0.35,
                "normal/within_22.5": 0.61, "normal/within_30": 0.72}
    results = {name: value * rng.uniform(0.9, 1.1) for name, value in baseline.items()}
    return baseline, results


def projection(channels: int) -> np.ndarray:
    """The fixed ``[channels, 16]`` matrix a stage's output is recorded through (float64)."""
    return _generator(channels).uniform(-1.0, 1.0, size=(channels, PROJECTED_CHANNELS)) / np.sqrt(channels)


def project(stage_output: np.ndarray) -> np.ndarray:
    """``[B, H, W, C]`` -> ``[B, H, W, 16]``, in float64."""
    return np.asarray(stage_output, np.float64) @ projection(stage_output.shape[-1])


def compute_reference() -> dict[str, np.ndarray]:
    """The recorded arrays, computed now with torch (on the CPU; float32 unless the module docstring says float64)."""
    import warnings

    with warnings.catch_warnings():
        # lpips and LibMTL build torchvision models with the `pretrained=` argument torchvision deprecated in 0.13.
        warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
        return _compute_reference()


def _compute_reference() -> dict[str, np.ndarray]:
    from importlib.metadata import version

    import lpips
    import torch
    import torchvision

    reference = {"versions": np.array(f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
                                      f"lpips {version('lpips')}, LibMTL {version('LibMTL')}")}

    resnet = torchvision.models.resnet50(weights=None, replace_stride_with_dilation=[False, True, True])
    reference.update({f"backbone_{stage}": project(output)
                      for stage, output in zip(STAGES, _resnet_stages(torch, resnet, backbone_arrays()))})
    resnet18 = torchvision.models.resnet18(weights=None)
    reference.update({f"resnet18_{stage}": project(output)
                      for stage, output in zip(STAGES, _resnet_stages(torch, resnet18, resnet18_arrays()))})
    _import_libmtl(torch)
    from LibMTL.model.resnet_dilated import resnet_dilated

    # LibMTL's own dilated ResNet-50 (MTAN's _nostride_dilate on LibMTL's ResNet), the backbone of its published
    # NYUv2 numbers, is the same network: with the same weights, bit for bit the same stages.
    libmtl_stages = _resnet_stages(torch, resnet_dilated("resnet50", pretrained=False), backbone_arrays())
    for stage, output in zip(STAGES, libmtl_stages, strict=True):
        assert np.array_equal(project(output), reference[f"backbone_{stage}"]), f"LibMTL's {stage} differs"

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
    reference.update(_mtan(torch, torchvision))
    reference["aspp_head"] = _aspp_head(torch, torchvision)
    reference.update(_functional(torch))
    reference.update(_optimisers(torch))
    reference.update(_libmtl(torch))
    return reference


def _nchw(torch, x: np.ndarray):
    return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)


def _nhwc(x) -> np.ndarray:
    return x.permute(0, 2, 3, 1).detach().numpy()


def _mtan(torch, torchvision) -> dict[str, np.ndarray]:
    _import_libmtl(torch)
    from LibMTL.architecture.MTAN import _transform_resnet_MTAN

    resnet = torchvision.models.resnet50(weights=None, replace_stride_with_dilation=[False, True, True])
    resnet.feature_dim = 2048  # what LibMTL's ResNet wrappers carry, and _transform_resnet_MTAN reads
    encoder = _transform_resnet_MTAN(resnet, [name for name, _ in MTAN_TASKS], "cpu")
    state, arrays = encoder.state_dict(), mtan_arrays()
    unused = {key for key in state if key.endswith("num_batches_tracked")}
    assert set(arrays) == set(state) - unused, sorted(set(arrays) ^ (set(state) - unused))[:10]
    encoder.load_state_dict({**state, **{key: torch.from_numpy(value) for key, value in arrays.items()}})
    # In float64: through the attention masks and transitions of random weights, float32 rounding alone moves the
    # attended maps by about 1e-5 (torch's own float32 result is 1.0-1.2e-5 from this one).
    encoder.eval().double()
    with torch.no_grad():
        attended = encoder(_nchw(torch, backbone_images().astype(np.float64)))
    return {f"mtan_{name}": project(_nhwc(output)) for (name, _), output in zip(MTAN_TASKS, attended, strict=True)}


def _aspp_head(torch, torchvision) -> np.ndarray:
    from torchvision.models.segmentation.deeplabv3 import ASPP

    in_channels, channels, classes = ASPP_HEAD
    head = torch.nn.Sequential(ASPP(in_channels, [12, 24, 36], channels),
                               torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                               torch.nn.BatchNorm2d(channels), torch.nn.ReLU(), torch.nn.Conv2d(channels, classes, 1))
    state = head.state_dict()
    arrays = aspp_head_arrays()
    unused = {key for key in state if key.endswith("num_batches_tracked")}
    assert set(arrays) == set(state) - unused, set(arrays) ^ (set(state) - unused)
    head.load_state_dict({**state, **{key: torch.from_numpy(value) for key, value in arrays.items()}})
    head.eval()
    with torch.no_grad():
        return _nhwc(head(_nchw(torch, aspp_head_features()))).astype(np.float64)


def _functional(torch) -> dict[str, np.ndarray]:
    functional, recorded = torch.nn.functional, {}
    for index, (size_in, size_out, align_corners) in enumerate(RESIZE_CASES):
        x = _nchw(torch, resize_input(index, size_in))
        recorded[f"resize_{index}"] = _nhwc(functional.interpolate(x, size=size_out, mode="bilinear",
                                                                   align_corners=align_corners))
    for index, (size_in, size_out) in enumerate(NEAREST_CASES):
        x = _nchw(torch, resize_input(len(RESIZE_CASES) + index, size_in))
        recorded[f"nearest_{index}"] = _nhwc(functional.interpolate(x, size=size_out, mode="nearest"))
    for shape in BATCH_NORM_SHAPES:
        case, name = batch_norm_inputs(shape), f"batch_norm_{shape[1]}x{shape[2]}"
        norm = torch.nn.BatchNorm2d(shape[-1], momentum=0.1, eps=1e-5).double()
        with torch.no_grad():
            for leaf in ("weight", "bias", "running_mean", "running_var"):
                getattr(norm, leaf).copy_(torch.from_numpy(case[leaf]))
            norm.train()
            recorded[f"{name}_train_output"] = _nhwc(norm(_nchw(torch, case["train_input"])))
            recorded[f"{name}_running_mean"] = norm.running_mean.numpy().copy()
            recorded[f"{name}_running_var"] = norm.running_var.numpy().copy()
            norm.eval()
            recorded[f"{name}_eval_output"] = _nhwc(norm(_nchw(torch, case["eval_input"])))
    recorded["instance_norm"] = _nhwc(functional.instance_norm(_nchw(torch, instance_norm_input()), eps=1e-5))
    case = group_norm_inputs()
    weight, bias = torch.from_numpy(case["weight"]), torch.from_numpy(case["bias"])
    recorded["group_norm"] = _nhwc(functional.group_norm(_nchw(torch, case["input"]), 4, weight, bias,
                                                         eps=1e-5)).astype(np.float64)
    logits, labels = cross_entropy_inputs()
    recorded["cross_entropy"] = functional.cross_entropy(_nchw(torch, logits), torch.from_numpy(labels),
                                                         ignore_index=-1).numpy()
    return recorded


def _optimisers(torch) -> dict[str, np.ndarray]:
    recorded = {}
    base, epochs, warmup = OPTIMISER["learning_rate"], OPTIMISER["epochs"], OPTIMISER["warmup_epochs"]
    for name, kind in (("adam_l2", torch.optim.Adam), ("adamw", torch.optim.AdamW)):
        initial, grads = optimiser_inputs()
        params = [torch.tensor(initial[key], requires_grad=True) for key in ("a", "b")]
        optimiser = kind(params, lr=base, weight_decay=OPTIMISER["weight_decay"])
        trajectory, step, cosine = [], 0, None
        for epoch in range(epochs):
            if epoch < warmup:
                for group in optimiser.param_groups:
                    group["lr"] = base * (0.1 + 0.9 * (epoch + 1) / warmup)
            elif epoch == warmup:
                for group in optimiser.param_groups:
                    group["lr"] = base
                cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=epochs - warmup,
                                                                    eta_min=0.01 * base)
            for _ in range(OPTIMISER["steps_per_epoch"]):
                for param, key in zip(params, ("a", "b")):
                    param.grad = torch.from_numpy(grads[step][key].copy())
                torch.nn.utils.clip_grad_norm_(params, OPTIMISER["clip_norm"])
                optimiser.step()
                trajectory.append(np.concatenate([param.detach().numpy().reshape(-1) for param in params]))
                step += 1
            if cosine is not None:
                cosine.step()
        recorded[name] = np.stack(trajectory)
    return recorded


def _resnet_stages(torch, resnet, arrays: dict[str, np.ndarray]) -> list[np.ndarray]:
    state = resnet.state_dict()
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


def _libmtl(torch) -> dict[str, np.ndarray]:
    """LibMTL's directions: each weighting class driven as its trainer drives it, on the shared parameter
    ``theta`` (zero) of losses ``L_t = J_t . theta + l_t``, whose gradients are the rows ``J_t``."""
    _import_libmtl(torch)
    import LibMTL.weighting

    inputs, recorded = balancing_inputs(), {}
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # LibMTL allocates its gradient matrix with the default dtype
    try:
        for name, (method, tasks, options, _, our_options) in LIBMTL_CASES.items():
            period = our_options.get("period", 1)
            steps = balancing_steps(method, tasks, inputs, period)
            weighting = _libmtl_weighting(getattr(LibMTL.weighting, method), tasks)
            # What LibMTL's Trainer keeps for the weighting: the epoch (from 0), each finished epoch's mean training
            # losses (written after its last step: batches of equal size, so the plain mean), and the optimiser that
            # also steps the weighting's own parameters after each backward pass (UW's log-variances; IMTL's loss
            # scales take a single step here, so no update of theirs is recorded).
            weighting.train_loss_buffer = np.zeros((tasks, len(steps) // period + 1))
            optimizer = None
            if method == "UW":
                optimizer = torch.optim.SGD(weighting.parameters(), lr=our_options["learning_rate"])
            directions = []
            for index, (jacobian, losses) in enumerate(steps):
                weighting.epoch = index // period
                if optimizer is not None:
                    optimizer.zero_grad()
                directions.append(_libmtl_direction(torch, weighting, jacobian, losses, options))
                if optimizer is not None:
                    optimizer.step()
                if (index + 1) % period == 0:
                    epoch_losses = [losses for _, losses in steps[index + 1 - period:index + 1]]
                    weighting.train_loss_buffer[:, weighting.epoch] = np.mean(epoch_losses, axis=0)
            recorded[f"libmtl_{name}"] = np.stack(directions)
    finally:
        torch.set_default_dtype(default_dtype)
    from LibMTL.utils import count_improvement

    baseline, results = nyuv2_results()
    as_libmtl = lambda metrics: {task: [metrics[f"{task}/{name}"] for name in names]
                                 for task, (names, _) in LIBMTL_NYUV2_METRICS.items()}
    recorded["libmtl_delta_p"] = np.asarray(count_improvement(
        as_libmtl(baseline), as_libmtl(results),
        {task: list(weight) for task, (_, weight) in LIBMTL_NYUV2_METRICS.items()}), np.float64)
    return recorded


def _import_libmtl(torch) -> None:
    import types

    # LibMTL 1.1.5 imports a module torchvision removed in 0.13 (only for downloading ResNet weights): a stand-in,
    # left in sys.modules for the rest of this process (harmless: nothing else imports that name).
    sys.modules.setdefault("torchvision.models.utils", types.SimpleNamespace(
        load_state_dict_from_url=torch.hub.load_state_dict_from_url))


def _libmtl_weighting(method_class, tasks: int):
    class Weighting(method_class):  # what LibMTL's Trainer mixes in: the task count, the device, no rep_grad
        def __init__(self):
            super().__init__()
            self.task_num, self.device, self.rep_grad = tasks, "cpu", False
            self.task_name = [f"task{t}" for t in range(tasks)]

    weighting = Weighting()
    weighting.init_param()
    return weighting


def _libmtl_direction(torch, weighting, jacobian: np.ndarray, losses: np.ndarray, options: dict) -> np.ndarray:
    theta = torch.zeros(jacobian.shape[1], requires_grad=True)
    weighting.get_share_params = lambda: [theta]
    weighting.zero_grad_share_params = lambda: theta.grad.zero_() if theta.grad is not None else None
    rows, offsets = torch.from_numpy(jacobian), torch.from_numpy(losses)
    weighting.backward(torch.stack([rows[t] @ theta + offsets[t] for t in range(len(losses))]), **options)
    return theta.grad.detach().numpy().copy()


def main() -> int:
    sys.path.insert(0, str(ROOT))
    from deep.weights import write_npz

    reference = compute_reference()
    write_npz(REFERENCE, reference, compressed=True)
    print(f"wrote {REFERENCE.relative_to(ROOT)} ({REFERENCE.stat().st_size} bytes; {reference['versions']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
