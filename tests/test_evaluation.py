"""Tests of the numpy accuracy metrics on fixed arrays."""

import math

import numpy as np
import pytest

from kc_keras import evaluation
from kc_keras.errors import KCError

# Four classes: 0 and 1 in vertical "a", 2 and 3 in vertical "b".
CLASS_VERTICAL = (0, 0, 1, 1)
VERTICALS = ("a", "b")

SCORES = np.array(
    [
        [0.6, 0.3, 0.1, 0.0],  # label 0: top-1 hit
        [0.6, 0.3, 0.1, 0.0],  # label 1: top-2 hit
        [0.1, 0.2, 0.3, 0.4],  # label 2: top-2 hit
        [0.1, 0.2, 0.3, 0.4],  # label 3: top-1 hit
        [0.4, 0.3, 0.2, 0.1],  # label 3: only in the top-4
    ],
    dtype=np.float32,
)
LABELS = np.array([0, 1, 2, 3, 3])


@pytest.mark.parametrize(
    "k, expected",
    [(1, 2 / 5), (2, 4 / 5), (3, 4 / 5), (4, 1.0), (9, 1.0)],
    ids=["top1", "top2", "top3", "top4", "k-above-columns"],
)
def test_top_k_accuracy(k, expected):
    assert evaluation.top_k_accuracy(SCORES, LABELS, k) == pytest.approx(
        expected
    )


