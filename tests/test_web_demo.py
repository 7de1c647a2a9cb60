"""The LiteRT.js web demo in headless Chromium, against Python LiteRT.

One module fixture builds the page around a tiny int8 student, serves it
from 127.0.0.1 on a free port and runs mobile_demo/web/test/drive.mjs,
which drives Debian's Chromium through playwright-core and reports what
the page did. The tests check that report.

Set KC_WEB_SCREENSHOT_DIR to keep the screenshots (docs/images contains
the committed ones).
"""

import functools
import http.server
import json
import os
import re
import shutil
import subprocess
import threading
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
import tiny_student_tflite as tiny
from PIL import Image

from mobile_demo.benchmark import TFLiteModel

WEB = Path(__file__).resolve().parents[1] / "mobile_demo" / "web"
CHROMIUM = os.environ.get("KC_CHROMIUM", "/usr/bin/chromium")
NUM_IMAGES = 16

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        shutil.which("node") is None, reason="Node.js is not installed"
    ),
    pytest.mark.skipif(
        not Path(CHROMIUM).exists(),
        reason=f"Chromium not found at {CHROMIUM} (set KC_CHROMIUM)",
    ),
]


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True


class _LoggingHandler(http.server.SimpleHTTPRequestHandler):
    """Serves the build folder and records every request."""

    def __init__(self, *args, log, **kwargs):
        self.request_log = log
        super().__init__(*args, **kwargs)

    def do_GET(self):
        self.request_log.append((self.client_address[0], self.path))
        super().do_GET()

    def log_message(self, format, *args):
        pass


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tiny.write_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def images():
    pixels, _ = tiny.make_images(NUM_IMAGES, seed=3)
    return pixels


