"""The dual-stream multi-task model: backbone -> (semantic map ẑ_s, residual code ẑ_r) -> task heads.

By default the task heads read **only** the semantic stream, as the paper states (``heads_read="semantic"``). The
authors' code also feeds backbone features to the heads, which carry residual information; ``heads_read=
"semantic+backbone"`` reproduces that (the heads then see ``concat(ẑ_s, c4)``). Predictions are upsampled to the
image with bilinear ``align_corners=True`` (LibMTL's convention); surface normals are unit-normalised.

The model returns ``(predictions, aux)``: ``aux`` holds the intermediates that losses and probes read (the
semantic map, the residual code, the backbone features).

With ``grounding="hard"`` the model also renders the image through the physical decoder (:mod:`deep.decoders`)
and returns the rendering and its parts in ``aux``. Not built yet (see the README's roadmap): the AdaIN appearance
decoder and the soft-grounding decoder, MTAN.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from deep.backbone import BackboneConfig, ResNet
from deep.decoders import PhysicalDecoder
from deep.heads import ASPPHead
from deep.resize import resize_bilinear
from deep.shading import unit_vectors
from deep.streams import DualStream

HEAD_INPUTS = ("semantic", "semantic+backbone")
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# The layers whose matrix work follows the compute dtype; normalisation statistics are reduced in float32 by Flax.
_COMPUTE_LAYERS = (nnx.Conv, nnx.Linear, nnx.BatchNorm, nnx.LayerNorm)
GROUNDINGS = ("hard", "none")
NYUV2_TASKS = (("segmentation", 13), ("depth", 1), ("normal", 3))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Sizes and options of :class:`DualStreamModel` (defaults: the paper's NYUv2 model)."""

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

    def __post_init__(self):
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}; got {self.compute_dtype!r}")
        if self.grounding not in GROUNDINGS:
            raise ValueError(f"grounding must be one of {', '.join(GROUNDINGS)}; got {self.grounding!r}")
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
            raise ValueError("this model has no grounding decoder (grounding='none')")
        return self.decoder(semantic_map, residual_code, jnp.mean(features, axis=(1, 2)), image_size)

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

    def __call__(self, images: jax.Array) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
        c1, c2, c3, c4 = self.backbone(images)
        semantic_map, residual_code = self.streams(c4)
        predictions = self.predict_from_streams(semantic_map, residual_code, c4, images.shape[1:3])
        aux = {"semantic_map": semantic_map, "residual_code": residual_code, "features": c4, "low_level": c1}
        if self.decoder is not None:
            rendered, parts = self.render(semantic_map, residual_code, c4, images.shape[1:3])
            aux.update(rendered=rendered, **parts)
        # Losses, CKA and metrics are computed in float32 whatever the compute dtype.
        return jax.tree.map(_as_float32, predictions), jax.tree.map(_as_float32, aux)


def _as_float32(value: jax.Array) -> jax.Array:
    return value.astype(jnp.float32) if jnp.issubdtype(value.dtype, jnp.floating) else value
