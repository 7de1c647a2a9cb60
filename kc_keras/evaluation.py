"""Accuracy metrics on numpy arrays of model outputs.

Every function takes scores (logits, probabilities or ensemble scores: only
their order matters) of shape (num_images, num_outputs) and integer labels,
so the same code scores Keras models, TFLite models and the ensembles of
`mobile_demo.benchmark`.

Large label spaces are scored batch by batch: `AccuracyCounter` and
`EnsembleCounter` keep only per-image hit flags, and
`stream_teacher_reports` combines the teachers batch by batch. No array of
num_images x num_classes is built, because at 100,000 classes and 100,000
test images such an array takes 40 GB in float32.
"""

import logging

import numpy as np

from kc_keras.errors import KCError
from mobile_demo.benchmark import full_ensemble_scores
from mobile_demo.benchmark import routed_scores

logger = logging.getLogger(__name__)

TOP_K = (1, 5)
# Test images scored per step: evaluation keeps the outputs of one batch of
# every model only. At 100,000 classes, batches of 64 (25.6 MB per float32
# array) took 1.8 ms of numpy time per image against 4.4 ms for batches of
# 256 on 2 shared CPU cores. The allocator reuses the smaller arrays instead
# of mapping fresh memory for every batch.
EVALUATION_BATCH_SIZE = 64


def softmax(logits):
    """Return the row-wise softmax of `logits` as float32.

    It works in float32, in place on one copy, because a float64 copy of
    a batch of 100,000-class logits doubles the memory and the time.
    """
    values = np.array(logits, dtype=np.float32)
    values -= values.max(axis=1, keepdims=True)
    np.exp(values, out=values)
    values /= values.sum(axis=1, keepdims=True)
    return values.astype(np.float32)


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
    return label_rank(scores, labels) < k


def label_rank(scores, labels):
    """Return each label's position in its row sorted by descending score.

    The position is the one a stable descending sort gives (ties keep
    column order, NaN scores sort last), computed by counting instead of
    sorting, so it costs O(num_outputs) per row rather than a full sort.

    Args:
        scores: (num_images, num_outputs) array, checked by the caller.
        labels: (num_images,) integer array of column indices.

    Returns:
        A (num_images,) int64 array; 0 means the label has the top score.
    """
    rows = np.arange(len(labels))
    label_scores = scores[rows, labels][:, None]
    columns = np.arange(scores.shape[1])
    higher = np.count_nonzero(scores > label_scores, axis=1)
    tied_before = np.count_nonzero(
        (scores == label_scores) & (columns < labels[:, None]), axis=1
    )
    rank = higher + tied_before
    # A NaN label score compares false with everything, and a stable
    # sort puts it after every number and after the NaNs before it.
    for row in np.flatnonzero(np.isnan(label_scores[:, 0])):
        missing = np.isnan(scores[row])
        rank[row] = np.count_nonzero(~missing) + np.count_nonzero(
            missing[: labels[row]]
        )
    return rank


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
    counter = AccuracyCounter(class_vertical, vertical_names, ks)
    counter.update(scores, labels, classes)
    return counter.report()


def _mean(hits):
    # The accuracy of no images is NaN, as in `top_k_accuracy`.
    if hits.size == 0:
        return float("nan")
    return float(hits.mean())


