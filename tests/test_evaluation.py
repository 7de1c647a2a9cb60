"""Tests of the numpy accuracy metrics on fixed arrays."""

import math
import tracemalloc

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


def _sorted_rank(scores, labels):
    # The definition `label_rank` must match: a stable descending sort.
    order = np.argsort(-scores, axis=1, kind="stable")
    return np.array(
        [
            list(row).index(label)
            for row, label in zip(order, labels, strict=True)
        ]
    )


@pytest.mark.parametrize(
    "values",
    [
        np.array([0.0, 1.0, 2.0]),
        np.array([0.0, 1.0]),
        np.array([0.0, 1.0, np.nan]),
    ],
    ids=["three-values-with-ties", "two-values", "nan-scores"],
)
def test_label_rank_matches_stable_sort(values):
    rng = np.random.default_rng(0)
    scores = rng.choice(values, size=(200, 7)).astype(np.float32)
    labels = rng.integers(0, 7, size=200)
    rank = evaluation.label_rank(scores, labels)
    np.testing.assert_array_equal(rank, _sorted_rank(scores, labels))


def _random_teacher_batches(num_images, batch_size, seed=0):
    # Random logits of 12 classes in verticals (0, 0, 0, 0, 1, 1, 1, 1, 2,
    # ...), rounded so ties occur.
    rng = np.random.default_rng(seed)
    class_vertical = np.repeat(np.arange(3), 4)
    labels = rng.integers(0, 12, size=num_images)
    generalist = np.round(rng.normal(size=(num_images, 12)), 1)
    specialists = [
        np.round(rng.normal(size=(num_images, 5)), 1) for _ in range(3)
    ]
    batches = [
        (
            labels[start : start + batch_size],
            generalist[start : start + batch_size],
            [s[start : start + batch_size] for s in specialists],
        )
        for start in range(0, num_images, batch_size)
    ]
    return class_vertical, labels, generalist, specialists, batches


@pytest.mark.parametrize("batch_size", [1, 7, 50], ids=["1", "7", "all"])
def test_stream_teacher_reports_match_dense(batch_size):
    class_vertical, labels, generalist, specialists, batches = (
        _random_teacher_batches(50, batch_size)
    )
    names = ("x", "y", "z")
    streamed = evaluation.stream_teacher_reports(batches, class_vertical, names)
    assert streamed["num_images"] == 50
    assert streamed["models"]["generalist"] == evaluation.accuracy_report(
        generalist, labels, class_vertical, names
    )
    for v, logits in enumerate(specialists):
        expected = evaluation.specialist_report(
            logits, generalist, labels, class_vertical, names, v
        )
        assert streamed["models"][f"specialist_{v}"] == expected
    dense = evaluation.ensemble_reports(
        evaluation.softmax(generalist),
        [evaluation.softmax(s) for s in specialists],
        labels,
        class_vertical,
        names,
    )
    assert streamed["ensembles"] == dense


def _large_teacher_batches(num_images, num_classes, num_verticals, batch):
    """Yield teacher logits whose accuracies are known.

    The generalist ranks the label first on even images and second, behind
    the next class of the same vertical, on odd images. Every specialist
    ranks the local label first on its own vertical's images and the
    dustbin first on the others.
    """
    size = num_classes // num_verticals
    for start in range(0, num_images, batch):
        index = np.arange(start, min(start + batch, num_images))
        labels = index * 10 % num_classes
        generalist = np.zeros((len(index), num_classes), np.float32)
        rows = np.arange(len(index))
        odd = index % 2 == 1
        generalist[rows, labels] = np.where(odd, 4.0, 5.0)
        generalist[rows[odd], labels[odd] + 1] = 5.0
        specialists = []
        for v in range(num_verticals):
            logits = np.zeros((len(index), size + 1), np.float32)
            local = np.where(labels // size == v, labels - v * size, size)
            logits[rows, local] = 5.0
            specialists.append(logits)
        yield labels, generalist, specialists


def test_stream_teacher_reports_20k_classes_bounded_memory():
    num_images, num_classes, num_verticals, batch = 2000, 20_000, 4, 50
    class_vertical = np.arange(num_classes) * num_verticals // num_classes
    names = tuple(f"v{v}" for v in range(num_verticals))
    tracemalloc.start()
    try:
        reports = evaluation.stream_teacher_reports(
            _large_teacher_batches(
                num_images, num_classes, num_verticals, batch
            ),
            class_vertical,
            names,
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # One dense float32 array of images x classes takes 160 MB; a batch
    # of every output with its temporaries stays far below half of it.
    dense_bytes = num_images * num_classes * 4
    assert peak < dense_bytes / 2

    generalist = reports["models"]["generalist"]
    assert generalist["num_images"] == num_images
    assert generalist["top1"] == pytest.approx(0.5)
    assert generalist["top5"] == pytest.approx(1.0)
    assert generalist["per_vertical"]["v0"]["num_images"] == 500

    specialist = reports["models"]["specialist_2"]
    assert specialist["top1"] == pytest.approx(1.0)
    assert specialist["own_vertical"]["num_images"] == 500
    assert specialist["own_vertical"]["gain"] == pytest.approx(0.5)

    assert reports["ensembles"]["routed"]["top1"] == pytest.approx(1.0)
    assert reports["ensembles"]["full"]["top1"] == pytest.approx(1.0)


def test_ensemble_counter_rejects_unknown_rule():
    with pytest.raises(KCError, match="unknown ensemble rule 'mean'"):
        evaluation.EnsembleCounter(CLASS_VERTICAL, VERTICALS, rules=("mean",))


def test_confusion_counts_match_confusion_matrix():
    counts = evaluation.confusion_counts(np.argmax(SCORES, axis=1), LABELS, 4)
    np.testing.assert_array_equal(
        counts, evaluation.confusion_matrix(SCORES, LABELS, 4)
    )
