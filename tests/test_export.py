"""Tests of the TFLite export modes, the operator check and `kc tflite`."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner

from converters import export
from converters import ops
from converters import pipeline
from converters.testing import build_tiny_classifier
from converters.testing import build_tiny_teachers
from converters.testing import fit_classifier
from kc_keras.cli.main import cli
from kc_keras.data import load_dataset
from kc_keras.errors import KCError
from kc_keras.run import RunDir
from mobile_demo import benchmark

FLOAT_MODES = ("float32", "float16", "dynamic", "ptq-int8")
# Upper bounds of the max absolute probability difference to Keras.
MAX_DIFF = {"float32": 1e-4, "float16": 1e-2, "dynamic": 0.05, "ptq-int8": 0.1}


@pytest.fixture(scope="module")
def dataset():
    """Six synthetic classes in two verticals, 16x16 grayscale."""
    return load_dataset("synthetic", num_classes=6, num_verticals=2, seed=0)


@pytest.fixture(scope="module")
def student(dataset):
    shape = dataset.preprocessing.input_shape
    model = build_tiny_classifier(dataset.taxonomy.num_classes, *shape)
    train = dataset.split("train")
    return fit_classifier(model, train.images, train.labels, epochs=20)


@pytest.fixture(scope="module")
def test_split(dataset):
    split = dataset.split("test")
    return split.images, split.labels


def export_student(student, dataset, path, mode, options):
    train = dataset.split("train")
    tflite_bytes = export.convert_keras(student, mode, train.images, options)
    info = export.ModelInfo("student", tuple(range(6)))
    return export.write_export(
        tflite_bytes,
        path,
        mode,
        info,
        dataset.taxonomy,
        dataset.preprocessing,
        options,
    )


@pytest.mark.parametrize("mode", FLOAT_MODES, ids=FLOAT_MODES)
def test_mode_converts_with_parity(
    student, dataset, test_split, mode, tmp_path
):
    images, labels = test_split
    path = tmp_path / f"student_{mode}.tflite"
    options = export.ExportOptions()
    record = export_student(student, dataset, path, mode, options)
    reference = pipeline.keras_outputs(student, images, False)
    entry = pipeline.parity_entry(path, record, reference, images, labels)
    assert entry["mode"] == mode
    assert entry["top1_agreement"] >= 0.95
    assert entry["max_abs_diff"] <= MAX_DIFF[mode]
    assert entry["keras_top1_accuracy"] >= 0.5
    assert entry["size_bytes"] == path.stat().st_size
    assert entry["op_histogram"]["SOFTMAX/" + entry["output"]["dtype"].upper()]


@pytest.mark.parametrize(
    ("uint8_input", "dtype", "zero_point"),
    [(False, "int8", -128), (True, "uint8", 0)],
    ids=["int8-input", "uint8-input"],
)
def test_full_integer_io(
    student, dataset, tmp_path, uint8_input, dtype, zero_point
):
    options = export.ExportOptions(uint8_input=uint8_input)
    path = tmp_path / "student_ptq-int8.tflite"
    record = export_student(student, dataset, path, "ptq-int8", options)
    assert record["input"]["dtype"] == dtype
    assert record["input"]["scale"] == 1.0
    assert record["input"]["zero_point"] == zero_point
    assert record["output"]["dtype"] == "int8"
    assert record["output"]["scale"] == pytest.approx(1 / 256)
    assert record["output"]["zero_point"] == -128
    assert record["float_ops"] == []
    model = benchmark.TFLiteModel(path)
    assert model.metadata["input"]["dtype"] == dtype


def test_logits_output(student, dataset, test_split, tmp_path):
    images, labels = test_split
    options = export.ExportOptions(logits_output=True)
    path = tmp_path / "student_float32.tflite"
    record = export_student(student, dataset, path, "float32", options)
    assert not any(key.startswith("SOFTMAX") for key in record["op_histogram"])
    reference = pipeline.keras_outputs(student, images, True)
    entry = pipeline.parity_entry(path, record, reference, images, labels)
    assert entry["output_kind"] == "logits"
    assert entry["max_abs_diff"] < 1e-3


@keras.saving.register_keras_serializable(package="test_export")
class Sine(keras.layers.Layer):
    """Sine of the logits: TFLite has no int8 SIN kernel."""

    def call(self, inputs):
        return tf.sin(inputs)


@pytest.fixture(scope="module")
def sine_model(student, dataset):
    inputs = keras.Input(dataset.preprocessing.input_shape)
    outputs = Sine(name="sine")(student(inputs))
    return keras.Model(inputs, outputs)


def test_float_island_rejected(sine_model, dataset, tmp_path):
    path = tmp_path / "student_ptq-int8.tflite"
    with pytest.raises(KCError) as error:
        export_student(
            sine_model, dataset, path, "ptq-int8", export.ExportOptions()
        )
    message = str(error.value)
    assert "SIN" in message
    assert "sine" in message
    assert "--allow-float-ops" in message
    assert list(tmp_path.iterdir()) == []


def test_float_island_allowed_with_warning(
    sine_model, dataset, tmp_path, caplog
):
    path = tmp_path / "student_ptq-int8.tflite"
    options = export.ExportOptions(allow_float_ops=True)
    record = export_student(sine_model, dataset, path, "ptq-int8", options)
    assert len(record["float_ops"]) == 1
    assert record["float_ops"][0].startswith("SIN")
    assert "SIN" in caplog.text
    assert path.is_file()


def test_float_islands_found_in_op_list(sine_model, dataset):
    train = dataset.split("train")
    options = export.ExportOptions(allow_float_ops=True)
    tflite_bytes = export.convert_keras(
        sine_model, "ptq-int8", train.images, options
    )
    islands = ops.float_islands(ops.list_ops(tflite_bytes))
    assert [op.op_type for op in islands] == ["SIN"]


@pytest.mark.parametrize(
    ("images", "expected"),
    [
        (np.zeros((4, 8, 8, 1), np.uint8), "shape (4, 8, 8, 1)"),
        (np.zeros((4, 16, 16), np.uint8), "shape (4, 16, 16)"),
        (np.zeros((4, 16, 16, 1), np.int64), "dtype int64"),
        (np.zeros((0, 16, 16, 1), np.uint8), "empty"),
    ],
    ids=["wrong-size", "no-channels", "int64", "empty"],
)
def test_bad_representative_dataset(student, images, expected):
    with pytest.raises(KCError) as error:
        export.convert_keras(student, "ptq-int8", images)
    assert expected in str(error.value)
    assert "'pixels'" in str(error.value)


def test_unknown_mode_rejected(student):
    with pytest.raises(KCError) as error:
        export.convert_keras(student, "int4")
    assert "'int4'" in str(error.value)


# ---------------------------------------------------------------------------
# The whole run export


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory, dataset, student):
    run = RunDir(tmp_path_factory.mktemp("run") / "synthetic")
    run.claim(dataset.spec)
    run.student.mkdir(parents=True)
    student.save(run.student / pipeline.STUDENT_FILE)
    return run


@pytest.fixture(scope="module")
def run_report(run_folder, dataset, monkeypatch_module):
    teachers = build_tiny_teachers(dataset, epochs=10)
    monkeypatch_module.setattr(
        pipeline, "load_run_teachers", lambda run: teachers
    )
    config = pipeline.TFLiteConfig(
        modes=("ptq-int8", "float32"), golden_images=3
    )
    return pipeline.export_run(run_folder, config, dataset=dataset)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_run_export_writes_every_model(run_folder, run_report):
    names = sorted(entry["file"] for entry in run_report["models"])
    expected = sorted(
        [f"student_{m}.tflite" for m in ("ptq-int8", "float32")]
        + [f"generalist_{m}.tflite" for m in ("ptq-int8", "float32")]
        + [
            f"specialist_{v}_{m}.tflite"
            for v in (0, 1)
            for m in ("ptq-int8", "float32")
        ]
    )
    assert names == expected
    for name in names:
        assert (run_folder.tflite / name).is_file()
        assert (run_folder.tflite / name).with_suffix(".json").is_file()
    leftovers = [
        p.name for p in run_folder.tflite.iterdir() if p.name[0] == "."
    ]
    assert leftovers == []


def test_run_export_parity(run_report):
    for entry in run_report["models"]:
        assert entry["top1_agreement"] >= 0.9, entry["name"]
        assert entry["max_abs_diff"] <= 0.1, entry["name"]


def test_run_export_specialist_metadata(run_folder, dataset):
    path = run_folder.tflite / "specialist_1_ptq-int8.tflite"
    entry = benchmark.read_model_metadata(path)
    classes = list(dataset.taxonomy.vertical_classes(1))
    assert entry["role"] == "specialist"
    assert entry["vertical"] == 1
    assert entry["output_classes"] == classes + [-1]
    assert len(entry["labels"]) == len(classes) + 1


def test_run_export_test_set(run_folder, run_report, dataset):
    images, labels = benchmark.load_test_set(run_folder.tflite / "test.npz")
    split = dataset.split("test")
    np.testing.assert_array_equal(images, split.images)
    np.testing.assert_array_equal(labels, split.labels)
    assert run_report["test_set"]["subset"] is False
    assert run_report["test_set"]["images"] == len(split)


def test_run_export_golden(run_folder, run_report, dataset):
    golden = json.loads((run_folder.tflite / "golden.json").read_text())
    assert golden["model"] == "student_ptq-int8.tflite"
    assert len(golden["cases"]) == 3
    case = golden["cases"][0]
    pixels = np.array(case["pixels"])
    np.testing.assert_array_equal(np.array(case["input_tensor"]), pixels - 128)
    names = dataset.taxonomy.class_names
    assert [item["label"] for item in case["top5"]] == [
        names[item["index"]] for item in case["top5"]
    ]
    scores = [item["score"] for item in case["top5"]]
    assert scores == sorted(scores, reverse=True)


def test_run_export_parity_file(run_folder, run_report):
    saved = json.loads((run_folder.tflite / "parity.json").read_text())
    assert saved == json.loads(json.dumps(run_report))


def test_run_export_subsets_large_test_split(dataset):
    split = dataset.split("test")
    images, labels, info = pipeline.test_subset(split, 20, seed=1)
    assert len(images) == 20
    assert info["subset"] is True
    assert info["split_images"] == len(split)


# ---------------------------------------------------------------------------
# `kc tflite`


def invoke(*args):
    return CliRunner().invoke(cli, ["tflite", *args])


def test_cli_without_student(tmp_path):
    result = invoke("--run", str(tmp_path))
    assert result.exit_code == 2
    assert "no distilled student" in result.output
    assert "kc distill" in result.output


def test_cli_unknown_mode(tmp_path):
    result = invoke("--run", str(tmp_path), "--modes", "ptq-int8,int4")
    assert result.exit_code == 2
    assert "unknown export mode 'int4'" in result.output


def test_cli_qat_without_student_config(run_folder):
    result = invoke("--run", str(run_folder.root), "--modes", "qat-int8")
    assert result.exit_code == 2
    assert "StudentConfig" in result.output


def test_cli_exports_quick_run(run_folder):
    result = invoke(
        "--run",
        str(run_folder.root),
        "--modes",
        "ptq-int8",
        "--no-teachers",
        "--quick",
    )
    assert result.exit_code == 0, result.output
    assert "student_ptq-int8" in result.output
