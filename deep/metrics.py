r"""Evaluation metrics of the dense tasks over a whole split, and the two multi-task summaries Δp and Δm.

Each batch is reduced on the device by a jitted function to a few additive statistics (a confusion matrix, sums,
counts, a histogram of angles); :class:`MetricAccumulator` adds them up on the host in int64/float64 and turns the
totals into metrics. Every metric is therefore a statistic of the **whole split** — no mean of per-batch means —
and feeding a split in one batch or in several gives the same numbers (up to float32 rounding inside a batch).

The definitions follow LibMTL's ``examples/nyu/utils.py`` (``reference/ecosystem.md`` §1.3-1.4), which the
CORE-MTL evaluator reproduces (``reference/official_implementation.md``, "Metrics"); where they differ it is said:

* **segmentation** (``logits [B, H, W, C]``, ``labels [B, H, W]`` int, −1 = ignored): one confusion matrix
  :math:`N_{ij}` (ground truth i, prediction :math:`\arg\max` logits j) over the split;
  :math:`\mathrm{IoU}_c = N_{cc} / (\sum_j N_{cj} + \sum_i N_{ic} - N_{cc})`, mIoU the mean over the classes that
  occur in the labels or the predictions of the split, pixel accuracy :math:`\sum_c N_{cc} / \sum_{ij} N_{ij}`.
  Both are fractions.
* **depth** (``[B, H, W, 1]`` each, metres, 0 = invalid): over the valid pixels V of the split,
  :math:`\mathrm{abs\_err} = \frac{1}{|V|}\sum_V |p - g|` and :math:`\mathrm{rel\_err} = \frac{1}{|V|}\sum_V |p - g|/g`.
* **normal** (``[B, H, W, 3]`` each): the angle :math:`\alpha = \frac{180}{\pi}\arccos\mathrm{clip}(\langle p/\|p\|,
  g\rangle, -1, 1)` in degrees over the valid pixels; its mean, its median and the fractions of pixels with
  :math:`\alpha < 11.25°, 22.5°, 30°`.

Metric names are ``"<task>/<metric>"`` (:data:`METRIC_DIRECTIONS` lists them with their direction).

Binary attributes (CelebA; ``logits [B, T]``, ``labels [B, T]`` in {0, 1}, −1 = no label) are scored by
:class:`AttributeAccuracy`: each attribute's accuracy at the authors' threshold (a sigmoid above 0.5, a positive
logit) over the labelled examples of the split, and the mean over the attributes, ``attributes/mean_accuracy``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from deep.shading import unit_vectors

__all__ = ["METRIC_DIRECTIONS", "TASK_CHANNELS", "NORMAL_THRESHOLDS_DEGREES", "IGNORED_LABELS",
           "segmentation_statistics", "depth_statistics", "normal_angles", "normal_statistics", "segmentation_scores",
           "histogram_median", "MetricAccumulator", "AttributeAccuracy", "attribute_statistics", "delta_p",
           "delta_m", "mean_and_error", "ratio_of_means", "to_host"]

#: +1 where higher is better, −1 where lower is better.
METRIC_DIRECTIONS: dict[str, int] = {
    "segmentation/miou": +1,
    "segmentation/pixel_accuracy": +1,
    "depth/abs_err": -1,
    "depth/rel_err": -1,
    "normal/mean": -1,
    "normal/median": -1,
    "normal/within_11.25": +1,
    "normal/within_22.5": +1,
    "normal/within_30": +1,
    "attributes/mean_accuracy": +1,
}
#: The tasks the metrics know, with the channels their predictions must have (``None``: any number of classes).
TASK_CHANNELS: dict[str, int | None] = {"segmentation": None, "depth": 1, "normal": 3}
NORMAL_THRESHOLDS_DEGREES: tuple[float, ...] = (11.25, 22.5, 30.0)
# The label value of a pixel every metric skips (LibMTL's conventions): class -1, and a depth or normal of 0; an
# attribute's -1 (no label).
IGNORED_LABELS: dict[str, int] = {"segmentation": -1, "depth": 0, "normal": 0, "attributes": -1}
_MAX_ANGLE_DEGREES = 180.0


# ------------------------------------------------------------------------------------- per-batch statistics (jit)


@jax.jit
def segmentation_statistics(logits: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
    r"""Confusion matrix of one batch.

    .. math:: N_{ij} = \#\{\text{pixels}: g = i,\ \arg\max_c \text{logits}_c = j\},\qquad g \ne -1

    Args:
        logits: ``[B, H, W, C]``.
        labels: ``[B, H, W]`` integers in ``0..C-1``, or −1 for an ignored pixel.

    Returns:
        ``confusion`` ``[C, C]`` (rows: ground truth, columns: prediction) and ``out_of_range``, the number of
        labels that are neither −1 nor a class (LibMTL drops them silently; :class:`MetricAccumulator` rejects them).
    """
    num_classes = logits.shape[-1]
    labels = labels.astype(jnp.int32)  # no overflow of labels × C in a narrow integer type
    predicted = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    valid = (labels >= 0) & (labels < num_classes)
    # Ignored pixels go to one extra bin that is cut off.
    index = jnp.where(valid, labels * num_classes + predicted, num_classes * num_classes)
    counts = jnp.bincount(index.ravel(), length=num_classes * num_classes + 1)
    return {"confusion": counts[:-1].reshape(num_classes, num_classes),
            "out_of_range": jnp.sum((labels < -1) | (labels >= num_classes))}


@jax.jit
def depth_statistics(prediction: jax.Array, target: jax.Array) -> dict[str, jax.Array]:
    r"""Sums of the depth errors of one batch over its valid pixels.

    A pixel is valid where the sum of the ground truth over channels is not 0 — LibMTL's mask, also the one of
    :func:`deep.losses.depth_loss`. The ground truth is depth ≥ 0 with 0 = invalid, so this is the same set as
    CORE-MTL's ``g > 0``; :class:`MetricAccumulator` rejects negative ground truth, where the two would differ.

    Args:
        prediction: ``[B, H, W, 1]``.
        target: ``[B, H, W, 1]``.

    Returns:
        ``abs_err_sum`` and ``rel_err_sum`` ``[B, H]`` (per image row, so that float32 rounding stays within a row;
        the host adds rows in float64) of :math:`|p - g|` and :math:`|p - g| / g`, ``count`` (valid pixels) and
        ``negative`` (pixels with :math:`g < 0`).
    """
    valid = jnp.sum(target, axis=-1) != 0
    error = jnp.abs(prediction[..., 0] - target[..., 0])
    safe_target = jnp.where(valid, target[..., 0], 1)
    return {"abs_err_sum": jnp.sum(jnp.where(valid, error, 0), axis=-1),
            "rel_err_sum": jnp.sum(jnp.where(valid, error / safe_target, 0), axis=-1),
            "count": jnp.sum(valid),
            "negative": jnp.sum(target < 0)}


def _number_of_bins(bin_degrees: float) -> int:
    return max(1, math.ceil(_MAX_ANGLE_DEGREES / bin_degrees - 1e-9))


def normal_angles(prediction: jax.Array, target: jax.Array) -> tuple[jax.Array, jax.Array]:
    r"""Angles in degrees between the unit prediction and the ground truth, and the valid mask.

    .. math:: \alpha = \frac{180}{\pi}\arccos\,\mathrm{clip}\big(\langle p/\max(\|p\|, 10^{-12}),\ g\rangle, -1, 1\big)

    As in LibMTL the ground truth is used as stored, not renormalised (MTAN's NYUv2 normals are not all of unit
    length: :mod:`deep.data.npy_split`), and a pixel is valid where the **sum** of the ground truth's three
    components is not 0 (this drops a valid normal whose components sum to 0; kept for parity). A zero prediction
    counts as 90° (LibMTL would give NaN). In float32 :math:`\arccos` resolves angles near 0° and 180° only to
    about 0.02°.

    Args:
        prediction: ``[B, H, W, 3]``, any length.
        target: ``[B, H, W, 3]``, unit or all zero.

    Returns:
        ``angles`` ``[B, H, W]`` and ``valid`` ``[B, H, W]`` bool.
    """
    valid = jnp.sum(target, axis=-1) != 0
    cosine = jnp.clip(jnp.sum(unit_vectors(prediction, 1e-12) * target, axis=-1), -1.0, 1.0)
    return jnp.degrees(jnp.arccos(cosine)), valid


@functools.partial(jax.jit, static_argnames=("bin_degrees",))
def normal_statistics(prediction: jax.Array, target: jax.Array, bin_degrees: float = 0.001) -> dict[str, jax.Array]:
    r"""Sums, threshold counts and a histogram of the normal angles of one batch (see :func:`normal_angles`).

    Args:
        prediction: ``[B, H, W, 3]``.
        target: ``[B, H, W, 3]``.
        bin_degrees: width of the histogram's bins over [0°, 180°] (static).

    Returns:
        ``angle_sum`` ``[B, H]`` (per image row), ``count``, ``within`` ``[3]`` (pixels with
        :math:`\alpha <` 11.25°, 22.5°, 30°, strict as LibMTL), ``histogram`` ``[ceil(180 / bin_degrees)]`` (bin k holds
        :math:`k\,w \le \alpha < (k + 1)\,w`; 180° goes to the last bin) and ``nonfinite`` (valid pixels whose
        angle is NaN, e.g. from a NaN prediction; they are left out of the histogram).
    """
    angles, valid = normal_angles(prediction, target)
    finite = valid & jnp.isfinite(angles)
    bins = _number_of_bins(bin_degrees)
    index = jnp.clip(jnp.floor(jnp.where(finite, angles, 0) / bin_degrees).astype(jnp.int32), 0, bins - 1)
    histogram = jnp.bincount(jnp.where(finite, index, bins).ravel(), length=bins + 1)[:-1]
    within = jnp.stack([jnp.sum(valid & (angles < threshold)) for threshold in NORMAL_THRESHOLDS_DEGREES])
    return {"angle_sum": jnp.sum(jnp.where(valid, angles, 0), axis=-1),
            "count": jnp.sum(valid),
            "within": within,
            "histogram": histogram,
            "nonfinite": jnp.sum(valid & ~jnp.isfinite(angles))}


# ------------------------------------------------------------------------------------------ split-level scores


def segmentation_scores(confusion: np.ndarray) -> tuple[float, float]:
    r"""mIoU and pixel accuracy of a confusion matrix ``[C, C]`` (rows: ground truth).

    .. math::
        \mathrm{IoU}_c = \frac{N_{cc}}{\sum_j N_{cj} + \sum_i N_{ic} - N_{cc}},\qquad
        \mathrm{mIoU} = \frac{1}{|P|}\sum_{c \in P} \mathrm{IoU}_c,\qquad
        \mathrm{pixAcc} = \frac{\sum_c N_{cc}}{\sum_{ij} N_{ij}}

    with P the classes present in the union of labels and predictions of the split (:math:`\sum_j N_{cj} +
    \sum_i N_{ic} > 0`). A class absent from both is excluded — not counted as IoU 0 or 1. This is torchmetrics'
    ``MulticlassJaccardIndex`` (the CORE-MTL evaluator); LibMTL's ``SegMetric`` averages over all C classes, so a
    class absent from both would make its mIoU NaN (0/0). On the NYUv2 test split every class occurs and the two
    agree. A class that is predicted but never labelled (or the reverse) counts with IoU 0.

    Raises:
        ValueError: if the matrix holds no pixel.
    """
    confusion = np.asarray(confusion, dtype=np.float64)
    total = confusion.sum()
    if total == 0:
        raise ValueError("no labelled segmentation pixel was seen; mIoU and pixel accuracy are undefined")
    hits = np.diag(confusion)
    union = confusion.sum(axis=0) + confusion.sum(axis=1) - hits
    present = union > 0
    return float(np.mean(hits[present] / union[present])), float(hits.sum() / total)


def histogram_median(histogram: np.ndarray, bin_degrees: float) -> float:
    r"""The median of the values counted in ``histogram`` (bin k: :math:`[k w, (k + 1) w)`), numpy's convention.

    With n values sorted, the median is the value of rank :math:`(n-1)/2` for odd n and the mean of ranks
    :math:`n/2 - 1` and :math:`n/2` for even n; each rank is replaced by the centre of its bin (clipped to 180°),
    so the result is within :math:`w/2` of numpy's median of the binned values.

    Raises:
        ValueError: if the histogram is empty.
    """
    histogram = np.asarray(histogram, dtype=np.int64)
    n = int(histogram.sum())
    if n == 0:
        raise ValueError("no valid normal pixel was seen; the median angle is undefined")
    cumulative = np.cumsum(histogram)
    ranks = np.array([(n - 1) // 2, n // 2])
    bins = np.searchsorted(cumulative, ranks, side="right")  # first bin whose cumulative count exceeds the rank
    centres = np.minimum((bins + 0.5) * bin_degrees, _MAX_ANGLE_DEGREES)
    return float(centres.mean())


# ------------------------------------------------------------------------------------------------- accumulator


def to_host(value) -> np.ndarray:
    """A statistic as a host array: whole, also when it is split over devices of several processes (an evaluation
    batch sharded along the data axis leaves the per-image sums so), where each process gathers the others' rows."""
    # A value every device holds whole (a sum over the batch) is read from a local copy, without a collective.
    if isinstance(value, jax.Array) and not (value.is_fully_addressable or value.is_fully_replicated):
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(value, tiled=True))
    return np.asarray(value)


