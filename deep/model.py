"""The dual-stream multi-task model: backbone -> (semantic map ẑ_s, residual code ẑ_r) -> task heads.

Four choices of :class:`ModelConfig` set the architecture; the defaults are the paper's, and
``ModelConfig.variant("authors", ...)`` (see :data:`VARIANTS`) selects the authors' code in one setting:

* ``fusion``: what the two projectors read. ``"c4"`` (paper): the backbone's last stage. ``"multiscale"``
  (authors): :math:`F`, a 1×1 convolution of each of c1..c4 to ``fusion_channels`` on the 1/8 grid,
  concatenated (:class:`deep.streams.MultiScaleFusion`).
* ``heads_read``: ``"semantic"`` (paper): the heads read **only** ẑ_s; ``"semantic+backbone"`` (authors): they
  also read the features the projectors read (c4, or :math:`F` with the multi-scale fusion), which carry
  residual information. No head ever reads the residual code ẑ_r itself.
* ``head``: ``"aspp"``: LibMTL's DeepLabV3 head on ẑ_s, or on ``concat(ẑ_s, features)``; ``"deeplabv3plus"``:
  the authors' ``TaskHead`` (:class:`deep.heads.DeepLabV3PlusHead`): ``concat(P_F(features), P_s(ẑ_s))`` →
  ASPP → decoder with a GroupNorm'd skip from c1 at 1/4. It reads backbone features, so it needs
  ``heads_read="semantic+backbone"``.
* ``light_reads``: what the physical decoder's light head reads. ``"residual"`` (paper: "the residual stream
  predicts photometric factors such as albedo and illumination"): the residual code ẑ_r, so whatever the
  rendering needs of the illumination passes through ẑ_r; ``"backbone"`` (authors): the spatial mean of c4, or
  of the adapted c4 inside :math:`F` with the multi-scale fusion, a path for lighting around both streams.

Predictions are upsampled to the image with bilinear ``align_corners=True`` (LibMTL's and the authors'
convention; straight to the image size, which for sizes divisible by 4 is the authors' ×4); surface normals
are unit-normalised.

The model returns ``(predictions, aux)``: ``aux`` holds the intermediates that losses and probes read (the
semantic map, the residual code, the features the projectors read (``features``: c4 or :math:`F`), and c1
(``low_level``)).

Grounding (:mod:`deep.decoders`) is selected by ``ModelConfig.grounding``:

* ``"soft"``: the generic decoders only (the paper's soft grounding, Eq (15)): depth from ẑ_s (``aux["geometry"]``,
  ``aux["geometry_aux"]``) and the image from ẑ_s and ẑ_r through AdaIN (``aux["reconstruction"]``,
  ``aux["reconstruction_aux"]``).
* ``"hard"``: the physical decoder of Eq (13) (``aux["rendered"]`` and its parts ``albedo``, ``normals``,
  ``shading``, ``lighting``) **plus** the generic decoders, because the authors' code always runs both (no config
  switches them off); the counterfactuals then come from the appearance decoder, as theirs.
* ``"none"``: neither, for the gradient-balancing baselines.

MTAN, a different architecture on the same backbone, is :mod:`deep.mtan`.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deep import losses
from deep.atrous import DILATED_CONVS, set_dilated_conv
from deep.backbone import BackboneConfig, ResNet
from deep.decoders import AppearanceDecoder, GeometryDecoder, PhysicalDecoder
from deep.heads import ASPPHead, DeepLabV3PlusHead
from deep.layers import drawn_later
from deep.resize import resize_bilinear
from deep.shading import unit_vectors
from deep.streams import DualStream, MultiScaleFusion
from scm.linear_gaussian import as_count

HEAD_INPUTS = ("semantic", "semantic+backbone")
FUSIONS = ("c4", "multiscale")
HEAD_TYPES = ("aspp", "deeplabv3plus")
# The architecture choices of the paper and of the authors' code (models/causal_model.py), apart from sizes.
VARIANTS = {"paper": {"fusion": "c4", "heads_read": "semantic", "head": "aspp", "light_reads": "residual"},
            "authors": {"fusion": "multiscale", "heads_read": "semantic+backbone", "head": "deeplabv3plus",
                        "light_reads": "backbone"}}
LIGHT_INPUTS = ("residual", "backbone")
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# The layers whose matrix work follows the compute dtype; normalisation statistics are reduced in float32 (by Flax,
# and by deep.decoders' InstanceNorm and AdaIN, which are jnp functions of the activations with no dtype setting).
_COMPUTE_LAYERS = (nnx.Conv, nnx.Linear, nnx.BatchNorm, nnx.LayerNorm, nnx.GroupNorm)
GROUNDINGS = ("hard", "soft", "none")
NYUV2_TASKS = (("segmentation", 13), ("depth", 1), ("normal", 3))
TASK_CHANNELS = {"depth": 1, "normal": 3}  # what their losses and metrics read; segmentation has one per class


def _is_count(value) -> bool:
    return as_count(value, 1) is not None


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Sizes and options of :class:`DualStreamModel` (defaults: the paper's NYUv2 model).

    ``grounding``: ``"hard"`` (physical + generic decoders, as the authors' code), ``"soft"`` (generic decoders
    only) or ``"none"``. ``decoder_widths``, ``albedo_seed`` and ``light_hidden`` size the physical decoder;
    ``generic_width`` the generic decoders' trunk (a multiple of 8; their blocks halve it three times).

    Architecture (module docstring): ``fusion`` (``"c4"`` or ``"multiscale"``, with ``fusion_channels`` per
    stage, 1024 in the authors' code), ``heads_read``, ``head`` (``"aspp"`` or ``"deeplabv3plus"``) and
    ``light_reads`` (``"residual"`` or ``"backbone"``). The DeepLabV3+ head is sized by ``head_channels`` (its
    input projections, ASPP and decoder), ``skip_channels`` and ``skip_groups`` (the c1 skip: 48 channels,
    GroupNorm with 4 groups) and ``decoder_groups`` (GroupNorm of its 3×3 convolution, 32 groups); the ASPP head
    ignores those three.

    ``dilated_conv`` says how the dilated convolutions (backbone layers 3–4, ASPP) are computed, the same
    function every way (:mod:`deep.atrous`): ``"xla"`` (``lax.conv_general_dilated``), ``"space_to_batch"``,
    ``"shifted_matmul"`` or ``"auto"`` (the default: sub-images, or one product per tap where most taps read
    padding; about twice as fast as ``"xla"`` on an H200, ``bench/bench_atrous.py``).
    """

    backbone: BackboneConfig = BackboneConfig()
    tasks: tuple[tuple[str, int], ...] = NYUV2_TASKS
    semantic_channels: int = 512
    residual_channels: int = 256
    head_channels: int = 256
    aspp_rates: tuple[int, ...] = (12, 24, 36)
    heads_read: str = "semantic"
    grounding: str = "hard"
    decoder_widths: tuple[int, ...] = (128, 128, 64, 32)
    albedo_seed: int = 16
    light_hidden: int = 128
    compute_dtype: str = "float32"
    generic_width: int = 512
    # After the older fields, so that configurations written positionally keep their meaning.
    fusion: str = "c4"
    fusion_channels: int = 1024
    head: str = "aspp"
    skip_channels: int = 48
    skip_groups: int = 4
    decoder_groups: int = 32
    dilated_conv: str = "auto"
    light_reads: str = "residual"

    def __post_init__(self):
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}; got {self.compute_dtype!r}")
        if self.grounding not in GROUNDINGS:
            raise ValueError(f"grounding must be one of {', '.join(GROUNDINGS)}; got {self.grounding!r}")
        if self.generic_width < 8 or self.generic_width % 8:
            raise ValueError(f"generic_width must be a positive multiple of 8 (the attention's keys have "
                             f"generic_width/8 channels); got {self.generic_width}")
        if self.heads_read not in HEAD_INPUTS:
            raise ValueError(f"heads_read must be one of {', '.join(HEAD_INPUTS)}; got {self.heads_read!r}")
        self._check_tasks()
        for name in ("semantic_channels", "residual_channels", "head_channels", "albedo_seed", "light_hidden",
                     "fusion_channels"):
            if not _is_count(getattr(self, name)):
                raise ValueError(f"{name} must be an integer >= 1; got {getattr(self, name)!r}")
        for name in ("aspp_rates", "decoder_widths"):
            values = getattr(self, name)
            if not (isinstance(values, tuple) and values and all(_is_count(v) for v in values)):
                raise ValueError(f"{name} must be a non-empty tuple of integers >= 1; got {values!r}")
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {', '.join(FUSIONS)}; got {self.fusion!r}")
        if self.dilated_conv not in DILATED_CONVS:
            raise ValueError(f"dilated_conv must be one of {', '.join(DILATED_CONVS)}; got {self.dilated_conv!r}")
        if self.light_reads not in LIGHT_INPUTS:
            raise ValueError(f"light_reads must be one of {', '.join(LIGHT_INPUTS)}; got {self.light_reads!r}")
        if self.head not in HEAD_TYPES:
            raise ValueError(f"head must be one of {', '.join(HEAD_TYPES)}; got {self.head!r}")
        if self.head == "deeplabv3plus":
            self._check_deeplabv3plus()

    def _check_tasks(self):
        tasks = self.tasks
        if not (isinstance(tasks, tuple) and tasks and all(
                isinstance(task, tuple) and len(task) == 2 and isinstance(task[0], str) and _is_count(task[1])
                for task in tasks)):
            raise ValueError(f"tasks must be a non-empty tuple of (name, output channels >= 1) pairs; got {tasks!r}")
        names = [name for name, _ in tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"tasks must have distinct names; got {', '.join(names)}")
        for name, channels in tasks:
            if TASK_CHANNELS.get(name, channels) != channels:
                raise ValueError(f"task {name!r} predicts {TASK_CHANNELS[name]} channel(s); got {channels}")

    def _check_deeplabv3plus(self):
        if self.heads_read != "semantic+backbone":
            raise ValueError(f"head='deeplabv3plus' reads backbone features (and the c1 skip), so heads_read "
                             f"must be 'semantic+backbone'; got {self.heads_read!r}")
        if self.skip_channels < 1:
            raise ValueError(f"skip_channels must be >= 1; got {self.skip_channels}")
        for groups_name, channels_name in (("skip_groups", "skip_channels"),
                                           ("decoder_groups", "head_channels")):
            groups, channels = getattr(self, groups_name), getattr(self, channels_name)
            if groups < 1 or channels % groups:
                raise ValueError(f"{groups_name} (GroupNorm groups) must be >= 1 and divide {channels_name} "
                                 f"({channels}); got {groups}")

    @classmethod
    def variant(cls, name: str, **fields) -> "ModelConfig":
        """The configuration of an architecture of :data:`VARIANTS` (``"paper"`` or ``"authors"``) with any
        other ``fields`` (sizes, tasks, grounding; a field given here wins over the variant's)."""
        if name not in VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(VARIANTS)}; got {name!r}")
        return cls(**{**VARIANTS[name], **fields})


