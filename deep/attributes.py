r"""The CelebA attribute model: a dual-stream ResNet with soft grounding (the paper's scalability benchmark).

The paper's Appendix E and the authors' ``models/causal_celeba_model.py`` (``reference/official_implementation.md``,
"CelebA model") agree but for the backbone (:data:`ATTRIBUTE_BACKBONES`):

* **backbone**: ResNet-50 without dilation in the paper ("dilated convolutions disabled for classification"),
  ResNet-18 in the authors' code; output stride 32 either way (a 4×4 map for 128×128 faces);
* **streams**: ``proj_zs`` and ``proj_zp``, each a 1×1 convolution → BatchNorm → ReLU, to the semantic map ẑ_s
  (1024 channels) and the residual map ẑ_r (64 channels), both spatial;
* **attribute head**: the spatial mean of ẑ_s → Linear 256 → BatchNorm → ReLU → Dropout 0.5 → Linear T (logits). The
  last layer, one logit per attribute, is the task-specific part (``heads``): everything before it, the 256-channel
  features included, is shared, so the gradient-balancing baselines (:func:`deep.train.balanced_step`) see T tasks
  with linear heads on one shared representation;
* **soft grounding** (Eq (15)): ``concat(ẑ_s, ẑ_r)`` maps → five blocks of (bilinear ×2 → 3×3 convolution →
  BatchNorm → ReLU) with 256, 128, 64, 32, 32 channels → 1×1 convolution to 3 → sigmoid, the reconstructed face.

No physical renderer, no counterfactual pass, no stages: the CelebA objective is

.. math:: \mathcal L = \lambda_{\rm attr}\,\mathrm{BCE} + \beta_{\rm app}\big[\lambda_{L1}\|D([\hat z_s;\hat z_r])
          - x\|_1 + \mathrm{LPIPS}(D([\hat z_s;\hat z_r]), x)\big] + \lambda_{\rm ind}\,\mathrm{CKA}(\bar z_s, \bar z_r)

(:func:`attribute_objective`), with the CKA between the spatially pooled streams and the LPIPS term only from a
user-supplied weights file (:mod:`deep.perceptual`). The baselines (``grounding="none"``) have no decoder and train
the per-attribute losses with a method of :mod:`theory.balancing`.

A prediction is an attribute's logit ``[B]``; the attribute is predicted present where the logit is positive (a
sigmoid above 0.5, the authors' threshold). :func:`evaluate_attributes` scores a split, :func:`gradient_cosines`
measures the paper's gradient-orthogonality probes (its Figs. 4-5), :func:`sample_panels` draws reconstructions and
residual swaps; ``experiments/train_celeba.py`` drives them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.flatten_util import ravel_pytree

from deep import losses, train, trainer
from deep.backbone import RESNET18, BackboneConfig, ResNet, batch_norm
from deep.data.celeba import CELEBA_ATTRIBUTES
from deep.layers import conv, dense, drawn_later
from deep.metrics import AttributeAccuracy
from deep.model import COMPUTE_DTYPES, check_task_names, configure_layers, initialise_like_pytorch
from deep.perceptual import LPIPSWeights, lpips_loss
from deep.resize import resize_bilinear
from theory.measures import gradient_cosine

ATTRIBUTE_GROUNDINGS = ("soft", "none")
# The backbone of each variant: the paper's ResNet-50 without dilation, the authors' ResNet-18.
ATTRIBUTE_BACKBONES = {"paper": BackboneConfig(replace_stride_with_dilation=(False, False, False)),
                       "authors": RESNET18}
# Model sizes: the full one (1024/64 streams) and one for CPU smoke runs and tests, on a variant's backbone.
ATTRIBUTE_MODEL_SIZES = {
    "full": {},
    "tiny": dict(depths=(1, 1, 1, 1), width=8, semantic_channels=16, residual_channels=4, hidden_channels=16,
                 decoder_widths=(8, 8, 8, 8, 8)),
}


def attribute_model_config(variant: str, size: str, **fields) -> "AttributeModelConfig":
    """The configuration of ``variant``'s model (:data:`ATTRIBUTE_BACKBONES`) at ``size``
    (:data:`ATTRIBUTE_MODEL_SIZES`), with any other :class:`AttributeModelConfig` field given."""
    if variant not in ATTRIBUTE_BACKBONES:
        raise ValueError(f"variant must be one of {', '.join(ATTRIBUTE_BACKBONES)}; got {variant!r}")
    if size not in ATTRIBUTE_MODEL_SIZES:
        raise ValueError(f"size must be one of {', '.join(ATTRIBUTE_MODEL_SIZES)}; got {size!r}")
    sized = dict(ATTRIBUTE_MODEL_SIZES[size])
    backbone_fields = {name: sized.pop(name) for name in ("depths", "width") if name in sized}
    backbone = dataclasses.replace(ATTRIBUTE_BACKBONES[variant], **backbone_fields)
    return AttributeModelConfig(backbone=backbone, **sized, **fields)


def run_model_config(record) -> "AttributeModelConfig":
    """The model of a run of ``experiments/train_celeba.py`` whose flags are ``record`` (a mapping with its
    fields, ``attributes`` as names, such as its ``run.json``): the script builds its model from this too."""
    return attribute_model_config(record["variant"], record["model"], attributes=tuple(record["attributes"]),
                                  grounding="soft" if record["method"] == "core" else "none",
                                  compute_dtype=record["precision"])


@dataclasses.dataclass(frozen=True)
class AttributeModelConfig:
    """Sizes of :class:`AttributeModel` (defaults: the authors' CelebA model, all 40 attributes; the paper's has the
    ResNet-50 of :data:`ATTRIBUTE_BACKBONES`).

    ``attributes``: the task names, one binary attribute each (their order is the order of the columns of the
    ``attributes`` array the data holds). ``grounding``: ``"soft"`` (CORE-MTL: the reconstruction decoder) or
    ``"none"`` (the baselines).
    """

    backbone: BackboneConfig = RESNET18
    attributes: tuple[str, ...] = CELEBA_ATTRIBUTES
    semantic_channels: int = 1024
    residual_channels: int = 64
    hidden_channels: int = 256
    dropout: float = 0.5
    decoder_widths: tuple[int, ...] = (256, 128, 64, 32, 32)
    grounding: str = "soft"
    compute_dtype: str = "float32"

    def __post_init__(self):
        if not self.attributes or len(set(self.attributes)) != len(self.attributes):
            raise ValueError(f"attributes must be distinct names, at least one; got {self.attributes}")
        for name in ("semantic_channels", "residual_channels", "hidden_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if not self.decoder_widths or any(width < 1 for width in self.decoder_widths):
            raise ValueError(f"decoder_widths must be channel counts >= 1; got {self.decoder_widths}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must lie in [0, 1); got {self.dropout}")
        if self.grounding not in ATTRIBUTE_GROUNDINGS:
            raise ValueError(f"grounding must be one of {', '.join(ATTRIBUTE_GROUNDINGS)}; got {self.grounding!r}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}; got {self.compute_dtype!r}")

    @property
    def tasks(self) -> tuple[tuple[str, int], ...]:
        """``(attribute, 1)`` pairs: the task list the training steps iterate over (one logit per attribute)."""
        return tuple((name, 1) for name in self.attributes)


class Projector(nnx.Module):
    """1×1 convolution → BatchNorm → ReLU (the authors' ``proj_zs`` and ``proj_zp``)."""

    def __init__(self, in_channels: int, out_channels: int, rngs: nnx.Rngs):
        self.conv = conv(in_channels, out_channels, (1, 1), use_bias=False, rngs=rngs)
        self.bn = batch_norm(out_channels, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(self.bn(self.conv(x)))


class UpBlock(nnx.Module):
    """Bilinear ×2 → 3×3 convolution → BatchNorm → ReLU."""

    def __init__(self, in_channels: int, out_channels: int, rngs: nnx.Rngs):
        self.conv = conv(in_channels, out_channels, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, rngs=rngs)
        self.bn = batch_norm(out_channels, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = resize_bilinear(x, (2 * x.shape[1], 2 * x.shape[2]))
        return jax.nn.relu(self.bn(self.conv(x)))


class SoftDecoder(nnx.Module):
    """``concat(ẑ_s, ẑ_r) [B, h, w, C_s + C_r] -> image [B, H, W, 3]`` in (0, 1): the generic decoder of Eq (15),
    resized bilinearly to the image where the doublings do not reach it exactly."""

    def __init__(self, in_channels: int, widths: tuple[int, ...], rngs: nnx.Rngs):
        channels = (in_channels, *widths)
        self.blocks = nnx.List([UpBlock(a, b, rngs) for a, b in zip(channels[:-1], channels[1:])])
        self.out = conv(widths[-1], 3, (1, 1), rngs=rngs)

    def __call__(self, x: jax.Array, image_size: tuple[int, int]) -> jax.Array:
        for block in self.blocks:
            x = block(x)
        if x.shape[1:3] != tuple(image_size):
            x = resize_bilinear(x, image_size)
        return jax.nn.sigmoid(self.out(x))


class AttributeModel(nnx.Module):
    """``images [B, H, W, 3] -> (predictions {attribute: logits [B]}, aux)``; ``aux``: ``semantic_map``,
    ``residual_map`` (``[B, h, w, C]``), ``semantic_code``, ``residual_code`` (their spatial means), ``features``
    (the shared 256-channel input of the heads) and, with soft grounding, ``reconstruction`` ``[B, H, W, 3]``."""

    # The shared parameters the heads read themselves (deep.train.task_jacobian_step): none.
    shared_read_by_heads = nnx.Nothing

    def __init__(self, config: AttributeModelConfig, rngs: nnx.Rngs):
        self.config = config
        with drawn_later():  # initialise_like_pytorch draws every convolution and dense layer below
            self.backbone = ResNet(config.backbone, rngs)
            features = config.backbone.output_channels[-1]
            self.semantic = Projector(features, config.semantic_channels, rngs)
            self.residual = Projector(features, config.residual_channels, rngs)
            self.hidden = dense(config.semantic_channels, config.hidden_channels, rngs=rngs)
            self.hidden_bn = batch_norm(config.hidden_channels, rngs)
            self.dropout = nnx.Dropout(config.dropout, rngs=rngs)
            self.heads = dense(config.hidden_channels, len(config.attributes), rngs=rngs)
            self.decoder = SoftDecoder(config.semantic_channels + config.residual_channels, config.decoder_widths,
                                       rngs) if config.grounding == "soft" else None
        initialise_like_pytorch(self, rngs.params())
        configure_layers(self, config.compute_dtype, "xla")

    def _streams(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        c4 = self.backbone(images)[-1]
        return self.semantic(c4), self.residual(c4)

    def _features(self, semantic_map: jax.Array) -> jax.Array:
        hidden = self.hidden_bn(self.hidden(jnp.mean(semantic_map, axis=(1, 2))))
        return self.dropout(jax.nn.relu(hidden))

    def encode(self, images: jax.Array) -> dict[str, jax.Array]:
        """The representation the heads read, keyed as :meth:`predict_from_streams`' argument: ``features``."""
        semantic_map, _ = self._streams(images)
        return {"features": self._features(semantic_map)}

    def predict_from_streams(self, features: jax.Array, image_size: tuple[int, int] | None = None,
                             tasks: tuple[str, ...] | None = None) -> dict[str, jax.Array]:
        """``{attribute: logits [B]}`` for ``tasks`` (default: all) from the shared features ``[B, 256]``;
        ``image_size`` is not read (the dense models' interface)."""
        del image_size
        check_task_names(tasks, self.config.tasks)
        logits = self.heads(features).astype(jnp.float32)
        return {name: logits[:, index] for index, name in enumerate(self.config.attributes)
                if tasks is None or name in tasks}

    def task_loss(self, name: str, prediction: jax.Array, batch: dict) -> jax.Array:
        """Attribute ``name``'s binary cross-entropy against its column of ``batch["attributes"]``."""
        return attribute_loss(prediction[:, None], batch["attributes"][:, self.config.attributes.index(name), None])

    def reconstruct(self, semantic_map: jax.Array, residual_map: jax.Array, image_size: tuple[int, int]) -> jax.Array:
        """The soft-grounding decoder's image ``[B, H, W, 3]`` from the two stream maps (a residual map of another
        image gives that image's appearance on this one's semantics, if the streams have separated them)."""
        if self.decoder is None:
            raise ValueError("this model has no decoder (grounding='none')")
        return self.decoder(jnp.concatenate([semantic_map, residual_map], axis=-1), image_size)

    def __call__(self, images: jax.Array) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
        semantic_map, residual_map = self._streams(images)
        features = self._features(semantic_map)
        aux = {"semantic_map": semantic_map, "residual_map": residual_map,
               "semantic_code": jnp.mean(semantic_map, axis=(1, 2)),
               "residual_code": jnp.mean(residual_map, axis=(1, 2)), "features": features}
        if self.decoder is not None:
            aux["reconstruction"] = self.reconstruct(semantic_map, residual_map, images.shape[1:3])
        return self.predict_from_streams(features), jax.tree.map(lambda x: x.astype(jnp.float32), aux)


def attribute_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Binary cross-entropy with logits, averaged over the labelled entries (labels 0 or 1; −1 = no label, the
    filler rows of an evaluation batch): PyTorch's ``BCEWithLogitsLoss`` over ``[B, T]`` when every entry is
    labelled."""
    labelled = labels >= 0
    per_entry = optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), jnp.where(labelled, labels, 0))
    return jnp.sum(jnp.where(labelled, per_entry, 0.0)) / jnp.maximum(jnp.sum(labelled), 1)


def stacked_logits(predictions: dict[str, jax.Array], attributes: tuple[str, ...]) -> jax.Array:
    """``[B, T]`` logits, columns in the order of ``attributes``."""
    return jnp.stack([predictions[name] for name in attributes], axis=-1)


@dataclasses.dataclass(frozen=True)
class AttributeLossWeights:
    """The CelebA objective's weights (the authors' ``5celeba.yaml``; the paper's Table 7, CelebA row)."""

    attributes: float = 1.0     # lambda_attr
    independence: float = 0.5   # lambda_ind (CKA)
    appearance: float = 5.0     # beta_app
    appearance_l1: float = 1.0  # lambda_l1 inside beta_app

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"loss weight {field.name} must be a finite number >= 0; got {value!r}")


def attribute_objective(graphdef, params, batch_stats, rest, batch: dict, weights: AttributeLossWeights,
                        perceptual: LPIPSWeights | None = None):
    """The CelebA objective (module docstring) of a train-mode pass, with ``(batch_stats, rest, terms)``."""
    model = train._merge(graphdef, params, batch_stats, rest)
    model.train()
    images = batch["images"]
    predictions, aux = model(images)
    logits = stacked_logits(predictions, model.config.attributes)
    terms = {"attributes": attribute_loss(logits, batch["attributes"]),
             "independence": losses.independence_loss(aux["semantic_map"], aux["residual_code"])}
    appearance = 0.0
    if "reconstruction" in aux:
        terms["appearance_l1"] = losses.l1(aux["reconstruction"], images)
        appearance = weights.appearance_l1 * terms["appearance_l1"]
        if perceptual is not None:
            terms["appearance_perceptual"] = lpips_loss(perceptual, aux["reconstruction"], images)
            appearance = appearance + terms["appearance_perceptual"]
    loss = (weights.attributes * terms["attributes"] + weights.independence * terms["independence"]
            + weights.appearance * appearance)
    batch_stats, rest = train._split_states(model)
    return loss, (batch_stats, rest, terms)


def attribute_step(graphdef, optimizer: optax.GradientTransformation, state: train.TrainState, batch: dict,
                   weights: AttributeLossWeights, perceptual: LPIPSWeights | None = None):
    """One CORE-MTL step on CelebA: the gradient of :func:`attribute_objective`, clipped and applied by
    ``optimizer`` (:func:`deep.train.make_optimizer`; the authors' AdamW and cosine schedule), guarded against
    non-finite values as every step here. Jit with ``graphdef``, ``optimizer`` and ``weights`` static."""
    (loss, (batch_stats, rest, terms)), grads = jax.value_and_grad(attribute_objective, argnums=1, has_aux=True)(
        graphdef, state.params, state.batch_stats, state.rest, batch, weights, perceptual)
    new_state, finite = train.guarded_update(optimizer, state, grads, batch_stats, rest, loss)
    return new_state, {"loss": loss, "finite": finite, **terms}


def gradient_cosines(graphdef, state: train.TrainState, batch: dict, weights: AttributeLossWeights,
                     perceptual: LPIPSWeights | None = None, jacobian_chunk: int | None = None
                     ) -> dict[str, jax.Array]:
    r"""The paper's gradient-orthogonality probes (its Figs. 4 and 5) on one batch, in training mode, with respect to
    the shared parameters :math:`\theta` (everything but the heads):

    * ``task_task`` ``[T, T]``: :math:`\cos(\nabla_\theta\ell_s, \nabla_\theta\ell_t)` for every two
      attributes (Fig. 5, the pairwise interactions);
    * for a model with the decoder, ``task_reconstruction`` and ``task_independence`` ``[T]``: each attribute's
      gradient against the reconstruction term's, :math:`\beta(\lambda_{L1}L_1 + \mathrm{LPIPS})`, and the
      independence term's, CKA (Fig. 4: near 0 for CORE-MTL, the paper says, with no projection).

    Zero gradients give a cosine of 0. Jit with ``graphdef``, ``weights`` and ``jacobian_chunk``
    (:func:`deep.train.task_jacobian_step`'s ``chunk``) static."""
    _, jacobian, _, _, _ = train.task_jacobian_step(graphdef, state, batch, jacobian_chunk)
    cosines_with = lambda gradient: jax.vmap(lambda row: gradient_cosine(row, gradient))(jacobian)  # noqa: E731
    probes = {"task_task": jax.vmap(cosines_with)(jacobian)}
    shared, heads = state.params
    if train._merge(graphdef, state.params, state.batch_stats, state.rest).decoder is None:
        return probes

    def term_gradient(name: str) -> jax.Array:
        def term(shared):
            _, (_, _, terms) = attribute_objective(graphdef, (shared, heads), state.batch_stats, state.rest, batch,
                                                   weights, perceptual)
            if name == "independence":
                return terms["independence"]
            return weights.appearance * (weights.appearance_l1 * terms["appearance_l1"]
                                         + terms.get("appearance_perceptual", 0.0))

        return ravel_pytree(jax.grad(term)(shared))[0]

    probes["task_reconstruction"] = cosines_with(term_gradient("reconstruction"))
    probes["task_independence"] = cosines_with(term_gradient("independence"))
    return probes


def make_attribute_step(method: str, graphdef, optimizer: optax.GradientTransformation,
                        weights: AttributeLossWeights, perceptual: LPIPSWeights | None = None,
                        jacobian_chunk: int | None = None):
    """``(balancer, step)`` with ``step(state, balancer_state, batch, key) -> (state, balancer_state, metrics)``
    jitted, consuming (donating) its states: CORE-MTL's :func:`attribute_step` for ``method="core"`` (no balancer:
    ``()``), else the method of :mod:`theory.balancing` over the per-attribute losses
    (:func:`deep.train.balanced_step`, ``jacobian_chunk`` tasks' pull-backs at a time; ``None``: all). ``batch``:
    ``images`` float in [0, 1] and ``attributes`` ``[B, T]``."""
    if method != "core":
        balancer, balanced = trainer.make_step(method, graphdef, optimizer, losses.LossWeights(),
                                               jacobian_chunk=jacobian_chunk)
        return balancer, lambda state, balancer_state, batch, key: balanced(state, balancer_state, batch, key, None)
    core = jax.jit(functools.partial(attribute_step, graphdef, optimizer, weights=weights), donate_argnums=0)

    def step(state, balancer_state, batch, key):
        del key  # the CelebA objective draws nothing beyond the model's own dropout stream
        state, metrics = core(state, batch, perceptual=perceptual)
        return state, balancer_state, metrics

    return (), step


def predict_logits_function(graphdef) -> Callable:
    """Jitted ``(state, images) -> logits [B, T]`` in eval mode (running statistics, no dropout); the decoder does
    not run."""

    @jax.jit
    def predict(state: train.TrainState, images: jax.Array) -> jax.Array:
        model = trainer.eval_model(graphdef, state)
        # Stacked here: a dict leaving jit comes back with its keys sorted, not in the attributes' order.
        return stacked_logits(model.predict_from_streams(**model.encode(images)), model.config.attributes)

    return predict


def evaluate_attributes(predict: Callable, state: train.TrainState, batches: Iterable[dict],
                        attributes: tuple[str, ...]) -> dict[str, float]:
    """:class:`deep.metrics.AttributeAccuracy` over every batch of a split (``predict`` from
    :func:`predict_logits_function`), each batch's statistics brought to the host one batch late."""
    accuracy = AttributeAccuracy(attributes)
    dispatched = (accuracy.statistics(predict(state, batch["images"]), batch["attributes"]) for batch in batches)
    for statistics in trainer.one_behind(dispatched):
        accuracy.add(statistics)
    return accuracy.result()


def sample_panels(graphdef, state: train.TrainState, images: jax.Array) -> dict[str, np.ndarray]:
    """For a model with the decoder, in eval mode: ``reconstruction`` of each image, and ``swapped``: each image's
    semantic map decoded with the residual map of the image before it (rolled by one), which shows what the residual
    stream carries."""
    return {name: np.asarray(value, np.float32) for name, value in _panels(graphdef, state, images).items()}


@functools.partial(jax.jit, static_argnums=0)
def _panels(graphdef, state: train.TrainState, images: jax.Array) -> dict[str, jax.Array]:
    model = trainer.eval_model(graphdef, state)
    _, aux = model(images)
    swapped = model.reconstruct(aux["semantic_map"], jnp.roll(aux["residual_map"], 1, axis=0), images.shape[1:3])
    return {"reconstruction": aux["reconstruction"], "swapped": swapped}
