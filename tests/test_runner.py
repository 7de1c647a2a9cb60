"""Tests of the LiteRT runner in mobile_demo/benchmark.py."""

import numpy as np
import pytest

from converters import export
from converters.testing import build_tiny_classifier
from mobile_demo.benchmark import TFLiteError
from mobile_demo.benchmark import TFLiteModel

NUM_CLASSES = 3


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    """A float32, an int8 and a uint8-input export of one tiny model."""
    folder = tmp_path_factory.mktemp("runner")
    model = build_tiny_classifier(NUM_CLASSES, height=6, width=6)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (16, 6, 6, 1), dtype=np.uint8)
    files = {}
    for name, mode, options in (
        ("float32", "float32", export.ExportOptions()),
        ("int8", "ptq-int8", export.ExportOptions()),
        ("uint8", "ptq-int8", export.ExportOptions(uint8_input=True)),
    ):
        path = folder / f"{name}.tflite"
        path.write_bytes(export.convert_keras(model, mode, images, options))
        files[name] = path
    return files


def test_int8_input_quantization(model_files):
    model = TFLiteModel(model_files["int8"])
    pixels = np.array([0, 1, 128, 255], np.uint8).reshape(1, 2, 2, 1)
    model_input = np.resize(pixels, (1, 6, 6, 1))
    tensor = model.quantize_input(model_input)
    assert tensor.dtype == np.int8
    assert tensor.reshape(-1)[:4].tolist() == [-128, -127, 0, 127]


def test_uint8_input_passes_pixels(model_files):
    model = TFLiteModel(model_files["uint8"])
    pixels = np.arange(36, dtype=np.uint8).reshape(1, 6, 6, 1) * 7
    tensor = model.quantize_input(pixels)
    assert tensor.dtype == np.uint8
    np.testing.assert_array_equal(tensor, pixels)


@pytest.mark.parametrize("name", ["float32", "int8"], ids=["float", "int8"])
def test_predict_returns_probabilities(model_files, name):
    model = TFLiteModel(model_files[name])
    pixels = np.random.default_rng(1).integers(0, 256, (4, 6, 6, 1))
    outputs = model.predict(pixels.astype(np.uint8))
    assert outputs.shape == (4, NUM_CLASSES)
    np.testing.assert_allclose(outputs.sum(axis=1), 1.0, atol=0.02)


def test_wrong_dtype_names_expected_input(model_files):
    model = TFLiteModel(model_files["int8"])
    with pytest.raises(TFLiteError) as error:
        model.quantize_input(np.zeros((1, 6, 6, 1), np.int32))
    message = str(error.value)
    assert "int32" in message
    assert "dtype int8" in message
    assert "(1, 6, 6, 1)" in message
    assert "scale 1.0" in message
    assert "zero point -128" in message


def test_wrong_shape_names_expected_input(model_files):
    model = TFLiteModel(model_files["int8"])
    with pytest.raises(TFLiteError) as error:
        model.quantize_input(np.zeros((1, 8, 8, 1), np.uint8))
    message = str(error.value)
    assert "(1, 8, 8, 1)" in message
    assert "(6, 6, 1)" in message
    assert "zero point -128" in message


def test_invoke_rejects_unquantized_tensor(model_files):
    model = TFLiteModel(model_files["int8"])
    with pytest.raises(TFLiteError) as error:
        model.invoke(np.zeros((1, 6, 6, 1), np.float32))
    message = str(error.value)
    assert "float32" in message
    assert "expected dtype int8" in message


def test_truncated_file_rejected(model_files, tmp_path):
    data = model_files["int8"].read_bytes()
    path = tmp_path / "truncated.tflite"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(TFLiteError) as error:
        TFLiteModel(path)
    assert "truncated.tflite" in str(error.value)


def test_non_tflite_file_rejected(tmp_path):
    path = tmp_path / "notes.tflite"
    path.write_text("this is not a model\n")
    with pytest.raises(TFLiteError) as error:
        TFLiteModel(path)
    assert "TFL3" in str(error.value)


def test_missing_file_rejected(tmp_path):
    with pytest.raises(TFLiteError) as error:
        TFLiteModel(tmp_path / "absent.tflite")
    assert "not found" in str(error.value)