def test_top_k_breaks_ties_by_column():
    scores = np.array([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    assert evaluation.top_k_correct(scores, np.array([0, 1]), 1).tolist() == [
        True,
        False,
    ]
    assert evaluation.top_k_correct(scores, np.array([1, 2]), 2).tolist() == [
        True,
        False,
    ]


def test_top_k_of_no_rows_is_nan():
    empty = np.zeros((0, 3))
    assert math.isnan(evaluation.top_k_accuracy(empty, np.zeros(0, int)))


@pytest.mark.parametrize(
    "scores, labels, k, message",
    [
        (np.zeros(4), np.zeros(4, int), 1, "expected \\(num_images"),
        (np.zeros((3, 2)), np.zeros(2, int), 1, "one label per row"),
        (np.zeros((2, 2)), np.array([0, 2]), 1, "must index a column"),
        (np.zeros((2, 2)), np.array([0, -1]), 1, "must index a column"),
        (np.zeros((2, 2)), np.array([0, 1]), 0, "k >= 1"),
    ],
    ids=["rank-1", "row-mismatch", "label-high", "label-negative", "k-zero"],
)
def test_top_k_rejects_bad_input(scores, labels, k, message):
    with pytest.raises(KCError, match=message):
        evaluation.top_k_correct(scores, labels, k)


def test_accuracy_report_per_vertical():
    report = evaluation.accuracy_report(
        SCORES, LABELS, CLASS_VERTICAL, VERTICALS
    )
    assert report["num_images"] == 5
    assert report["top1"] == pytest.approx(2 / 5)
    assert report["top5"] == pytest.approx(1.0)
    assert report["per_vertical"]["a"]["num_images"] == 2
    assert report["per_vertical"]["a"]["top1"] == pytest.approx(1 / 2)
    assert report["per_vertical"]["b"]["num_images"] == 3
    assert report["per_vertical"]["b"]["top1"] == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    "vertical, expected",
    [(0, [0, 1, 2, 2]), (1, [2, 2, 0, 1])],
    ids=["vertical-0", "vertical-1"],
)
def test_specialist_label_map(vertical, expected):
    label_map = evaluation.specialist_label_map(CLASS_VERTICAL, vertical)
    assert label_map.tolist() == expected


def test_specialist_label_map_non_contiguous():
    label_map = evaluation.specialist_label_map((1, 0, 1, 0, 0), 0)
    assert label_map.tolist() == [3, 0, 3, 1, 2]


def test_specialist_report_gain_and_dustbin():
    # Specialist of vertical "a": outputs class 0, class 1, dustbin.
    specialist = np.array(
        [
            [5.0, 0.0, 0.0],  # label 0: right
            [0.0, 5.0, 0.0],  # label 1: right (the generalist is wrong)
            [0.0, 0.0, 5.0],  # label 2: dustbin, right
            [5.0, 0.0, 0.0],  # label 3: not dustbin, wrong
            [0.0, 0.0, 5.0],  # label 3: dustbin, right
        ]
    )
    report = evaluation.specialist_report(
        specialist, SCORES, LABELS, CLASS_VERTICAL, VERTICALS, 0
    )
    assert report["vertical"] == 0
    assert report["vertical_name"] == "a"
    assert report["top1"] == pytest.approx(4 / 5)
    assert report["per_vertical"]["a"]["top1"] == pytest.approx(1.0)
    assert report["per_vertical"]["b"]["top1"] == pytest.approx(2 / 3)
    own = report["own_vertical"]
    assert own["num_images"] == 2
    assert own["top1"] == pytest.approx(1.0)
    assert own["generalist_top1"] == pytest.approx(1 / 2)
    assert own["gain"] == pytest.approx(1 / 2)


def test_ensemble_reports_routed_and_full():
    generalist = np.array(
        [
            [0.5, 0.4, 0.05, 0.05],  # label 1: routed to "a"
            [0.1, 0.1, 0.45, 0.35],  # label 3: routed to "b"
            [0.3, 0.1, 0.35, 0.25],  # label 0: routed to "b" (wrong)
        ],
        dtype=np.float32,
    )
    labels = np.array([1, 3, 0])

    specialist_a = np.array(
        [[0.1, 0.8, 0.1], [0.0, 0.0, 1.0], [0.9, 0.05, 0.05]],
        dtype=np.float32,
    )
    specialist_b = np.array(
        [[0.0, 0.0, 1.0], [0.2, 0.7, 0.1], [0.5, 0.4, 0.1]],
        dtype=np.float32,
    )
    reports = evaluation.ensemble_reports(
        generalist,
        [specialist_a, specialist_b],
        labels,
        CLASS_VERTICAL,
        VERTICALS,
    )

    routed = reports["routed"]
    # Their specialists correct rows 0 and 1. Row 2 is routed to the wrong
    # vertical, so class 0 ranks below both classes of "b".
    assert routed["top1"] == pytest.approx(2 / 3)
    assert routed["per_vertical"]["a"]["top1"] == pytest.approx(1 / 2)
    assert routed["per_vertical"]["b"]["top1"] == pytest.approx(1.0)
    # Full ensemble, row 2: class 0 scores (0.3 + 0.9) / 2 = 0.6, the best.
    full = reports["full"]
    assert full["top1"] == pytest.approx(1.0)


def test_ensemble_reports_need_one_specialist_per_vertical():
    with pytest.raises(KCError, match="1 specialist outputs for 2"):
        evaluation.ensemble_reports(
            SCORES, [np.zeros((5, 3))], LABELS, CLASS_VERTICAL, VERTICALS
        )


def test_confusion_matrix_counts():
    matrix = evaluation.confusion_matrix(SCORES, LABELS, 4)
    assert matrix.sum() == 5
    assert matrix[0, 0] == 1
    assert matrix[1, 0] == 1
    assert matrix[3, 3] == 1
    assert matrix[3, 0] == 1
    assert matrix[2, 3] == 1


def test_softmax_rows_sum_to_one():
    probs = evaluation.softmax(np.array([[1000.0, 1000.0], [0.0, np.log(3)]]))
    assert probs.dtype == np.float32
    np.testing.assert_allclose(probs, [[0.5, 0.5], [0.25, 0.75]], rtol=1e-6)


def test_json_safe_replaces_nan():
    data = {"a": float("nan"), "b": [1.0, float("nan")], "c": "x"}
    assert evaluation.json_safe(data) == {"a": None, "b": [1.0, None], "c": "x"}
