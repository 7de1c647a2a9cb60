"""Tests of the kc_keras metadata entry and its sidecar files."""

import json

import numpy as np
import pytest

from converters import export
from converters import metadata
from converters import ops
from converters.testing import build_tiny_classifier
from kc_keras.data.base import Preprocessing
from kc_keras.data.base import Taxonomy
from kc_keras.errors import KCError
from mobile_demo import benchmark

TAXONOMY = Taxonomy(
    class_names=("zero", "one", "shirt", "boot"),
    vertical_names=("digits", "clothing"),
    class_vertical=(0, 0, 1, 1),
)
PREPROCESSING = Preprocessing(6, 6, 1)


@pytest.fixture(scope="module")
def int8_bytes():
    model = build_tiny_classifier(TAXONOMY.num_classes, height=6, width=6)
    images = np.random.default_rng(0).integers(0, 256, (8, 6, 6, 1))
    return export.convert_keras(model, "ptq-int8", images.astype(np.uint8))


def student_metadata(model_bytes, output_classes=(0, 1, 2, 3)):
    return metadata.build_metadata(
        name="student_ptq-int8",
        role="student",
        mode="ptq-int8",
        taxonomy=TAXONOMY,
        preprocessing=PREPROCESSING,
        io=ops.io_details(model_bytes),
        output_classes=list(output_classes),
        output_kind="probabilities",
    )


def test_metadata_round_trip_in_file(int8_bytes, tmp_path):
    entry = student_metadata(int8_bytes)
    path = tmp_path / "student_ptq-int8.tflite"
    path.write_bytes(metadata.add_metadata(int8_bytes, entry))
    assert benchmark.read_model_metadata(path) == entry


def test_metadata_records_int8_input_format(int8_bytes):
    entry = student_metadata(int8_bytes)
    assert entry["input"]["dtype"] == "int8"
    assert entry["input"]["scale"] == 1.0
    assert entry["input"]["zero_point"] == -128
    assert entry["input"]["shape"] == [1, 6, 6, 1]
    assert entry["output"]["kind"] == "probabilities"
    assert entry["labels"] == ["zero", "one", "shirt", "boot"]


def test_metadata_keeps_model_runnable(int8_bytes, tmp_path):
    plain = tmp_path / "plain.tflite"
    plain.write_bytes(int8_bytes)
    tagged = tmp_path / "tagged.tflite"
    tagged.write_bytes(
        metadata.add_metadata(int8_bytes, student_metadata(int8_bytes))
    )
    pixels = np.random.default_rng(2).integers(0, 256, (3, 6, 6, 1))
    pixels = pixels.astype(np.uint8)
    np.testing.assert_array_equal(
        benchmark.TFLiteModel(plain).predict(pixels),
        benchmark.TFLiteModel(tagged).predict(pixels),
    )


def test_metadata_replaces_previous_entry(int8_bytes):
    first = metadata.add_metadata(int8_bytes, student_metadata(int8_bytes))
    second_entry = dict(student_metadata(int8_bytes), name="renamed")
    second = metadata.add_metadata(first, second_entry)
    entries = benchmark.read_metadata(second)
    assert json.loads(entries[benchmark.METADATA_NAME]) == second_entry
    # The converter's own entry survives.
    assert "min_runtime_version" in entries


def test_specialist_dustbin_label():
    model = build_tiny_classifier(3, height=6, width=6)
    model_bytes = export.convert_keras(model, "float32")
    entry = metadata.build_metadata(
        name="specialist_1_float32",
        role="specialist",
        mode="float32",
        taxonomy=TAXONOMY,
        preprocessing=PREPROCESSING,
        io=ops.io_details(model_bytes),
        output_classes=[2, 3, -1],
        output_kind="probabilities",
        vertical=1,
    )
    assert entry["labels"] == ["shirt", "boot", "other vertical"]
    assert entry["output_classes"] == [2, 3, -1]
    assert entry["vertical"] == 1


def test_label_count_mismatch_rejected_at_export(int8_bytes):
    entry = student_metadata(int8_bytes, output_classes=(0, 1, 2))
    with pytest.raises(KCError) as error:
        metadata.add_metadata(int8_bytes, entry)
    assert "3 labels" in str(error.value)
    assert "4 outputs" in str(error.value)


def test_label_count_mismatch_rejected_at_load(
    int8_bytes, tmp_path, monkeypatch
):
    entry = student_metadata(int8_bytes, output_classes=(0, 1, 2))
    # Bypass the export-time check to write a file that an older or
    # foreign exporter could have produced.
    monkeypatch.setattr(metadata, "_output_size", lambda model: 3)
    path = tmp_path / "bad_labels.tflite"
    path.write_bytes(metadata.add_metadata(int8_bytes, entry))
    with pytest.raises(benchmark.TFLiteError) as error:
        benchmark.TFLiteModel(path)
    assert "3 labels" in str(error.value)
    assert "4 outputs" in str(error.value)


def test_unknown_output_class_rejected(int8_bytes):
    with pytest.raises(KCError) as error:
        student_metadata(int8_bytes, output_classes=(0, 1, 2, 9))
    assert "output class 9" in str(error.value)


def test_add_metadata_rejects_non_tflite():
    with pytest.raises(KCError) as error:
        metadata.add_metadata(b"not a flatbuffer at all", {"labels": []})
    assert "TFL3" in str(error.value)


def test_sidecars_round_trip(int8_bytes, tmp_path):
    entry = student_metadata(int8_bytes)
    path = tmp_path / "student_ptq-int8.tflite"
    metadata.write_sidecars(path, entry)
    sidecar = json.loads((tmp_path / "student_ptq-int8.json").read_text())
    assert sidecar == entry
    labels = (tmp_path / "labels.txt").read_text().splitlines()
    assert labels == list(TAXONOMY.class_names)
    assert benchmark.read_labels(tmp_path) == list(TAXONOMY.class_names)