class AccuracyCounter:
    """Top-k hits of score batches, reduced to an `accuracy_report`.

    Each `update` scores one batch and keeps one boolean per image and k
    plus the image's vertical, so memory grows with the number of images
    only, never with images x outputs.

    Args:
        class_vertical: vertical index of each class.
        vertical_names: name of each vertical.
        ks: the k values to report; top-1 is always counted, because
            `specialist_summary` compares top-1 figures.
    """

    def __init__(self, class_vertical, vertical_names, ks=TOP_K):
        self.class_vertical = np.asarray(class_vertical)
        self.vertical_names = tuple(vertical_names)
        self.ks = tuple(ks)
        self._counted_ks = tuple(sorted(set(self.ks) | {1}))
        self._hits = {k: [] for k in self._counted_ks}
        self._image_vertical = []

    def update(self, scores, labels, classes=None):
        """Count the hits of one batch.

        Args:
            scores: (batch, num_outputs) array.
            labels: (batch,) column index of each image's correct output.
            classes: (batch,) true class index of each image, which
                decides its vertical; None when it equals `labels`.

        Raises:
            KCError: shapes do not match or a label is out of range.
        """
        scores, labels = _check(scores, labels)
        classes = labels if classes is None else np.asarray(classes)
        for k in self._counted_ks:
            self._hits[k].append(top_k_correct(scores, labels, k))
        self._image_vertical.append(self.class_vertical[classes])

    def hits(self, k):
        """Return the (num_images,) top-`k` hit flags counted so far."""
        return _concatenate(self._hits[k], bool)

    @property
    def image_vertical(self):
        """Vertical index of every image counted so far."""
        return _concatenate(self._image_vertical, self.class_vertical.dtype)

    def report(self):
        """Return the `accuracy_report` dict of every image counted."""
        image_vertical = self.image_vertical
        report = {"num_images": int(image_vertical.size)}
        for k in self.ks:
            report[f"top{k}"] = _mean(self.hits(k))
        per_vertical = {}
        for v, name in enumerate(self.vertical_names):
            rows = image_vertical == v
            entry = {"num_images": int(np.count_nonzero(rows))}
            for k in self.ks:
                entry[f"top{k}"] = _mean(self.hits(k)[rows])
            per_vertical[name] = entry
        report["per_vertical"] = per_vertical
        return report


def _concatenate(parts, dtype):
    if not parts:
        return np.zeros(0, dtype)
    return np.concatenate(parts)


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
    specialist = AccuracyCounter(class_vertical, vertical_names, ks)
    specialist.update(specialist_scores, label_map[labels], labels)
    generalist = AccuracyCounter(class_vertical, vertical_names, ks)
    generalist.update(generalist_scores, labels)
    return specialist_summary(specialist, generalist, vertical)


