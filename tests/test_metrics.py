"""Metrics of deep/metrics.py against values computed by hand, numpy, and the Δ sign conventions."""

import math

import numpy as np
import pytest

from deep.metrics import (METRIC_DIRECTIONS, MetricAccumulator, delta_m, delta_p, histogram_median,
                          segmentation_scores)

F32 = np.float32

# A 3-class split of 8 pixels (one ignored). Class 2 is predicted only at the ignored pixel, so it is absent from
# the split: confusion (rows gt) [[2, 1, 0], [1, 3, 0], [0, 0, 0]]; IoU_0 = 2/(3+3-2) = 1/2, IoU_1 = 3/(4+4-3) = 3/5,
# mIoU = 0.55 over the two present classes (0.3667 if class 2 counted as 0, 0.7 as 1); pixel accuracy 5/7.
LABELS = np.array([0, 0, 1, 1, 1, -1, 0, 1], dtype=np.int32)
PREDICTED = np.array([0, 1, 1, 1, 0, 2, 0, 1], dtype=np.int32)


def _logits(predicted, num_classes=3):
    return (5.0 * np.eye(num_classes, dtype=F32)[predicted]).astype(F32)


def test_segmentation_by_hand_with_a_class_absent_from_the_split():
    accumulator = MetricAccumulator({"segmentation": 3})
    accumulator.update({"segmentation": _logits(PREDICTED).reshape(2, 1, 4, 3)},
                       {"segmentation": LABELS.reshape(2, 1, 4)})
    np.testing.assert_array_equal(accumulator._confusion, [[2, 1, 0], [1, 3, 0], [0, 0, 0]])
    result = accumulator.result()
    assert result["segmentation/miou"] == pytest.approx(0.55)
    assert result["segmentation/pixel_accuracy"] == pytest.approx(5 / 7)
    assert set(result) == {"segmentation/miou", "segmentation/pixel_accuracy"}


def test_a_class_only_predicted_counts_with_iou_zero():
    miou, accuracy = segmentation_scores(np.array([[2, 0, 1], [0, 3, 0], [0, 0, 0]]))
    assert miou == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert accuracy == pytest.approx(5 / 6)


def test_narrow_integer_labels_give_the_same_confusion_matrix():
    """Labels in int8, the narrowest type holding -1 and 12: the flat index label × C + prediction reaches
    12 × 13 + 12 = 168 with NYUv2's 13 classes, past int8's 127, so it must be formed in a wider type."""
    labels = np.array([12, 12, 5, -1], dtype=np.int8).reshape(1, 1, 4)
    accumulator = MetricAccumulator({"segmentation": 13})
    accumulator.update({"segmentation": _logits(np.array([12, 3, 5, 0]), 13).reshape(1, 1, 4, 13)},
                       {"segmentation": labels})
    expected = np.zeros((13, 13), dtype=np.int64)
    expected[12, 12] = expected[12, 3] = expected[5, 5] = 1  # the ignored pixel counts nowhere
    np.testing.assert_array_equal(accumulator._confusion, expected)


def test_two_batches_equal_one_batch():
    one, two = MetricAccumulator({"segmentation": 3}), MetricAccumulator({"segmentation": 3})
    one.update({"segmentation": _logits(PREDICTED).reshape(2, 1, 4, 3)}, {"segmentation": LABELS.reshape(2, 1, 4)})
    for half in (slice(0, 4), slice(4, 8)):
        two.update({"segmentation": _logits(PREDICTED[half]).reshape(1, 1, 4, 3)},
                   {"segmentation": LABELS[half].reshape(1, 1, 4)})
    assert one.result() == two.result()
    assert one.num_images == two.num_images == 2


def test_depth_errors_pool_valid_pixels_over_the_split():
    # Valid pixels (gt != 0): |p-g| = 1, 1, 0 and |p-g|/g = 0.5, 0.25, 0; the means over the split are 2/3 and
    # 0.25. The mean of per-batch means would give abs (1 + 0.5) / 2 = 0.75.
    target = np.array([2.0, 0.0, 4.0, 1.0], dtype=F32).reshape(2, 1, 2, 1)
    prediction = np.array([1.0, 5.0, 5.0, 1.0], dtype=F32).reshape(2, 1, 2, 1)
    accumulator = MetricAccumulator({"depth": 1})
    for index in range(2):
        accumulator.update({"depth": prediction[index:index + 1]}, {"depth": target[index:index + 1]})
    result = accumulator.result()
    assert result["depth/abs_err"] == pytest.approx(2 / 3, rel=1e-6)
    assert result["depth/rel_err"] == pytest.approx(0.25, rel=1e-6)


