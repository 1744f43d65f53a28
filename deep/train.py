r"""Training steps for the dual-stream model (CORE-MTL) and for its gradient-balanced baselines.

Every step is a pure function of split NNX state (``nnx.split`` once; ``nnx.merge`` inside the traced function), so it
jits, differentiates per task and shards:

* :func:`core_step` — Eq (16): weighted task losses + λ_ind·CKA + the edge term + the grounding terms (hard: the
  physical rendering loss, albedo TV, grey shading, albedo–normal covariance; hard and soft: the generic decoders'
  geometry and appearance reconstructions, the latter with the authors' LPIPS-VGG term when its weights are
  passed, :mod:`deep.perceptual`) + the counterfactual loss of Eq (12) on the steps that run it (a static flag: the
  step compiles once with the pass and once without). The counterfactual pass re-encodes images synthesised by the
  AdaIN appearance decoder with residual codes shuffled within the batch (``stop_gradient`` on the images, as the
  authors detach them) with the model in eval mode — BatchNorm reads its running statistics and leaves them unchanged,
  dropout is off — while gradients still flow into every parameter, and scores the predictions against the **original**
  labels.
* :func:`task_jacobian_step` + ``balancer.step`` + :func:`apply_gradients` — a baseline of Definition 2.1 on the
  same backbone: per-task gradients of the shared parameters from one forward pass (``jax.vjp``: each task's loss
  through its own head, then ``vmap`` of the encoder's pull-back over the K representation gradients), combined by
  any method of :mod:`theory.balancing`; each head gets its own task's gradient.

The optimiser is the authors': global-norm clipping at 10, Adam with *coupled* L2 (``decoupled_weight_decay=False``)
or AdamW as the paper says (``True``), warm-up then cosine decay per epoch. A non-finite loss or gradient norm leaves
the state (and a balancer's) unchanged and is reported (``finite``), so a driver can stop with the last good state.

Data parallelism: a batch split over a device mesh and the state copied to every device (:mod:`deep.devices`) make
``jax.jit`` run the step as SPMD (BatchNorm statistics are over the global batch).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.flatten_util import ravel_pytree

from deep import losses
from deep.model import DualStreamModel
from deep.perceptual import LPIPSWeights, lpips_loss


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Optimiser and schedule (defaults: the authors' NYUv2 run)."""

    learning_rate: float = 2e-4
    weight_decay: float = 1e-4
    decoupled_weight_decay: bool = False
    clip_norm: float = 10.0
    epochs: int = 100
    warmup_epochs: int = 5
    steps_per_epoch: int = 1
    min_lr_ratio: float = 0.01

    def __post_init__(self):
        for name in ("learning_rate", "clip_norm"):
            if not (getattr(self, name) > 0 and math.isfinite(getattr(self, name))):
                raise ValueError(f"{name} must be a finite number > 0; got {getattr(self, name)}")
        if not (self.weight_decay >= 0 and 0 <= self.min_lr_ratio <= 1):
            raise ValueError("weight_decay must be >= 0 and min_lr_ratio in [0, 1]")
        if self.epochs < 1 or self.steps_per_epoch < 1 or not 0 <= self.warmup_epochs < self.epochs:
            raise ValueError(f"need epochs >= 1, steps_per_epoch >= 1 and 0 <= warmup_epochs < epochs; got "
                             f"{self.epochs}, {self.steps_per_epoch}, {self.warmup_epochs}")


def learning_rate_at(config: OptimConfig, step) -> jax.Array:
    """Per-epoch schedule: warm-up :math:`\\eta(0.1 + 0.9(e+1)/W)` for :math:`e < W`, then cosine from η to
    ``min_lr_ratio``·η over the remaining epochs."""
    epoch = jnp.asarray(step) // config.steps_per_epoch
    base, floor = config.learning_rate, config.learning_rate * config.min_lr_ratio
    warmup = base * (0.1 + 0.9 * (epoch + 1) / max(config.warmup_epochs, 1))
    progress = (epoch - config.warmup_epochs) / max(config.epochs - config.warmup_epochs, 1)
    cosine = floor + (base - floor) * 0.5 * (1 + jnp.cos(jnp.pi * jnp.clip(progress, 0.0, 1.0)))
    return jnp.where(epoch < config.warmup_epochs, warmup, cosine)


