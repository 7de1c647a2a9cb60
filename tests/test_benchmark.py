"""End-to-end tests of mobile_demo/benchmark.py and `kc bench`.

The tests export tiny Keras models with the real TFLite converter, in the
file layout of a run's tflite/ folder, and run the real interpreters.
"""

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from kc_keras.cli.main import cli
from mobile_demo import benchmark

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "mobile_demo" / "benchmark.py"
FALLBACK_PYTHON = REPO / ".venv-tflite-runtime" / "bin" / "python"

SIZE = 8
CLASS_VERTICAL = [0, 0, 1, 1]
CLASS_NAMES = ["c0", "c1", "c2", "c3"]
VERTICALS = ["v0", "v1"]
STUDENT_MODES = ("float32", "ptq-int8")
TEACHER_MODE = "ptq-int8"


# ---------------------------------------------------------------------------
# Tiny exports


def make_images(count, seed):
    """Return uint8 images whose bright row band encodes the label."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(CLASS_NAMES), count).astype(np.int32)
    images = rng.integers(0, 60, (count, SIZE, SIZE, 1)).astype(np.uint8)
    for i, label in enumerate(labels):
        band = slice(2 * label, 2 * label + 2)
        images[i, band] = rng.integers(120, 256, (2, SIZE, 1))
    return images, labels


def band_weights(columns):
    """Dense weights that sum the row bands of each column's classes."""
    weights = np.zeros((SIZE * SIZE, len(columns)), np.float32)
    for j, classes in enumerate(columns):
        for c in np.atleast_1d(classes):
            weights[2 * c * SIZE : (2 * c + 2) * SIZE, j] = 1.0
    return weights


def keras_model(weights):
    import tensorflow as tf

    inputs = tf.keras.Input((SIZE, SIZE, 1))
    x = tf.keras.layers.Rescaling(1 / 255)(inputs)
    x = tf.keras.layers.Flatten()(x)
    dense = tf.keras.layers.Dense(weights.shape[1])
    outputs = tf.keras.layers.Softmax()(dense(x))
    model = tf.keras.Model(inputs, outputs)
    dense.set_weights([weights, np.zeros(weights.shape[1], np.float32)])
    return model


def convert(model, mode, calibration):
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if mode == "ptq-int8":

        def representative():
            # Black and white images pin the input range to [0, 255], so
            # the int8 input gets scale 1 and zero point -128.
            yield [np.zeros((1, SIZE, SIZE, 1), np.float32)]
            yield [np.full((1, SIZE, SIZE, 1), 255, np.float32)]
            for image in calibration[:16]:
                yield [image[None].astype(np.float32)]

        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [
            tf.lite.OpsSet.TFLITE_BUILTINS_INT8
        ]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    with warnings.catch_warnings():
        # The converter warns that quantized inputs have no statistics; the
        # representative dataset provides the input range instead.
        warnings.filterwarnings(
            "ignore", message="Statistics for quantized inputs"
        )
        return converter.convert()


def add_metadata(tflite_bytes, entry):
    """Add the kc_keras metadata entry with converters' helper if present."""
    try:
        from converters.metadata import add_metadata as converters_add
    except ImportError:
        converters_add = None
    if converters_add is not None:
        return converters_add(tflite_bytes, entry)
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(
        bytearray(tflite_bytes)
    )
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(json.dumps(entry).encode(), np.uint8)
    model.buffers.append(buffer)
    metadata = schema.MetadataT()
    metadata.name = benchmark.METADATA_NAME
    metadata.buffer = len(model.buffers) - 1
    model.metadata = (model.metadata or []) + [metadata]
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def model_specs():
    """Yield (file stem, role, vertical, output classes, weights, mode)."""
    rng = np.random.default_rng(1)
    everything = list(range(len(CLASS_NAMES)))
    for mode in STUDENT_MODES:
        # Noisy weights: the student is less accurate than the teachers.
        noise = rng.normal(0, 1.5, (SIZE * SIZE, len(CLASS_NAMES)))
        weights = band_weights(everything) + noise.astype(np.float32)
        yield f"student_{mode}", "student", None, everything, weights, mode
    yield (
        f"generalist_{TEACHER_MODE}",
        "generalist",
        None,
        everything,
        band_weights(everything),
        TEACHER_MODE,
    )
    for k in range(len(VERTICALS)):
        members = [c for c, v in enumerate(CLASS_VERTICAL) if v == k]
        others = [c for c, v in enumerate(CLASS_VERTICAL) if v != k]
        # The last output is the dustbin: "an image of another vertical".
        yield (
            f"specialist_{k}_{TEACHER_MODE}",
            "specialist",
            k,
            members + [-1],
            band_weights(members + [others]),
            TEACHER_MODE,
        )