def configure_layers(model: nnx.Module, compute_dtype: str, dilated_conv: str) -> None:
    """The layer settings every model here takes from its config, in one place:

    * mixed precision: every convolution, dense and normalisation layer computes in ``compute_dtype`` (its inputs
      and parameters are cast at the call) while the parameters themselves stay float32, so the optimiser and the
      gradients are float32. Setting the layers' ``dtype`` here keeps the module constructors free of a precision
      argument; the setting is static and travels in the graph definition;
    * how dilated convolutions are computed (:func:`deep.atrous.set_dilated_conv`).
    """
    for _, module in nnx.iter_graph(model):
        if isinstance(module, _COMPUTE_LAYERS):
            module.dtype = COMPUTE_DTYPES[compute_dtype]
    set_dilated_conv(model, dilated_conv)


def initialise_like_pytorch(model: nnx.Module, key: jax.Array) -> None:
    r"""Draws every convolution's and dense layer's parameters as the authors' PyTorch models start, in one place, so
    that whatever trains from scratch here (heads, streams, decoders; the whole model without ``--pretrained``)
    starts at their scale rather than Flax's:

    * the backbone ResNet's convolutions: torchvision's ResNet rule (LibMTL's too), Kaiming normal with fan-out and
      ReLU gain, :math:`\mathcal N(0, 2/(k_h k_w C_{out}))`;
    * every other convolution and dense layer, MTAN's shared transition bottlenecks included (LibMTL builds them
      outside its ResNet): ``nn.Conv2d``'s and ``nn.Linear``'s default, weights and biases
      :math:`\mathcal U(\pm 1/\sqrt{\text{fan-in}})` (Flax's LeCun normal is :math:`\sqrt 3` times wider and
      its biases 0).

    Normalisation layers keep scale 1 and offset 0, as in both frameworks. Weights loaded afterwards (a torchvision
    checkpoint) replace the backbone's."""
    try:
        # Drawn on the host: a JAX draw per layer shape would compile a program each (tens of seconds on a CPU).
        generator = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())
        normal, uniform = generator.standard_normal, lambda shape: generator.uniform(-1.0, 1.0, shape)
    except jax.errors.TracerArrayConversionError:
        # Traced (nnx.eval_shape, or a model built under jit): the same rules with JAX's generator, in the trace
        # (other values than an eager build from the same key, from the same distributions).
        draws = itertools.count()
        normal = lambda shape: jax.random.normal(jax.random.fold_in(key, next(draws)), shape)
        uniform = lambda shape: jax.random.uniform(jax.random.fold_in(key, next(draws)), shape, minval=-1.0,
                                                   maxval=1.0)
    resnet = {id(layer) for _, block in nnx.iter_graph(model) if isinstance(block, ResNet)
              for _, layer in nnx.iter_graph(block) if isinstance(layer, nnx.Conv)}
    for _, layer in nnx.iter_graph(model):
        if not isinstance(layer, (nnx.Conv, nnx.Linear)):
            continue
        shape, dtype = layer.kernel[...].shape, layer.kernel[...].dtype
        if id(layer) in resnet:  # kernel [kh, kw, C_in, C_out]
            std = (2.0 / (shape[-1] * shape[0] * shape[1])) ** 0.5
            layer.kernel.set_value(jnp.asarray(std * normal(shape), dtype))
        else:  # fan-in: every kernel axis but the last (kh·kw·C_in per group; C_in for a dense layer)
            bound = 1.0 / math.prod(shape[:-1]) ** 0.5
            layer.kernel.set_value(jnp.asarray(bound * uniform(shape), dtype))
            if layer.bias is not None:
                layer.bias.set_value(jnp.asarray(bound * uniform(layer.bias.get_value().shape), dtype))


