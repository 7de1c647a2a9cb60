"""Tests of the tf.data pipeline and the augmentation ops."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from kc_keras.data import pipeline
from kc_keras.data.base import Dataset
from kc_keras.data.base import Preprocessing
from kc_keras.data.base import Split
from kc_keras.data.base import Taxonomy
from kc_keras.errors import KCError


def collect(data):
    images, labels = [], []
    for batch_images, batch_labels in data:
        images.append(batch_images.numpy())
        labels.append(batch_labels.numpy())
    return np.concatenate(images), np.concatenate(labels)


def glyph_dataset(augment, count=16):
    """Return a dataset of white squares on black, 4 classes in 2 verticals."""
    images = np.zeros((count, 24, 24, 1), np.uint8)
    images[:, 8:16, 8:16] = 255
    labels = np.arange(count, dtype=np.int32) % 4
    split = Split(images, labels)
    return Dataset(
        name="squares",
        spec={"name": "squares"},
        taxonomy=Taxonomy(("a", "b", "c", "d"), ("x", "y"), (0, 0, 1, 1)),
        preprocessing=Preprocessing(24, 24, 1),
        splits={"train": split, "validation": split, "test": split},
        augment=augment,
        seed=3,
    )


def test_pipeline_shapes_and_dtypes(synthetic_dataset):
    data = synthetic_dataset.pipeline("test", batch_size=5)
    images, labels = next(iter(data))
    assert images.dtype == tf.float32
    assert labels.dtype == tf.int32
    assert images.shape == (5, 16, 16, 1)
    assert labels.shape == (5,)


def test_pipeline_keeps_pixels_and_order(synthetic_dataset):
    split = synthetic_dataset.split("test")
    images, labels = collect(synthetic_dataset.pipeline("test", 7))
    np.testing.assert_array_equal(images, split.images.astype(np.float32))
    np.testing.assert_array_equal(labels, split.labels)


def test_pipeline_filters_and_maps_labels(synthetic_dataset):
    label_map = np.full(12, 2)
    label_map[[4, 5]] = [0, 1]
    data = synthetic_dataset.pipeline(
        "validation", 4, classes=[4, 5, 9], label_map=label_map
    )
    _, labels = collect(data)
    expected_count = np.isin(
        synthetic_dataset.split("validation").labels, [4, 5, 9]
    ).sum()
    assert len(labels) == expected_count
    assert set(labels.tolist()) == {0, 1, 2}


def test_pipeline_shuffle_is_seeded(synthetic_dataset):
    first = collect(synthetic_dataset.pipeline("train", 8, shuffle=True))[1]
    second = collect(synthetic_dataset.pipeline("train", 8, shuffle=True))[1]
    ordered = synthetic_dataset.split("train").labels
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, ordered)
    assert sorted(first.tolist()) == sorted(ordered.tolist())


def test_pipeline_repeat_continues(synthetic_dataset):
    size = len(synthetic_dataset.split("test"))
    data = synthetic_dataset.pipeline("test", size, repeat=True)
    batches = list(data.take(3))
    assert len(batches) == 3


@pytest.mark.parametrize(
    "classes, label_map, message",
    [
        ([99], None, "no images left"),
        (None, np.zeros(3), "one entry per class"),
        (None, -np.ones(12), "negative label"),
        (None, np.zeros((12, 2)), "1-D array"),
    ],
    ids=["no-images", "short-map", "negative-map", "2d-map"],
)
def test_pipeline_rejects_bad_selection(
    synthetic_dataset, classes, label_map, message
):
    with pytest.raises(KCError, match=message):
        synthetic_dataset.pipeline(
            "test", 4, classes=classes, label_map=label_map
        )


def test_pipeline_rejects_zero_batch(synthetic_dataset):
    with pytest.raises(KCError, match="batch size 0"):
        synthetic_dataset.pipeline("test", 0)


@pytest.mark.parametrize(
    "augment, message",
    [
        ({"shift": 1.5}, "shift=1.5"),
        ({"stroke": 9}, "stroke=9"),
        ({"blur": 1}, "unknown augmentation keys"),
        ({"fill_mode": "mirror"}, "fill_mode='mirror'"),
    ],
    ids=["shift", "stroke", "unknown-key", "fill-mode"],
)
def test_pipeline_rejects_bad_augment(augment, message):
    with pytest.raises(KCError, match=message):
        glyph_dataset(augment).pipeline("train", 4)


@pytest.mark.parametrize(
    "augment",
    [
        {"shift": 0.2},
        {"scale": 0.3},
        {"rotation": 0.1},
        {"stroke": 1},
        {"shift": 0.1, "scale": 0.1, "rotation": 0.05, "stroke": 2},
    ],
    ids=["shift", "scale", "rotation", "stroke", "all"],
)
def test_augment_changes_images_in_range(augment):
    dataset = glyph_dataset(augment)
    original = dataset.split("train").images.astype(np.float32)
    images, labels = collect(dataset.pipeline("train", 8, shuffle=False))
    assert images.shape == original.shape
    assert images.dtype == np.float32
    assert images.min() >= 0.0
    assert images.max() <= 255.0
    changed = np.any(images != original, axis=(1, 2, 3))
    assert changed.sum() >= len(images) // 2
    np.testing.assert_array_equal(labels, dataset.split("train").labels)


def test_augment_only_for_train_by_default():
    dataset = glyph_dataset({"shift": 0.2})
    original = dataset.split("test").images.astype(np.float32)
    images, _ = collect(dataset.pipeline("test", 8))
    np.testing.assert_array_equal(images, original)


def test_augment_differs_between_epochs():
    dataset = glyph_dataset({"rotation": 0.1})
    data = dataset.pipeline("train", 16, shuffle=False)
    first = collect(data)[0]
    second = collect(data)[0]
    assert not np.array_equal(first, second)


def test_stroke_width_dilates_and_erodes():
    image = np.zeros((1, 10, 10, 1), np.float32)
    image[0, 3:7, 3:7] = 255.0
    batch = tf.constant(np.repeat(image, 64, axis=0))
    seed = tf.constant([1, 2], tf.int64)
    result = pipeline.change_stroke_width(batch, 1, seed).numpy()
    ink = (result > 0).sum(axis=(1, 2, 3))
    # A 4x4 square erodes to 3x3, stays, or dilates to 5x5.
    assert set(ink.tolist()) == {9, 16, 25}


def test_stroke_erosion_keeps_thin_strokes():
    image = np.zeros((1, 10, 10, 1), np.float32)
    image[0, 5, 1:9] = 255.0
    batch = tf.constant(np.repeat(image, 64, axis=0))
    seed = tf.constant([1, 2], tf.int64)
    result = pipeline.change_stroke_width(batch, 1, seed).numpy()
    ink = (result > 0).sum(axis=(1, 2, 3))
    # Eroding a one-pixel line would erase it, so it stays or thickens.
    assert ink.min() == 8
    assert ink.max() > 8


def test_affine_identity_keeps_images():
    dataset = glyph_dataset(None)
    images = tf.constant(dataset.split("train").images, tf.float32)
    settings = pipeline.validate_augment({})
    result = pipeline.random_affine(images, settings, tf.constant([0, 0]))
    np.testing.assert_allclose(result.numpy(), images.numpy(), atol=1e-3)


def test_flip_mirrors_images():
    images = np.zeros((32, 4, 4, 1), np.float32)
    images[:, :, 0] = 255.0
    settings = pipeline.validate_augment({"flip": True})
    seed = tf.constant([5, 6], tf.int64)
    result = pipeline.augment_batch(tf.constant(images), settings, seed)
    left = result.numpy()[:, :, 0].sum(axis=(1, 2))
    right = result.numpy()[:, :, -1].sum(axis=(1, 2))
    assert (left > 0).sum() > 0
    assert (right > 0).sum() > 0
    np.testing.assert_array_equal((left > 0) ^ (right > 0), True)


def test_dataset_with_taxonomy_replaces_verticals(synthetic_dataset):
    provisional = dataclasses.replace(
        synthetic_dataset, taxonomy_provisional=True
    )
    taxonomy = Taxonomy(
        synthetic_dataset.taxonomy.class_names,
        ("left", "right"),
        (0,) * 6 + (1,) * 6,
    )
    final = provisional.with_taxonomy(taxonomy)
    assert final.taxonomy.vertical_names == ("left", "right")
    assert final.taxonomy_provisional is False
    assert final.splits is provisional.splits


def test_dataset_with_taxonomy_rejects_other_classes(synthetic_dataset):
    taxonomy = Taxonomy(("a", "b"), ("v",), (0, 0))
    with pytest.raises(KCError, match="do not match the 12 classes"):
        synthetic_dataset.with_taxonomy(taxonomy)
