"""Dilated ResNet (torchvision layout) in Flax NNX: the shared backbone of every model here.

torchvision's ResNet v1.5 (stride on the 3×3 convolution of each bottleneck), with
``replace_stride_with_dilation=(False, True, True)`` by default: layer3 and layer4 keep output stride 8 and dilate
instead — layer3's first block at dilation 1 and the rest at 2, layer4's first block at 2 and the rest at 4, exactly as
torchvision and LibMTL's ``resnet_dilated`` build it. Padding is symmetric and explicit (3 for the 7×7 stem, the
dilation for 3×3 convolutions, 1 for the max-pool), as in PyTorch, so converted torchvision weights give the same
features. Attribute names follow torchvision's state dict (``conv1``, ``bn1``, ``layer1[0].conv2``, ``downsample``)
so a weight import can map keys one to one. BatchNorm is PyTorch's (:class:`BatchNorm`): its momentum (Flax 0.9),
epsilon (1e-5) and running variance.

ResNet-18 and -34 (``block="basic"``: two 3×3 convolutions per block, torchvision's ``BasicBlock``, which has no
dilated form) serve the CelebA attribute model (:mod:`deep.attributes`), as in the authors' code.

Layout: ``[batch, height, width, channels]``. Width and depth are configurable so tests run tiny models.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from deep.layers import conv

EXPANSION = 4  # a bottleneck's output channels per plane
BLOCKS = ("bottleneck", "basic")


@dataclasses.dataclass(frozen=True)
class BackboneConfig:
    """Shape of the ResNet.

    Attributes:
        depths: bottleneck blocks per stage (ResNet-50: ``(3, 4, 6, 3)``).
        width: channels of the first stage's bottleneck (64 in ResNet-50; outputs have ``4 × width × 2^stage``).
        replace_stride_with_dilation: for stages 2-4, dilate instead of striding (default: output stride 8).
        input_channels: 3 for RGB.
        block: ``"bottleneck"`` (ResNet-50/101) or ``"basic"`` (ResNet-18/34: outputs ``width × 2^stage``, no
            dilation, as torchvision's ``BasicBlock``).
    """

    depths: tuple[int, int, int, int] = (3, 4, 6, 3)
    width: int = 64
    replace_stride_with_dilation: tuple[bool, bool, bool] = (False, True, True)
    input_channels: int = 3
    block: str = "bottleneck"

    def __post_init__(self):
        if len(self.depths) != 4 or any(int(d) < 1 for d in self.depths):
            raise ValueError(f"depths must be four integers >= 1; got {self.depths}")
        if self.width < 1 or self.input_channels < 1:
            raise ValueError(f"width and input_channels must be >= 1; got {self.width}, {self.input_channels}")
        if len(self.replace_stride_with_dilation) != 3:
            raise ValueError("replace_stride_with_dilation must hold three booleans (stages 2, 3, 4)")
        if self.block not in BLOCKS:
            raise ValueError(f"block must be one of {', '.join(BLOCKS)}; got {self.block!r}")
        if self.block == "basic" and any(self.replace_stride_with_dilation):
            raise ValueError("basic blocks (ResNet-18/34) have no dilated form, as torchvision's BasicBlock; "
                             "replace_stride_with_dilation must be (False, False, False)")

    @property
    def expansion(self) -> int:
        """Output channels of a block per plane: 4 for bottlenecks, 1 for basic blocks."""
        return EXPANSION if self.block == "bottleneck" else 1

    @property
    def output_channels(self) -> tuple[int, int, int, int]:
        return tuple(self.width * 2**i * self.expansion for i in range(4))

    @property
    def output_stride(self) -> int:
        stride = 4
        for dilate in self.replace_stride_with_dilation:
            stride *= 1 if dilate else 2
        return stride


def _conv(in_channels, out_channels, kernel, rngs, stride=1, dilation=1):
    padding = dilation * (kernel - 1) // 2
    return conv(in_channels, out_channels, (kernel, kernel), strides=(stride, stride),
                kernel_dilation=(dilation, dilation), padding=((padding, padding), (padding, padding)),
                use_bias=False, rngs=rngs)


class BatchNorm(nnx.BatchNorm):
    """PyTorch's ``nn.BatchNorm2d`` over the last axis (channels last), on ``nnx.BatchNorm``'s variables and settings.

    As in both frameworks, a training call normalises the batch with its biased variance. Unlike Flax, the running
    variance averages the batch's *unbiased* variance (divided by n − 1, n the values per channel), as PyTorch's does.
    The two differ by n/(n − 1), which is nothing for a convolution's BatchNorm (n = B·H·W) but 16/15 at batch 16 for
    the ASPP's image-pooling BatchNorm (n = B), whose running variance eval mode and the counterfactual pass read.

    The call is written out rather than inherited, with Flax's arithmetic: the layer's ``dtype`` (or the inputs'
    common one) for the normalisation, at least float32 for the statistics, the variance as E[x²] − E[x]² clipped at
    0. ``nnx.BatchNorm`` stores its statistics with ``variable[...] = value``, which probes the traced value's
    ``sharding``; a JAX tracer answers with an error whose message walks every operation traced so far, so tracing
    the model took time quadratic in its depth (jax 0.10; half the trace time of a reduced-size training step).
    ``set_value`` stores them without the probe, in the dtype they were stored in.

    Of ``nnx.BatchNorm``'s options it keeps the momentum, epsilon, ``dtype`` and ``use_running_average``; the others
    (``axis_name`` for a cross-device mean, no scale or bias, two-pass variance) are refused when it is built. Under
    ``jit`` with a sharded batch the statistics are already those of the whole batch (:mod:`deep.devices`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        unsupported = {"axis_name": self.axis_name is not None, "use_scale": not self.use_scale,
                       "use_bias": not self.use_bias, "use_fast_variance": not self.use_fast_variance}
        if any(unsupported.values()):
            raise ValueError(f"BatchNorm here supports nnx.BatchNorm's defaults for "
                             f"{', '.join(name for name, changed in unsupported.items() if changed)}")

    def __call__(self, x, use_running_average: bool | None = None):
        running = self.use_running_average if use_running_average is None else use_running_average
        if running is None:
            raise ValueError("BatchNorm needs use_running_average, in the call or from model.train() / model.eval()")
        if self.axis not in (-1, x.ndim - 1):
            raise ValueError(f"BatchNorm here normalises the last axis (channels last); got axis={self.axis}")
        stored_mean, stored_var = self.mean.get_value(), self.var.get_value()
        scale, bias = self.scale.get_value(), self.bias.get_value()
        dtype = self.dtype if self.dtype is not None else jnp.result_type(x, stored_mean, stored_var, scale, bias)
        x, scale, bias = x.astype(dtype), scale.astype(dtype), bias.astype(dtype)
        if running:
            mean, var = stored_mean.astype(dtype), stored_var.astype(dtype)
        else:
            axes = tuple(range(x.ndim - 1))
            wide = x.astype(jnp.promote_types(dtype, jnp.float32))
            mean = wide.mean(axes)
            var = jnp.maximum(0.0, jnp.square(wide).mean(axes) - jnp.square(mean))
            n = x.size // x.shape[-1]  # values per channel
            unbiased = var * (n / (n - 1)) if n > 1 else var
            new_mean = self.momentum * stored_mean + (1 - self.momentum) * mean
            new_var = self.momentum * stored_var + (1 - self.momentum) * unbiased
            self.mean.set_value(jax.lax.stop_gradient(new_mean).astype(stored_mean.dtype))
            self.var.set_value(jax.lax.stop_gradient(new_var).astype(stored_var.dtype))
        y = (x - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias
        return y.astype(dtype)


def batch_norm(channels: int, rngs: nnx.Rngs) -> BatchNorm:
    """PyTorch's ``nn.BatchNorm2d(channels)``: momentum 0.1 (Flax's 0.9), epsilon 1e-5, unbiased running variance."""
    return BatchNorm(channels, momentum=0.9, epsilon=1e-5, rngs=rngs)


class Downsample(nnx.Module):
    """The projection shortcut (torchvision's ``downsample.0`` conv and ``downsample.1`` BN)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, rngs: nnx.Rngs):
        self.conv = _conv(in_channels, out_channels, 1, rngs, stride=stride)
        self.bn = batch_norm(out_channels, rngs)

    def __call__(self, x):
        return self.bn(self.conv(x))


class Bottleneck(nnx.Module):
    """1×1 → 3×3 (stride, dilation) → 1×1 with a residual connection; output ``4 × planes`` channels."""

    def __init__(self, in_channels: int, planes: int, stride: int, dilation: int, rngs: nnx.Rngs):
        out_channels = planes * EXPANSION
        self.conv1, self.bn1 = _conv(in_channels, planes, 1, rngs), batch_norm(planes, rngs)
        self.conv2 = _conv(planes, planes, 3, rngs, stride=stride, dilation=dilation)
        self.bn2 = batch_norm(planes, rngs)
        self.conv3, self.bn3 = _conv(planes, out_channels, 1, rngs), batch_norm(out_channels, rngs)
        needs_projection = stride != 1 or in_channels != out_channels
        self.downsample = Downsample(in_channels, out_channels, stride, rngs) if needs_projection else None

    def __call__(self, x):
        out = jax.nn.relu(self.bn1(self.conv1(x)))
        out = jax.nn.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return jax.nn.relu(out + shortcut)


class BasicBlock(nnx.Module):
    """3×3 (stride) → 3×3 with a residual connection; output ``planes`` channels (torchvision's ``BasicBlock``)."""

    def __init__(self, in_channels: int, planes: int, stride: int, dilation: int, rngs: nnx.Rngs):
        if dilation != 1:
            raise ValueError(f"a basic block has no dilated form; got dilation {dilation}")
        self.conv1, self.bn1 = _conv(in_channels, planes, 3, rngs, stride=stride), batch_norm(planes, rngs)
        self.conv2, self.bn2 = _conv(planes, planes, 3, rngs), batch_norm(planes, rngs)
        needs_projection = stride != 1 or in_channels != planes
        self.downsample = Downsample(in_channels, planes, stride, rngs) if needs_projection else None

    def __call__(self, x):
        out = jax.nn.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return jax.nn.relu(out + shortcut)


def _max_pool(x):
    return nnx.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


class ResNet(nnx.Module):
    """The backbone; ``__call__`` returns the four stage outputs ``(c1, c2, c3, c4)``.

    With the default configuration and a 288×384 input: c1 ``[B, 72, 96, 256]`` (stride 4), c2..c4 at stride 8 with
    512, 1024 and 2048 channels.
    """

    def __init__(self, config: BackboneConfig, rngs: nnx.Rngs):
        self.config = config
        width = config.width
        self.conv1 = conv(config.input_channels, width, (7, 7), strides=(2, 2), padding=((3, 3), (3, 3)),
                          use_bias=False, rngs=rngs)
        self.bn1 = batch_norm(width, rngs)
        in_channels, dilation = width, 1
        block = Bottleneck if config.block == "bottleneck" else BasicBlock
        stages = []
        for index, depth in enumerate(config.depths):
            planes = width * 2**index
            stride = 1 if index == 0 else 2
            previous_dilation = dilation
            if index > 0 and config.replace_stride_with_dilation[index - 1]:
                dilation *= stride
                stride = 1
            blocks = [block(in_channels, planes, stride, previous_dilation, rngs)]
            in_channels = planes * config.expansion
            blocks += [block(in_channels, planes, 1, dilation, rngs) for _ in range(depth - 1)]
            stages.append(nnx.List(blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages

    def stem(self, images: jax.Array) -> jax.Array:
        """7×7 stride-2 convolution → BatchNorm → ReLU → 3×3 stride-2 max-pool, on checked images: what every model
        here runs first."""
        channels = self.conv1.in_features
        if images.ndim != 4 or images.shape[-1] != channels:
            hint = (" (channels first? the layout is channels last)"
                    if images.ndim == 4 and images.shape[1] == channels else "")
            raise ValueError(f"images must be [B, H, W, {channels}] (a batch, channels last); got shape "
                             f"{tuple(images.shape)}{hint}")
        if not jnp.issubdtype(images.dtype, jnp.floating):
            raise ValueError(f"images must be floating point, in [0, 1] as the data loaders give them; got "
                             f"{images.dtype} (8-bit images: divide by 255)")
        return _max_pool(jax.nn.relu(self.bn1(self.conv1(images))))

    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        x = self.stem(images)
        features = []
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in stage:
                x = block(x)
            features.append(x)
        return tuple(features)


def resnet50(rngs: nnx.Rngs, **overrides) -> ResNet:
    """ResNet-50 at output stride 8 (override any :class:`BackboneConfig` field)."""
    return ResNet(BackboneConfig(**overrides), rngs)


# torchvision's ResNet-18: basic blocks, output stride 32 (the CelebA model's backbone).
RESNET18 = BackboneConfig(depths=(2, 2, 2, 2), block="basic", replace_stride_with_dilation=(False, False, False))


def resnet18(rngs: nnx.Rngs, **overrides) -> ResNet:
    """ResNet-18 at output stride 32 (override any :class:`BackboneConfig` field)."""
    return ResNet(dataclasses.replace(RESNET18, **overrides), rngs)


# The PyTorch name of each NNX leaf (convolution kernels and BatchNorm's scale are both a module's `weight`).
TORCH_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


def torchvision_key(path: tuple) -> str:
    """The torchvision state-dict key of a backbone variable's NNX path, e.g.
    ``('layer1', 0, 'downsample', 'conv', 'kernel')`` -> ``'layer1.0.downsample.0.weight'`` (convolution kernels
    are HWIO here and OIHW there: transpose ``(2, 3, 1, 0)`` when converting)."""
    parts = []
    for part in path[:-1]:
        in_downsample = parts and parts[-1] == "downsample"
        parts.append({"conv": "0", "bn": "1"}.get(part, str(part)) if in_downsample else str(part))
    if path[-1] not in TORCH_LEAF:
        raise ValueError(f"no torchvision counterpart for the variable {path}")
    return ".".join(parts + [TORCH_LEAF[path[-1]]])
