r"""MTAN (Liu, Johns & Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019) on the dilated ResNet-50.

A baseline *architecture* (LibMTL's ``architecture/MTAN.py``, built as the MTAN authors' ResNet/DeepLabV3 model): the
shared ResNet runs as usual, and every task reads it through soft attention, one module per ResNet stage
``j = 1..4`` (the paper's task-specific attention module):

.. math::
    a_t^{(1)} = h_t^{(1)}\big(g_t^{(1)}(u^{(1)})\big), \qquad
    a_t^{(j)} = h_t^{(j)}\Big(g_t^{(j)}\big(\big[u^{(j)};\ \mathrm{pool}\big(f^{(j)}(\hat a_t^{(j-1)})\big)\big]\big)
    \Big), \qquad \hat a_t^{(j)} = a_t^{(j)} \odot p^{(j)},

where :math:`u^{(j)}` is the output of the stage's penultimate bottleneck, :math:`p^{(j)}` the stage output,
:math:`g_t` a 1×1 convolution → BN → ReLU to a quarter of the stage width, :math:`h_t` a 1×1 convolution → BN →
sigmoid back to the stage width (so :math:`a_t \in (0, 1)` is an element-wise mask), :math:`f^{(j)}` (``j = 2..4``)
a bottleneck block from stage ``j - 1``'s width to stage ``j``'s (with a 1×1 projection shortcut), and ``pool`` a
2×2 max-pool applied only where the backbone's resolution halves between the stages — after layer1 only with the
output-stride-8 backbone, whose layer3 and layer4 dilate instead of striding. Task ``t``'s last attended map
:math:`\hat a_t^{(4)}` (``[B, H/8, W/8, 2048]``) feeds that task's :class:`ASPPHead`.

Which parameters are whose (what :data:`deep.train.SHARED` / :data:`deep.train.HEADS` split):

* shared — ``backbone`` (the ResNet) and ``transitions`` (the three blocks :math:`f^{(2)}, f^{(3)}, f^{(4)}`:
  the paper writes :math:`f^{(j)}` without a task index and the authors' code builds one per stage, "task shared
  attention encoders"), so every task's gradient reaches them and a gradient-balancing method balances them;
* task-specific — ``heads[t]`` (:class:`MTANTaskBranch`): the four attention masks :math:`(g_t^{(j)}, h_t^{(j)})`
  and the ASPP head. Task ``t``'s prediction reads no parameter of ``heads[s]`` for ``s ≠ t``.

Each task owns its attention masks, as in the paper, the authors' ``resnet_mtan.py`` and LibMTL's
``_transform_resnet_MTAN`` (one module per task and stage, in 1.1.5 and on its GitHub head).
``tests/test_torch_reference.py`` checks each task's attended map against LibMTL's encoder run under PyTorch with the
same weights. Departures from LibMTL:

* The downsampling max-pool pads odd sizes (``ceil``, the size a stride-2 ResNet convolution gives); PyTorch's
  ``MaxPool2d(2, 2)`` floors, and LibMTL's concatenation then fails on odd feature maps. On even sizes (the 72×96
  stride-4 map of a 288×384 image) the two agree.
* A stage with a single bottleneck (the tiny test backbones) has no penultimate block; :math:`u^{(j)}` is then the
  stage output itself (LibMTL's empty ``layer[:-1]`` would pass the stage *input*, whose width does not fit).
* No ``rep_grad``/representation path: each task has its own representation, and the shared transitions sit inside
  each task's branch, so GradDrop's :func:`deep.train.representation_jacobian_step` refuses MTAN. The per-task
  Jacobian of the shared parameters (:func:`deep.train.task_jacobian_step`) takes each task's loss back through its
  own branch (the transitions' gradients), then the K gradients of the stages (:meth:`MTAN.encode`) through the
  backbone.

Kept from LibMTL: the attention convolutions have biases (before BatchNorm, as LibMTL's ``nn.Conv2d`` default); the
transition bottleneck's 3×3 is undilated at stride 1; the shared transitions run once per task, in the order of
``tasks``, so in training their BatchNorm running statistics are updated once per task per step, each time with
that task's batch statistics. The heads, the upsampling (bilinear, ``align_corners=True``) and the unit normals are
the dual-stream model's (LibMTL's NYUv2 example). Training: :func:`deep.train.balanced_step` with any
parameter-gradient or loss-weighting method of :mod:`theory.balancing`; :func:`deep.train.core_step` does not apply
(its objective reads the dual-stream model's semantic map and residual code, which MTAN does not have).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from deep import losses
from deep.atrous import DILATED_CONVS
from deep.backbone import EXPANSION, BackboneConfig, Bottleneck, ResNet, batch_norm
from deep.heads import ASPPHead
from deep.layers import conv, drawn_later
from deep.model import (COMPUTE_DTYPES, NYUV2_TASKS, _as_float32, check_task_names, configure_layers,
                        initialise_like_pytorch, task_prediction)

__all__ = ["MTANConfig", "AttentionMask", "MTANTaskBranch", "MTAN"]


@dataclasses.dataclass(frozen=True)
class MTANConfig:
    """Sizes and options of :class:`MTAN` (defaults: LibMTL's NYUv2 model, ResNet-50 at output stride 8).

    Attributes:
        backbone: the shared ResNet.
        tasks: ``(name, output channels)`` pairs, names unique (``deep.train`` scores ``segmentation``, ``depth``
            and ``normal``; ``normal`` predictions are unit-normalised).
        head_channels: the ASPP heads' width (256 in DeepLabV3).
        aspp_rates: the ASPP heads' dilation rates.
        compute_dtype: ``"float32"`` or ``"bfloat16"``: the dtype convolutions and BatchNorm compute in; parameters
            and outputs stay float32.
        dilated_conv: how dilated convolutions are computed (:class:`deep.model.ModelConfig`).
    """

    backbone: BackboneConfig = BackboneConfig()
    tasks: tuple[tuple[str, int], ...] = NYUV2_TASKS
    head_channels: int = 256
    aspp_rates: tuple[int, ...] = (12, 24, 36)
    compute_dtype: str = "float32"
    dilated_conv: str = "auto"

    def __post_init__(self):
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}; got {self.compute_dtype!r}")
        if self.dilated_conv not in DILATED_CONVS:
            raise ValueError(f"dilated_conv must be one of {', '.join(DILATED_CONVS)}; got {self.dilated_conv!r}")
        if self.backbone.block != "bottleneck":
            raise ValueError(f"MTAN's attention and transition blocks are built for a bottleneck ResNet (LibMTL's); "
                             f"got backbone block {self.backbone.block!r}")
        if not self.tasks or any(channels < 1 for _, channels in self.tasks):
            raise ValueError(f"tasks must be (name, output channels >= 1) pairs; got {self.tasks}")
        names = [name for name, _ in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"tasks must have distinct names; got {names}")
        if self.head_channels < 1:
            raise ValueError(f"head_channels must be >= 1; got {self.head_channels}")
        if not self.aspp_rates or any(rate < 1 for rate in self.aspp_rates):
            raise ValueError(f"aspp_rates must be one or more dilation rates >= 1; got {self.aspp_rates}")


class AttentionMask(nnx.Module):
    r"""One task's attention module at one stage, :math:`h(g(x))`: 1×1 conv → BN → ReLU → 1×1 conv → BN → sigmoid.

    ``[B, H, W, in_channels] -> [B, H, W, out_channels]`` with values in (0, 1).
    """

    def __init__(self, in_channels: int, hidden_channels: int, out_channels: int, rngs: nnx.Rngs):
        # Biases before BatchNorm are redundant but kept: LibMTL's and the authors' nn.Conv2d have them, so the
        # parameter counts agree.
        self.conv1 = conv(in_channels, hidden_channels, (1, 1), rngs=rngs)
        self.bn1 = batch_norm(hidden_channels, rngs)
        self.conv2 = conv(hidden_channels, out_channels, (1, 1), rngs=rngs)
        self.bn2 = batch_norm(out_channels, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        hidden = jax.nn.relu(self.bn1(self.conv1(x)))
        return jax.nn.sigmoid(self.bn2(self.conv2(hidden)))


def _pool_to(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Max-pools ``x`` ``[B, H, W, C]`` by 2×2, stride 2, until it has spatial ``size`` (at most once per stride-2
    stage of the backbone). Odd sizes are padded at the end (ceil), as a stride-2 ResNet stage rounds."""
    while x.shape[1:3] != tuple(size):
        height, width = x.shape[1:3]
        if height < size[0] or width < size[1]:
            raise ValueError(f"cannot pool a {height}×{width} map to {size[0]}×{size[1]}")
        x = nnx.max_pool(x, window_shape=(2, 2), strides=(2, 2), padding=((0, height % 2), (0, width % 2)))
    return x


class MTANTaskBranch(nnx.Module):
    """Everything one task owns: its attention mask per stage (``attention[j]``) and its ASPP head (``head``)."""

    def __init__(self, stage_channels: tuple[int, ...], out_channels: int, rngs: nnx.Rngs, head_channels: int = 256,
                 aspp_rates: tuple[int, ...] = (12, 24, 36)):
        # Stage 1 sees u^(1) alone; later stages see [u^(j); f^(j)(â^(j-1))], twice the stage width. The hidden
        # width is a quarter of the stage width (the bottleneck ratio), as LibMTL and the authors.
        self.attention = nnx.List([
            AttentionMask(channels if stage == 0 else 2 * channels, channels // EXPANSION, channels, rngs)
            for stage, channels in enumerate(stage_channels)])
        self.head = ASPPHead(stage_channels[-1], out_channels, rngs, channels=head_channels, rates=aspp_rates)

    def attend(self, stages: list[tuple[jax.Array, jax.Array]], transitions: nnx.List) -> jax.Array:
        r"""The task's attended features :math:`\hat a_t^{(4)}` from the shared stages.

        Args:
            stages: per stage ``(u, p)``: the penultimate block's output and the stage output, ``[B, H_j, W_j, C_j]``.
            transitions: the shared blocks, ``transitions[j - 2]`` = :math:`f^{(j)}` from stage ``j - 1``'s width to
                stage ``j``'s.

        Returns:
            ``[B, H_4, W_4, C_4]``.
        """
        attended = None
        for stage, ((u, p), mask) in enumerate(zip(stages, self.attention)):
            if stage == 0:
                a = mask(u)
            else:
                previous = _pool_to(transitions[stage - 1](attended), u.shape[1:3])
                a = mask(jnp.concatenate([u, previous], axis=-1))
            attended = a * p
        return attended

    def __call__(self, stages: list[tuple[jax.Array, jax.Array]], transitions: nnx.List) -> tuple[jax.Array, jax.Array]:
        """``(head output [B, H_4, W_4, out_channels], attended features [B, H_4, W_4, C_4])``."""
        attended = self.attend(stages, transitions)
        return self.head(attended), attended


class MTAN(nnx.Module):
    """``images [B, H, W, 3] -> (predictions {task: [B, H, W, C_t]}, aux)``, the conventions of
    :class:`deep.model.DualStreamModel`: predictions upsampled bilinearly with ``align_corners=True``, normals of
    unit length, everything returned in float32.

    ``aux``: ``features`` (the backbone's c4, ``[B, H/8, W/8, 2048]``), ``low_level`` (c1) and ``attended``
    (``{task: [B, H/8, W/8, 2048]}``, each task's attended map, what its head reads).

    Attributes:
        backbone: the shared ResNet.
        transitions: the shared blocks :math:`f^{(2)}, f^{(3)}, f^{(4)}` between the attention stages.
        heads: ``{task: MTANTaskBranch}``, every task-specific parameter (the name :data:`deep.train.HEADS` selects).
        decoder, geometry_decoder, appearance_decoder: ``None`` — no grounding decoders (the dual-stream model's
            ``grounding="none"``), for code that asks.
    """

    # As DualStreamModel's: the shared parameters a task branch reads itself, beside the stages of :meth:`encode`.
    shared_read_by_heads = nnx.PathContains("transitions")
    task_loss = staticmethod(losses.dense_task_loss)

    def __init__(self, config: MTANConfig, rngs: nnx.Rngs):
        self.config = config
        with drawn_later():  # initialise_like_pytorch draws every convolution below
            self.backbone = ResNet(config.backbone, rngs)
            channels = config.backbone.output_channels
            self.transitions = nnx.List([Bottleneck(channels[j], channels[j + 1] // EXPANSION, 1, 1, rngs)
                                         for j in range(len(channels) - 1)])
            self.heads = nnx.Dict({name: MTANTaskBranch(channels, out_channels, rngs, config.head_channels,
                                                        config.aspp_rates) for name, out_channels in config.tasks})
        self.decoder = self.geometry_decoder = self.appearance_decoder = None
        initialise_like_pytorch(self, rngs.params())
        configure_layers(self, config.compute_dtype, config.dilated_conv)

    @property
    def makes_counterfactuals(self) -> bool:
        """Always ``False``: MTAN has no decoder to synthesise images."""
        return False

    def shared_stages(self, images: jax.Array) -> list[tuple[jax.Array, jax.Array]]:
        """The backbone's forward pass, keeping per stage ``(u, p)``: the penultimate bottleneck's output (the stage
        output when the stage has one block) and the stage output; ``p`` of the last stage is ``backbone(images)[-1]``.
        """
        backbone = self.backbone
        x = backbone.stem(images)
        stages = []
        for layer in (backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4):
            outputs = []
            for block in layer:
                x = block(x)
                outputs.append(x)
            stages.append((outputs[-2] if len(outputs) > 1 else outputs[-1], outputs[-1]))
        return stages

    def encode(self, images: jax.Array) -> dict[str, list[tuple[jax.Array, jax.Array]]]:
        """What the task branches read of the backbone, keyed as :meth:`predict_from_streams`' arguments:
        ``{"stages": shared_stages(images)}``. The two methods are :class:`deep.model.DualStreamModel`'s interface,
        through which :func:`deep.train.task_jacobian_step` takes each task's loss back through its own branch alone;
        the branches also read shared parameters themselves (``shared_read_by_heads``: the transitions)."""
        return {"stages": self.shared_stages(images)}

    def predict_from_streams(self, stages: list[tuple[jax.Array, jax.Array]], image_size: tuple[int, int],
                             tasks: tuple[str, ...] | None = None) -> dict[str, jax.Array]:
        """Task predictions ``{task: [B, H, W, C_t]}`` at ``image_size`` from :meth:`shared_stages`' output;
        ``tasks``: the tasks to predict, by name (default: all), the other branches do not run. Returned in the
        compute dtype (``__call__`` returns float32)."""
        check_task_names(tasks, self.config.tasks)
        return {name: self._branch(name, stages, image_size)[0]
                for name, _ in self.config.tasks if tasks is None or name in tasks}

    def _branch(self, name: str, stages, image_size: tuple[int, int]) -> tuple[jax.Array, jax.Array]:
        """Task ``name``'s prediction at ``image_size`` and its attended features."""
        out, attended = self.heads[name](stages, self.transitions)
        return task_prediction(name, out, image_size), attended

    def __call__(self, images: jax.Array) -> tuple[dict[str, jax.Array], dict]:
        """Predictions and ``aux`` for ``images`` ``[B, H, W, 3]`` (see the class docstring)."""
        image_size = images.shape[1:3]
        stages = self.shared_stages(images)
        predictions, attended = {}, {}
        for name, _ in self.config.tasks:
            predictions[name], attended[name] = self._branch(name, stages, image_size)
        aux = {"features": stages[-1][1], "low_level": stages[0][1], "attended": attended}
        # Losses, probes and metrics are computed in float32 whatever the compute dtype.
        return jax.tree.map(_as_float32, predictions), jax.tree.map(_as_float32, aux)