def _rotated(base, perpendicular, degrees, length=3.0):
    radians = math.radians(degrees)
    return length * (math.cos(radians) * base + math.sin(radians) * perpendicular)


def test_normal_angles_of_known_vectors():
    base = np.array([1.0, 2.0, 3.0]) / math.sqrt(14.0)
    perpendicular = np.cross(base, [0.0, 0.0, 1.0])
    perpendicular /= np.linalg.norm(perpendicular)
    angles = [0.0, 90.0, 180.0, 10.0, 20.0, 25.0]
    predictions = [_rotated(base, perpendicular, angle) for angle in angles]
    targets = [base] * len(angles)
    # Two pixels LibMTL's mask drops: all-zero ground truth, and a unit ground truth whose components sum to 0.
    predictions += [base, base]
    targets += [np.zeros(3), np.array([1.0, -1.0, 0.0]) / math.sqrt(2.0)]
    prediction = np.array(predictions, dtype=F32).reshape(1, 2, 4, 3)
    target = np.array(targets, dtype=F32).reshape(1, 2, 4, 3)
    accumulator = MetricAccumulator({"normal": 3})
    accumulator.update({"normal": prediction}, {"normal": target})
    result = accumulator.result()
    assert result["normal/mean"] == pytest.approx(325.0 / 6, abs=0.01)
    assert result["normal/median"] == pytest.approx((20.0 + 25.0) / 2, abs=1e-3)  # sorted 0 10 20 25 90 180
    assert result["normal/within_11.25"] == pytest.approx(2 / 6)  # 0 and 10
    assert result["normal/within_22.5"] == pytest.approx(3 / 6)
    assert result["normal/within_30"] == pytest.approx(4 / 6)
    assert accumulator._normal["count"] == 6
    # The ground truth is not renormalised (LibMTL's are unit already): length 0.5 along the prediction is
    # arccos(0.5) = 60 degrees.
    accumulator = MetricAccumulator({"normal": 3})
    accumulator.update({"normal": np.array([0, 0, 2.0], F32).reshape(1, 1, 1, 3)},
                       {"normal": np.array([0, 0, 0.5], F32).reshape(1, 1, 1, 3)})
    assert accumulator.result()["normal/mean"] == pytest.approx(60.0, abs=0.01)
    # A ground truth a little longer than 1 (the loaders accept up to 1.01) along or against the prediction: its
    # cosine, ±1.005, is clipped to ±1, so the angles are 0° and 180°, not NaN.
    accumulator = MetricAccumulator({"normal": 3})
    accumulator.update({"normal": np.array([[0, 0, 2.0], [0, 0, -2.0]], F32).reshape(1, 1, 2, 3)},
                       {"normal": np.array([[0, 0, 1.005], [0, 0, 1.005]], F32).reshape(1, 1, 2, 3)})
    assert accumulator.result()["normal/mean"] == pytest.approx(90.0, abs=1e-4)


def test_normal_median_matches_numpy_within_the_histogram_resolution():
    rng = np.random.default_rng(0)
    prediction = rng.normal(size=(3, 6, 7, 3)).astype(F32)
    target = rng.normal(size=(3, 6, 7, 3))
    target = (target / np.linalg.norm(target, axis=-1, keepdims=True)).astype(F32)
    unit = prediction.astype(np.float64) / np.linalg.norm(prediction.astype(np.float64), axis=-1, keepdims=True)
    exact = np.degrees(np.arccos(np.clip(np.sum(unit * target, axis=-1), -1, 1)))
    for bin_degrees in (0.001, 1.0):
        accumulator = MetricAccumulator({"normal": 3}, normal_bin_degrees=bin_degrees)
        accumulator.update({"normal": prediction[:1]}, {"normal": target[:1]})
        accumulator.update({"normal": prediction[1:]}, {"normal": target[1:]})
        result = accumulator.result()
        assert abs(result["normal/median"] - np.median(exact)) <= bin_degrees / 2 + 1e-4
        assert result["normal/mean"] == pytest.approx(np.mean(exact), rel=1e-5)
        assert result["normal/within_30"] == pytest.approx(np.mean(exact < 30))


