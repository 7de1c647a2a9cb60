"""Tests of the synthetic source and of `load_dataset` itself."""

import json

import numpy as np
import pytest

from kc_keras.data import DATASETS
from kc_keras.data import load_dataset
from kc_keras.data import synthetic
from kc_keras.errors import KCError


def test_synthetic_shapes_and_taxonomy():
    dataset = load_dataset("synthetic", num_classes=40, num_verticals=4)
    assert dataset.preprocessing.input_shape == (16, 16, 1)
    assert dataset.taxonomy.num_classes == 40
    assert dataset.taxonomy.vertical_sizes == (10, 10, 10, 10)
    assert dataset.taxonomy.is_contiguous
    for name, per_class in zip(
        ("train", "validation", "test"), (40, 10, 10), strict=True
    ):
        split = dataset.split(name)
        assert split.images.dtype == np.uint8
        assert split.labels.dtype == np.int32
        assert split.images.shape[1:] == (16, 16, 1)
        np.testing.assert_array_equal(
            dataset.class_counts(name), np.full(40, per_class)
        )


def test_synthetic_is_deterministic_per_seed():
    first = load_dataset("synthetic", num_classes=10, quick=True, seed=4)
    second = load_dataset("synthetic", num_classes=10, quick=True, seed=4)
    other = load_dataset("synthetic", num_classes=10, quick=True, seed=5)
    train = first.split("train").images
    np.testing.assert_array_equal(train, second.split("train").images)
    assert not np.array_equal(train, other.split("train").images)


def test_synthetic_verticals_are_confusable():
    dataset = load_dataset("synthetic", num_classes=20, num_verticals=2)
    split = dataset.split("train")
    means = np.stack(
        [
            split.images[split.labels == c].astype(np.float64).mean(axis=0)
            for c in range(20)
        ]
    ).reshape(20, -1)
    distances = np.linalg.norm(means[:, None] - means[None], axis=-1)
    vertical = np.array(dataset.taxonomy.class_vertical)
    same = vertical[:, None] == vertical[None]
    off_diagonal = ~np.eye(20, dtype=bool)
    within = distances[same & off_diagonal].mean()
    between = distances[~same].mean()
    assert within < between


def test_synthetic_large_n_keeps_few_images():
    dataset = load_dataset("synthetic", num_classes=25_000, quick=True)
    assert dataset.taxonomy.num_verticals == synthetic.default_num_verticals(
        25_000
    )
    assert len(dataset.split("train")) == 2 * 25_000
    assert len(dataset.split("validation")) == 25_000
    assert len(dataset.split("test")) == 25_000


@pytest.mark.parametrize(
    "num_classes, quick, expected",
    [
        (10, False, (40, 10, 10)),
        (10, True, (8, 2, 2)),
        (4_000, False, (10, 2, 2)),
        (100_000, False, (2, 1, 1)),
    ],
    ids=["small", "small-quick", "medium", "large"],
)
def test_synthetic_images_per_class(num_classes, quick, expected):
    assert synthetic.images_per_class(num_classes, quick) == expected


@pytest.mark.parametrize(
    "num_classes, num_verticals, message",
    [
        (1, None, "num_classes=1 is invalid"),
        (10, 6, "num_verticals=6 is invalid"),
        (10, 0, "num_verticals=0 is invalid"),
    ],
    ids=["one-class", "too-many-verticals", "zero-verticals"],
)
def test_synthetic_rejects_bad_sizes(num_classes, num_verticals, message):
    with pytest.raises(KCError, match=message):
        load_dataset(
            "synthetic", num_classes=num_classes, num_verticals=num_verticals
        )


def test_load_dataset_spec_reloads_same_data():
    dataset = load_dataset(
        "synthetic", num_classes=8, num_verticals=2, quick=True, seed=2
    )
    spec = json.loads(json.dumps(dataset.spec))
    assert spec == dataset.spec
    assert set(spec) == {
        "name",
        "path",
        "taxonomy_file",
        "quick",
        "seed",
        "strict",
        "num_classes",
        "num_verticals",
        "image_size",
    }
    reloaded = load_dataset(**spec)
    np.testing.assert_array_equal(
        reloaded.split("test").images, dataset.split("test").images
    )
    assert reloaded.taxonomy == dataset.taxonomy


def test_load_dataset_rejects_unknown_name():
    with pytest.raises(KCError, match="unknown dataset 'mnist'") as error:
        load_dataset("mnist")
    for name in DATASETS:
        assert name in str(error.value)


@pytest.mark.parametrize(
    "name, option",
    [
        ("trio-30", {"num_classes": 5}),
        ("synthetic", {"path": "/tmp"}),
        ("kanji-2136", {"image_size": 32}),
        ("synthetic", {"strict": True}),
    ],
    ids=["trio-num-classes", "synthetic-path", "kanji-size", "strict"],
)
def test_load_dataset_rejects_unused_option(name, option):
    key = next(iter(option))
    with pytest.raises(KCError, match=f"option {key}=.* does not apply"):
        load_dataset(name, **option)


@pytest.mark.parametrize(
    "image_size",
    [4, (32, 2000), "big", (8, 8, 8)],
    ids=["too-small", "too-large", "text", "three-values"],
)
def test_load_dataset_rejects_bad_image_size(tmp_path, image_size):
    with pytest.raises(KCError, match="image size .* is invalid"):
        load_dataset("image-folder", path=tmp_path, image_size=image_size)