class MetricAccumulator:
    """Metrics of a whole split, fed batch by batch.

    Example::

        accumulator = MetricAccumulator({"segmentation": 13, "depth": 1, "normal": 3})  # NYUv2
        for batch in loader:
            predictions, _ = eval_model(batch["images"])
            accumulator.update(predictions, batch)
        metrics = accumulator.result()  # {"segmentation/miou": ..., "normal/median": ...}

    Cityscapes is ``{"segmentation": 7, "depth": 1}``. Only the configured tasks are read from ``predictions``
    and ``batch`` (both keyed by task name; the model's ``predictions`` and the data's ``batch`` use the same
    names); other keys are ignored.

    Args:
        tasks: task name -> output channels (classes for segmentation, 1 for depth, 3 for normal); a mapping or
            ``(name, channels)`` pairs such as ``ModelConfig.tasks``.
        normal_bin_degrees: width of the angle histogram from which the median is read; the median is within half
            a bin of the exact median of the float32 angles (0.0005° by default, with 180 000 bins: 1.4 MB).
    """

    def __init__(self, tasks: Mapping[str, int] | tuple[tuple[str, int], ...], normal_bin_degrees: float = 0.001):
        tasks = dict(tasks)
        if not tasks:
            raise ValueError(f"tasks must name at least one of {', '.join(TASK_CHANNELS)}")
        for name, channels in tasks.items():
            if name not in TASK_CHANNELS:
                raise ValueError(f"unknown task {name!r}; metrics exist for {', '.join(TASK_CHANNELS)}")
            required = TASK_CHANNELS[name]
            if required is not None and channels != required:
                raise ValueError(f"task {name!r} must have {required} channel(s); got {channels}")
            if required is None and (int(channels) != channels or channels < 2):
                raise ValueError(f"segmentation needs an integer number of classes >= 2; got {channels}")
        if not 0 < normal_bin_degrees <= 1:
            raise ValueError(f"normal_bin_degrees must be in (0, 1]; got {normal_bin_degrees}")
        self.tasks = tasks
        self.normal_bin_degrees = float(normal_bin_degrees)
        self.reset()

    def reset(self) -> None:
        """Forgets every batch seen."""
        self.num_images = 0
        if "segmentation" in self.tasks:
            classes = self.tasks["segmentation"]
            self._confusion = np.zeros((classes, classes), dtype=np.int64)
        self._depth = {"abs_err_sum": 0.0, "rel_err_sum": 0.0, "count": 0}
        self._normal = {"angle_sum": 0.0, "count": 0, "nonfinite": 0,
                        "within": np.zeros(len(NORMAL_THRESHOLDS_DEGREES), dtype=np.int64),
                        "histogram": np.zeros(_number_of_bins(self.normal_bin_degrees), dtype=np.int64)}

    def _check_shapes(self, name: str, prediction: jax.Array, target: jax.Array) -> None:
        channels = self.tasks[name]
        if prediction.ndim != 4 or prediction.shape[-1] != channels:
            raise ValueError(f"{name} predictions must be [batch, height, width, {channels}]; "
                             f"got shape {tuple(prediction.shape)}")
        expected = prediction.shape[:3] if name == "segmentation" else prediction.shape
        if tuple(target.shape) != tuple(expected):
            raise ValueError(f"{name} ground truth must have shape {tuple(expected)} to match the predictions; "
                             f"got {tuple(target.shape)}")
        if name == "segmentation" and not jnp.issubdtype(target.dtype, jnp.integer):
            raise ValueError(f"segmentation labels must be integers (-1 = ignored); got dtype {target.dtype}")

    def update(self, predictions: Mapping[str, jax.Array], batch: Mapping[str, jax.Array]) -> None:
        """Adds one batch: ``predictions[task]`` and ``batch[task]`` for every configured task.

        The batch is checked whole before anything is added, so a rejected batch leaves the totals unchanged.

        Raises:
            ValueError: on a missing task, a shape mismatch, non-integer labels, a label that is neither −1 nor a
                class, or negative depth.
        """
        self.add(self.statistics(predictions, batch))

    def statistics(self, predictions: Mapping[str, jax.Array], batch: Mapping[str, jax.Array]) -> dict:
        """The first half of :meth:`update`: one batch's statistics, computed on its device and not waited for, so a
        loop can start the next batch before :meth:`add` brings these to the host. Checks names and shapes (raises
        as :meth:`update`)."""
        statistics = {}
        for name in self.tasks:
            for source, mapping in (("predictions", predictions), ("batch", batch)):
                if name not in mapping:
                    raise ValueError(f"{source} has no {name!r} entry; it has {', '.join(map(str, mapping))}")
            prediction, target = jnp.asarray(predictions[name]), jnp.asarray(batch[name])
            self._check_shapes(name, prediction, target)
            if name == "segmentation":
                statistics[name] = segmentation_statistics(prediction, target)
            elif name == "depth":
                statistics[name] = depth_statistics(prediction, target)
            else:
                statistics[name] = normal_statistics(prediction, target, bin_degrees=self.normal_bin_degrees)
        statistics["images"] = int(jnp.shape(predictions[next(iter(self.tasks))])[0])
        return statistics

    def add(self, statistics: dict) -> None:
        """The second half of :meth:`update`: adds the statistics of :meth:`statistics` (checks the label values
        and raises as :meth:`update`)."""
        statistics = jax.tree.map(to_host, statistics)
        if "segmentation" in statistics and statistics["segmentation"]["out_of_range"] > 0:
            raise ValueError(f"{int(statistics['segmentation']['out_of_range'])} segmentation labels are outside "
                             f"-1..{self.tasks['segmentation'] - 1} (-1 = ignored)")
        if "depth" in statistics and statistics["depth"]["negative"] > 0:
            raise ValueError(f"{int(statistics['depth']['negative'])} depth ground-truth values are negative; "
                             "depth must be >= 0 with 0 = invalid")
        self.num_images += int(statistics["images"])
        if "segmentation" in statistics:
            self._confusion += np.asarray(statistics["segmentation"]["confusion"], dtype=np.int64)
        if "depth" in statistics:
            depth = statistics["depth"]
            for key in ("abs_err_sum", "rel_err_sum"):
                self._depth[key] += float(np.sum(depth[key], dtype=np.float64))
            self._depth["count"] += int(depth["count"])
        if "normal" in statistics:
            normal = statistics["normal"]
            self._normal["angle_sum"] += float(np.sum(normal["angle_sum"], dtype=np.float64))
            for key in ("count", "nonfinite"):
                self._normal[key] += int(normal[key])
            for key in ("within", "histogram"):
                self._normal[key] += np.asarray(normal[key], dtype=np.int64)

    def result(self) -> dict[str, float]:
        r"""The metrics of everything fed since construction or :meth:`reset`.

        .. math::
            \mathrm{abs\_err} = \frac{\sum_V |p-g|}{|V|},\quad \mathrm{rel\_err} = \frac{\sum_V |p-g|/g}{|V|},\quad
            \mathrm{mean} = \frac{\sum_V \alpha}{|V|},\quad \mathrm{within}_t = \frac{\#\{\alpha < t\}}{|V|}

        over the valid pixels V of the split; mIoU and pixel accuracy as in :func:`segmentation_scores`, the median
        angle from the histogram (:func:`histogram_median`; NaN if some valid angle was NaN, as the mean then is).

        Raises:
            ValueError: if no batch was fed, or a task saw no valid pixel.
        """
        if self.num_images == 0:
            raise ValueError("no batch was fed to the accumulator; call update() before result()")
        metrics = {}
        if "segmentation" in self.tasks:
            miou, pixel_accuracy = segmentation_scores(self._confusion)
            metrics.update({"segmentation/miou": miou, "segmentation/pixel_accuracy": pixel_accuracy})
        if "depth" in self.tasks:
            count = self._depth["count"]
            if count == 0:
                raise ValueError("no valid depth pixel (ground truth != 0) was seen; depth errors are undefined")
            metrics.update({"depth/abs_err": self._depth["abs_err_sum"] / count,
                            "depth/rel_err": self._depth["rel_err_sum"] / count})
        if "normal" in self.tasks:
            count = self._normal["count"]
            if count == 0:
                raise ValueError("no valid normal pixel (ground-truth components summing to non-zero) was seen; "
                                 "normal metrics are undefined")
            median = (math.nan if self._normal["nonfinite"]
                      else histogram_median(self._normal["histogram"], self.normal_bin_degrees))
            metrics.update({"normal/mean": self._normal["angle_sum"] / count, "normal/median": median})
            for threshold, within in zip(NORMAL_THRESHOLDS_DEGREES, self._normal["within"]):
                metrics[f"normal/within_{threshold:g}"] = int(within) / count
        return metrics


