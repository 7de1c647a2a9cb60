"""Seeded stratified splits and per-class subsets shared by the sources."""

import logging

import numpy as np

from kc_keras.data.base import Split
from kc_keras.errors import KCError

logger = logging.getLogger(__name__)

# Images per class kept by `quick=True`: (train, validation, test).
QUICK_PER_CLASS = (40, 10, 10)


def stratified_indices(labels, fractions, seed, class_names=None):
    """Split indices class by class into parts of the given fractions.

    Every class contributes round(fraction * count) images to each part
    after the first, and the rest to the first part, so each class appears
    in every part.

    Args:
        labels: int array of class indices.
        fractions: fractions of the parts after the first, for example
            (0.15, 0.15) for validation and test beside train.
        seed: seed of the per-class permutation.
        class_names: names used in error messages, or None.

    Returns:
        A list of sorted index arrays, one per part (len(fractions) + 1).

    Raises:
        KCError: a class has too few images to put at least one in every
            part; the message names those classes.
    """
    rng = np.random.default_rng(seed)
    parts = [[] for _ in range(len(fractions) + 1)]
    too_small = []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        sizes = [max(1, round(f * len(members))) for f in fractions]
        if len(members) - sum(sizes) < 1:
            name = class_names[label] if class_names else str(label)
            too_small.append(f"{name} ({len(members)})")
            continue
        start = 0
        for part, size in zip(parts[1:], sizes, strict=True):
            part.append(members[start : start + size])
            start += size
        parts[0].append(members[start:])
    if too_small:
        raise KCError(
            f"classes with too few images to split into "
            f"{len(fractions) + 1} parts: {', '.join(too_small)}; add at "
            f"least {len(fractions) + 1} images to each or remove them"
        )
    return [np.sort(np.concatenate(part)) for part in parts]


def limit_per_class(split, max_per_class, seed):
    """Return a seeded subset of `split` with at most `max_per_class` each.

    Args:
        split: a `Split`.
        max_per_class: largest number of images kept per class.
        seed: seed of the choice of images.

    Returns:
        A `Split` whose images keep their original order.
    """
    rng = np.random.default_rng(seed)
    keep = []
    for label in np.unique(split.labels):
        members = np.flatnonzero(split.labels == label)
        if len(members) > max_per_class:
            members = rng.choice(members, max_per_class, replace=False)
        keep.append(members)
    return split.subset(np.sort(np.concatenate(keep)))


def quick_splits(splits, seed):
    """Return `splits` cut to `QUICK_PER_CLASS` images per class."""
    return {
        name: limit_per_class(splits[name], limit, seed)
        for name, limit in zip(
            ("train", "validation", "test"), QUICK_PER_CLASS, strict=True
        )
    }


def make_split(images, labels):
    """Return a `Split` with uint8 NHWC images and int32 labels."""
    images = np.asarray(images, dtype=np.uint8)
    if images.ndim == 3:
        images = images[..., np.newaxis]
    return Split(images, np.asarray(labels, dtype=np.int32))