def test_an_angle_of_180_degrees_is_counted_in_the_last_bin():
    """Antiparallel predictions: every angle is 180° (float32's arccos(-1) in degrees rounds to it exactly), which
    lies on the histogram's upper edge and is clipped into the last bin, not dropped. With 0.7° bins, which do not
    divide 180, the last bin [179.9°, 180.6°) is partial: it must exist (ceil(180 / 0.7) = 258 bins; with 257 the
    angle would be read as 179.55°) and its centre, 180.25°, is clipped to 180°. With 1° bins the median is 179.5°,
    the centre of the last bin, within the documented half bin."""
    target = np.tile(np.array([0.0, 0.0, 1.0], F32), (1, 2, 2, 1))
    for bin_degrees, median in ((0.7, 180.0), (1.0, 179.5)):
        accumulator = MetricAccumulator({"normal": 3}, normal_bin_degrees=bin_degrees)
        accumulator.update({"normal": -2 * target}, {"normal": target})
        result = accumulator.result()
        assert result["normal/median"] == median
        assert result["normal/mean"] == pytest.approx(180.0, abs=1e-4)


def test_a_nan_prediction_spoils_the_statistics_only_at_a_valid_pixel():
    """LibMTL drops the masked pixels before anything else: a NaN prediction where the ground truth is 0 changes
    nothing. At a valid pixel the mean and the median are NaN (the median is not read from the other angles), and
    each within-t fraction keeps that pixel in its denominator (a NaN angle is not below t, as in LibMTL's
    ``np.mean(error < t)``)."""
    target = np.array([[0, 0, 1], [0, 0, 1], [0, 0, 1], [0, 0, 0]], F32).reshape(1, 1, 4, 3)
    prediction = target.copy()
    prediction[0, 0, 3] = np.nan  # the masked pixel
    accumulator = MetricAccumulator({"normal": 3})
    accumulator.update({"normal": prediction}, {"normal": target})
    result = accumulator.result()
    assert result["normal/mean"] == 0.0 and result["normal/median"] == pytest.approx(0.0, abs=1e-3)
    assert [result[f"normal/within_{t:g}"] for t in (11.25, 22.5, 30)] == [1.0, 1.0, 1.0]
    prediction[0, 0, 0] = np.nan  # a valid pixel
    accumulator.reset()
    accumulator.update({"normal": prediction}, {"normal": target})
    result = accumulator.result()
    assert math.isnan(result["normal/mean"]) and math.isnan(result["normal/median"])
    assert [result[f"normal/within_{t:g}"] for t in (11.25, 22.5, 30)] == pytest.approx([2 / 3] * 3)


def test_a_nan_angle_of_an_earlier_batch_keeps_the_median_nan():
    """The NaN count adds up over the batches like every other statistic: a diverged first batch followed by a clean
    one leaves the median NaN, as the mean is, instead of a median read from the clean angles alone."""
    target = np.tile(np.array([0.0, 0.0, 1.0], F32), (1, 1, 2, 1))
    diverged = target.copy()
    diverged[0, 0, 0] = np.nan
    accumulator = MetricAccumulator({"normal": 3})
    accumulator.update({"normal": diverged}, {"normal": target})
    accumulator.update({"normal": target}, {"normal": target})
    result = accumulator.result()
    assert math.isnan(result["normal/mean"]) and math.isnan(result["normal/median"])


def test_an_angle_goes_to_the_bin_below_it_not_the_nearest():
    """Bin k holds k w <= angle < (k + 1) w: with 1-degree bins an angle of 10.7 degrees is in [10, 11), read as its
    centre 10.5 (rounding to the nearest bin would give [11, 12) and 11.5, outside the promised half bin)."""
    target = np.array([0.0, 0.0, 1.0], F32).reshape(1, 1, 1, 3)
    prediction = np.array(_rotated(np.array([0.0, 0.0, 1.0]), np.array([1.0, 0.0, 0.0]), 10.7), F32).reshape(1, 1, 1, 3)
    accumulator = MetricAccumulator({"normal": 3}, normal_bin_degrees=1.0)
    accumulator.update({"normal": prediction}, {"normal": target})
    result = accumulator.result()
    assert result["normal/mean"] == pytest.approx(10.7, abs=1e-3)
    assert result["normal/median"] == 10.5


