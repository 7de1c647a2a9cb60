"""The Android app reads what the exporter writes.

Building the app needs the Android SDK and the LiteRT AAR, which CI does
not have. These tests therefore parse its Kotlin and Gradle sources for the
asset names it opens, the copy steps that put the export there and the
metadata keys it requires. They check each against the exporter's real
functions. When kotlinc and JUnit 4
are installed (Debian packages kotlin, junit4, libandroid-json-java), the
plain-JVM processing code and its unit tests also run against a golden.json
made by the exporter.
"""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import tiny_student_tflite as tiny

ROOT = Path(__file__).resolve().parents[1]
ANDROID = ROOT / "mobile_demo" / "android"
APP = ANDROID / "app"
KOTLIN_MAIN = APP / "src" / "main" / "java" / "com" / "kckeras" / "demo"
METADATA_KT = KOTLIN_MAIN / "processing" / "ModelMetadata.kt"
GRADLE_APP = APP / "build.gradle.kts"
MAKEFILE = ROOT / "Makefile"
JAVA_LIBS = Path("/usr/share/java")
JVM_JARS = (
    "junit4.jar",
    "hamcrest-core.jar",
    "com.android.json.jar",
    "kotlin-stdlib.jar",
)


def kotlin_asset_names():
    source = METADATA_KT.read_text()
    return dict(re.findall(r'const val (\w+_ASSET) = "([^"]+)"', source))


def kotlin_metadata_keys():
    source = METADATA_KT.read_text()
    required = re.findall(r'require\w+\(root, "([\w.]+)"\)', source)
    optional = re.findall(r'root\.opt\w+\("(\w+)"', source)
    return required, optional


def makefile_recipe(target):
    lines = MAKEFILE.read_text().splitlines()
    start = lines.index(f"{target}:")
    recipe = []
    for line in lines[start + 1 :]:
        if line and not line.startswith("\t"):
            break
        recipe.append(line)
    return "\n".join(recipe)


def lookup(metadata, path):
    node = metadata
    for part in path.split("."):
        assert isinstance(node, dict), f"{path}: {part} is not an object"
        assert part in node, f"{path}: key {part!r} missing"
        node = node[part]
    return node


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A tiny student exported with the exporter's metadata and sidecars."""
    from converters.metadata import build_metadata
    from converters.metadata import write_sidecars
    from converters.ops import io_details
    from kc_keras.data.base import Preprocessing
    from kc_keras.data.base import Taxonomy

    folder = tmp_path_factory.mktemp("export")
    plain = tiny.convert_int8(tiny.build_keras_model())
    taxonomy = Taxonomy(
        tiny.CLASS_NAMES, tiny.VERTICAL_NAMES, tiny.CLASS_VERTICAL
    )
    metadata = build_metadata(
        name="student_qat-int8",
        role="student",
        mode="qat-int8",
        taxonomy=taxonomy,
        preprocessing=Preprocessing(tiny.HEIGHT, tiny.WIDTH, tiny.CHANNELS),
        io=io_details(plain),
        output_classes=list(range(tiny.NUM_CLASSES)),
        output_kind="probabilities",
    )
    model_path = folder / "student_qat-int8.tflite"
    model_path.write_bytes(tiny.add_metadata(plain, metadata))
    write_sidecars(model_path, metadata)
    return {"folder": folder, "model": model_path, "metadata": metadata}


def test_kotlin_asset_names():
    assert kotlin_asset_names() == {
        "MODEL_ASSET": "model.tflite",
        "METADATA_ASSET": "model.json",
        "LABELS_ASSET": "labels.txt",
    }


def test_makefile_copies_export_to_assets():
    recipe = makefile_recipe("android-assets")
    copies = re.findall(r"^\tcp (\S+) (\S+)$", recipe, flags=re.MULTILINE)
    targets = {
        Path(target).name: Path(source).name for source, target in copies
    }
    assets = kotlin_asset_names()
    assert targets[assets["MODEL_ASSET"]] == "$(ANDROID_MODEL).tflite"
    assert targets[assets["METADATA_ASSET"]] == "$(ANDROID_MODEL).json"
    assert targets[assets["LABELS_ASSET"]] == "labels.txt"
    assert targets["golden.json"] == "golden.json"
    assert "ANDROID_MODEL ?= student_qat-int8" in MAKEFILE.read_text()