def build_exports(folder):
    """Write tiny exports, labels.txt and test.npz into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    images, labels = make_images(48, seed=0)
    taxonomy = {
        "classes": CLASS_NAMES,
        "verticals": VERTICALS,
        "class_vertical": CLASS_VERTICAL,
    }
    for stem, role, vertical, outputs, weights, mode in model_specs():
        entry = {
            "format_version": 1,
            "name": stem,
            "role": role,
            "mode": mode,
            "vertical": vertical,
            "output_classes": outputs,
            "labels": [CLASS_NAMES[c] if c >= 0 else "other" for c in outputs],
            "taxonomy": taxonomy,
        }
        data = convert(keras_model(weights), mode, images)
        (folder / f"{stem}.tflite").write_bytes(add_metadata(data, entry))
        (folder / f"{stem}.json").write_text(json.dumps(entry))
    (folder / "labels.txt").write_text("\n".join(CLASS_NAMES) + "\n")
    np.savez(folder / "test.npz", images=images, labels=labels)
    return folder


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    return build_exports(tmp_path_factory.mktemp("exports") / "tflite")


@pytest.fixture
def exports_copy(exports, tmp_path):
    """A private copy of the exports that a test may damage."""
    return Path(shutil.copytree(exports, tmp_path / "tflite"))


# ---------------------------------------------------------------------------
# Independent reference: the interpreter used directly, not TFLiteModel


def reference_probabilities(path, images):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    source = interpreter.get_input_details()[0]
    target = interpreter.get_output_details()[0]
    rows = []
    for image in images:
        tensor = image[None].astype(np.float32)
        if source["dtype"] == np.int8:
            scale, zero_point = source["quantization"]
            tensor = np.round(tensor / scale + zero_point).astype(np.int8)
        interpreter.set_tensor(source["index"], tensor)
        interpreter.invoke()
        raw = interpreter.get_tensor(target["index"])[0].astype(np.float32)
        if target["dtype"] == np.int8:
            scale, zero_point = target["quantization"]
            raw = (raw - zero_point) * scale
        rows.append(raw)
    return np.array(rows)


def run_script(python, models, out, *extra):
    return subprocess.run(
        [str(python), str(SCRIPT), "--models", str(models), "--out", str(out)]
        + [str(arg) for arg in extra],
        capture_output=True,
        text=True,
        timeout=300,
    )


def check_report(report, runs, threads):
    names = [system["name"] for system in report["systems"]]
    assert names == [
        "student (float32)",
        "student (ptq-int8)",
        "generalist (ptq-int8)",
        "routed ensemble (ptq-int8)",
        "full ensemble (ptq-int8)",
    ]
    assert report["settings"]["threads"] == threads
    assert report["machine"]["cores"] >= 1
    assert report["memory_baseline_mb"] > 0
    for system in report["systems"]:
        accuracy = system["accuracy"]
        assert 0.0 <= accuracy["top1"] <= accuracy["top5"] <= 1.0
        assert set(accuracy["per_vertical_top1"]) == set(VERTICALS)
        assert [t["threads_requested"] for t in system["threads"]] == threads
        for measured in system["threads"]:
            latency = measured["latency_ms"]
            # Warm-up runs are not timed: only the timed runs are counted.
            assert latency["count"] == runs
            assert latency["min"] <= latency["median"] <= latency["p90"]
            assert latency["p90"] <= latency["p99"] <= latency["max"]
            assert measured["load_ms"] > 0
            assert measured["peak_rss_mb"] > 0
            assert measured["peak_rss_above_baseline_mb"] == pytest.approx(
                measured["peak_rss_mb"] - report["memory_baseline_mb"]
            )
            assert measured["threads_started"] >= 1
    sizes = {s["name"]: s["model_bytes"] for s in report["systems"]}
    assert sizes["full ensemble (ptq-int8)"] > sizes["generalist (ptq-int8)"]
    assert len(report["targets"]) == 2 * len(threads) + 1
    assert all(t["met"] is not None for t in report["targets"])


# ---------------------------------------------------------------------------
# End to end


def test_script_end_to_end_ai_edge_litert(exports, tmp_path):
    out = tmp_path / "bench"
    completed = run_script(
        sys.executable, exports, out, "--runs", 5, "--warmup", 2,
        "--runtime", "ai_edge_litert",
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    report = json.loads((out / "bench.json").read_text())
    check_report(report, runs=5, threads=[1, 2])
    assert report["runtime"]["name"] == "ai_edge_litert"
    assert (
        report["runtime"]["version"]
        == benchmark.load_runtime("ai_edge_litert")[1]
    )
    assert report["numpy_version"] == np.__version__

    # Accuracy matches the interpreter run directly on the same images.
    with np.load(exports / "test.npz") as data:
        images, labels = data["images"], data["labels"]
    systems = {s["name"]: s for s in report["systems"]}
    student = reference_probabilities(
        exports / "student_float32.tflite", images
    )
    assert systems["student (float32)"]["accuracy"]["top1"] == pytest.approx(
        np.mean(student.argmax(1) == labels)
    )
    generalist = reference_probabilities(
        exports / "generalist_ptq-int8.tflite", images
    )
    specialists = [
        reference_probabilities(
            exports / f"specialist_{k}_ptq-int8.tflite", images
        )
        for k in range(len(VERTICALS))
    ]
    routed = benchmark.routed_scores(generalist, specialists, CLASS_VERTICAL)
    routed_system = systems["routed ensemble (ptq-int8)"]
    assert routed_system["accuracy"]["top1"] == pytest.approx(
        np.mean(routed.argmax(1) == labels)
    )

    markdown = (out / "bench.md").read_text()
    assert "## 1 thread(s)" in markdown
    assert "## 2 thread(s)" in markdown
    assert "student (ptq-int8) / ensembles" in markdown
    assert "1/(0.8*(M+1)) = 0.417" in markdown
    assert "target(s) met" in markdown
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Results go to stdout, progress to stderr.
    assert "# On-device benchmark" in completed.stdout
    assert "benchmarking 5 systems" in completed.stderr
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_script_end_to_end_tflite_runtime(exports, tmp_path):
    if not FALLBACK_PYTHON.exists():
        message = (
            f"{FALLBACK_PYTHON} is missing; build it with "
            "`make .venv-tflite-runtime`"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    out = tmp_path / "bench"
    completed = run_script(
        FALLBACK_PYTHON, exports, out, "--runs", 5, "--warmup", 2,
        "--threads", 3,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    report = json.loads((out / "bench.json").read_text())
    check_report(report, runs=5, threads=[1, 2, 3])
    # ai_edge_litert is absent there, so auto falls back.
    assert report["runtime"] == {"name": "tflite_runtime", "version": "2.14.0"}
    assert report["numpy_version"].startswith("1.")
    # The fallback environment has no matplotlib: the plot is skipped.
    assert not (out / "bench.png").exists()
    assert "bench.png skipped" in completed.stderr
    assert (out / "bench.md").is_file()


def test_script_imports_no_tensorflow():
    code = (
        "import sys; sys.path.insert(0, 'mobile_demo'); import benchmark; "
        "benchmark.load_runtime('auto'); "
        "print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'tensorflow', 'keras', 'kc_keras', 'tf_keras'}))"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "[]"


# ---------------------------------------------------------------------------
# Bad input: one line naming the value and the fix, exit code 2


def run_main(capsys, models, out, *extra):
    code = benchmark.main(
        ["--models", str(models), "--out", str(out), "--runs", "2"]
        + [str(arg) for arg in extra]
    )
    err = capsys.readouterr().err
    error_lines = [line for line in err.splitlines() if "error:" in line]
    return code, error_lines


def test_bad_missing_student_mode(exports, tmp_path, capsys):
    code, lines = run_main(capsys, exports, tmp_path, "--modes", "qat-int8")
    assert code == 2
    assert len(lines) == 1
    assert "student_qat-int8.tflite" in lines[0]
    assert "--modes" in lines[0]


def test_bad_models_folder_missing(tmp_path, capsys):
    code, lines = run_main(capsys, tmp_path / "none", tmp_path / "out")
    assert code == 2
    assert "models folder not found" in lines[0]
    assert "kc tflite" in lines[0]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"garbage", "not a TFLite model"),
        ("truncated", "corrupt TFLite model"),
    ],
    ids=["not-tflite", "truncated"],
)
def test_bad_corrupt_model(exports_copy, tmp_path, capsys, content, expected):
    path = exports_copy / "student_float32.tflite"
    if content == "truncated":
        content = path.read_bytes()[:100]
    path.write_bytes(content)
    code, lines = run_main(capsys, exports_copy, tmp_path / "out")
    assert code == 2
    assert len(lines) == 1
    assert "student_float32.tflite" in lines[0]
    assert expected in lines[0]
    assert "re-export" in lines[0]
    assert not (tmp_path / "out" / "bench.json").exists()


def test_bad_labels_count(exports_copy, tmp_path, capsys):
    (exports_copy / "labels.txt").write_text("a\nb\nc\nd\ne\n")
    code, lines = run_main(capsys, exports_copy, tmp_path / "out")
    assert code == 2
    assert "has 5 labels" in lines[0]
    assert "4 classes" in lines[0]
    assert "re-export labels.txt" in lines[0]


def test_bad_model_output_size(exports_copy, tmp_path, capsys):
    # A 4-class model where vertical 1's specialist (2 classes + dustbin)
    # belongs.
    shutil.copy(
        exports_copy / "generalist_ptq-int8.tflite",
        exports_copy / "specialist_1_ptq-int8.tflite",
    )
    code, lines = run_main(capsys, exports_copy, tmp_path / "out")
    assert code == 2
    assert len(lines) == 1
    assert "specialist_1_ptq-int8.tflite outputs 4 scores" in lines[0]
    assert "expected 3 (2 classes of vertical 1 + 1 dustbin)" in lines[0]


@pytest.mark.parametrize(
    ("images", "shown"),
    [
        (np.zeros((4, 9, 9, 1), np.uint8), "(4, 9, 9, 1) and dtype uint8"),
        (np.zeros((4, 8, 8, 1), np.int16), "(4, 8, 8, 1) and dtype int16"),
    ],
    ids=["shape", "dtype"],
)
def test_bad_test_images(exports_copy, tmp_path, capsys, images, shown):
    np.savez(
        exports_copy / "test.npz",
        images=images,
        labels=np.zeros(len(images), np.int32),
    )
    code, lines = run_main(capsys, exports_copy, tmp_path / "out")
    assert code == 2
    assert len(lines) == 1
    assert shown in lines[0]
    # The model side: its input tensor, for example int8 (1, 8, 8, 1).
    assert "takes dtype" in lines[0]
    assert "shape (1, 8, 8, 1)" in lines[0]


def test_bad_test_set_missing_array(exports_copy, tmp_path, capsys):
    np.savez(exports_copy / "test.npz", images=np.zeros((2, 8, 8, 1)))
    code, lines = run_main(capsys, exports_copy, tmp_path / "out")
    assert code == 2
    assert "no 'labels' array" in lines[0]


def test_bad_missing_specialist(exports_copy, tmp_path, capsys):
    (exports_copy / "specialist_1_ptq-int8.tflite").unlink()
    code, lines = run_main(capsys, exports_copy, tmp_path / "out")
    assert code == 2
    assert len(lines) == 1
    assert "ensemble incomplete" in lines[0]
    assert "specialist_1_ptq-int8.tflite" in lines[0]
    assert "'v1'" in lines[0]


def test_bad_runtime_not_installed(exports, tmp_path, capsys):
    try:
        import tflite_runtime  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("tflite_runtime is installed in this environment")
    code, lines = run_main(
        capsys, exports, tmp_path, "--runtime", "tflite_runtime"
    )
    assert code == 2
    assert len(lines) == 1
    assert "pip install tflite-runtime" in lines[0]


def test_bad_thread_value(exports, tmp_path, capsys):
    code, lines = run_main(capsys, exports, tmp_path, "--threads", "two")
    assert code == 2
    assert "invalid --threads 'two'" in lines[0]


# ---------------------------------------------------------------------------
# kc bench


@pytest.fixture
def run_folder(exports, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(exports, run / "tflite")
    return run


def test_kc_bench_quick(run_folder):
    result = CliRunner().invoke(
        cli,
        ["bench", "--run", str(run_folder), "--quick", "--modes", "ptq-int8"],
    )
    assert result.exit_code == 0, result.output
    report = json.loads((run_folder / "bench" / "bench.json").read_text())
    assert report["settings"]["timed_runs"] == 20
    assert report["settings"]["warmup_runs"] == 2
    assert [s["name"] for s in report["systems"]][0] == "student (ptq-int8)"
    assert "## Targets" in result.output
    assert (run_folder / "bench" / "bench.md").is_file()


def test_kc_bench_students_only(run_folder):
    result = CliRunner().invoke(
        cli,
        [
            "bench", "--run", str(run_folder), "--runs", "2", "--warmup",
            "0", "--ensemble-modes", "none",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((run_folder / "bench" / "bench.json").read_text())
    assert {s["kind"] for s in report["systems"]} == {"student"}
    assert all(t["met"] is None for t in report["targets"])


def test_kc_bench_missing_exports(tmp_path):
    result = CliRunner().invoke(cli, ["bench", "--run", str(tmp_path)])
    assert result.exit_code == 2
    assert "kc tflite --run" in result.output


def test_kc_bench_missing_specialist(run_folder):
    (run_folder / "tflite" / "specialist_0_ptq-int8.tflite").unlink()
    result = CliRunner().invoke(
        cli, ["bench", "--run", str(run_folder), "--quick"]
    )
    assert result.exit_code == 2
    assert "ensemble incomplete" in result.output
    assert not (run_folder / "bench" / "bench.json").exists()