class DualStreamModel(nnx.Module):
    """``images [B, H, W, 3] -> (predictions {task: [B, H, W, C_t]}, aux)``."""

    # The shared parameters the heads read themselves, beside the representation of :meth:`encode` (an NNX filter;
    # deep.train.task_jacobian_step differentiates them in each head's own pass): none, here.
    shared_read_by_heads = nnx.Nothing
    # Each task's loss of its prediction against the batch, as the training steps score it.
    task_loss = staticmethod(losses.dense_task_loss)

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        self.config = config
        with drawn_later():  # initialise_like_pytorch draws every convolution and dense layer below
            self._build(config, rngs)
        initialise_like_pytorch(self, rngs.params())
        configure_layers(self, config.compute_dtype, config.dilated_conv)

    def _build(self, config: ModelConfig, rngs: nnx.Rngs) -> None:
        self.backbone = ResNet(config.backbone, rngs)
        stage_channels = config.backbone.output_channels
        if config.fusion == "multiscale":
            self.fusion = MultiScaleFusion(stage_channels, rngs, config.fusion_channels)
            features, pooled_channels = len(stage_channels) * config.fusion_channels, config.fusion_channels
        else:
            self.fusion = None
            features = pooled_channels = stage_channels[-1]
        light_channels = config.residual_channels if config.light_reads == "residual" else pooled_channels
        self.streams = DualStream(features, rngs, config.semantic_channels, config.residual_channels)
        self.heads = nnx.Dict({name: self._head(features, channels, rngs) for name, channels in config.tasks})
        self.decoder = PhysicalDecoder(config.semantic_channels, config.residual_channels, light_channels,
                                       rngs, config.decoder_widths, config.albedo_seed,
                                       config.light_hidden) if config.grounding == "hard" else None
        generic = config.grounding in ("hard", "soft")
        self.geometry_decoder = GeometryDecoder(config.semantic_channels, rngs,
                                                config.generic_width) if generic else None
        self.appearance_decoder = AppearanceDecoder(config.semantic_channels, config.residual_channels, rngs,
                                                    config.generic_width) if generic else None

    def _head(self, features: int, out_channels: int, rngs: nnx.Rngs) -> nnx.Module:
        config = self.config
        if config.head == "deeplabv3plus":
            return DeepLabV3PlusHead(config.semantic_channels, features, config.backbone.output_channels[0],
                                     out_channels, rngs, channels=config.head_channels,
                                     rates=config.aspp_rates, skip_channels=config.skip_channels,
                                     skip_groups=config.skip_groups, decoder_groups=config.decoder_groups)
        head_input = config.semantic_channels + (features if config.heads_read == "semantic+backbone" else 0)
        return ASPPHead(head_input, out_channels, rngs, channels=config.head_channels,
                        rates=config.aspp_rates)

    def render(self, semantic_map: jax.Array, residual_code: jax.Array, features: jax.Array | None,
               image_size: tuple[int, int]) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Hard grounding: the image rendered from the streams (albedo from ``residual_code``). The lighting reads
        ``residual_code`` too (``light_reads="residual"``), or the spatial mean of c4 in ``features``, or with
        the multi-scale fusion of the adapted c4 inside ``features`` (:math:`F`); ``features`` is read only
        then."""
        if self.decoder is None:
            raise ValueError(f"this model has no physical decoder (grounding={self.config.grounding!r})")
        if self.config.light_reads == "residual":
            return self.decoder(semantic_map, residual_code, residual_code, image_size)
        if features is None:
            raise ValueError("with light_reads='backbone' the physical renderer needs the backbone features for "
                             "the lighting")
        if self.fusion is not None:
            features = self.fusion.adapted_last_stage(features)
        return self.decoder(semantic_map, residual_code, jnp.mean(features, axis=(1, 2)), image_size)

    @property
    def makes_counterfactuals(self) -> bool:
        """Whether :meth:`counterfactual_image` can synthesise an image (some grounding decoder exists)."""
        return self.appearance_decoder is not None or self.decoder is not None

    def counterfactual_image(self, semantic_map: jax.Array, residual_code: jax.Array, image_size: tuple[int, int],
                             features: jax.Array | None = None) -> jax.Array:
        r"""An image synthesised from a semantic map and a (possibly shuffled) residual code, for Eq (12):

        .. math:: \tilde x_i = D_{\rm app}(\hat z_{s,i}, \hat z_{r,\pi(i)}),

        through the appearance decoder (which ends in the sigmoid), as the authors' CFA. Without one, the physical
        rendering :math:`\mathrm{clip}(A(\hat z_{r,\pi(i)}) \odot S(\hat z_{s,i}, L), 0, 1)`, whose lighting
        :math:`L` comes from the swapped code too, or with ``light_reads="backbone"`` from ``features``; no
        configuration has the physical decoder alone today.

        Args:
            semantic_map: ``[B, h, w, C_s]``.
            residual_code: ``[B, C_r]``.
            image_size: ``(H, W)``.
            features: ``[B, h, w, C]``, what the projectors read (``aux["features"]``: c4 or :math:`F`); read
                only by the physical fallback with ``light_reads="backbone"``.

        Returns:
            ``[B, H, W, 3]`` in [0, 1], float32.

        Raises:
            ValueError: when the model has no decoder (``grounding="none"``), or the fallback needs ``features``
                and lacks them.
        """
        if self.appearance_decoder is not None:
            return _as_float32(self.appearance_decoder(semantic_map, residual_code, image_size)[0])
        if self.decoder is not None:
            return _as_float32(self.render(semantic_map, residual_code, features, image_size)[0])
        raise ValueError("this model has no decoder to synthesise counterfactuals (grounding='none')")

    def predict_from_streams(self, semantic_map: jax.Array, residual_code: jax.Array, features: jax.Array,
                             image_size: tuple[int, int], low_level: jax.Array | None = None,
                             tasks: tuple[str, ...] | None = None) -> dict[str, jax.Array]:
        """Task predictions from the streams; in the paper mode ``residual_code`` and ``features`` are not
        read.

        Args:
            semantic_map: ``[B, h, w, C_s]``.
            residual_code: ``[B, C_r]``; no head reads it, in any mode.
            features: ``[B, h, w, C]``, what the projectors read (c4, or :math:`F` with the multi-scale
                fusion).
            image_size: ``(H, W)`` of the predictions.
            low_level: ``[B, H_1, W_1, C_1]``, the backbone's c1; read (and required) only by the DeepLabV3+
                head.
            tasks: the tasks to predict, by name (default: all); the other heads do not run.

        Returns:
            ``{task: [B, H, W, C_t]}``.
        """
        del residual_code  # no head reads the residual code, in any mode
        check_task_names(tasks, self.config.tasks)
        if self.config.head == "deeplabv3plus":
            if low_level is None:
                raise ValueError("the DeepLabV3+ head needs low_level (the backbone's c1) for its skip")
            run_head = lambda head: head(semantic_map, features, low_level)
        else:
            head_input = semantic_map
            if self.config.heads_read == "semantic+backbone":
                head_input = jnp.concatenate([semantic_map, features], axis=-1)
            run_head = lambda head: head(head_input)
        return {name: task_prediction(name, run_head(self.heads[name]), image_size)
                for name, _ in self.config.tasks if tasks is None or name in tasks}

    def encode(self, images: jax.Array) -> dict[str, jax.Array]:
        """The representation the heads may read, keyed as :meth:`predict_from_streams`' arguments: the
        streams ``semantic_map`` and ``residual_code``, ``features`` (c4 or :math:`F`) and, for the DeepLabV3+
        head only, ``low_level`` (c1); ``predict_from_streams(**model.encode(images), image_size=...)``
        predicts."""
        representation = self._encode(images)
        if self.config.head != "deeplabv3plus":
            del representation["low_level"]
        return representation

    def _encode(self, images):
        c1, c2, c3, c4 = self.backbone(images)
        features = c4 if self.fusion is None else self.fusion((c1, c2, c3, c4))
        semantic_map, residual_code = self.streams(features)
        return {"semantic_map": semantic_map, "residual_code": residual_code, "features": features,
                "low_level": c1}

    def predict(self, images: jax.Array) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
        """The task predictions and the streams, without running any grounding decoder (what the counterfactual
        pass scores): ``(predictions, aux)`` with ``aux`` keys semantic_map, residual_code, features, low_level."""
        predictions, aux = self._encode_and_predict(images)
        return jax.tree.map(_as_float32, predictions), jax.tree.map(_as_float32, aux)

    def _encode_and_predict(self, images):
        aux = self._encode(images)
        return self.predict_from_streams(**aux, image_size=images.shape[1:3]), aux

    def __call__(self, images: jax.Array) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
        """``aux`` adds, with the physical decoder, ``rendered``, ``albedo``, ``normals``, ``shading`` and
        ``lighting``; with the generic decoders, ``geometry`` ``[B, H, W, 1]``, ``reconstruction`` ``[B, H, W, 3]``
        and their deep-supervision outputs ``geometry_aux``, ``reconstruction_aux`` (at 1/2 resolution)."""
        image_size = images.shape[1:3]
        predictions, aux = self._encode_and_predict(images)
        semantic_map, residual_code = aux["semantic_map"], aux["residual_code"]
        if self.decoder is not None:
            rendered, parts = self.render(semantic_map, residual_code, aux["features"], image_size)
            aux.update(rendered=rendered, **parts)
        if self.geometry_decoder is not None:
            aux["geometry"], aux["geometry_aux"] = self.geometry_decoder(semantic_map, image_size)
        if self.appearance_decoder is not None:
            aux["reconstruction"], aux["reconstruction_aux"] = self.appearance_decoder(semantic_map, residual_code,
                                                                                       image_size)
        # Losses, CKA and metrics are computed in float32 whatever the compute dtype.
        return jax.tree.map(_as_float32, predictions), jax.tree.map(_as_float32, aux)


def check_task_names(tasks: tuple[str, ...] | None, model_tasks: tuple[tuple[str, int], ...]) -> None:
    """Refuses a selection of tasks (``None``: all) that is not a tuple of the model's task names."""
    if isinstance(tasks, str):
        raise ValueError(f"tasks must be a tuple of task names, such as ({tasks!r},); got the string {tasks!r}")
    unknown = set(tasks or ()) - {name for name, _ in model_tasks}
    if unknown:
        raise ValueError(f"tasks must be among the model's, {', '.join(n for n, _ in model_tasks)}; got "
                         f"{', '.join(sorted(unknown))}")


def task_prediction(name: str, head_output: jax.Array, image_size: tuple[int, int]) -> jax.Array:
    """A head's output as task ``name``'s prediction: upsampled bilinearly to ``image_size`` (``align_corners=True``,
    as LibMTL), unit-normalised for ``normal``."""
    out = resize_bilinear(head_output, image_size, align_corners=True)
    return unit_vectors(out, 1e-12) if name == "normal" else out


def _as_float32(value: jax.Array) -> jax.Array:
    return value.astype(jnp.float32) if jnp.issubdtype(value.dtype, jnp.floating) else value
