"""Confusion matrix, IoU (the paper's one-matrix mean), streaming accumulation, ETS."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from particleseg_model.model.metrics import (
    ConfusionAccumulator,
    confusion_matrix,
    edge_to_signal,
    iou_scores,
    per_particle_iou,
)

TRUE = np.array([[0, 1], [2, 2]], dtype=np.uint8)
PRED = np.array([[0, 2], [2, 1]], dtype=np.uint8)


def _brute_confusion(true: np.ndarray, pred: np.ndarray, n: int) -> np.ndarray:
    matrix = np.zeros((n, n), dtype=np.int64)
    for t, p in zip(true.ravel(), pred.ravel(), strict=True):
        matrix[t, p] += 1
    return matrix


def test_confusion_matrix_by_hand() -> None:
    matrix = confusion_matrix(TRUE, PRED)
    assert matrix.dtype == np.int64 and matrix.shape == (3, 3)
    # rows true, columns predicted
    np.testing.assert_array_equal(matrix, [[1, 0, 0], [0, 0, 1], [0, 1, 1]])


def test_confusion_matrix_matches_brute_force_on_random_batches() -> None:
    rng = np.random.default_rng(0)
    true = rng.integers(0, 3, (5, 16, 16), dtype=np.uint8)
    pred = rng.integers(0, 3, (5, 16, 16)).astype(np.int64)  # mixed dtypes are fine
    matrix = confusion_matrix(true, pred)
    np.testing.assert_array_equal(matrix, _brute_confusion(true, pred, 3))
    assert matrix.sum() == true.size


def test_iou_scores_by_hand() -> None:
    scores = iou_scores(confusion_matrix(TRUE, PRED))
    assert scores["iou_background"] == 1.0  # TP 1, FP 0, FN 0
    assert scores["iou_signal"] == 0.0  # TP 0, FP 1, FN 1
    assert scores["iou_edge"] == pytest.approx(1 / 3)  # TP 1, FP 1, FN 1
    assert scores["mean_iou"] == pytest.approx((1 + 0 + 1 / 3) / 3)
    assert scores["pixel_accuracy"] == 0.5
    assert scores["pixels"] == 4


def test_class_absent_from_truth_and_prediction_is_nan_and_left_out_of_the_mean() -> None:
    true = np.array([0, 0, 1, 1])
    pred = np.array([0, 1, 1, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "mean of empty slice" / division warnings
        scores = iou_scores(confusion_matrix(true, pred))
        empty = iou_scores(np.zeros((3, 3), dtype=np.int64))
    assert math.isnan(scores["iou_edge"])
    assert scores["iou_background"] == 0.5 and scores["iou_signal"] == pytest.approx(2 / 3)
    assert scores["mean_iou"] == pytest.approx((0.5 + 2 / 3) / 2)
    # a class only predicted (never true) has IoU 0, not NaN
    assert iou_scores(confusion_matrix(np.array([0, 0]), np.array([0, 2])))["iou_edge"] == 0.0
    assert math.isnan(empty["mean_iou"]) and math.isnan(empty["pixel_accuracy"])
    assert empty["pixels"] == 0


def test_other_class_counts_name_their_ious_by_index() -> None:
    scores = iou_scores(confusion_matrix(np.array([0, 1, 3]), np.array([0, 1, 3]), n_classes=4))
    assert scores["iou_3"] == 1.0 and math.isnan(scores["iou_edge"])
    assert scores["mean_iou"] == 1.0


def test_accumulator_equals_one_confusion_matrix_over_everything() -> None:
    rng = np.random.default_rng(1)
    true = rng.integers(0, 3, (12, 8, 8), dtype=np.uint8)
    pred = np.where(rng.random(true.shape) < 0.7, true, rng.integers(0, 3, true.shape)).astype(
        np.uint8
    )
    acc = ConfusionAccumulator()
    for start in range(0, 12, 5):  # uneven batches: 5, 5, 2
        acc.update(true[start : start + 5], pred[start : start + 5])
    np.testing.assert_array_equal(acc.matrix, confusion_matrix(true, pred))
    assert acc.scores() == iou_scores(confusion_matrix(true, pred))
    # the dataset mean IoU is not the mean of per-particle IoUs
    assert acc.scores()["mean_iou"] != pytest.approx(per_particle_iou(true, pred).mean(), abs=1e-6)
    acc.matrix[0, 0] = 10**6  # a copy: the accumulator is unchanged
    assert acc.matrix.sum() == true.size
    acc.reset()
    assert acc.matrix.sum() == 0


def test_shape_mismatch_names_both_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(2, 2\).*\(4,\)"):
        confusion_matrix(TRUE, np.zeros(4, dtype=np.uint8))
    with pytest.raises(ValueError, match=r"\(1, 4, 4\).*\(1, 4, 5\)"):
        per_particle_iou(np.zeros((1, 4, 4), np.uint8), np.zeros((1, 4, 5), np.uint8))


@pytest.mark.parametrize("bad", [np.array([0, 3]), np.array([-1, 0])])
def test_codes_outside_the_classes_are_errors(bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match=r"outside \[0, 3\)"):
        confusion_matrix(np.array([0, 1]), bad)
    with pytest.raises(ValueError, match="true has codes outside"):
        ConfusionAccumulator().update(bad, np.array([0, 1]))


def test_float_predictions_are_refused() -> None:
    with pytest.raises(TypeError, match="float"):
        confusion_matrix(np.array([0, 1]), np.array([0.0, 1.0]))


def test_edge_to_signal_per_particle() -> None:
    labels = np.zeros((3, 6, 6), dtype=np.uint8)
    labels[0, 1:3, 1:3] = 1  # 4 signal
    labels[0, 4, :] = 2  # 6 edge
    labels[1, 0, :3] = 2  # edge but no signal: ETS 0 (the paper's rule)
    # particle 2: all background: 0
    ets = edge_to_signal(labels)
    assert ets.dtype == np.float64 and ets.shape == (3,)
    np.testing.assert_array_equal(ets, [1.5, 0.0, 0.0])
    one = edge_to_signal(labels[0])  # (S, S): one particle
    assert one.shape == (1,) and one[0] == 1.5
    with pytest.raises(ValueError, match=r"\(N, S, S\)"):
        edge_to_signal(np.zeros(5, dtype=np.uint8))


def test_per_particle_iou() -> None:
    true = np.stack([TRUE, TRUE, np.zeros((2, 2), np.uint8)])
    pred = np.stack([TRUE, PRED, np.array([[0, 0], [0, 1]], np.uint8)])
    ious = per_particle_iou(true, pred)
    assert ious.dtype == np.float64 and ious.shape == (3,)
    # perfect; the hand-computed pair; background 3/4 and signal 0 (only predicted), no edge
    np.testing.assert_allclose(ious, [1.0, (1 + 0 + 1 / 3) / 3, (0.75 + 0.0) / 2])
    for i in range(3):  # each equals the one-matrix mean IoU of that particle alone
        assert ious[i] == pytest.approx(iou_scores(confusion_matrix(true[i], pred[i]))["mean_iou"])
    assert per_particle_iou(TRUE, PRED).shape == (1,)


def test_chunked_counting_gives_the_same_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    import particleseg_model.model.metrics as metrics

    rng = np.random.default_rng(2)
    true = rng.integers(0, 3, (7, 5, 5), dtype=np.uint8)
    pred = rng.integers(0, 3, (7, 5, 5), dtype=np.uint8)
    whole, per_particle = confusion_matrix(true, pred), per_particle_iou(true, pred)
    monkeypatch.setattr(metrics, "_CHUNK", 60)  # 3 chunks of pixels; 2 particles per chunk
    np.testing.assert_array_equal(confusion_matrix(true, pred), whole)
    np.testing.assert_array_equal(per_particle_iou(true, pred), per_particle)
    np.testing.assert_array_equal(whole, _brute_confusion(true, pred, 3))
