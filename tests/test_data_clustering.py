"""Tests of deriving verticals from a confusion matrix."""

import numpy as np
import pytest

from kc_keras.data.clustering import cluster_confusion
from kc_keras.errors import KCError


def planted_confusion(block_sizes, seed=0):
    """Return a confusion matrix with heavy confusion inside each block."""
    rng = np.random.default_rng(seed)
    truth = np.repeat(np.arange(len(block_sizes)), block_sizes)
    num_classes = len(truth)
    same = truth[:, None] == truth[None]
    confusion = np.where(same, 20.0, 1.0) * rng.uniform(
        0.5, 1.5, (num_classes, num_classes)
    )
    np.fill_diagonal(confusion, 200.0)
    # Shuffle class indices so that blocks are not contiguous.
    order = rng.permutation(num_classes)
    return confusion[np.ix_(order, order)], truth[order]


def same_partition(found, truth):
    pairs_found = found[:, None] == found[None]
    pairs_truth = truth[:, None] == truth[None]
    return np.array_equal(pairs_found, pairs_truth)


@pytest.mark.parametrize("method", ["spectral", "agglomerative"])
def test_clustering_recovers_planted_blocks(method):
    confusion, truth = planted_confusion([4, 6, 5, 3])
    found = cluster_confusion(confusion, 4, method=method, seed=0)
    assert found.shape == (18,)
    assert same_partition(found, truth)


@pytest.mark.parametrize("method", ["spectral", "agglomerative"])
def test_clustering_is_deterministic_and_numbered(method):
    confusion, _ = planted_confusion([5, 5, 5], seed=3)
    first = cluster_confusion(confusion, 3, method=method, seed=1)
    second = cluster_confusion(confusion, 3, method=method, seed=1)
    np.testing.assert_array_equal(first, second)
    # Verticals are numbered by their first class.
    _, first_class = np.unique(first, return_index=True)
    assert list(first[np.sort(first_class)]) == [0, 1, 2]


@pytest.mark.parametrize("method", ["spectral", "agglomerative"])
def test_clustering_merges_single_class_clusters(method):
    # Class 6 is confused with nothing, so it would form its own cluster.
    confusion, truth = planted_confusion([3, 3], seed=1)
    confusion = np.pad(confusion, ((0, 1), (0, 1)))
    confusion[6, 6] = 100.0
    confusion[6, 0] = confusion[0, 6] = 0.5
    found = cluster_confusion(confusion, 3, method=method)
    counts = np.bincount(found)
    assert counts.min() >= 2
    assert found[6] == found[0]


def test_clustering_accepts_unbalanced_counts():
    confusion, truth = planted_confusion([3, 3, 3], seed=2)
    # One class with 100 times the images still has the same error rates.
    confusion[0] *= 100.0
    found = cluster_confusion(confusion, 3)
    assert same_partition(found, truth)


@pytest.mark.parametrize(
    "confusion, num_verticals, method, message",
    [
        (np.ones((6, 6)), 1, "spectral", "into 1 verticals"),
        (np.ones((6, 6)), 4, "spectral", "into 4 verticals; use 2 to 3"),
        (np.ones((3, 3)), 2, "spectral", "needs 4 or more classes"),
        (np.ones((4, 5)), 2, "spectral", "shape \\(4, 5\\)"),
        (-np.ones((4, 4)), 2, "spectral", "negative or non-finite"),
        (np.ones((4, 4)), 2, "kmeans", "unknown clustering method"),
    ],
    ids=["k1", "k-too-big", "tiny", "non-square", "negative", "method"],
)
def test_clustering_rejects_bad_input(
    confusion, num_verticals, method, message
):
    with pytest.raises(KCError, match=message):
        cluster_confusion(confusion, num_verticals, method=method)