@jax.jit
def attribute_statistics(logits: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
    """Per attribute ``[T]``: the labelled examples whose prediction (logit > 0) is right, the labelled examples
    (label 0 or 1; −1 is skipped) and those among them whose logit is NaN or infinite; with ``out_of_range``, the
    count of labels that are none of −1, 0, 1."""
    labelled = (labels == 0) | (labels == 1)
    right = labelled & ((logits > 0) == (labels == 1))
    return {"correct": jnp.sum(right, axis=0, dtype=jnp.int32),
            "labelled": jnp.sum(labelled, axis=0, dtype=jnp.int32),
            "non_finite": jnp.sum(labelled & ~jnp.isfinite(logits), axis=0, dtype=jnp.int32),
            "out_of_range": jnp.sum(~labelled & (labels != -1), dtype=jnp.int32)}


class AttributeAccuracy:
    """Accuracy of binary attributes over a whole split, fed batch by batch (the CelebA metric).

    Example::

        accuracy = AttributeAccuracy(("Smiling", "Young"))
        for batch in loader:
            accuracy.update(logits, batch["attributes"])  # [B, 2] each, columns in that order
        accuracy.result()  # {"attributes/mean_accuracy": ..., "attributes/Smiling": ..., "attributes/Young": ...}

    Each attribute's accuracy is over its labelled examples (label 0 or 1; −1, the filler rows of a last batch, is
    skipped); the mean is the plain mean over the attributes, as the authors report it.
    """

    def __init__(self, attributes: tuple[str, ...]):
        if not attributes or len(set(attributes)) != len(attributes):
            raise ValueError(f"attributes must be distinct names, at least one; got {attributes}")
        self.attributes = tuple(attributes)
        self.reset()

    def reset(self) -> None:
        """Forgets every batch seen."""
        self._correct = np.zeros(len(self.attributes), np.int64)
        self._labelled = np.zeros(len(self.attributes), np.int64)
        self._non_finite = np.zeros(len(self.attributes), np.int64)

    def statistics(self, logits: jax.Array, labels: jax.Array) -> dict:
        """One batch's statistics, computed on its device and not waited for (:meth:`add` brings them to the host).

        Raises:
            ValueError: unless ``logits`` and ``labels`` are both ``[batch, T]`` with integer labels.
        """
        shape = (jnp.shape(logits)[0] if jnp.ndim(logits) else 0, len(self.attributes))
        for name, value in (("logits", logits), ("labels", labels)):
            if tuple(jnp.shape(value)) != shape:
                raise ValueError(f"attribute {name} must be [batch, {len(self.attributes)}]; got shape "
                                 f"{tuple(jnp.shape(value))}")
        if not jnp.issubdtype(jnp.asarray(labels).dtype, jnp.integer):
            raise ValueError(f"attribute labels must be integers (0, 1; -1 = no label); got dtype "
                             f"{jnp.asarray(labels).dtype}")
        return attribute_statistics(jnp.asarray(logits), jnp.asarray(labels))

    def add(self, statistics: dict) -> None:
        """Adds the statistics of :meth:`statistics`; raises ``ValueError`` on a label that is none of −1, 0, 1."""
        statistics = jax.tree.map(to_host, statistics)
        if statistics["out_of_range"] > 0:
            raise ValueError(f"{int(statistics['out_of_range'])} attribute labels are none of 0, 1 and -1 (no label)")
        self._correct += np.asarray(statistics["correct"], np.int64)
        self._labelled += np.asarray(statistics["labelled"], np.int64)
        self._non_finite += np.asarray(statistics["non_finite"], np.int64)

    def update(self, logits: jax.Array, labels: jax.Array) -> None:
        """Adds one batch (:meth:`statistics` then :meth:`add`)."""
        self.add(self.statistics(logits, labels))

    def result(self) -> dict[str, float]:
        """``attributes/mean_accuracy`` and ``attributes/<name>`` for each attribute, as fractions; NaN for an
        attribute some of whose logits were NaN or infinite (a diverged model is not scored as if it predicted
        "absent"), and then for the mean too.

        Raises:
            ValueError: when some attribute has no labelled example.
        """
        if not self._labelled.all():
            missing = [name for name, count in zip(self.attributes, self._labelled) if not count]
            raise ValueError(f"no labelled example of {', '.join(missing)} was seen; its accuracy is undefined")
        accuracy = np.where(self._non_finite > 0, np.nan, self._correct / self._labelled)
        return {"attributes/mean_accuracy": float(accuracy.mean()),
                **{f"attributes/{name}": float(value) for name, value in zip(self.attributes, accuracy)}}


# ------------------------------------------------------------------------------------- multi-task summaries


def mean_and_error(values) -> dict:
    """``{"mean", "standard_error", "n"}`` of ``values``: the standard error is the sample standard deviation
    (``ddof = 1``) over √n, and ``None`` for a single value (its spread is unknown, not zero)."""
    from theory.checks import mean_and_sem

    values = np.asarray(values, np.float64).ravel()
    mean, error = mean_and_sem(values)
    return {"mean": float(mean), "standard_error": float(error) if values.size > 1 else None, "n": int(values.size)}


def ratio_of_means(numerators, denominators) -> dict:
    r"""``{"ratio", "standard_error"}``: :math:`R = \bar b / \bar a` of paired samples (:math:`b_i` over :math:`a_i`),
    with the delta method's standard error :math:`\sqrt{\widehat{\mathrm{Var}}(b_i - R a_i) / n} / |\bar a|`
    (``None`` for fewer than two pairs); the ratio is ``None`` when :math:`\bar a = 0`."""
    b, a = np.asarray(numerators, np.float64).ravel(), np.asarray(denominators, np.float64).ravel()
    if a.mean() == 0:
        return {"ratio": None, "standard_error": None}
    ratio = float(b.mean() / a.mean())
    error = float(np.std(b - ratio * a, ddof=1) / math.sqrt(a.size) / abs(a.mean())) if a.size > 1 else None
    return {"ratio": ratio, "standard_error": error}


def _relative_improvements(results: Mapping[str, float], baseline: Mapping[str, float],
                           directions: Mapping[str, int]) -> dict[str, float]:
    r""":math:`d_k = \sigma_k (M_k - B_k) / B_k` for every metric k of ``baseline`` (:math:`\sigma_k = \pm 1`, positive
    = better)."""
    if not baseline:
        raise ValueError("the baseline holds no metric; give the single-task results, e.g. {'depth/abs_err': 0.4}")
    improvements = {}
    for name, base in baseline.items():
        if name not in results:
            raise ValueError(f"metric {name!r} of the baseline is missing from the results; "
                             f"they have {', '.join(results) or 'nothing'}")
        if name not in directions:
            raise ValueError(f"metric {name!r} has no direction; give +1 (higher is better) or -1 (lower is better)")
        direction = directions[name]
        if direction not in (1, -1):
            raise ValueError(f"the direction of {name!r} must be +1 or -1; got {direction}")
        value, base = float(results[name]), float(base)
        if not (math.isfinite(value) and math.isfinite(base)):
            raise ValueError(f"metric {name!r} must be finite in results and baseline; got {value} and {base}")
        if base == 0:
            raise ValueError(f"the baseline of {name!r} is 0; a relative improvement needs a non-zero baseline")
        improvements[name] = direction * (value - base) / base
    return improvements


def delta_p(results: Mapping[str, float], baseline: Mapping[str, float],
            directions: Mapping[str, int] = METRIC_DIRECTIONS) -> float:
    r"""LibMTL's Δp (``utils.count_improvement``), in percent: **positive = better than the baseline**.

    .. math::
        \Delta_p = 100\,\frac{1}{T}\sum_{t=1}^{T}\frac{1}{M_t}\sum_{m=1}^{M_t}
                   (-1)^{w_{t,m}}\,\frac{B_{t,m} - N_{t,m}}{B_{t,m}},\qquad w_{t,m} = 1 \text{ if higher is better}

    i.e. the relative improvements :math:`\sigma (N - B)/B` (:math:`\sigma = +1` higher-better, −1 lower-better)
    are averaged **within each task first**, then across tasks, so a task with five metrics (normal) weighs as
    much as one with two. Tasks are the prefixes of the names (``"normal/mean"`` belongs to ``normal``). LibMTL
    returns the fraction; this returns 100 × it, as papers print it.

    Args:
        results: the method's metrics N (extra entries are ignored).
        baseline: the single-task (STL) metrics B; its keys are the metrics compared.
        directions: metric -> +1 (higher is better) or −1 (lower is better).

    Raises:
        ValueError: if a baseline metric is missing from ``results`` or ``directions``, or a baseline is 0.
    """
    improvements = _relative_improvements(results, baseline, directions)
    per_task: dict[str, list[float]] = {}
    for name, improvement in improvements.items():
        per_task.setdefault(name.split("/")[0], []).append(improvement)
    return 100.0 * float(np.mean([np.mean(values) for values in per_task.values()]))


def delta_m(results: Mapping[str, float], baseline: Mapping[str, float],
            directions: Mapping[str, int] = METRIC_DIRECTIONS) -> float:
    r"""Nash-MTL's / CAGrad's Δm (``experiments/nyuv2/utils.py::delta_fn``), in percent: **positive = worse than the
    baseline** (lower is better; a method better on every metric has Δm < 0).

    .. math::
        \Delta_m = \frac{100}{K}\sum_{k=1}^{K}(-1)^{s_k}\,\frac{M_{m,k} - M_{b,k}}{M_{b,k}},\qquad
        s_k = 1 \text{ if higher is better}

    a **flat** mean over all K metrics (on NYUv2 the five normal metrics carry 5/9 of the weight). For the same
    run, :math:`\Delta_m = -\Delta_p` when every task has the same number of metrics, and differs otherwise.

    Args:
        results: the method's metrics :math:`M_m` (extra entries are ignored).
        baseline: the single-task (STL) metrics :math:`M_b`; its keys are the metrics compared.
        directions: metric -> +1 (higher is better) or −1 (lower is better).

    Raises:
        ValueError: if a baseline metric is missing from ``results`` or ``directions``, or a baseline is 0.
    """
    improvements = _relative_improvements(results, baseline, directions)
    return -100.0 * float(np.mean(list(improvements.values())))
