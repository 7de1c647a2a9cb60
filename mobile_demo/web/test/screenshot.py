"""Screenshot the web demo classifying a test image of a real export.

    .venv/bin/python mobile_demo/web/test/screenshot.py runs/trio-30 \\
        docs/images/web_demo_trio30.png

Builds the page around RUN/tflite/student_qat-int8.tflite in a temporary
folder, serves it from 127.0.0.1, drives Chromium with drive.mjs on the
first test images of RUN/tflite/test.npz, writes the screenshot, and
prints the page's top-1 agreement with Python LiteRT as JSON.
"""

import argparse
import functools
import http.server
import json
import logging
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
from PIL import Image

WEB = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(WEB.parents[1]))

from mobile_demo.benchmark import TFLiteModel  # noqa: E402

logger = logging.getLogger(__name__)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


def build(model, dist):
    subprocess.run(
        [
            "node",
            "build.mjs",
            "--model",
            str(Path(model).resolve()),
            "--out",
            str(Path(dist).resolve()),
        ],
        cwd=WEB,
        check=True,
    )


def drive(dist, config):
    handler = functools.partial(_QuietHandler, directory=str(dist))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    config = dict(config, baseUrl=f"http://127.0.0.1:{server.server_port}/")
    config_path = dist.parent / "config.json"
    config_path.write_text(json.dumps(config))
    try:
        result = subprocess.run(
            ["node", "test/drive.mjs", str(config_path)],
            cwd=WEB,
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        )
    finally:
        server.shutdown()
        server.server_close()
    return json.loads(result.stdout)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="run folder with tflite/")
    parser.add_argument("screenshot", type=Path, help="PNG file to write")
    parser.add_argument(
        "--images", type=int, default=64, help="test images to compare"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)

    model_path = args.run / "tflite" / "student_qat-int8.tflite"
    test_set = np.load(args.run / "tflite" / "test.npz")
    images = test_set["images"][: args.images]
    labels = test_set["labels"][: args.images]
    python_top1 = TFLiteModel(model_path).predict(images).argmax(axis=1)
    # Show an image that the model classifies correctly, when there is one.
    correct = np.flatnonzero(python_top1 == labels)
    shown = int(correct[0]) if correct.size else 0

    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        build(model_path, work / "dist")
        Image.fromarray(images[shown][:, :, 0]).save(work / "photo.png")
        (work / "notes.txt").write_text("not an image\n")
        report = drive(
            work / "dist",
            {
                "images": images.reshape(len(images), -1).tolist(),
                "photo": str(work / "photo.png"),
                "notImage": str(work / "notes.txt"),
                "badModels": [],
                "screenshot": str(args.screenshot.resolve()),
                "badScreenshot": None,
            },
        )

    browser_top1 = np.array([result["top5"][0] for result in report["results"]])
    summary = {
        "model": str(model_path),
        "images": len(images),
        "top1_agreement_with_python": float(
            np.mean(browser_top1 == python_top1)
        ),
        "browser_top1_accuracy": float(np.mean(browser_top1 == labels)),
        "requests_blocked": report["blocked"],
        "shown_image": shown,
        "shown_top5": report["photoTop5"],
        "benchmark": report["benchmarkText"],
    }
    json.dump(summary, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