def specialist_summary(specialist, generalist, vertical):
    """Build `specialist_report`'s dict from two filled counters.

    Args:
        specialist: the specialist's `AccuracyCounter`, updated with local
            labels and true classes.
        generalist: the generalist's `AccuracyCounter`, updated with the
            same images in the same order.
        vertical: the specialist's vertical index.

    Returns:
        The dict described in `specialist_report`.
    """
    report = specialist.report()
    own = specialist.image_vertical == vertical
    specialist_top1 = _mean(specialist.hits(1)[own])
    generalist_top1 = _mean(generalist.hits(1)[own])
    report["vertical"] = int(vertical)
    report["vertical_name"] = specialist.vertical_names[vertical]
    report["own_vertical"] = {
        "num_images": int(np.count_nonzero(own)),
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
    counter = EnsembleCounter(class_vertical, vertical_names, ks)
    counter.update(generalist_probs, specialist_probs, labels)
    return counter.reports()


class EnsembleCounter:
    """Hits of the routed and full teacher ensembles, batch by batch.

    Args:
        class_vertical: vertical index of each class.
        vertical_names: name of each vertical.
        ks: the k values to report.
        rules: the ensembles to score, keys of `RULES`.

    Raises:
        KCError: an unknown rule name.
    """

    RULES = {"routed": routed_scores, "full": full_ensemble_scores}

    def __init__(
        self, class_vertical, vertical_names, ks=TOP_K, rules=tuple(RULES)
    ):
        unknown = sorted(set(rules) - set(self.RULES))
        if unknown:
            raise KCError(
                f"unknown ensemble rule {unknown[0]!r}; expected one of "
                f"{', '.join(self.RULES)}"
            )
        self.class_vertical = np.asarray(class_vertical)
        self.num_verticals = len(vertical_names)
        self.counters = {
            name: AccuracyCounter(class_vertical, vertical_names, ks)
            for name in rules
        }

    def update(self, generalist_probs, specialist_probs, labels):
        """Combine the teachers' probabilities of one batch and count hits.

        Args:
            generalist_probs: (batch, num_classes) probabilities.
            specialist_probs: one (batch, vertical_size + 1) probability
                array per vertical.
            labels: (batch,) true class indices.

        Raises:
            KCError: the number of specialists differs from the number of
                verticals.
        """
        if len(specialist_probs) != self.num_verticals:
            raise KCError(
                f"got {len(specialist_probs)} specialist outputs for "
                f"{self.num_verticals} verticals; pass one per vertical"
            )
        for name, counter in self.counters.items():
            scores = self.RULES[name](
                generalist_probs, specialist_probs, self.class_vertical
            )
            counter.update(scores, labels)

    def reports(self):
        """Return `{rule name: accuracy_report dict}`."""
        return {name: c.report() for name, c in self.counters.items()}


def stream_teacher_reports(batches, class_vertical, vertical_names, ks=TOP_K):
    """Score the generalist, every specialist and both ensembles.

    Only one batch of outputs is held at a time.

    Args:
        batches: iterable of `(labels, generalist_logits,
            specialist_logits)` per batch of images: true class indices
            (batch,), generalist logits (batch, num_classes) and a list of
            (batch, vertical_size + 1) logits, one per vertical.
        class_vertical: vertical index of each class.
        vertical_names: name of each vertical.
        ks: the k values to report.

    Returns:
        `{"num_images", "models": {"generalist": report, "specialist_<k>":
        report}, "ensembles": {"routed": report, "full": report}}` with the
        reports of `accuracy_report` and `specialist_report`.

    Raises:
        KCError: shapes do not match, a label is out of range, or the
            number of specialists differs from the number of verticals.
    """
    class_vertical = np.asarray(class_vertical)
    names = tuple(vertical_names)
    label_maps = [
        specialist_label_map(class_vertical, v) for v in range(len(names))
    ]
    generalist = AccuracyCounter(class_vertical, names, ks)
    specialists = [AccuracyCounter(class_vertical, names, ks) for _ in names]
    ensembles = EnsembleCounter(class_vertical, names, ks)
    num_images = 0
    for labels, generalist_logits, specialist_logits in batches:
        labels = np.asarray(labels)
        if len(specialist_logits) != len(names):
            raise KCError(
                f"got {len(specialist_logits)} specialist outputs for "
                f"{len(names)} verticals; pass one per vertical"
            )
        num_images += len(labels)
        generalist.update(generalist_logits, labels)
        for v, logits in enumerate(specialist_logits):
            specialists[v].update(logits, label_maps[v][labels], labels)
        ensembles.update(
            softmax(generalist_logits),
            [softmax(logits) for logits in specialist_logits],
            labels,
        )
    models = {"generalist": generalist.report()}
    for v, counter in enumerate(specialists):
        models[f"specialist_{v}"] = specialist_summary(counter, generalist, v)
    return {
        "num_images": num_images,
        "models": models,
        "ensembles": ensembles.reports(),
    }


def confusion_matrix(scores, labels, num_classes):
    """Return the (num_classes, num_classes) count matrix, rows = true."""
    scores, labels = _check(scores, labels)
    return confusion_counts(np.argmax(scores, axis=1), labels, num_classes)


def confusion_counts(predicted, labels, num_classes):
    """Return the confusion count matrix of predicted class indices.

    Args:
        predicted: (num_images,) predicted class indices (argmax of the
            scores), so the scores can be reduced batch by batch.
        labels: (num_images,) true class indices.
        num_classes: size of both axes.

    Returns:
        A (num_classes, num_classes) int64 array, rows are true classes.
    """
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(labels), np.asarray(predicted)), 1)
    return matrix


def log_progress(start, batch_size, total):
    """Log at every tenth of the images scored batch by batch.

    Scoring 100,000 test images at 100,000 classes takes minutes.

    Args:
        start: index of the batch's first image.
        batch_size: images in the batch.
        total: images to score.
    """
    step = max(1, total // 10)
    done = start + batch_size
    if done == total or done // step != start // step:
        logger.info("scored %d of %d images", done, total)


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
