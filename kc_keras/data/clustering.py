"""Derive verticals by clustering a generalist's confusion matrix.

Classes that the generalist confuses with each other belong in the same
vertical, so that one specialist learns to separate them. The confusion
matrix (rows: true class, columns: predicted class) is normalised per row,
so large classes do not dominate, and symmetrised into an affinity
A[i, j] = (P[i, j] + P[j, i]) / 2 with a zero diagonal.
"""

import logging

import numpy as np

from kc_keras.errors import KCError

logger = logging.getLogger(__name__)

METHODS = ("spectral", "agglomerative")
# Added to every affinity so that the similarity graph is connected even
# when some classes are never confused; spectral clustering needs that.
AFFINITY_FLOOR = 1e-6


def confusion_affinity(confusion):
    """Return the symmetric affinity matrix of a confusion matrix.

    Args:
        confusion: (N, N) array of counts or rates, rows are true classes.

    Returns:
        float64 (N, N) affinity with a zero diagonal.
    """
    confusion = np.asarray(confusion, dtype=np.float64)
    totals = confusion.sum(axis=1, keepdims=True)
    rates = np.divide(
        confusion, totals, out=np.zeros_like(confusion), where=totals > 0
    )
    affinity = (rates + rates.T) / 2.0
    np.fill_diagonal(affinity, 0.0)
    return affinity


def check_confusion(confusion, num_verticals, method):
    """Return the confusion matrix as float64, or raise `KCError`."""
    if method not in METHODS:
        raise KCError(
            f"unknown clustering method {method!r}; use one of "
            f"{', '.join(METHODS)}"
        )
    confusion = np.asarray(confusion, dtype=np.float64)
    if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1]:
        raise KCError(
            f"confusion matrix has shape {confusion.shape}; pass a square "
            "(num_classes, num_classes) matrix"
        )
    if not np.isfinite(confusion).all() or (confusion < 0).any():
        raise KCError(
            "confusion matrix has negative or non-finite entries; pass "
            "counts or rates"
        )
    num_classes = confusion.shape[0]
    if not 2 <= num_verticals <= num_classes // 2:
        raise KCError(
            f"cannot cluster {num_classes} classes into {num_verticals} "
            f"verticals; use 2 to {max(2, num_classes // 2)} verticals so "
            "each has at least 2 classes"
            + ("" if num_classes >= 4 else " (this needs 4 or more classes)")
        )
    return confusion


def cluster_confusion(confusion, num_verticals, method="spectral", seed=0):
    """Group classes into verticals of mutually confused classes.

    Args:
        confusion: (N, N) confusion matrix, rows are true classes.
        num_verticals: number of verticals k, 2 <= k <= N / 2.
        method: "spectral" (spectral clustering on the affinity) or
            "agglomerative" (average linkage on 1 - affinity).
        seed: seed of the spectral embedding's k-means.

    Returns:
        int array (N,) with the vertical index of each class. Vertical
        indices follow the smallest class index in each vertical, and each
        vertical has at least 2 classes. Fewer than `num_verticals`
        verticals remain when single-class clusters had to be merged.

    Raises:
        KCError: invalid matrix, method or number of verticals.
    """
    confusion = check_confusion(confusion, num_verticals, method)
    affinity = confusion_affinity(confusion)
    if method == "spectral":
        from sklearn.cluster import SpectralClustering

        model = SpectralClustering(
            n_clusters=num_verticals,
            affinity="precomputed",
            assign_labels="cluster_qr",
            random_state=seed,
        )
        labels = model.fit_predict(affinity + AFFINITY_FLOOR)
    else:
        from sklearn.cluster import AgglomerativeClustering

        distance = affinity.max() - affinity
        np.fill_diagonal(distance, 0.0)
        model = AgglomerativeClustering(
            n_clusters=num_verticals, metric="precomputed", linkage="average"
        )
        labels = model.fit_predict(distance)
    labels = merge_singletons(np.asarray(labels), affinity)
    labels = renumber(labels)
    found = int(labels.max()) + 1
    if found < num_verticals:
        logger.warning(
            "clustering into %d verticals left %d after merging "
            "single-class clusters",
            num_verticals,
            found,
        )
    return labels


def merge_singletons(labels, affinity):
    """Move each single-class cluster's class into its closest cluster.

    Singletons are handled in ascending class order. Each joins the
    cluster with the largest mean affinity to it, ties going to the lowest
    cluster label, so the result is deterministic.
    """
    labels = labels.copy()
    while True:
        ids, counts = np.unique(labels, return_counts=True)
        singles = ids[counts < 2]
        if len(singles) == 0 or len(ids) < 2:
            return labels
        member = int(np.flatnonzero(labels == singles[0])[0])
        best_label, best_score = None, -np.inf
        for cluster in ids:
            if cluster == singles[0]:
                continue
            score = affinity[member, labels == cluster].mean()
            if score > best_score:
                best_label, best_score = cluster, score
        labels[member] = best_label


def renumber(labels):
    """Renumber cluster labels 0..k-1 in order of their first class."""
    _, first = np.unique(labels, return_index=True)
    order = labels[np.sort(first)]
    mapping = {int(old): new for new, old in enumerate(order)}
    return np.array([mapping[int(label)] for label in labels], dtype=np.int64)
