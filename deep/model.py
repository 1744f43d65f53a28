"""The dual-stream multi-task model: backbone -> (semantic map ẑ_s, residual code ẑ_r) -> task heads.

By default the task heads read **only** the semantic stream, as the paper states (``heads_read="semantic"``). The
authors' code also feeds backbone features to the heads, which carry residual information; ``heads_read=
"semantic+backbone"`` reproduces that (the heads then see ``concat(ẑ_s, c4)``). Predictions are upsampled to the
image with bilinear ``align_corners=True`` (LibMTL's convention); surface normals are unit-normalised.

The model returns ``(predictions, aux)``: ``aux`` holds the intermediates that losses and probes read (the
semantic map, the residual code, the backbone features).

Grounding (:mod:`deep.decoders`) is selected by ``ModelConfig.grounding``:

* ``"soft"``: the generic decoders of Eq (15) only: depth from ẑ_s (``aux["geometry"]``, ``aux["geometry_aux"]``)
  and the image from ẑ_s and ẑ_r through AdaIN (``aux["reconstruction"]``, ``aux["reconstruction_aux"]``).
* ``"hard"``: the physical decoder of Eq (13) (``aux["rendered"]`` and its parts ``albedo``, ``normals``,
  ``shading``, ``lighting``) **plus** the generic decoders, because the authors' code always runs both (no config
  switches them off); the counterfactuals then come from the appearance decoder, as theirs.
* ``"none"``: neither, for the gradient-balancing baselines.

Not built yet (see the README's roadmap): MTAN.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from deep.backbone import BackboneConfig, ResNet
from deep.decoders import AppearanceDecoder, GeometryDecoder, PhysicalDecoder
from deep.heads import ASPPHead
from deep.resize import resize_bilinear
from deep.shading import unit_vectors
from deep.streams import DualStream

HEAD_INPUTS = ("semantic", "semantic+backbone")
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# The layers whose matrix work follows the compute dtype; normalisation statistics are reduced in float32 (by Flax,
# and by deep.decoders' InstanceNorm and AdaIN, which are jnp functions of the activations with no dtype setting).
_COMPUTE_LAYERS = (nnx.Conv, nnx.Linear, nnx.BatchNorm, nnx.LayerNorm)
GROUNDINGS = ("hard", "soft", "none")
NYUV2_TASKS = (("segmentation", 13), ("depth", 1), ("normal", 3))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Sizes and options of :class:`DualStreamModel` (defaults: the paper's NYUv2 model).

    ``grounding``: ``"hard"`` (physical + generic decoders, as the authors' code), ``"soft"`` (generic decoders
    only, Eq (15)) or ``"none"``. ``decoder_widths``, ``albedo_seed`` and ``light_hidden`` size the physical decoder;
    ``generic_width`` the generic decoders' trunk (a multiple of 8; their blocks halve it three times).
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
        if not self.tasks or any(channels < 1 for _, channels in self.tasks):
            raise ValueError(f"tasks must be (name, output channels >= 1) pairs; got {self.tasks}")


class DualStreamModel(nnx.Module):
    """``images [B, H, W, 3] -> (predictions {task: [B, H, W, C_t]}, aux)``."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        self.config = config
        self.backbone = ResNet(config.backbone, rngs)
        features = config.backbone.output_channels[-1]
        self.streams = DualStream(features, rngs, config.semantic_channels, config.residual_channels)
        head_input = config.semantic_channels + (features if config.heads_read == "semantic+backbone" else 0)
        self.heads = nnx.Dict({name: ASPPHead(head_input, channels, rngs, channels=config.head_channels,
                                              rates=config.aspp_rates) for name, channels in config.tasks})
        self.decoder = PhysicalDecoder(config.semantic_channels, config.residual_channels, features, rngs,
                                       config.decoder_widths, config.albedo_seed,
                                       config.light_hidden) if config.grounding == "hard" else None
        generic = config.grounding in ("hard", "soft")
        self.geometry_decoder = GeometryDecoder(config.semantic_channels, rngs,
                                                config.generic_width) if generic else None
        self.appearance_decoder = AppearanceDecoder(config.semantic_channels, config.residual_channels, rngs,
                                                    config.generic_width) if generic else None
        self._set_compute_dtype(COMPUTE_DTYPES[config.compute_dtype])

    def _set_compute_dtype(self, dtype) -> None:
        """Mixed precision: every convolution, dense and normalisation layer computes in ``dtype`` (its inputs and
        parameters are cast at the call) while the parameters themselves stay float32, so the optimiser and the
        gradients are float32. Setting the layers' ``dtype`` in one place keeps the module constructors free of a
        precision argument; the setting is static and travels in the graph definition."""
        for _, module in nnx.iter_graph(self):
            if isinstance(module, _COMPUTE_LAYERS):
                module.dtype = dtype

    def render(self, semantic_map: jax.Array, residual_code: jax.Array, features: jax.Array,
               image_size: tuple[int, int]) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Hard grounding: the image rendered from the streams (albedo from ``residual_code``)."""
        if self.decoder is None:
            raise ValueError(f"this model has no physical decoder (grounding={self.config.grounding!r})")
        return self.decoder(semantic_map, residual_code, jnp.mean(features, axis=(1, 2)), image_size)

    @property
    def makes_counterfactuals(self) -> bool:
        """Whether :meth:`counterfactual_image` can synthesise an image (some grounding decoder exists)."""
        return self.appearance_decoder is not None or self.decoder is not None

    def counterfactual_image(self, semantic_map: jax.Array, residual_code: jax.Array, image_size: tuple[int, int],
                             features: jax.Array | None = None) -> jax.Array:
        r"""An image synthesised from a semantic map and a (possibly shuffled) residual code, for Eq (12):

        .. math:: \tilde x_i = D_{\rm app}(\hat z_{s,i}, \hat z_{r,\pi(i)}),

        through the appearance decoder (which ends in the sigmoid), as the authors' CFA. Without one, the physical rendering
        :math:`\mathrm{clip}(A(\hat z_{r,\pi(i)}) \odot S(\hat z_{s,i}), 0, 1)` (which needs ``features`` for the
        lighting); no configuration has the physical decoder alone today.

        Args:
            semantic_map: ``[B, h, w, C_s]``.
            residual_code: ``[B, C_r]``.
            image_size: ``(H, W)``.
            features: ``[B, h, w, C]`` backbone features; read only by the physical fallback.

        Returns:
            ``[B, H, W, 3]`` in [0, 1], float32.

        Raises:
            ValueError: when the model has no decoder (``grounding="none"``), or the fallback lacks ``features``.
        """
        if self.appearance_decoder is not None:
            return _as_float32(self.appearance_decoder(semantic_map, residual_code, image_size)[0])
        if self.decoder is not None:
            if features is None:
                raise ValueError("the physical renderer needs the backbone features for the lighting")
            return _as_float32(self.render(semantic_map, residual_code, features, image_size)[0])
        raise ValueError("this model has no decoder to synthesise counterfactuals (grounding='none')")

    def predict_from_streams(self, semantic_map: jax.Array, residual_code: jax.Array, features: jax.Array,
                             image_size: tuple[int, int]) -> dict[str, jax.Array]:
        """Task predictions from the streams; in the paper mode ``residual_code`` and ``features`` are not read."""
        del residual_code  # no head reads the residual code, in either mode
        head_input = semantic_map
        if self.config.heads_read == "semantic+backbone":
            head_input = jnp.concatenate([semantic_map, features], axis=-1)
        predictions = {}
        for name, _ in self.config.tasks:
            out = resize_bilinear(self.heads[name](head_input), image_size, align_corners=True)
            if name == "normal":
                out = unit_vectors(out, 1e-12)
            predictions[name] = out
        return predictions

    def predict(self, images: jax.Array) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
        """The task predictions and the streams, without running any grounding decoder (what the counterfactual
        pass scores): ``(predictions, aux)`` with ``aux`` keys semantic_map, residual_code, features, low_level."""
        predictions, aux = self._encode_and_predict(images)
        return jax.tree.map(_as_float32, predictions), jax.tree.map(_as_float32, aux)

    def _encode_and_predict(self, images):
        c1, c2, c3, c4 = self.backbone(images)
        semantic_map, residual_code = self.streams(c4)
        predictions = self.predict_from_streams(semantic_map, residual_code, c4, images.shape[1:3])
        return predictions, {"semantic_map": semantic_map, "residual_code": residual_code, "features": c4,
                             "low_level": c1}

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


def _as_float32(value: jax.Array) -> jax.Array:
    return value.astype(jnp.float32) if jnp.issubdtype(value.dtype, jnp.floating) else value