def test_histogram_median_follows_numpy_for_odd_and_even_counts():
    histogram = np.zeros(180)
    histogram[[3, 7, 50]] = 1  # values at bin centres 3.5, 7.5, 50.5
    assert histogram_median(histogram, 1.0) == 7.5
    histogram[50] = 2  # values at bin centres 3.5, 7.5, 50.5, 50.5: numpy's median (7.5 + 50.5) / 2
    assert histogram_median(histogram, 1.0) == pytest.approx(29.0)


def test_cityscapes_tasks_give_four_metrics_with_directions():
    accumulator = MetricAccumulator((("segmentation", 7), ("depth", 1)))
    labels = np.arange(8, dtype=np.int32).reshape(1, 2, 4) % 7
    accumulator.update({"segmentation": _logits(labels, 7), "depth": np.ones((1, 2, 4, 1), F32),
                        "normal": np.zeros(3)}, {"segmentation": labels, "depth": np.full((1, 2, 4, 1), 2, F32)})
    result = accumulator.result()
    assert set(result) == {"segmentation/miou", "segmentation/pixel_accuracy", "depth/abs_err", "depth/rel_err"}
    assert result["segmentation/miou"] == result["segmentation/pixel_accuracy"] == 1.0
    assert set(result) <= set(METRIC_DIRECTIONS)


def test_nyuv2_result_keys_are_the_nine_directed_metrics():
    accumulator = MetricAccumulator({"segmentation": 3, "depth": 1, "normal": 3})
    normal = np.tile(np.array([0.0, 0.0, 1.0], F32), (1, 1, 8, 1))
    accumulator.update({"segmentation": _logits(PREDICTED).reshape(1, 1, 8, 3), "depth": np.ones((1, 1, 8, 1), F32),
                        "normal": normal},
                       {"segmentation": LABELS.reshape(1, 1, 8), "depth": np.ones((1, 1, 8, 1), F32), "normal": normal})
    dense = {name for name in METRIC_DIRECTIONS if not name.startswith("attributes/")}  # CelebA's beside them
    assert set(accumulator.result()) == dense and len(dense) == 9


def test_bad_input_is_rejected_with_one_line_and_leaves_the_totals_unchanged():
    accumulator = MetricAccumulator({"segmentation": 3, "depth": 1})
    logits, labels = _logits(PREDICTED).reshape(1, 1, 8, 3), LABELS.reshape(1, 1, 8)
    depth = np.ones((1, 1, 8, 1), F32)
    with pytest.raises(ValueError, match="no batch"):
        accumulator.result()
    with pytest.raises(ValueError, match="outside -1..2"):
        accumulator.update({"segmentation": logits, "depth": depth}, {"segmentation": labels + 2, "depth": depth})
    with pytest.raises(ValueError, match="negative"):
        accumulator.update({"segmentation": logits, "depth": depth}, {"segmentation": labels, "depth": -depth})
    with pytest.raises(ValueError, match="no 'depth' entry"):
        accumulator.update({"segmentation": logits}, {"segmentation": labels, "depth": depth})
    with pytest.raises(ValueError, match="integers"):
        accumulator.update({"segmentation": logits, "depth": depth}, {"segmentation": labels.astype(F32),
                                                                     "depth": depth})
    with pytest.raises(ValueError, match="must have shape"):
        accumulator.update({"segmentation": logits, "depth": depth}, {"segmentation": labels[:, :, :4],
                                                                     "depth": depth})
    assert accumulator.num_images == 0 and accumulator._confusion.sum() == 0
    with pytest.raises(ValueError, match="unknown task 'edges'"):
        MetricAccumulator({"edges": 1})
    with pytest.raises(ValueError, match="3 channel"):
        MetricAccumulator({"normal": 2})
    for classes in (1, 2.5):
        with pytest.raises(ValueError, match="segmentation needs an integer number of classes >= 2"):
            MetricAccumulator({"segmentation": classes})
    for width in (0.0, 2.0):  # the median's resolution is half a bin: wider than 1° is refused
        with pytest.raises(ValueError, match=r"normal_bin_degrees must be in \(0, 1\]"):
            MetricAccumulator({"normal": 3}, normal_bin_degrees=width)
    with pytest.raises(ValueError, match="the median angle is undefined"):
        histogram_median(np.zeros(180, dtype=np.int64), 1.0)


# --------------------------------------------------------------------------------------------------- Δp and Δm