def test_gradle_copies_export_to_assets():
    source = GRADLE_APP.read_text()
    for name in kotlin_asset_names().values():
        assert f'"{name}"' in source, f"{name} is not produced by Gradle"
    assert '?: "student_qat-int8"' in source
    assert 'noCompress += "tflite"' in source
    assert "minSdk = 24" in source


def test_exporter_writes_copied_files(export):
    from converters.export import STUDENT_MODES

    folder = export["folder"]
    assert "qat-int8" in STUDENT_MODES
    assert (folder / "student_qat-int8.tflite").is_file()
    assert (folder / "student_qat-int8.json").is_file()
    assert (folder / "labels.txt").is_file()


def test_label_counts_agree(export):
    from mobile_demo.benchmark import TFLiteModel

    metadata = export["metadata"]
    lines = (export["folder"] / "labels.txt").read_text().splitlines()
    model = TFLiteModel(export["model"])
    # The app checks labels.txt against taxonomy.classes and the metadata
    # labels against the output size.
    assert lines == metadata["taxonomy"]["classes"]
    assert len(metadata["labels"]) == model.num_outputs
    assert len(metadata["output_classes"]) == model.num_outputs


def test_metadata_keys_exist(export):
    required, optional = kotlin_metadata_keys()
    assert len(required) >= 10, "the key parser found too few keys"
    sidecar = json.loads(
        (export["folder"] / "student_qat-int8.json").read_text()
    )
    for metadata in (export["metadata"], sidecar):
        for path in required:
            assert lookup(metadata, path) is not None, path
        for key in optional:
            assert key in metadata, key


def test_metadata_dtypes_supported(export):
    source = (KOTLIN_MAIN / "processing" / "Processing.kt").read_text()
    supported = set(re.findall(r'"(\w+)" -> (?:INT8|UINT8|FLOAT32)', source))
    assert export["metadata"]["input"]["dtype"] in supported
    assert export["metadata"]["output"]["dtype"] in supported


def kotlin_tools_missing():
    if shutil.which("kotlinc") is None:
        return "kotlinc not installed (Debian package kotlin)"
    for jar in JVM_JARS:
        if not (JAVA_LIBS / jar).exists():
            return f"{JAVA_LIBS / jar} not installed"
    return None


@pytest.mark.slow
@pytest.mark.skipif(
    kotlin_tools_missing() is not None,
    reason=str(kotlin_tools_missing()),
)
def test_kotlin_unit_tests_pass(export, tmp_path):
    from converters.pipeline import golden_entries

    images, labels = tiny.make_images(5, seed=3)
    golden = golden_entries(
        export["model"], images, labels, list(tiny.CLASS_NAMES), 5
    )
    resources = tmp_path / "resources"
    resources.mkdir()
    (resources / "golden.json").write_text(json.dumps(golden))
    assets = tmp_path / "assets"
    assets.mkdir()
    shutil.copy(export["model"], assets / "model.tflite")

    classes = tmp_path / "classes"
    sources = sorted((KOTLIN_MAIN / "processing").glob("*.kt"))
    sources += sorted((APP / "src" / "test").rglob("*.kt"))
    classpath = ":".join(str(JAVA_LIBS / jar) for jar in JVM_JARS)
    compiled = subprocess.run(
        ["kotlinc", "-cp", classpath, "-d", str(classes)]
        + [str(s) for s in sources],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert compiled.returncode == 0, compiled.stderr[-3000:]
    result = subprocess.run(
        [
            "java",
            f"-Dkc.assets={assets}",
            "-cp",
            f"{classes}:{resources}:{classpath}",
            "org.junit.runner.JUnitCore",
            "com.kckeras.demo.processing.ProcessingTest",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    assert re.search(r"OK \(\d+ tests\)", result.stdout), result.stdout
