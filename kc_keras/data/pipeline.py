"""tf.data pipelines and image augmentation for `Dataset.pipeline`.

The pipeline reads a split's uint8 arrays, keeps the requested classes,
remaps labels, caches the raw images, shuffles, batches, augments whole
batches with TensorFlow ops and prefetches. It yields float32 pixels in
[0, 255] and int32 labels, the input contract of every model.
"""

import logging
import math

import numpy as np

from kc_keras.errors import KCError

logger = logging.getLogger(__name__)

# Keys of `Dataset.augment` understood by `augment_batch`.
AUGMENT_KEYS = ("shift", "scale", "rotation", "stroke", "flip", "fill_mode")
FILL_MODES = ("constant", "nearest", "reflect", "wrap")
# Smallest fraction of an image's ink that stroke erosion may keep.
MIN_ERODED_INK = 0.5


def select_examples(split, classes=None, label_map=None):
    """Return the images and labels of `split` after filtering and remapping.

    Args:
        split: a `Split`.
        classes: class indices to keep, or None for all.
        label_map: int array mapping each class index to a new label, or
            None to keep the class indices.

    Returns:
        (images, labels): uint8 images and int32 labels.

    Raises:
        KCError: `label_map` does not cover every class, maps a kept class
            to a negative label, or no image remains.
    """
    images, labels = split.images, split.labels
    if classes is not None:
        keep = np.isin(labels, np.asarray(list(classes), dtype=np.int64))
        images, labels = images[keep], labels[keep]
    if label_map is not None:
        label_map = np.asarray(label_map, dtype=np.int64)
        if label_map.ndim != 1:
            raise KCError(
                f"label_map has shape {label_map.shape}; pass a 1-D array "
                "with one new label per class index"
            )
        if len(labels) and labels.max() >= len(label_map):
            raise KCError(
                f"label_map has {len(label_map)} entries but the split has "
                f"class index {int(labels.max())}; give one entry per class"
            )
        labels = label_map[labels]
        if len(labels) and labels.min() < 0:
            raise KCError(
                "label_map maps a kept class to a negative label; pass "
                "`classes` to drop classes instead"
            )
    if len(labels) == 0:
        raise KCError(
            f"no images left after keeping classes {classes}; check the "
            "class indices against the dataset taxonomy"
        )
    return images, labels.astype(np.int32)


def make_pipeline(
    dataset,
    split,
    batch_size,
    shuffle=False,
    augment=False,
    classes=None,
    label_map=None,
    repeat=False,
):
    """Build a batched `tf.data.Dataset` of (float32 pixels, int32 labels).

    Args:
        dataset: a `Dataset`.
        split: "train", "validation" or "test".
        batch_size: images per batch (the last batch may be smaller).
        shuffle: reshuffle every epoch, seeded by `dataset.seed`.
        augment: apply `dataset.augment` (ignored when it is None).
        classes: class indices to keep, or None for all.
        label_map: int array mapping each class index to a new label.
        repeat: repeat forever.

    Returns:
        A prefetched `tf.data.Dataset` whose elements are float32 images
        of shape (batch, height, width, channels) in [0, 255] and int32
        labels of shape (batch,).

    Raises:
        KCError: invalid batch size, label map or augmentation settings.
    """
    import tensorflow as tf

    if int(batch_size) < 1:
        raise KCError(f"batch size {batch_size} is invalid; pass 1 or more")
    images, labels = select_examples(
        dataset.split(split), classes=classes, label_map=label_map
    )
    settings = (
        validate_augment(dataset.augment)
        if augment and dataset.augment
        else None
    )
    data = tf.data.Dataset.from_tensor_slices((images, labels))
    # Caching the uint8 elements keeps the source arrays out of the
    # per-epoch work. Augmentation runs after the cache, so each epoch gets
    # new random transforms.
    data = data.cache()
    if shuffle:
        data = data.shuffle(
            len(labels),
            seed=dataset.seed,
            reshuffle_each_iteration=True,
        )
    if repeat:
        data = data.repeat()
    data = data.batch(int(batch_size))

    def to_float(batch_images, batch_labels):
        return tf.cast(batch_images, tf.float32), batch_labels

    data = data.map(to_float, num_parallel_calls=tf.data.AUTOTUNE)
    if settings is not None:
        # One random integer per batch seeds the stateless random ops, so
        # augmentation is reproducible for a given dataset seed yet differs
        # between batches and between epochs.
        seeds = tf.data.Dataset.random(
            seed=dataset.seed, rerandomize_each_iteration=True
        )

        def augment_element(batch, seed):
            batch_images, batch_labels = batch
            stateless_seed = tf.stack(
                [tf.constant(dataset.seed, tf.int64), seed]
            )
            return (
                augment_batch(batch_images, settings, stateless_seed),
                batch_labels,
            )

        data = tf.data.Dataset.zip((data, seeds)).map(
            augment_element, num_parallel_calls=tf.data.AUTOTUNE
        )
    return data.prefetch(tf.data.AUTOTUNE)