BASELINE = {"segmentation/miou": 0.5, "segmentation/pixel_accuracy": 0.8, "depth/abs_err": 0.4}


def test_delta_signs_on_a_worked_example():
    # Relative improvements: mIoU +10 %, pixel accuracy 0 %, abs_err (0.4 -> 0.3) +25 %.
    better = {"segmentation/miou": 0.55, "segmentation/pixel_accuracy": 0.8, "depth/abs_err": 0.3, "other": 1.0}
    # LibMTL: within tasks first (segmentation (10 + 0) / 2 = 5, depth 25), then across tasks.
    assert delta_p(better, BASELINE) == pytest.approx((5.0 + 25.0) / 2)
    # Nash-MTL: flat mean over the three metrics, positive = worse, so a better method is negative.
    assert delta_m(better, BASELINE) == pytest.approx(-(10.0 + 0.0 + 25.0) / 3)
    worse = {"segmentation/miou": 0.45, "segmentation/pixel_accuracy": 0.72, "depth/abs_err": 0.5}
    assert delta_p(worse, BASELINE) < 0 < delta_m(worse, BASELINE)
    assert delta_p(BASELINE, BASELINE) == delta_m(BASELINE, BASELINE) == 0.0


def test_delta_errors_name_the_metric():
    results = dict(BASELINE)
    del results["depth/abs_err"]
    for delta in (delta_p, delta_m):
        with pytest.raises(ValueError, match="'depth/abs_err' of the baseline is missing"):
            delta(results, BASELINE)
        with pytest.raises(ValueError, match="baseline of 'depth/abs_err' is 0"):
            delta(BASELINE, {**BASELINE, "depth/abs_err": 0.0})
        with pytest.raises(ValueError, match="'new' has no direction"):
            delta({**BASELINE, "new": 1.0}, {**BASELINE, "new": 1.0})
        with pytest.raises(ValueError, match="must be \\+1 or -1"):
            delta(BASELINE, BASELINE, {**METRIC_DIRECTIONS, "depth/abs_err": 0})
        with pytest.raises(ValueError, match="'depth/abs_err' must be finite in results and baseline; got nan"):
            delta({**BASELINE, "depth/abs_err": math.nan}, BASELINE)
        # A diverged single-task run in the baseline is refused too, rather than giving a NaN Δ.
        with pytest.raises(ValueError, match="'depth/abs_err' must be finite in results and baseline; got 0.4 and nan"):
            delta(BASELINE, {**BASELINE, "depth/abs_err": math.nan})


def test_the_ratio_of_means_carries_the_delta_methods_standard_error():
    """Over 4000 replicate samples of 200 correlated pairs, the spread of the ratio of means is what the delta method
    says for one sample (within 10 %), and the formula is the expanded one."""
    from deep.metrics import mean_and_error, ratio_of_means

    rng = np.random.default_rng(0)
    a = rng.gamma(4.0, 0.5, (4000, 200))
    b = 0.3 * a + rng.gamma(2.0, 0.4, (4000, 200))
    ratios = b.mean(1) / a.mean(1)
    errors = [ratio_of_means(b[i], a[i])["standard_error"] for i in range(200)]
    assert np.mean(errors) == pytest.approx(ratios.std(), rel=0.1)
    one = ratio_of_means(b[0], a[0])
    r, n = b[0].mean() / a[0].mean(), a.shape[1]
    covariance = np.cov(a[0], b[0], ddof=1)
    expanded = np.sqrt((covariance[1, 1] - 2 * r * covariance[0, 1] + r * r * covariance[0, 0]) / n) / a[0].mean()
    assert one == pytest.approx({"ratio": r, "standard_error": expanded})
    assert ratio_of_means([1.0], [2.0]) == {"ratio": 0.5, "standard_error": None}
    assert ratio_of_means([1.0, 2.0], [1.0, -1.0]) == {"ratio": None, "standard_error": None}  # mean of a is 0
    # A standard error is a spread: over |ā|, so a negative denominator flips the ratio's sign and not the error's.
    flipped = ratio_of_means(b[0], -a[0])
    assert flipped["ratio"] == pytest.approx(-r) and flipped["standard_error"] == pytest.approx(expanded)
    assert mean_and_error([2.0]) == {"mean": 2.0, "standard_error": None, "n": 1}
    assert mean_and_error([1.0, 3.0]) == {"mean": 2.0, "standard_error": 1.0, "n": 2}
