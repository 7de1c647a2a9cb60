"""Accuracy metrics on numpy arrays of model outputs.

Every function takes scores (logits, probabilities or ensemble scores: only
their order matters) of shape (num_images, num_outputs) and integer labels,
so the same code scores Keras models, TFLite models and the ensembles of
`mobile_demo.benchmark`.
"""

import logging

import numpy as np

from kc_keras.errors import KCError
from mobile_demo.benchmark import full_ensemble_scores
from mobile_demo.benchmark import routed_scores

logger = logging.getLogger(__name__)

TOP_K = (1, 5)


def softmax(logits):
    """Return the row-wise softmax of `logits` as float32."""
    logits = np.asarray(logits, dtype=np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)


def _check(scores, labels):
    scores = np.asarray(scores)
    labels = np.asarray(labels)
    if scores.ndim != 2:
        raise KCError(
            f"scores have shape {scores.shape}; expected (num_images, "
            "num_outputs)"
        )
    if labels.shape != (scores.shape[0],):
        raise KCError(
            f"labels have shape {labels.shape} but scores have "
            f"{scores.shape[0]} rows; pass one label per row"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= scores.shape[1]):
        raise KCError(
            f"labels range over {labels.min()}..{labels.max()} but scores "
            f"have {scores.shape[1]} columns; labels must index a column"
        )
    return scores, labels


def top_k_correct(scores, labels, k):
    """Return a boolean array: is each label among its row's top `k` scores.

    Ties are broken by column order (a stable sort), so the result does not
    depend on the platform. `k` larger than the number of columns counts
    every row as correct.

    Args:
        scores: (num_images, num_outputs) array.
        labels: (num_images,) integer array of column indices.
        k: number of top columns that count as a hit.

    Returns:
        A (num_images,) boolean array.

    Raises:
        KCError: shapes do not match, a label is out of range or k < 1.
    """
    scores, labels = _check(scores, labels)
    if k < 1:
        raise KCError(f"top-k needs k >= 1, got {k}")
    if k == 1:
        return np.argmax(scores, axis=1) == labels
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.any(order == labels[:, None], axis=1)


def top_k_accuracy(scores, labels, k=1):
    """Return the fraction of rows whose label is in the top `k`.

    Returns NaN for zero rows (see `json_safe`).
    """
    correct = top_k_correct(scores, labels, k)
    if correct.size == 0:
        return float("nan")
    return float(correct.mean())


def accuracy_report(scores, labels, class_vertical, vertical_names, ks=TOP_K):
    """Compute top-k accuracy overall and on each vertical's images.

    Args:
        scores: (num_images, num_outputs) array.
        labels: (num_images,) column index of the correct output.
        class_vertical: vertical index of each image's true class, per
            class index; images are grouped by
            `class_vertical[true_class]`.
        vertical_names: name of each vertical.
        ks: the k values to report.

    Returns:
        A dict `{"num_images", "top1", "top5", "per_vertical": {name:
        {"num_images", "top1", "top5"}}}` (one `top<k>` key per k).
    """
    return _report(scores, labels, labels, class_vertical, vertical_names, ks)


def _report(scores, labels, classes, class_vertical, vertical_names, ks):
    # `labels` index the score columns; `classes` are the true class
    # indices that decide each image's vertical. They differ for a
    # specialist, whose columns are local class indices plus a dustbin.
    scores, labels = _check(scores, labels)
    image_vertical = np.asarray(class_vertical)[np.asarray(classes)]
    report = {"num_images": int(len(labels))}
    for k in ks:
        report[f"top{k}"] = top_k_accuracy(scores, labels, k)
    per_vertical = {}
    for v, name in enumerate(vertical_names):
        rows = np.flatnonzero(image_vertical == v)
        entry = {"num_images": int(rows.size)}
        for k in ks:
            entry[f"top{k}"] = top_k_accuracy(scores[rows], labels[rows], k)
        per_vertical[name] = entry
    report["per_vertical"] = per_vertical
    return report


def specialist_label_map(class_vertical, vertical):
    """Map each class index to a specialist's output index.

    The specialist of `vertical` outputs that vertical's classes in
    ascending class-index order, then one dustbin output for every class of
    another vertical.

    Args:
        class_vertical: vertical index of each class.
        vertical: the specialist's vertical index.

    Returns:
        An int32 array of length num_classes.
    """
    class_vertical = np.asarray(class_vertical)
    own = np.flatnonzero(class_vertical == vertical)
    label_map = np.full(len(class_vertical), len(own), dtype=np.int32)
    label_map[own] = np.arange(len(own), dtype=np.int32)
    return label_map