def make_optimizer(config: OptimConfig, ravel: bool = True) -> optax.GradientTransformation:
    """Clip → (coupled L2 →) Adam (→ decoupled decay) → −η(step), for parameters ``(shared, heads)`` as in
    :class:`TrainState`.

    The shared parameters and the heads' are two groups, each with its own Adam state (moments and step count), as
    PyTorch keeps Adam's state per parameter: in the authors' stage 0 the heads are frozen and PyTorch never touches
    their state, so their first update when the tasks start is a first Adam step (bias-corrected, about η per
    weight). :func:`core_step` keeps the heads' group unchanged while ``train_tasks`` is off. The clipping norm and
    the schedule's step are global. Any other parameter tree is one group.

    Each group's Adam runs on its parameters raveled into one vector (``optax.flatten``; every step of it is
    elementwise, so the update is the same): its state is two vectors per group, not two arrays per parameter.
    The model has a few hundred parameter arrays, and a step's program otherwise repeats Adam's operations for each
    (about 29 per array): raveled, CORE-MTL's step has a fifth fewer operations and traces and compiles about a fifth
    faster (``bench/bench_optimizer.py`` compares the two; ``ravel=False`` keeps an array per parameter)."""
    decay = optax.add_decayed_weights(config.weight_decay)
    adam = optax.chain(optax.scale_by_adam(), decay) if config.decoupled_weight_decay else optax.chain(
        decay, optax.scale_by_adam())
    adam = _raveled(adam) if ravel else adam
    return optax.chain(optax.clip_by_global_norm(config.clip_norm),
                       optax.multi_transform({"shared": adam, "heads": adam}, _parameter_groups),
                       optax.scale_by_learning_rate(lambda step: learning_rate_at(config, step)))


def _raveled(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """``inner`` on the parameters raveled into one vector (``optax.flatten``), or as it is on a group without
    parameters (a model without heads, or a parameter tree of one group), which has nothing to ravel."""
    raveled = optax.flatten(inner)
    return optax.GradientTransformation(
        lambda params: (raveled if jax.tree.leaves(params) else inner).init(params),
        lambda updates, state, params=None: (raveled if jax.tree.leaves(updates) else inner).update(
            updates, state, params))


def _parameter_groups(params):
    if isinstance(params, tuple) and len(params) == 2:
        shared, heads = params
        return jax.tree.map(lambda _: "shared", shared), jax.tree.map(lambda _: "heads", heads)
    return jax.tree.map(lambda _: "shared", params)


def _keep_group(new_state, old_state, group: str, keep_old):
    """The optimiser state ``new_state`` with parameter group ``group``'s Adam state taken from ``old_state`` where
    ``keep_old`` (a traced bool) holds."""
    if isinstance(new_state, optax.MultiTransformState):
        inner = dict(new_state.inner_states)
        inner[group] = _select(keep_old, old_state.inner_states[group], new_state.inner_states[group])
        return new_state._replace(inner_states=inner)
    if isinstance(new_state, tuple) and not hasattr(new_state, "_fields"):  # a chain's states
        return tuple(_keep_group(new, old, group, keep_old) for new, old in zip(new_state, old_state))
    return new_state


class TrainState(NamedTuple):
    """The arrays of a training run (the graph definition is kept apart, static).

    ``params`` is the pair ``(shared, heads)``: the parameters every task shares (backbone, streams, decoders) and
    the task heads', so that baselines can take per-task Jacobians of the shared part alone.
    """

    params: Any
    batch_stats: Any
    rest: Any
    opt_state: Any
    step: jax.Array


HEADS = nnx.All(nnx.Param, nnx.PathContains("heads"))
SHARED = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("heads")))


def split_states(model: DualStreamModel):
    """``(graphdef, (shared, heads), batch_stats, rest)``: the model split as :class:`TrainState` holds it."""
    graphdef, shared, heads, batch_stats, rest = nnx.split(model, SHARED, HEADS, nnx.BatchStat, ...)
    return graphdef, (shared, heads), batch_stats, rest


