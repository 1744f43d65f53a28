"""What a training run is made of, apart from its command line: the model and step for a method, the per-epoch
controls of CORE-MTL's stages, evaluation over a whole split, and the sample panels of a run.

``experiments/train_nyuv2.py`` drives these; they print nothing and read no flags.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterable, Iterator, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deep import devices, losses, train
from deep.backbone import BackboneConfig
from deep.metrics import MetricAccumulator
from deep.model import GROUNDINGS, DualStreamModel, ModelConfig

DATASET_TASKS = {"nyuv2": (("segmentation", 13), ("depth", 1), ("normal", 3)),
                 "cityscapes": (("segmentation", 7), ("depth", 1)),
                 "gta5": (("segmentation", 7), ("depth", 1)),  # mapped onto Cityscapes' 7 categories
                 "colored_cityscapes": (("segmentation", 7), ("depth", 1))}  # Cityscapes recoloured by class

# Model sizes: the paper's (ResNet-50, 512/256 streams), one for a CPU smoke run, and one for tests.
MODEL_SIZES = {
    "full": {},
    "reduced": dict(backbone=BackboneConfig(depths=(1, 1, 1, 1), width=8), semantic_channels=32,
                    residual_channels=16, head_channels=16, aspp_rates=(2, 4, 6), decoder_widths=(16, 16, 8),
                    albedo_seed=4, light_hidden=16, generic_width=16, fusion_channels=32, skip_channels=8,
                    skip_groups=2, decoder_groups=4),
    "tiny": dict(backbone=BackboneConfig(depths=(1, 1, 1, 1), width=2), semantic_channels=6, residual_channels=3,
                 head_channels=4, aspp_rates=(1, 2, 3), decoder_widths=(4, 4), albedo_seed=2, light_hidden=8,
                 generic_width=8, fusion_channels=4, skip_channels=4, skip_groups=2, decoder_groups=2),
}


def check_method(method: str) -> None:
    """Refuses a ``method`` that is none of ``core``, ``stl`` and the balancing methods."""
    from theory.balancing import METHODS

    if method not in ("core", "stl") + tuple(METHODS):
        raise ValueError(f"method must be core, stl or a balancing method ({', '.join(METHODS)}); got {method!r}")


def model_config(dataset: str, size: str, method: str, task: str = "", grounding: str = "hard",
                 heads_read: str = "", compute_dtype: str = "float32", variant: str = "paper",
                 semantic_channels: int = 0, residual_channels: int = 0) -> ModelConfig:
    """The model a run trains: CORE-MTL's dual-stream model with grounding for ``method="core"``; the same
    backbone and heads without a decoder for the baselines; one head for ``method="stl"``. ``variant``: the
    paper's architecture or the authors' code (:data:`deep.model.VARIANTS`); ``heads_read``, when given, overrides
    the variant's; ``semantic_channels`` and ``residual_channels``, when not 0, override the size's stream widths
    (the authors' GTA5 and Cityscapes-C configurations use 1024 and 64)."""
    if dataset not in DATASET_TASKS:
        raise ValueError(f"dataset must be one of {', '.join(DATASET_TASKS)}; got {dataset!r}")
    check_method(method)
    if grounding not in GROUNDINGS:  # checked for every method: a baseline ignores it, a typo should not pass
        raise ValueError(f"grounding must be one of {', '.join(GROUNDINGS)}; got {grounding!r}")
    if size not in MODEL_SIZES:
        raise ValueError(f"model size must be one of {', '.join(MODEL_SIZES)}; got {size!r}")
    tasks = DATASET_TASKS[dataset]
    if method == "stl":
        names = [name for name, _ in tasks]
        if task not in names:
            raise ValueError(f"method 'stl' trains one task: --task must be one of {', '.join(names)}; got {task!r}")
        tasks = tuple(pair for pair in tasks if pair[0] == task)
    fields = dict(tasks=tasks, grounding=grounding if method == "core" else "none", compute_dtype=compute_dtype,
                  **MODEL_SIZES[size])
    if heads_read:
        fields["heads_read"] = heads_read
    for name, channels in (("semantic_channels", semantic_channels), ("residual_channels", residual_channels)):
        if channels < 0:
            raise ValueError(f"{name} must be an integer >= 0 (0: the model size's); got {channels}")
        if channels:
            fields[name] = channels
    return ModelConfig.variant(variant, **fields)


ARCHITECTURES = ("shared", "mtan")


def run_model_config(record) -> ModelConfig:
    """The model of a run of ``experiments/train_nyuv2.py`` whose flags are ``record`` (a mapping with its
    fields, such as its ``run.json``): the script builds its model from this too."""
    return model_config(record["dataset"], record["model"], record["method"], record["task"], record["grounding"],
                        record["heads_read"], record["precision"], record["variant"], record["semantic_channels"],
                        record["residual_channels"])


def build_model(config: ModelConfig, architecture: str, seed: int):
    """The model to train, initialised from ``seed``: the dual-stream model (hard parameter sharing for the
    baselines) or MTAN with the same backbone, tasks, head sizes and compute dtype."""
    if architecture == "shared":
        return DualStreamModel(config, nnx.Rngs(seed))
    if architecture != "mtan":
        raise ValueError(f"architecture must be one of {', '.join(ARCHITECTURES)}; got {architecture!r}")
    from deep.mtan import MTAN, MTANConfig

    return MTAN(MTANConfig(backbone=config.backbone, tasks=config.tasks, head_channels=config.head_channels,
                           aspp_rates=config.aspp_rates, compute_dtype=config.compute_dtype,
                           dilated_conv=config.dilated_conv), nnx.Rngs(seed))


# A third number keeps the coin flips' stream apart from the loader's, numpy's default_rng((seed, epoch)), which
# (seed, step) alone would repeat at step == epoch.
_COUNTERFACTUAL_STREAM = 0xCF


@dataclasses.dataclass(frozen=True)
class EpochControls:
    """CORE-MTL's stage schedule for one epoch (the authors' ``_switch_stage_freeze`` and CKA ramp).
    ``counterfactual_probability``: the chance that a step runs the counterfactual pass, 0 before stage 2 and its
    start epoch, and when the loss weights give the pass no weight."""

    train_tasks: bool
    independence_weight: float
    counterfactual_probability: float

    @classmethod
    def at(cls, weights: losses.LossWeights, epoch: int) -> "EpochControls":
        stage2 = epoch >= weights.stage0_epochs + weights.stage1_epochs
        counterfactual_on = stage2 and epoch >= weights.counterfactual_start_epoch and weights.counterfactual > 0
        return cls(train_tasks=epoch >= weights.stage0_epochs,
                   independence_weight=weights.independence_at(epoch),
                   counterfactual_probability=weights.counterfactual_probability if counterfactual_on else 0.0)

    def counterfactual_at(self, seed: int, step: int) -> bool:
        """Whether global step ``step`` of a run seeded ``seed`` runs the counterfactual pass: a coin flip on the host
        with probability ``counterfactual_probability``, as the authors' ``random.random() < prob``, drawn from
        ``(seed, step)`` alone, so a resumed run draws what the uninterrupted one drew. Deciding on the host gives the
        step two programs, each doing only its own work (:func:`deep.train.core_step`)."""
        if self.counterfactual_probability <= 0:
            return False
        generator = np.random.default_rng((seed, step, _COUNTERFACTUAL_STREAM))
        return bool(generator.random() < self.counterfactual_probability)


def unused_terms(weights: losses.LossWeights, epochs: int) -> list[str]:
    """The parts of CORE-MTL's objective that have weight but that no epoch of an ``epochs``-epoch run trains with
    (the schedule starts them later): such a run is the same as one with them at 0, which an ablation should know."""
    controls = [EpochControls.at(weights, epoch) for epoch in range(epochs)]
    unused = []
    if weights.independence > 0 and not any(control.independence_weight > 0 for control in controls):
        unused.append("the CKA term (independence)")
    if weights.counterfactual > 0 and weights.counterfactual_probability > 0 and not any(
            control.counterfactual_probability > 0 for control in controls):
        unused.append("the counterfactual pass (counterfactual)")
    return unused


def make_step(method: str, graphdef, optimizer, weights: losses.LossWeights,
              perceptual=None, jacobian_chunk: int | None = None) -> tuple[Any, Callable]:
    """``(balancer, step)`` with ``step(state, balancer_state, batch, key, controls, counterfactual=None) ->
    (state, balancer_state, metrics)`` jitted; ``controls`` (:class:`EpochControls`) and ``counterfactual`` (whether
    this step runs the counterfactual pass: :meth:`EpochControls.counterfactual_at`; required when the epoch's
    probability is not 0) are read by CORE-MTL only.
    ``method``: ``core``, ``stl`` (EW on one task) or any balancing method. ``perceptual``: LPIPS-VGG weights
    (:func:`deep.perceptual.load_lpips_npz`) for CORE-MTL's perceptual reconstruction term. ``jacobian_chunk``: for
    the methods that take the per-task Jacobian, how many tasks' pull-backs run at once
    (:func:`deep.train.task_jacobian_step`; ``None``: all).

    The step consumes its ``state`` and ``balancer_state``: they are donated, so XLA writes the new state into their
    buffers instead of holding both (the state's size less at the peak: 0.44 GiB for EW, 0.67 GiB for CORE-MTL at
    the NYUv2 size) and the arrays passed in are deleted. A non-finite step returns the values it was given."""
    from theory.balancing import make

    check_method(method)
    if method == "core":
        core = jax.jit(functools.partial(train.core_step, graphdef, optimizer, weights=weights), donate_argnums=0,
                       static_argnames="counterfactual")

        def step(state, balancer_state, batch, key, controls: EpochControls, counterfactual: bool | None = None):
            if not isinstance(controls, EpochControls):
                raise ValueError(f"CORE-MTL's step needs the epoch's stage controls, EpochControls.at(weights, epoch); "
                                 f"got {controls!r}")
            if counterfactual is None:  # left out: refused where it would silently skip the pass
                if controls.counterfactual_probability > 0:
                    raise ValueError(f"this epoch runs the counterfactual pass with probability "
                                     f"{controls.counterfactual_probability}: pass counterfactual="
                                     f"controls.counterfactual_at(seed, step) for each step")
                counterfactual = False
            state, metrics = core(state, batch, key, independence_weight=controls.independence_weight,
                                  counterfactual=counterfactual, train_tasks=controls.train_tasks,
                                  perceptual=perceptual)
            return state, balancer_state, metrics

        return (), step
    if perceptual is not None:
        raise ValueError(f"a perceptual loss belongs to CORE-MTL's reconstruction; method {method!r} has none")
    balancer = make("ew" if method == "stl" else method)
    balanced = jax.jit(functools.partial(train.balanced_step, graphdef, optimizer, balancer,
                                         jacobian_chunk=jacobian_chunk), donate_argnums=(0, 1))

    def step(state, balancer_state, batch, key, controls: EpochControls | None, counterfactual: bool | None = None):
        del controls, counterfactual  # the baselines have no stages and no counterfactual pass
        return balanced(state, balancer_state, batch, key)

    return balancer, step


def initial_balancer_state(method: str, balancer, state: train.TrainState, num_tasks: int):
    """The balancer's state for the first step of ``make_step(method, ...)``'s ``step``: none for CORE-MTL; else
    ``balancer.init`` for ``num_tasks`` tasks and the size P of ``state``'s shared parameters, so that a method with
    a state in parameter space (DB-MTL, MoCo, ExcessMTL) starts with its ``[K, P]`` arrays, not a placeholder whose
    shape the first step would change (a step that is not finite keeps the state it was given, which must have the
    new state's shape, and a checkpoint restores into this one's)."""
    if method == "core":
        return ()
    return balancer.init(num_tasks, num_params=sum(leaf.size for leaf in jax.tree.leaves(state.params[0])))


def predict_function(graphdef) -> Callable:
    """Jitted ``(state, images) -> predictions`` of the model in eval mode (running BatchNorm statistics).

    Only the task predictions leave the call, so what they do not need is never computed: a CORE-MTL model's
    grounding decoders (at the NYUv2 size 3.8 of its 5.5 forward TFLOP per batch of 16) and the maps of its streams
    and decoders (0.5 GB per batch, against 0.1 GB of predictions)."""

    @jax.jit
    def predict(state: train.TrainState, images: jax.Array):
        predictions, _ = eval_model(graphdef, state)(images)
        return predictions

    return predict


def eval_model(graphdef, state: train.TrainState):
    """The model of ``state`` in eval mode (running BatchNorm statistics, no dropout)."""
    model = nnx.merge(graphdef, *state.params, state.batch_stats, state.rest)
    model.eval()
    return model


def placed_for_evaluation(mesh, batches: Iterable[dict]) -> Iterable[dict]:
    """Each batch split over the mesh's devices when its size divides evenly (so evaluation is data-parallel as
    training is), else copied to every device (a split smaller than one batch, or a last batch not filled up by the
    loader's ``fill_last``, need not divide)."""
    for batch in batches:
        yield devices.place_batch(mesh, batch)


T = TypeVar("T")
_NOTHING = object()


def one_behind(items: Iterable[T]) -> Iterator[T]:
    """Each of ``items`` once the next one has been produced (the last at the end). When producing an item
    dispatches device work (a step, a batch's predictions), the caller reads item i (a host sync) only once the work
    of item i + 1 is queued, so the device never waits for the host, which meanwhile prepares the next batch."""
    iterator = iter(items)
    pending = next(iterator, _NOTHING)
    for item in iterator:
        yield pending
        pending = item
    if pending is not _NOTHING:
        yield pending


def evaluate(predict: Callable, state: train.TrainState, batches: Iterable[dict], tasks) -> dict[str, float]:
    """The metrics of :mod:`deep.metrics` over every batch of a split, each batch's statistics brought to the host
    one batch late (:func:`one_behind`), as in training."""
    accumulator = MetricAccumulator(tasks)
    dispatched = (accumulator.statistics(predict(state, jnp.asarray(batch["images"])), batch) for batch in batches)
    for statistics in one_behind(dispatched):
        accumulator.add(statistics)
    return accumulator.result()


def evaluate_corrupted(predict: Callable, state: train.TrainState, batches: Callable[[], Iterable[dict]], tasks,
                       corruptions: Iterable[str], severities: Iterable[int], key: jax.Array,
                       progress: Callable[[], Any] | None = None) -> dict[str, dict[str, dict[str, float]]]:
    """The paper's Cityscapes-C protocol in code: the metrics of a split whose images are corrupted by each of
    ``corruptions`` at each of ``severities`` (:func:`deep.data.corrupt`), the labels left clean.

    Args:
        predict: from :func:`predict_function`.
        batches: a function returning a fresh pass over the split (called once per corruption and severity).
        key: the corruptions' randomness; batch ``i`` of every pass uses ``fold_in(fold_in(key, corruption),
            i)``, so a severity changes the strength of the same noise, not the noise.
        progress: called after each pass (a progress bar's update).

    Returns:
        ``{corruption: {str(severity): metrics}}``.
    """
    from deep.data import CORRUPTIONS, corrupt

    def corrupted(corruption: str, severity: int) -> Iterable[dict]:
        corruption_key = jax.random.fold_in(key, CORRUPTIONS.index(corruption))
        for index, batch in enumerate(batches()):
            yield {**batch, "images": corrupt(jnp.asarray(batch["images"]), corruption, severity,
                                              jax.random.fold_in(corruption_key, index))}

    results = {}
    for corruption in corruptions:
        results[corruption] = {}
        for severity in severities:
            results[corruption][str(severity)] = evaluate(predict, state, corrupted(corruption, severity), tasks)
            if progress is not None:
                progress()
    return results


# The appearance change of the stream probe: torchvision's ColorJitter at strengths well beyond the training
# augmentation's (0.4, 0.4, 0.4, 0.1 on NYUv2), as the authors' appearance test used "strong colour jitter".
PROBE_JITTER = (0.8, 0.8, 0.8, 0.3)


def stream_shift(graphdef, state: train.TrainState, pairs: Iterable[tuple[jax.Array, jax.Array]],
                 count: int) -> dict[str, dict]:
    r"""How far each stream of a CORE-MTL model moves when an image's appearance changes and its content does not:
    for each pair :math:`(x, x')` (``pairs``: batches of images and their restyled copies, in eval mode), the
    relative change :math:`\lVert z(x) - z(x')\rVert / \lVert z(x)\rVert` of the semantic map ẑ_s and of the
    residual code ẑ_r, over the first ``count`` images (the rest fill up a last batch). The paper's claim is that ẑ_s
    stays and ẑ_r absorbs the change: a ``ratio`` (residual over semantic, of the means) well above 1. Its Table 3
    reports such a ratio ("feature swapping", intra- and cross-domain) without a definition the text kept; this is
    one definition, stated.

    Returns ``{"semantic": mean_and_error, "residual": mean_and_error, "ratio": ratio_of_means}``
    (:func:`deep.metrics.mean_and_error`, :func:`deep.metrics.ratio_of_means`: standard errors over the images)."""
    from deep.metrics import mean_and_error, ratio_of_means, to_host

    changes = {"semantic": [], "residual": []}
    for images, restyled in pairs:
        for name, value in _relative_stream_changes(graphdef, state, images, restyled).items():
            changes[name].append(np.asarray(to_host(value), np.float64))  # all rows, from every process
    changes = {name: np.concatenate(values)[:count] for name, values in changes.items()}
    if any(len(values) < count for values in changes.values()):
        raise ValueError(f"the pairs held {len(changes['semantic'])} images, fewer than the {count} asked for")
    return {"semantic": mean_and_error(changes["semantic"]), "residual": mean_and_error(changes["residual"]),
            "ratio": ratio_of_means(changes["residual"], changes["semantic"])}


@functools.partial(jax.jit, static_argnums=0)
def _relative_stream_changes(graphdef, state: train.TrainState, images: jax.Array,
                             restyled: jax.Array) -> dict[str, jax.Array]:
    model = eval_model(graphdef, state)
    original, shifted = model.encode(images), model.encode(restyled)

    def relative(before, after):  # per image, over everything else
        axes = tuple(range(1, before.ndim))
        difference = jnp.sqrt(jnp.sum(jnp.square((after - before).astype(jnp.float32)), axis=axes))
        return difference / jnp.maximum(jnp.sqrt(jnp.sum(jnp.square(before.astype(jnp.float32)), axis=axes)), 1e-12)

    return {"semantic": relative(original["semantic_map"], shifted["semantic_map"]),
            "residual": relative(original["residual_code"], shifted["residual_code"])}


def sample_panels(graphdef, state: train.TrainState, images: jax.Array) -> dict[str, np.ndarray]:
    """Predictions for a few images in eval mode, and for a model with grounding its reconstructions (physical
    rendering, appearance decoder) and a counterfactual: each image synthesised with the residual code of the next
    one (rolled by one). Compiled as one program: run op by op, the model's few hundred operations would each be
    compiled on their own."""
    return {name: np.asarray(value, np.float32) for name, value in _panels(graphdef, state, images).items()}


@functools.partial(jax.jit, static_argnums=0)
def _panels(graphdef, state: train.TrainState, images: jax.Array) -> dict[str, jax.Array]:
    model = eval_model(graphdef, state)
    predictions, aux = model(images)
    panels = {f"pred/{name}": value for name, value in predictions.items()}
    for name in ("rendered", "reconstruction"):
        if name in aux:
            panels[name] = aux[name]
    if getattr(model, "makes_counterfactuals", False):
        panels["counterfactual"] = model.counterfactual_image(
            aux["semantic_map"], jnp.roll(aux["residual_code"], 1, axis=0), images.shape[1:3],
            features=aux["features"])
    return panels