def specialist_report(
    specialist_scores,
    generalist_scores,
    labels,
    class_vertical,
    vertical_names,
    vertical,
    ks=TOP_K,
):
    """Score one specialist on all images and against the generalist.

    Overall and per-vertical figures count a dustbin prediction as correct
    for images of other verticals. The `own_vertical` entry compares the
    specialist's top-1 on its vertical's images with the generalist's top-1
    on the same images (argmax over all classes), and `gain` is the
    difference.

    Args:
        specialist_scores: (num_images, vertical_size + 1) array.
        generalist_scores: (num_images, num_classes) array.
        labels: (num_images,) true class indices.
        class_vertical: vertical index of each class.
        vertical_names: name of each vertical.
        vertical: the specialist's vertical index.
        ks: the k values to report.

    Returns:
        The `accuracy_report` dict plus `vertical`, `vertical_name` and
        `own_vertical: {"num_images", "top1", "generalist_top1", "gain"}`.
    """
    labels = np.asarray(labels)
    label_map = specialist_label_map(class_vertical, vertical)
    local_labels = label_map[labels]
    report = _report(
        specialist_scores,
        local_labels,
        labels,
        class_vertical,
        vertical_names,
        ks,
    )
    own = np.flatnonzero(np.asarray(class_vertical)[labels] == vertical)
    specialist_top1 = top_k_accuracy(
        np.asarray(specialist_scores)[own], local_labels[own], 1
    )
    generalist_top1 = top_k_accuracy(
        np.asarray(generalist_scores)[own], labels[own], 1
    )
    report["vertical"] = int(vertical)
    report["vertical_name"] = vertical_names[vertical]
    report["own_vertical"] = {
        "num_images": int(own.size),
        "top1": specialist_top1,
        "generalist_top1": generalist_top1,
        "gain": specialist_top1 - generalist_top1,
    }
    return report


def ensemble_reports(
    generalist_probs,
    specialist_probs,
    labels,
    class_vertical,
    vertical_names,
    ks=TOP_K,
):
    """Score the routed and the full teacher ensembles.

    Args:
        generalist_probs: (num_images, num_classes) probabilities.
        specialist_probs: one (num_images, vertical_size + 1) probability
            array per vertical.
        labels: (num_images,) true class indices.
        class_vertical: vertical index of each class.
        vertical_names: name of each vertical.
        ks: the k values to report.

    Returns:
        `{"routed": report, "full": report}` with `accuracy_report` dicts.

    Raises:
        KCError: the number of specialists differs from the number of
            verticals.
    """
    if len(specialist_probs) != len(vertical_names):
        raise KCError(
            f"got {len(specialist_probs)} specialist outputs for "
            f"{len(vertical_names)} verticals; pass one per vertical"
        )
    rules = {"routed": routed_scores, "full": full_ensemble_scores}
    return {
        name: accuracy_report(
            rule(generalist_probs, specialist_probs, class_vertical),
            labels,
            class_vertical,
            vertical_names,
            ks,
        )
        for name, rule in rules.items()
    }


def confusion_matrix(scores, labels, num_classes):
    """Return the (num_classes, num_classes) count matrix, rows = true."""
    scores, labels = _check(scores, labels)
    predicted = np.argmax(scores, axis=1)
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (labels, predicted), 1)
    return matrix


def json_safe(obj):
    """Return `obj` with NaN floats replaced by None, for strict JSON."""
    if isinstance(obj, dict):
        return {key: json_safe(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(value) for value in obj]
    if isinstance(obj, float) and np.isnan(obj):
        return None
    return obj


def format_table(metrics):
    """Format teacher metrics as a text table of top-1 accuracies in %.

    Args:
        metrics: the dict of `kc_keras.models.teachers.evaluate_teachers`.

    Returns:
        One row per model and ensemble: overall top-1 and top-5, top-1 on
        each vertical's images and, for a specialist, its top-1 gain over
        the generalist on its own vertical.
    """
    rows = dict(metrics["models"])
    rows.update(
        {f"{name} ensemble": r for name, r in metrics["ensembles"].items()}
    )
    verticals = list(rows["generalist"]["per_vertical"])
    header = ["model", "top1", "top5", *verticals, "gain"]
    lines = [header]
    for name, report in rows.items():
        own = report.get("own_vertical")
        cells = [
            name,
            _percent(report["top1"]),
            _percent(report["top5"]),
            *(_percent(report["per_vertical"][v]["top1"]) for v in verticals),
            "" if own is None else f"{100 * own['gain']:+.2f}",
        ]
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text_lines = []
    for line in lines:
        cells = zip(line, widths, strict=True)
        text_lines.append("  ".join(cell.rjust(width) for cell, width in cells))
    return "\n".join(text_lines)


def _percent(value):
    if value is None or np.isnan(value):
        return "-"
    return f"{100 * value:.2f}"