def split_model(model: DualStreamModel, optimizer: optax.GradientTransformation):
    """``(graphdef, TrainState)`` from a model, or its shapes from an abstract one (``nnx.eval_shape``)."""
    graphdef, params, batch_stats, rest = split_states(model)
    abstract = any(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(params))
    # (The raveled Adam of make_optimizer concatenates its parameters: shapes alone only go through eval_shape.)
    opt_state = jax.eval_shape(optimizer.init, params) if abstract else optimizer.init(params)
    return graphdef, TrainState(params, batch_stats, rest, opt_state, jnp.zeros((), jnp.int32))


def _split_states(model: DualStreamModel):
    """The non-parameter states of a model after a forward pass: ``(batch_stats, rest)``."""
    return split_states(model)[2:]


def _merge(graphdef, params, batch_stats, rest) -> DualStreamModel:
    """``nnx.merge`` with the non-differentiated states rebuilt at the current trace level, so that BatchNorm may
    update its statistics inside ``jax.grad``/``jax.vjp`` (NNX refuses to mutate a variable from an outer trace)."""
    batch_stats, rest = jax.tree.map(lambda value: value, (batch_stats, rest))
    return nnx.merge(graphdef, *params, batch_stats, rest)


def task_losses(model, predictions: dict, batch: dict) -> dict[str, jax.Array]:
    """Each task's loss, as the model scores it (its ``task_loss``: the dense losses, or an attribute's
    cross-entropy)."""
    return {name: model.task_loss(name, predictions[name], batch) for name, _ in model.config.tasks}


def _weighted_task_loss(task_terms: dict, weights: losses.LossWeights) -> jax.Array:
    return sum(getattr(weights, name) * value for name, value in task_terms.items())


def counterfactual_loss(graphdef, params, batch_stats, rest, aux: dict, batch: dict, key: jax.Array,
                        weights: losses.LossWeights) -> jax.Array:
    r"""Eq (12), the authors' CFA: residual codes shuffled within the batch, counterfactual images synthesised and
    re-encoded in eval mode, the predictions scored against the **original** labels,

    .. math:: \tilde x_i = D_{\rm app}(\hat z_{s,i}, \hat z_{r,\pi(i)}), \qquad
              \mathcal L_{cfa} = \lambda_{cfa}\Big[\sum_t \lambda_t\,\ell_t(f(\tilde x), y)
              + 0.1\,\mathrm{CKA}(\hat z_s(\tilde x), \hat z_r(\tilde x))\Big].

    :math:`\tilde x` comes from :meth:`DualStreamModel.counterfactual_image` (the AdaIN appearance decoder; the
    physical rendering only for a model without one), with ``stop_gradient`` on its inputs and on the image, as
    the authors detach them: the decoder gets no gradient from this term. Runs on its own merge of the states; the whole
    pass reads BatchNorm's running statistics and updates none, and gradients reach every parameter of the encoder and
    heads. Only the predictions and streams of :math:`\tilde x` are computed (the authors also run, then discard, every
    decoder on it).
    """
    model = _merge(graphdef, params, batch_stats, rest)
    model.eval()
    images = batch["images"]
    permutation = jax.random.permutation(key, images.shape[0])  # not a derangement, as the authors' randperm
    sg = jax.lax.stop_gradient
    counterfactual = model.counterfactual_image(sg(aux["semantic_map"]), sg(aux["residual_code"])[permutation],
                                                images.shape[1:3], features=sg(aux["features"]))
    predictions, cf_aux = model.predict(sg(counterfactual))
    task = _weighted_task_loss(task_losses(model, predictions, batch), weights)
    independence = losses.independence_loss(cf_aux["semantic_map"], cf_aux["residual_code"])
    return weights.counterfactual * (task + 0.1 * independence)