def run_build(model, out):
    if not (WEB / "node_modules" / "@litertjs" / "core").is_dir():
        pytest.fail(
            f"{WEB}/node_modules is missing; run `make web-deps` (npm ci)"
        )
    return subprocess.run(
        ["node", "build.mjs", "--model", str(model), "--out", str(out)],
        cwd=WEB,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
def report(models, images, tmp_path_factory):
    """Build, serve and drive the demo once; return the driver's report."""
    work = tmp_path_factory.mktemp("web")
    dist = work / "dist"
    build = run_build(models["student"], dist)
    assert build.returncode == 0, build.stderr
    for name in ("no_metadata", "bad_labels"):
        shutil.copy(models[name], dist / models[name].name)
    photo = work / "photo.png"
    Image.fromarray(images[0][:, :, 0]).save(photo)
    not_image = work / "notes.txt"
    not_image.write_text("not an image\n")
    screenshots = Path(os.environ.get("KC_WEB_SCREENSHOT_DIR", work)).resolve()
    screenshots.mkdir(parents=True, exist_ok=True)

    server_log = []
    handler = functools.partial(
        _LoggingHandler, directory=str(dist), log=server_log
    )
    server = _Server(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    port = server.server_address[1]
    config = {
        "baseUrl": f"http://127.0.0.1:{port}/",
        "images": images.reshape(len(images), -1).tolist(),
        "photo": str(photo),
        "notImage": str(not_image),
        "badModels": [models["no_metadata"].name, models["bad_labels"].name],
        "screenshot": str(screenshots / "web_demo_tiny.png"),
        "badScreenshot": str(screenshots / "web_demo_no_metadata.png"),
    }
    config_path = work / "config.json"
    config_path.write_text(json.dumps(config))
    try:
        driver = subprocess.run(
            ["node", "test/drive.mjs", str(config_path)],
            cwd=WEB,
            capture_output=True,
            text=True,
            timeout=120,
            env=dict(os.environ, KC_CHROMIUM=CHROMIUM),
        )
    finally:
        server.shutdown()
        server.server_close()
    assert driver.returncode == 0, driver.stderr[-3000:]
    result = json.loads(driver.stdout)
    result["port"] = port
    result["serverLog"] = server_log
    return result


@pytest.fixture(scope="module")
def python_outputs(models, images):
    """Raw int8 outputs of Python LiteRT for each test image."""
    model = TFLiteModel(models["student"])
    tensors = model.quantize_input(images)
    return np.stack(
        [model.invoke(tensors[i : i + 1])[0] for i in range(len(tensors))]
    ).astype(np.int32)


def test_page_loads_model_metadata(report):
    assert report["loadError"] is None
    assert report["metadata"]["labels"] == list(tiny.CLASS_NAMES)
    assert report["metadata"]["taxonomy"]["verticals"] == list(
        tiny.VERTICAL_NAMES
    )


def test_top1_matches_python_litert(report, python_outputs):
    browser_top1 = [result["top5"][0] for result in report["results"]]
    python_top1 = np.argmax(python_outputs, axis=1).tolist()
    assert browser_top1 == python_top1


def test_outputs_match_python_litert(report, python_outputs):
    browser_raw = np.array([result["raw"] for result in report["results"]])
    assert browser_raw.shape == python_outputs.shape
    # Both runtimes run XNNPack's int8 kernels; allow one quantization step
    # for a different rounding path in WebAssembly SIMD.
    assert np.max(np.abs(browser_raw - python_outputs)) <= 1


def test_top5_labels_come_from_metadata(report):
    for result in report["results"]:
        expected = [tiny.CLASS_NAMES[i] for i in result["top5"]]
        assert result["top5Labels"] == expected
        assert len(set(result["top5"])) == 5


def test_picked_photo_matches_pixels(report):
    assert report["photoError"] is None
    assert report["photoTop5"] == report["results"][0]["top5Labels"]


def test_requests_stay_on_loopback(report):
    assert report["requests"], "the driver recorded no requests"
    assert report["blocked"] == []
    for url in report["requests"]:
        parts = urlsplit(url)
        assert parts.hostname == "127.0.0.1", url
        assert parts.port == report["port"], url
    paths = {path.split("?")[0] for _, path in report["serverLog"]}
    assert "/model.tflite" in paths
    assert "/wasm/litert_wasm_internal.wasm" in paths
    assert {client for client, _ in report["serverLog"]} == {"127.0.0.1"}


@pytest.mark.parametrize(
    "model_name, expected",
    [
        ("no_metadata.tflite", 'no "kc_keras" metadata'),
        ("bad_labels.tflite", "5 labels but the model has 6 outputs"),
    ],
    ids=["no-metadata", "label-count"],
)
def test_bad_model_shows_message(report, model_name, expected):
    entry = report["badModels"][model_name]
    assert expected in entry["loadError"]
    assert entry["shownError"].startswith(model_name)
    assert expected in entry["shownError"]


def test_out_of_range_pixels_rejected(report):
    assert report["invalidPixelsError"] is not None
    assert "Pixel 3 is 256" in report["invalidPixelsError"]


def test_non_image_file_shows_message(report):
    assert "notes.txt" in report["notImageError"]
    assert "is not an image" in report["notImageError"]


def test_camera_denied_shows_message(report):
    assert "Camera permission was denied" in report["cameraError"]


def test_works_offline(report):
    assert report["offlineLoadError"] is None
    assert report["offlineResults"] == report["results"][:1]


def test_benchmark_reports_median(report):
    match = re.search(r"median ([0-9.]+) ms", report["benchmarkText"])
    assert match is not None, report["benchmarkText"]
    assert float(match.group(1)) > 0


@pytest.mark.parametrize(
    "model_key, expected",
    [
        ("no_metadata", 'no "kc_keras" metadata'),
        ("bad_labels", "5 labels but the model has 6 outputs"),
    ],
    ids=["no-metadata", "label-count"],
)
def test_build_rejects_bad_model(models, tmp_path, model_key, expected):
    result = run_build(models[model_key], tmp_path / "dist")
    assert result.returncode == 2
    assert expected in result.stderr
    assert not (tmp_path / "dist").exists()


def test_build_rejects_missing_model(tmp_path):
    result = run_build(tmp_path / "missing.tflite", tmp_path / "dist")
    assert result.returncode == 2
    assert "model file not found" in result.stderr
