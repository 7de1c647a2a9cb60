"""Tests of quantization-aware training in the tf-keras child process."""

import os
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from converters import export
from converters import ops
from converters import pipeline
from converters import qat
from converters.testing import build_tiny_classifier
from converters.testing import build_tiny_teachers
from converters.testing import fit_classifier
from kc_keras import io_utils
from kc_keras.data import load_dataset
from kc_keras.errors import KCError
from kc_keras.models import student as student_lib
from kc_keras.run import RunDir
from mobile_demo import benchmark

TINY_BUILDER = "converters.testing:build_tiny_classifier"
# Two QAT steps are enough to check the mechanics; accuracy targets are
# measured on real runs, not here.
QUICK_QAT = qat.QATConfig(epochs=1, steps_per_epoch=2, batch_size=32)


@pytest.fixture(scope="module")
def dataset():
    return load_dataset("synthetic", num_classes=6, num_verticals=2, seed=0)


@pytest.fixture(scope="module")
def tiny_model(dataset):
    shape = dataset.preprocessing.input_shape
    model = build_tiny_classifier(6, *shape)
    train = dataset.split("train")
    return fit_classifier(model, train.images, train.labels, epochs=20)


def qat_data(model, images, labels, representative):
    reference = images[:4]
    return qat.QATData(
        train_images=images,
        train_labels=labels,
        representative=representative,
        reference_images=reference,
        reference_logits=model.predict(reference.astype(np.float32), verbose=0),
    )


@pytest.fixture(scope="module")
def caller_state_before():
    return {
        "keras": keras.__version__,
        "tf.keras": tf.keras.__name__,
        "legacy": os.environ.get("TF_USE_LEGACY_KERAS"),
    }


@pytest.fixture(scope="module")
def tiny_qat(tiny_model, dataset, caller_state_before):
    train = dataset.split("train")
    # A narrow pixel range: the input quantizer would learn [40, 200]
    # unless the exporter pins it to [0, 255].
    images = np.clip(train.images, 40, 200)
    builder_kwargs = {"num_classes": 6, "height": 16, "width": 16}
    return qat.qat_export(
        tiny_model,
        TINY_BUILDER,
        builder_kwargs,
        qat_data(tiny_model, images, train.labels, images[:64]),
        QUICK_QAT,
        export.ExportOptions(),
    )


def test_qat_model_is_fully_int8(tiny_qat):
    listed = ops.list_ops(tiny_qat)
    assert ops.float_islands(listed) == []
    types = {op.op_type for op in listed}
    assert {"CONV_2D", "FULLY_CONNECTED", "SOFTMAX"} <= types
    # The Rescaling layer runs as an int8 MUL.
    assert "MUL" in types


def test_qat_input_is_raw_pixels(tiny_qat):
    io = ops.io_details(tiny_qat)
    assert io["input"]["dtype"] == "int8"
    assert io["input"]["scale"] == 1.0
    assert io["input"]["zero_point"] == -128
    assert io["output"]["dtype"] == "int8"


def test_qat_agrees_with_keras(tiny_qat, tiny_model, dataset, tmp_path):
    path = tmp_path / "student_qat-int8.tflite"
    path.write_bytes(tiny_qat)
    test = dataset.split("test")
    outputs = benchmark.TFLiteModel(path).predict(test.images)
    reference = pipeline.keras_outputs(tiny_model, test.images, False)
    agreement = np.mean(outputs.argmax(1) == reference.argmax(1))
    assert agreement >= 0.9


def test_qat_keeps_caller_on_keras_3(tiny_qat, caller_state_before):
    assert keras.__version__ == caller_state_before["keras"]
    assert keras.__version__.startswith("3.")
    assert tf.keras.__name__ == caller_state_before["tf.keras"]
    assert (
        os.environ.get("TF_USE_LEGACY_KERAS") == (caller_state_before["legacy"])
    )
    assert "tensorflow_model_optimization" not in sys.modules


def test_qat_rejects_unsupported_layer(dataset):
    shape = dataset.preprocessing.input_shape
    model = build_tiny_classifier(6, *shape, extra_layer="layer-norm")
    train = dataset.split("train")
    kwargs = {
        "num_classes": 6,
        "height": 16,
        "width": 16,
        "extra_layer": "layer-norm",
    }
    with pytest.raises(KCError) as error:
        qat.qat_export(
            model,
            TINY_BUILDER,
            kwargs,
            qat_data(model, train.images, train.labels, train.images[:8]),
            QUICK_QAT,
            export.ExportOptions(),
        )
    message = str(error.value)
    assert "'extra_norm'" in message
    assert "LayerNormalization" in message


# ---------------------------------------------------------------------------
# The real student, with teacher soft targets


@pytest.fixture(scope="module", params=["small-cnn", "small-cnn-flatten"])
def student_run(request, tmp_path_factory, dataset):
    from kc_keras.models.backbones import BackboneSpec

    config = student_lib.StudentConfig(
        backbone=BackboneSpec(name=request.param, filters=4, blocks=1),
        fc_units=16,
        sc_width=8,
    )
    model = student_lib.build_student(
        config, dataset.taxonomy, dataset.preprocessing
    )
    train = dataset.split("train")
    fit_classifier(model, train.images, train.labels, epochs=20)
    run = RunDir(tmp_path_factory.mktemp("qat_run") / "synthetic")
    run.claim(dataset.spec)
    run.student.mkdir(parents=True)
    model.save(run.student / pipeline.STUDENT_FILE)
    io_utils.write_json(
        run.student / pipeline.STUDENT_METRICS_FILE,
        {"student_config": config.to_dict()},
    )
    return run


def test_student_qat_export(student_run, dataset, monkeypatch):
    teachers = build_tiny_teachers(dataset, epochs=3)
    monkeypatch.setattr(pipeline, "load_run_teachers", lambda run: teachers)
    config = pipeline.TFLiteConfig(
        modes=("qat-int8",), teacher_modes=(), qat=QUICK_QAT
    )
    report = pipeline.export_run(student_run, config, dataset=dataset)
    (entry,) = report["models"]
    assert entry["mode"] == "qat-int8"
    assert entry["float_ops"] == []
    assert entry["input"]["zero_point"] == -128
    assert entry["top1_agreement"] >= 0.8
    assert "soft targets" in report["qat"]["objective"]
    path = student_run.tflite / "student_qat-int8.tflite"
    assert benchmark.read_model_metadata(path)["mode"] == "qat-int8"
    assert any(
        key.startswith("L2_NORMALIZATION") for key in entry["op_histogram"]
    )
