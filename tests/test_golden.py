"""golden.json, the Android unit tests' expected values, against LiteRT.

The exporter's `golden_entries` records, for a few test images, the raw
pixels, the quantized input tensor and the top-5 outputs. These tests
recompute both from scratch on a tiny int8 student: the input tensor with
numpy from the interpreter's quantization, the top-5 with the LiteRT
interpreter called directly (not through TFLiteModel, which the exporter
uses).
"""

import json

import numpy as np
import pytest
import tiny_student_tflite as tiny
from ai_edge_litert.interpreter import Interpreter

NUM_CASES = 4


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return tiny.write_models(tmp_path_factory.mktemp("golden"))["student"]


@pytest.fixture(scope="module")
def images():
    return tiny.make_images(NUM_CASES, seed=5)


@pytest.fixture(scope="module")
def golden(model_path, images):
    from converters.pipeline import golden_entries

    pixels, labels = images
    entries = golden_entries(
        model_path, pixels, labels, list(tiny.CLASS_NAMES), NUM_CASES
    )
    # The app reads the file, so check the JSON round trip as well.
    return json.loads(json.dumps(entries))


@pytest.fixture(scope="module")
def interpreter(model_path):
    interpreter = Interpreter(model_path=str(model_path))
    interpreter.allocate_tensors()
    return interpreter


def run_raw(interpreter, tensor):
    input_detail = interpreter.get_input_details()[0]
    interpreter.set_tensor(input_detail["index"], tensor)
    interpreter.invoke()
    output_detail = interpreter.get_output_details()[0]
    raw = interpreter.get_tensor(output_detail["index"])[0]
    scale, zero_point = output_detail["quantization"]
    return (raw.astype(np.float32) - zero_point) * scale


def test_golden_header(golden, interpreter):
    scale, zero_point = interpreter.get_input_details()[0]["quantization"]
    assert golden["model"] == "student_qat-int8.tflite"
    assert golden["input"]["dtype"] == "int8"
    assert golden["input"]["scale"] == pytest.approx(scale)
    assert golden["input"]["zero_point"] == zero_point
    assert len(golden["cases"]) == NUM_CASES


@pytest.mark.parametrize(
    "case_index", range(NUM_CASES), ids=lambda i: f"case{i}"
)
def test_pixels_are_test_image(golden, images, case_index):
    case = golden["cases"][case_index]
    pixels, labels = images
    assert case["shape"] == [1, tiny.HEIGHT, tiny.WIDTH, tiny.CHANNELS]
    assert case["pixels"] == pixels[case_index].reshape(-1).tolist()
    assert case["label"] == int(labels[case_index])


@pytest.mark.parametrize(
    "case_index", range(NUM_CASES), ids=lambda i: f"case{i}"
)
def test_input_tensor_recomputed(golden, case_index):
    case = golden["cases"][case_index]
    scale = golden["input"]["scale"]
    zero_point = golden["input"]["zero_point"]
    pixels = np.array(case["pixels"], dtype=np.float32)
    expected = np.clip(np.round(pixels / scale) + zero_point, -128, 127)
    assert case["input_tensor"] == expected.astype(np.int64).tolist()
    # Scale 1 and zero point -128 make the tensor the raw pixel minus 128.
    assert case["input_tensor"] == (pixels - 128).astype(np.int64).tolist()


@pytest.mark.parametrize(
    "case_index", range(NUM_CASES), ids=lambda i: f"case{i}"
)
def test_top5_recomputed(golden, interpreter, case_index):
    case = golden["cases"][case_index]
    tensor = np.array(case["input_tensor"], dtype=np.int8).reshape(
        case["shape"]
    )
    scores = run_raw(interpreter, tensor)
    expected = np.argsort(-scores, kind="stable")[:5].tolist()
    top5 = case["top5"]
    assert [entry["index"] for entry in top5] == expected
    assert [entry["label"] for entry in top5] == [
        tiny.CLASS_NAMES[i] for i in expected
    ]
    assert [entry["score"] for entry in top5] == pytest.approx(
        scores[expected].tolist(), abs=1e-6
    )


def test_top1_is_true_label(golden):
    # The tiny model separates its classes, so a wrong top-1 means the
    # golden cases are misaligned with their images.
    for case in golden["cases"]:
        assert case["top5"][0]["index"] == case["label"]