def core_objective(graphdef, params, batch_stats, rest, batch: dict, key: jax.Array, weights: losses.LossWeights,
                   independence_weight, counterfactual: bool, task_scale=1.0,
                   perceptual: LPIPSWeights | None = None) -> tuple[jax.Array, tuple]:
    r"""Eq (16) plus, when ``counterfactual``, the counterfactual term; returns ``(loss, (batch_stats, rest, terms))``.
    ``task_scale`` multiplies the task losses in the objective (0 in the authors' stage 0); the reported terms are
    unscaled.

    Grounding terms, by what the model has (``ModelConfig.grounding``):

    * generic decoders (soft, and hard as the authors' code; their Eq (14) terms), all unmasked as the authors':
      ``geometry`` :math:`= \|D_{\rm geo}(\hat z_s) - d\|_1` at full resolution and ``geometry_aux`` against the
      depth downsampled by nearest neighbour to the auxiliary output (both only when the batch has ``depth``);
      ``appearance_l1`` :math:`= \|D_{\rm app}(\hat z_s, \hat z_r) - x\|_1` and ``appearance_aux`` against the image
      downsampled bilinearly; with ``perceptual`` (LPIPS-VGG weights from
      :func:`deep.perceptual.load_lpips_npz`) also the authors' ``appearance_perceptual``
      :math:`= \frac1B\sum_i \mathrm{LPIPS}(D_{\rm app}(\hat z_s, \hat z_r)_i, x_i)`
      (:func:`deep.perceptual.lpips_loss`, full resolution), weighted by β_app in :func:`losses.total_loss`.
      Without it that term is absent from ``terms`` and counts 0.
    * the physical decoder (hard only), Eq (13): ``image``, ``albedo_tv``, ``gray``, ``covariance``.

    A model that can synthesise counterfactuals, with ``weights.counterfactual > 0``, always reports the
    ``counterfactual`` term: :func:`counterfactual_loss` when ``counterfactual`` (a Python bool), else 0.
    """
    model = _merge(graphdef, params, batch_stats, rest)
    if not isinstance(model, DualStreamModel):  # before tracing its forward pass, which would fail only at the end
        raise ValueError(f"CORE-MTL's objective needs the dual-stream model (deep.model.DualStreamModel), which has "
                         f"the streams and decoders; got {type(model).__name__}, a baseline architecture: train it "
                         f"with a balancing method")
    model.train()
    predictions, aux = model(batch["images"])
    total, terms = objective_terms(model, predictions, aux, batch, weights, independence_weight, task_scale,
                                   perceptual)
    new_batch_stats, new_rest = _split_states(model)
    if model.makes_counterfactuals and weights.counterfactual > 0:
        if counterfactual:
            probes = {k: aux[k] for k in ("semantic_map", "residual_code", "features")}
            terms["counterfactual"] = counterfactual_loss(graphdef, params, new_batch_stats, new_rest, probes, batch,
                                                          key, weights)
            total = total + terms["counterfactual"]
        else:
            terms["counterfactual"] = jnp.zeros((), total.dtype)
    return total, (new_batch_stats, new_rest, terms)