def validate_augment(settings):
    """Return `settings` with defaults filled in, or raise `KCError`.

    Args:
        settings: a `Dataset.augment` dict.

    Returns:
        A dict with every key of `AUGMENT_KEYS`.
    """
    unknown = sorted(set(settings) - set(AUGMENT_KEYS))
    if unknown:
        raise KCError(
            f"unknown augmentation keys {unknown}; use {list(AUGMENT_KEYS)}"
        )
    result = {
        "shift": float(settings.get("shift", 0.0)),
        "scale": float(settings.get("scale", 0.0)),
        "rotation": float(settings.get("rotation", 0.0)),
        "stroke": int(settings.get("stroke", 0)),
        "flip": bool(settings.get("flip", False)),
        "fill_mode": str(settings.get("fill_mode", "constant")),
    }
    for key in ("shift", "scale", "rotation"):
        if not 0.0 <= result[key] < 1.0:
            raise KCError(
                f"augmentation {key}={result[key]} is invalid; use a "
                "fraction in [0, 1)"
            )
    if not 0 <= result["stroke"] <= 3:
        raise KCError(
            f"augmentation stroke={result['stroke']} is invalid; use 0 to 3 "
            "pixels"
        )
    if result["fill_mode"] not in FILL_MODES:
        raise KCError(
            f"augmentation fill_mode={result['fill_mode']!r} is invalid; "
            f"use one of {', '.join(FILL_MODES)}"
        )
    return result


def augment_batch(images, settings, seed):
    """Randomly change stroke width, flip, rotate, scale and shift images.

    Args:
        images: float32 tensor (batch, height, width, channels) in [0, 255].
        settings: a dict from `validate_augment`.
        seed: int64 tensor of shape (2,) for the stateless random ops.

    Returns:
        Augmented float32 images of the same shape, in [0, 255].
    """
    import tensorflow as tf

    seeds = tf.random.experimental.stateless_split(seed, num=3)
    if settings["stroke"] > 0:
        images = change_stroke_width(images, settings["stroke"], seeds[0])
    if settings["flip"]:
        flip = tf.random.stateless_uniform(
            tf.shape(images)[:1], seeds[1], maxval=2, dtype=tf.int32
        )
        images = tf.where(
            tf.reshape(flip > 0, (-1, 1, 1, 1)),
            tf.reverse(images, axis=[2]),
            images,
        )
    if settings["shift"] or settings["scale"] or settings["rotation"]:
        images = random_affine(images, settings, seeds[2])
    return tf.clip_by_value(images, 0.0, 255.0)


def change_stroke_width(images, max_pixels, seed):
    """Thicken or thin each image's bright strokes by a random amount.

    Each image gets a random k in [-max_pixels, max_pixels]. A positive k
    dilates by max pooling over a (k+1)x(k+1) window, which widens strokes
    by k pixels. A negative k erodes the same way on the negated image, and
    zero keeps the image. This assumes bright strokes on a dark background.

    Args:
        images: float32 tensor (batch, height, width, channels).
        max_pixels: largest change of stroke width in pixels.
        seed: int64 tensor of shape (2,).

    Returns:
        Float32 images of the same shape.
    """
    import tensorflow as tf

    ink = tf.reduce_sum(images, axis=[1, 2, 3], keepdims=True)
    variants = [images]
    for pixels in range(1, max_pixels + 1):
        size = pixels + 1
        dilated = tf.nn.max_pool2d(images, size, 1, "SAME")
        eroded = -tf.nn.max_pool2d(-images, size, 1, "SAME")
        # Erosion wipes out strokes thinner than the window, so an image
        # that would lose more than half of its ink keeps its strokes.
        eroded_ink = tf.reduce_sum(eroded, axis=[1, 2, 3], keepdims=True)
        eroded = tf.where(eroded_ink >= MIN_ERODED_INK * ink, eroded, images)
        variants = [eroded, *variants, dilated]
    # stacked: (batch, 2 * max_pixels + 1, height, width, channels)
    stacked = tf.stack(variants, axis=1)
    choice = tf.random.stateless_uniform(
        tf.shape(images)[:1],
        seed,
        maxval=2 * max_pixels + 1,
        dtype=tf.int32,
    )
    return tf.gather(stacked, choice, axis=1, batch_dims=1)


def random_affine(images, settings, seed):
    """Rotate, scale and shift each image about its centre.

    Args:
        images: float32 tensor (batch, height, width, channels).
        settings: a dict from `validate_augment`. `rotation` is a fraction
            of a full turn and `scale` a relative size change. `shift` is a
            fraction of the image size.
        seed: int64 tensor of shape (2,).

    Returns:
        Float32 images of the same shape, filled outside the source image
        according to `settings["fill_mode"]` (black for "constant").
    """
    import tensorflow as tf

    shape = tf.shape(images)
    batch = shape[0]
    height = tf.cast(shape[1], tf.float32)
    width = tf.cast(shape[2], tf.float32)
    uniform = tf.random.stateless_uniform(
        (batch, 4), seed, minval=-1.0, maxval=1.0
    )
    angle = uniform[:, 0] * settings["rotation"] * 2.0 * math.pi
    zoom = 1.0 + uniform[:, 1] * settings["scale"]
    shift_x = uniform[:, 2] * settings["shift"] * width
    shift_y = uniform[:, 3] * settings["shift"] * height
    center_x = (width - 1.0) / 2.0
    center_y = (height - 1.0) / 2.0
    # The transform maps each output pixel to the input point it samples:
    # input = M (output - center - shift) + center with M the inverse of
    # rotation by `angle` and scaling by `zoom`.
    cos = tf.cos(angle) / zoom
    sin = tf.sin(angle) / zoom
    a0, a1 = cos, sin
    b0, b1 = -sin, cos
    origin_x = center_x + shift_x
    origin_y = center_y + shift_y
    a2 = center_x - a0 * origin_x - a1 * origin_y
    b2 = center_y - b0 * origin_x - b1 * origin_y
    zeros = tf.zeros_like(a0)
    transforms = tf.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], axis=1)
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images,
        transforms=transforms,
        output_shape=shape[1:3],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode=settings["fill_mode"].upper(),
    )
