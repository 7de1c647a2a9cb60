"""Tests of the soft-target cache and the teacher checks."""

import os

import numpy as np
import pytest
import tensorflow as tf
from distill_helpers import teacher_targets
from distill_helpers import tiny_dataset
from distill_helpers import tiny_teacher

from kc_keras.distill import soft_targets
from kc_keras.distill.config import LossConfig
from kc_keras.errors import KCError
from kc_keras.models import backbones


@pytest.fixture(scope="module")
def dataset():
    return tiny_dataset()


@pytest.fixture(scope="module")
def targets(dataset):
    return teacher_targets(dataset, LossConfig(top_k=3, temperature=2.0))


def _teacher_files(tmp_path, targets):
    paths = []
    for model in (targets.generalist, *targets.specialists):
        path = tmp_path / "teachers" / f"{model.name}.keras"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(model.name.encode())
        paths.append(path)
    return paths


def test_cached_targets_match_online(dataset, targets, tmp_path):
    key = soft_targets.cache_key(
        targets, dataset, _teacher_files(tmp_path, targets)
    )
    folder = tmp_path / "soft_targets"
    soft_targets.write_cache(folder, targets, dataset, key)
    arrays = soft_targets.read_cache(folder, key)
    assert arrays is not None
    pipeline = soft_targets.cached_pipeline(dataset, arrays, batch_size=16)
    images, labels, cached = next(iter(pipeline))
    online = targets(images, labels)
    assert set(cached) == set(online) == {"specialist", "generalist"}
    for role in online:
        np.testing.assert_array_equal(
            cached[role][0].numpy(), online[role][0].numpy()
        )
        # Probabilities are stored as float16.
        np.testing.assert_allclose(
            cached[role][1].numpy(), online[role][1].numpy(), atol=1e-3
        )


def test_cache_layout_has_no_class_columns(dataset, targets, tmp_path):
    key = soft_targets.cache_key(
        targets, dataset, _teacher_files(tmp_path, targets)
    )
    folder = tmp_path / "soft_targets"
    soft_targets.write_cache(folder, targets, dataset, key)
    names = sorted(os.listdir(folder))
    assert "index.json" in names
    assert not [name for name in names if name.endswith(".tmp")]
    num_images = len(dataset.split("train"))
    indices = np.load(folder / "specialist_indices_00000.npy")
    probabilities = np.load(folder / "specialist_probabilities_00000.npy")
    assert indices.shape == (num_images, 3)
    assert indices.dtype == np.int16
    assert probabilities.dtype == np.float16
    # Nothing is left beside the folder either.
    assert sorted(os.listdir(tmp_path)) == ["soft_targets", "teachers"]


def test_index_dtype_grows_with_classes():
    assert soft_targets.index_dtype(30) == np.int16
    assert soft_targets.index_dtype(32768) == np.int16
    assert soft_targets.index_dtype(100_000) == np.int32


@pytest.mark.parametrize(
    "change", ["temperature", "teacher-file"], ids=["temperature", "teacher"]
)
def test_stale_cache_is_ignored(dataset, targets, tmp_path, change):
    files = _teacher_files(tmp_path, targets)
    key = soft_targets.cache_key(targets, dataset, files)
    folder = tmp_path / "soft_targets"
    soft_targets.write_cache(folder, targets, dataset, key)
    if change == "temperature":
        other = teacher_targets(dataset, LossConfig(top_k=3, temperature=4.0))
        new_key = soft_targets.cache_key(other, dataset, files)
    else:
        files[1].write_bytes(b"a retrained specialist")
        new_key = soft_targets.cache_key(targets, dataset, files)
    assert soft_targets.read_cache(folder, new_key) is None
    assert soft_targets.read_cache(folder, key) is not None


def test_cache_missing_returns_none(dataset, targets, tmp_path):
    key = soft_targets.cache_key(
        targets, dataset, _teacher_files(tmp_path, targets)
    )
    assert soft_targets.read_cache(tmp_path / "absent", key) is None


def test_generalist_skipped_at_zero_weight(dataset):
    targets = teacher_targets(dataset, LossConfig(generalist_weight=0.0))
    assert targets.roles == ("specialist",)
    split = dataset.split("train")
    result = targets(
        tf.constant(split.images[:4], tf.float32),
        tf.constant(split.labels[:4]),
    )
    assert set(result) == {"specialist"}


@pytest.mark.parametrize(
    "problem,match",
    [
        ("generalist-size", "generalist outputs 5 logits"),
        ("specialist-size", "outputs 3 logits, expected 5"),
        ("specialist-none", "is missing"),
    ],
    ids=["generalist-size", "specialist-size", "specialist-none"],
)
def test_check_teachers_rejects_mismatch(dataset, targets, problem, match):
    generalist = targets.generalist
    specialists = list(targets.specialists)
    if problem == "generalist-size":
        generalist = tiny_teacher(5, dataset.preprocessing, "g", seed=0)
    elif problem == "specialist-size":
        specialists[0] = tiny_teacher(3, dataset.preprocessing, "s", seed=0)
    else:
        specialists[1] = None
    with pytest.raises(KCError, match=match):
        soft_targets.check_teachers(generalist, specialists, dataset.taxonomy)


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
def test_targets_with_empty_vertical(dataset, graph):
    # The first training images all belong to class 0, so the other
    # verticals' specialists get no image in this batch. An empty batch
    # fails in eager Keras, and in graph mode in a second backbone block.
    targets = teacher_targets(
        dataset, backbone=backbones.BackboneSpec(filters=4, blocks=2)
    )
    split = dataset.split("train")
    images = tf.constant(split.images[:4], tf.float32)
    labels = tf.constant(split.labels[:4])
    compute = tf.function(targets) if graph else targets
    indices, probabilities = compute(images, labels)["specialist"]
    own = set(dataset.taxonomy.vertical_classes(0))
    assert set(indices.numpy().ravel()) <= own
    assert np.all(probabilities.numpy() > 0)