def objective_terms(model: DualStreamModel, predictions: dict, aux: dict, batch: dict, weights: losses.LossWeights,
                    independence_weight, task_scale=1.0,
                    perceptual: LPIPSWeights | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Eq (16) without the counterfactual term, from the outputs of ``model(batch["images"])``: ``(loss, terms)``
    (:func:`core_objective`; the model is read only for what it has)."""
    terms = task_losses(model, predictions, batch)
    scaled = {name: task_scale * value for name, value in terms.items()}
    if "depth" in predictions and weights.edge > 0:
        # Not gated by the stage, as in the authors' code: in stage 0 it still trains the encoder through the depth
        # head (whose own parameters are frozen then).
        scaled["edge"] = terms["edge"] = losses.edge_loss(predictions["depth"], batch["depth"])
    terms["independence"] = losses.independence_loss(aux["semantic_map"], aux["residual_code"])
    if model.geometry_decoder is not None and "depth" in batch:
        terms["geometry"] = losses.l1(aux["geometry"], batch["depth"])
        terms["geometry_aux"] = losses.geometry_aux_loss(aux["geometry_aux"], batch["depth"])
    if model.appearance_decoder is not None:
        terms["appearance_l1"] = losses.l1(aux["reconstruction"], batch["images"])
        terms["appearance_aux"] = losses.appearance_aux_loss(aux["reconstruction_aux"], batch["images"])
        if perceptual is not None:
            terms["appearance_perceptual"] = lpips_loss(perceptual, aux["reconstruction"], batch["images"],
                                                        model.config.compute_dtype)
    elif perceptual is not None:
        raise ValueError(f"a perceptual (LPIPS) loss needs the appearance decoder, which grounding "
                         f"{model.config.grounding!r} does not build (use 'soft' or 'hard')")
    if model.decoder is not None:
        terms["image"] = losses.physical_image_loss(aux["rendered"], batch["images"])
        terms["albedo_tv"] = losses.albedo_tv(aux["albedo"])
        terms["gray"] = losses.grayscale_shading(aux["shading"])
        terms["covariance"] = losses.albedo_normal_covariance(aux["albedo"], aux["normals"])
    return losses.total_loss({**terms, **scaled}, weights, independence_weight), terms


# The norm optax's clip_by_global_norm takes (optax.tree.norm; an older optax, without it, clips with global_norm,
# which the newer deprecates), so that XLA sees the same computation twice and does it once.
_global_norm = getattr(getattr(optax, "tree", None), "norm", None) or optax.global_norm


def _guarded(state: TrainState, new_state: TrainState, loss, grads) -> tuple[TrainState, jax.Array]:
    # One norm of all the gradients rather than a test per leaf (hundreds of small kernels): global-norm clipping
    # takes the same sum of squares, which XLA then computes once. Any NaN or infinity makes it non-finite; so does
    # a norm beyond float32's range (about 1.8e19), which only a diverged step reaches.
    finite = jnp.isfinite(loss) & jnp.isfinite(_global_norm(grads))
    return _select(finite, new_state, state), finite


def _select(condition, if_true, if_false):
    """``if_true`` where the traced bool ``condition`` holds, else ``if_false``, leaf by leaf of two like trees."""
    return jax.tree.map(lambda a, b: jnp.where(condition, a, b), if_true, if_false)


def core_step(graphdef, optimizer: optax.GradientTransformation, state: TrainState, batch: dict, key: jax.Array,
              weights: losses.LossWeights, independence_weight, counterfactual: bool = False,
              train_tasks=True, perceptual: LPIPSWeights | None = None) -> tuple[TrainState, dict]:
    """One CORE-MTL step. ``counterfactual``: whether this step runs the counterfactual pass, a Python bool (static
    under jit, ``static_argnames="counterfactual"``), so that each of the two programs holds only the work it does (a
    ``lax.cond`` on a traced flag would make the closed branch fill a buffer for every value the open one saves for the
    backward pass). The driver draws it on the host, as the authors' ``random.random() < p`` does
    (:meth:`deep.trainer.EpochControls.counterfactual_at`); a batch of one never runs it (nothing to shuffle).
    ``train_tasks=False`` is the authors' stage 0: the task losses leave the objective, and the heads get no gradient
    (not even the edge term's, which reaches the encoder through the frozen depth head), no update and no change of
    their Adam state, as PyTorch skips parameters that do not require gradients (:func:`make_optimizer`). Jit with
    ``graphdef``, ``optimizer`` and ``weights`` static (``functools.partial``).

    ``perceptual``: LPIPS-VGG weights (:func:`deep.perceptual.load_lpips_npz`) to add the authors'
    perceptual reconstruction term ``appearance_perceptual`` (reported in the metrics; absent without them).
    Pass them as a traced argument on every call, ``step(state, batch, key, ..., perceptual=lpips_weights)``:
    they stay out of ``TrainState`` (no optimiser state, no weight decay, not checkpointed), get no gradient,
    and are not baked into the compiled program. Requires a model with the appearance decoder (grounding
    ``soft`` or ``hard``); raises ``ValueError`` otherwise."""
    if not isinstance(counterfactual, (bool, np.bool_)):
        raise TypeError(f"counterfactual must be a Python bool (static under jit: "
                        f"static_argnames='counterfactual'); got {type(counterfactual).__name__}")
    counterfactual = bool(counterfactual) and batch["images"].shape[0] > 1
    task_scale = jnp.where(train_tasks, 1.0, 0.0)
    (loss, (batch_stats, rest, terms)), grads = jax.value_and_grad(core_objective, argnums=1, has_aux=True)(
        graphdef, state.params, state.batch_stats, state.rest, batch, key, weights, independence_weight,
        counterfactual, task_scale, perceptual)
    frozen = jnp.logical_not(train_tasks)
    grads = (grads[0], jax.tree.map(lambda g: jnp.where(frozen, jnp.zeros_like(g), g), grads[1]))
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    opt_state = _keep_group(opt_state, state.opt_state, "heads", frozen)
    params = optax.apply_updates(state.params, updates)
    params = (params[0], _select(frozen, state.params[1], params[1]))
    new_state = TrainState(params, batch_stats, rest, opt_state, state.step + 1)
    new_state, finite = _guarded(state, new_state, loss, grads)
    return new_state, {"loss": loss, "finite": finite, **terms}


# ------------------------------------------------------------------------------------------- balanced baselines


def _stacked_task_losses(graphdef, params, state: TrainState, batch: dict):
    """The task losses ``[K]`` of a train-mode forward pass with ``params``, and the updated non-parameter states."""
    model = _merge(graphdef, params, state.batch_stats, state.rest)
    model.train()
    predictions, _ = model(batch["images"])
    return jnp.stack(list(task_losses(model, predictions, batch).values())), _split_states(model)


def task_jacobian_step(graphdef, state: TrainState, batch: dict, chunk: int | None = None):
    """Per-task losses, the Jacobian ``[K, P]`` of the shared parameters, each head's own gradient, and the new
    BatchNorm statistics, from one forward pass.

    ``chunk``: how many of the K pull-backs through the encoder run at once (``None``: all K, one ``vmap``). Each
    holds its own activations' gradients, so memory grows with it: at CelebA's paper setting (ResNet-50, batch 256,
    128×128) XLA's CPU program for PCGrad needs 29 GiB of temporaries at K = 10 and 92 GiB at K = 40, beyond an
    80 GB GPU; chunks of a few tasks (``jax.lax.map`` with ``batch_size=chunk``) trade that for sequential passes,
    with the same Jacobian.

    Each task's loss is pulled back through its own head alone (:func:`_per_task_heads`), then the K representation
    gradients through the encoder, so every head's backward pass runs once instead of once per task (PCGrad's step at
    the NYUv2 size, by XLA's count: 10.9 TFLOP instead of 12.3 with the dual-stream model, 19.2 instead of 32.6 with
    MTAN). MTAN's task branches also read shared parameters (the transition blocks): their gradients come from each
    branch's own pass and add to what the encoder's pull-back gives. Only the encoder and the heads run: a grounded
    model's decoders (the baselines have none) neither run nor update their BatchNorm statistics."""
    shared, heads = state.params
    read_by_heads = _merge(graphdef, state.params, state.batch_stats, state.rest).shared_read_by_heads
    representation, encoder_pullback, batch_stats, rest = _encoder_vjp(graphdef, state, batch)
    losses_k, representation_grads, direct_grads, head_grads, batch_stats, rest = _per_task_heads(
        graphdef, shared, heads, batch_stats, rest, representation, batch)

    def shared_gradient(representation_grad, direct_grad):
        (through_encoder,) = encoder_pullback(representation_grad)
        read, not_read = nnx.split_state(through_encoder, read_by_heads, ...)
        return ravel_pytree(nnx.merge_state(jax.tree.map(jnp.add, read, direct_grad), not_read))[0]

    if chunk is None or chunk >= len(losses_k):
        jacobian = jax.vmap(shared_gradient)(representation_grads, direct_grads)
    else:
        jacobian = jax.lax.map(lambda grads: shared_gradient(*grads), (representation_grads, direct_grads),
                               batch_size=chunk)
    return losses_k, jacobian, head_grads, batch_stats, rest


def _encoder_vjp(graphdef, state: TrainState, batch: dict):
    """``(representation, pull-back to the shared parameters, batch_stats, rest)`` of a train-mode pass of the
    encoder (the model's ``encode``: what the heads may read)."""
    shared, heads = state.params

    def encode(shared):
        model = _merge(graphdef, (shared, heads), state.batch_stats, state.rest)
        model.train()
        return model.encode(batch["images"]), _split_states(model)

    representation, pullback, (batch_stats, rest) = jax.vjp(encode, shared, has_aux=True)
    return representation, pullback, batch_stats, rest


def _per_task_heads(graphdef, shared, heads, batch_stats, rest, representation: dict, batch: dict):
    """Each task's loss from the representation through its own head alone, with its gradients: ``(losses [K],
    representation gradients, gradients of the shared parameters the heads read themselves (the model's
    ``shared_read_by_heads``: MTAN's transition blocks; none for the dual-stream model), the heads' gradients (each
    head its own task's), batch_stats, rest)``, each gradient but the heads' with a leading K axis. The heads run in
    the order of the tasks, each from the states the one before left, as in the model's forward pass, so the states
    come out as the whole pass leaves them: each head's dropout stream advanced once, and MTAN's shared transitions'
    BatchNorm statistics updated once per task, in that order."""
    image_size = batch["images"].shape[1:3]
    merged = _merge(graphdef, (shared, heads), batch_stats, rest)
    tasks = [name for name, _ in merged.config.tasks]
    read_by_heads, not_read = nnx.split_state(shared, merged.shared_read_by_heads, ...)

    def decode(name, batch_stats, rest, representation, read_by_heads, heads):
        model = _merge(graphdef, (read_by_heads, not_read, heads), batch_stats, rest)
        model.train()
        prediction = model.predict_from_streams(**representation, image_size=image_size, tasks=(name,))[name]
        return model.task_loss(name, prediction.astype(jnp.float32), batch), _split_states(model)

    losses_k, representation_grads, direct_grads, head_grads = [], [], [], None
    for name in tasks:
        loss, pullback, (batch_stats, rest) = jax.vjp(functools.partial(decode, name, batch_stats, rest),
                                                      representation, read_by_heads, heads, has_aux=True)
        representation_grad, direct_grad, head_grad = pullback(jnp.ones_like(loss))
        losses_k.append(loss)
        representation_grads.append(representation_grad)
        direct_grads.append(direct_grad)
        # Head t only enters loss t: the other heads' gradients are zeros, so the sum is each head's own.
        head_grads = head_grad if head_grads is None else jax.tree.map(jnp.add, head_grads, head_grad)
    stacked = lambda grads: jax.tree.map(lambda *leaves: jnp.stack(leaves), *grads)
    return (jnp.stack(losses_k), stacked(representation_grads), stacked(direct_grads), head_grads, batch_stats,
            rest)


def guarded_update(optimizer: optax.GradientTransformation, state: TrainState, grads, batch_stats, rest,
                   loss) -> tuple[TrainState, jax.Array]:
    """``(state after one optax step along grads, finite)``, with the pass's new non-parameter states; a non-finite
    loss or gradient norm leaves ``state`` as it was."""
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    new_state = TrainState(optax.apply_updates(state.params, updates), batch_stats, rest, opt_state, state.step + 1)
    return _guarded(state, new_state, loss, grads)


def apply_gradients(graphdef, optimizer: optax.GradientTransformation, state: TrainState, shared_direction,
                    head_grads, batch_stats, rest, loss) -> tuple[TrainState, jax.Array]:
    """The optax update from a balanced shared direction ``[P]`` and the heads' gradients (guarded)."""
    _, unravel = ravel_pytree(state.params[0])
    return guarded_update(optimizer, state, (unravel(shared_direction), head_grads), batch_stats, rest, loss)


def _loss_weighted_step(graphdef, optimizer, balancer, state: TrainState, balancer_state, batch: dict, key):
    r"""A method that weighs the losses alone: its weights from the losses of this forward pass, then one backward
    pass of :math:`\sum_t w_t \mathcal L_t` (``jax.vjp`` with the weights as the cotangent), heads included."""
    losses_k, pullback, (batch_stats, rest) = jax.vjp(
        lambda params: _stacked_task_losses(graphdef, params, state, batch), state.params, has_aux=True)
    weights, balancer_state = balancer.weigh(None, losses_k, balancer_state, key)
    (grads,) = pullback(jax.lax.stop_gradient(weights).astype(losses_k.dtype))
    new_state, finite = guarded_update(optimizer, state, grads, batch_stats, rest, losses_k.sum())
    return new_state, balancer_state, losses_k, weights, finite


def representation_jacobian_step(graphdef, state: TrainState, batch: dict):
    """Per-task losses, their Jacobian ``[K, R]`` with respect to the shared representation (the streams and the
    backbone features the heads may read, raveled), the pull-back of a representation direction to the shared
    parameters, each head's own gradient, and the new BatchNorm statistics; one forward pass, each head's backward
    pass once (:func:`_per_task_heads`). The dual-stream model's alone: MTAN's task branches also read shared
    parameters (the transition blocks), which a representation gradient leaves out."""
    shared, heads = state.params
    representation, encoder_pullback, batch_stats, rest = _encoder_vjp(graphdef, state, batch)
    flat_representation, unravel = ravel_pytree(representation)
    losses_k, representation_grads, direct_grads, head_grads, batch_stats, rest = _per_task_heads(
        graphdef, shared, heads, batch_stats, rest, representation, batch)
    if jax.tree.leaves(direct_grads):  # checked while tracing: the heads read shared parameters themselves
        raise ValueError("representation gradients need the dual-stream model, whose heads read no shared "
                         "parameter; MTAN's task branches read the shared transition blocks")
    jacobian = jax.vmap(lambda grads: ravel_pytree(grads)[0])(representation_grads)

    def pull_back(direction):
        (shared_grads,) = encoder_pullback(unravel(direction.astype(flat_representation.dtype)))
        return ravel_pytree(shared_grads)[0]

    return losses_k, jacobian, pull_back, head_grads, batch_stats, rest


def balanced_step(graphdef, optimizer: optax.GradientTransformation, balancer, state: TrainState, balancer_state,
                  batch: dict, key: jax.Array, jacobian_chunk: int | None = None):
    r"""One step of a baseline of Definition 2.1 with any method of :mod:`theory.balancing`, by what it needs:

    * ``requires="losses"``: weights from the losses, one weighted backward pass (heads get :math:`w_t\nabla`);
    * gradients of the shared parameters: :func:`task_jacobian_step`, ``balancer.step``, each head its own
      task's gradient (LibMTL's convention for gradient methods);
    * gradients of the representation (GradDrop): :func:`representation_jacobian_step`, the method's direction
      pulled back through the encoder.

    Returns ``(state, balancer_state, metrics)``; jit with everything but the arrays static. A step whose loss or
    gradients are not finite leaves both states as they were. ``jacobian_chunk``: :func:`task_jacobian_step`'s
    ``chunk`` (the pull-backs through the encoder run that many at a time; ``None``: all at once).
    """
    previous_balancer_state = balancer_state
    if balancer.requires == "losses" and balancer.gradient_of == "parameters":
        state, balancer_state, losses_k, weights, finite = _loss_weighted_step(graphdef, optimizer, balancer, state,
                                                                               balancer_state, batch, key)
    else:
        if balancer.gradient_of == "representation":
            losses_k, jacobian, pull_back, head_grads, batch_stats, rest = representation_jacobian_step(
                graphdef, state, batch)
            direction, weights, balancer_state = balancer.step(jacobian, losses_k, balancer_state, key)
            direction = pull_back(direction)
        else:
            losses_k, jacobian, head_grads, batch_stats, rest = task_jacobian_step(graphdef, state, batch,
                                                                                   jacobian_chunk)
            direction, weights, balancer_state = balancer.step(jacobian, losses_k, balancer_state, key)
        state, finite = apply_gradients(graphdef, optimizer, state, direction, head_grads, batch_stats, rest,
                                        losses_k.sum())
    balancer_state = _select(finite, balancer_state, previous_balancer_state)
    metrics = {"loss": losses_k.sum(), "finite": finite}
    tasks = [name for name, _ in nnx.merge(graphdef, *state.params, state.batch_stats, state.rest).config.tasks]
    metrics.update({name: losses_k[i] for i, name in enumerate(tasks)})
    metrics.update({f"weight/{name}": weights[i] for i, name in enumerate(tasks)})
    return state, balancer_state, metrics
