"""Tests of the benchmark's pure parts: statistics, targets, log parsing.

None of these needs TensorFlow or a TFLite model.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mobile_demo import benchmark
from mobile_demo.benchmark import TFLiteError

REPO = Path(__file__).resolve().parents[1]
SAMPLE_LOG = REPO / "mobile_demo" / "testdata" / "benchmark_model_pixel6a.log"
ANDROID_SCRIPT = REPO / "mobile_demo" / "android_benchmark.sh"


# ---------------------------------------------------------------------------
# Statistics


def test_latency_stats_fixed_timings():
    # 1, 2, 3, 4 and 100 ms: one outlier, so mean and median differ.
    stats = benchmark.latency_stats([0.001, 0.002, 0.003, 0.004, 0.100])
    assert stats["count"] == 5
    assert stats["median"] == pytest.approx(3.0)
    assert stats["min"] == pytest.approx(1.0)
    assert stats["max"] == pytest.approx(100.0)
    assert stats["mean"] == pytest.approx(22.0)
    # Population std: sqrt((21^2 + 20^2 + 19^2 + 18^2 + 78^2) / 5).
    assert stats["std"] == pytest.approx(math.sqrt(7610 / 5))
    # Linear interpolation: rank 0.9 * 4 = 3.6 between 4 and 100 ms.
    assert stats["p90"] == pytest.approx(4.0 + 0.6 * 96.0)
    assert stats["p99"] == pytest.approx(4.0 + 0.96 * 96.0)


def test_latency_stats_single_timing():
    stats = benchmark.latency_stats([0.0025])
    assert stats["count"] == 1
    for key in ("median", "p90", "p99", "min", "max", "mean"):
        assert stats[key] == pytest.approx(2.5), key
    assert stats["std"] == 0.0


def test_latency_stats_empty_raises():
    with pytest.raises(TFLiteError, match="--runs"):
        benchmark.latency_stats([])


SCORES = np.array(
    [
        [0.1, 0.7, 0.2, 0.0],  # label 1: top-1 hit
        [0.5, 0.1, 0.3, 0.1],  # label 2: second place, top-2 hit
        [0.4, 0.3, 0.2, 0.1],  # label 3: last place, top-4 only
        [0.0, 0.1, 0.2, 0.7],  # label 3: top-1 hit
    ]
)
LABELS = np.array([1, 2, 3, 3])


@pytest.mark.parametrize(
    ("k", "expected"),
    [(1, 0.5), (2, 0.75), (3, 0.75), (4, 1.0), (5, 1.0)],
    ids=["top1", "top2", "top3", "top4", "k-above-classes"],
)
def test_top_k_accuracy(k, expected):
    assert benchmark.top_k_accuracy(SCORES, LABELS, k) == expected


def test_per_vertical_top1_counts_each_vertical():
    # Classes 0, 1 in vertical "a"; 2, 3 in "b"; "c" has no test image.
    result = benchmark.per_vertical_top1(
        SCORES, LABELS, [0, 0, 1, 1], ["a", "b", "c"]
    )
    assert result["a"] == 1.0
    assert result["b"] == pytest.approx(1 / 3)
    assert result["c"] is None


def test_thread_counts_always_include_one_and_two():
    assert benchmark.thread_counts([4]) == (1, 2, 4)
    assert benchmark.thread_counts([2, 1]) == (1, 2)


def test_thread_counts_reject_zero():
    with pytest.raises(TFLiteError, match="invalid thread count 0"):
        benchmark.thread_counts([0])


class _FixedOutputModel:
    """A stand-in for TFLiteModel that returns fixed outputs."""

    def __init__(self, outputs, kind):
        self.outputs = np.array(outputs, np.float32)
        self.metadata = {"output": {"kind": kind}}

    def predict(self, images):
        return self.outputs


def test_probabilities_softmax_for_logits():
    model = _FixedOutputModel([[0.0, np.log(3.0)]], "logits")
    probabilities = benchmark.LoadedSystem.probabilities(model, None)
    np.testing.assert_allclose(probabilities, [[0.25, 0.75]], rtol=1e-6)


def test_probabilities_kept_for_probability_outputs():
    model = _FixedOutputModel([[0.2, 0.8]], "probabilities")
    probabilities = benchmark.LoadedSystem.probabilities(model, None)
    np.testing.assert_array_equal(probabilities, model.outputs)


def test_load_test_set_limit_keeps_every_class(tmp_path):
    # Sorted by class, as exported: the first 8 rows hold only class 0.
    labels = np.repeat(np.arange(4), 10).astype(np.int32)
    images = np.zeros((40, 2, 2, 1), np.uint8)
    np.savez(tmp_path / "test.npz", images=images, labels=labels)
    _, kept = benchmark.load_test_set(tmp_path / "test.npz", limit=8)
    assert len(kept) == 8
    assert set(kept.tolist()) == {0, 1, 2, 3}


def test_invalid_limit_rejected(tmp_path, capsys):
    code = benchmark.main(
        ["--models", str(tmp_path), "--out", str(tmp_path), "--limit", "0"]
    )
    assert code == 2
    assert "invalid --limit 0" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# Targets


def _system(kind, mode, top1, medians):
    return {
        "name": f"{kind} ({mode})",
        "kind": kind,
        "mode": mode,
        "models": [],
        "model_bytes": 1,
        "accuracy": {"top1": top1},
        "threads": [
            {"threads_requested": t, "latency_ms": {"median": m}}
            for t, m in medians.items()
        ],
    }


def _report(student_ms, student_top1=0.8):
    return {
        "settings": {"threads": [1], "latency_statistic": "median"},
        "taxonomy": {"verticals": ["a", "b"]},  # M = 2 specialists
        "systems": [
            _system("student", "float32", 0.9, {1: 0.1}),
            _system("student", "qat-int8", student_top1, {1: student_ms}),
            _system("routed", "ptq-int8", 0.7, {1: 2.0}),
            _system("full", "ptq-int8", 0.75, {1: 3.0}),
        ],
    }


@pytest.mark.parametrize(
    ("student_ms", "expected"),
    [(1.0, [True, True]), (1.22, [True, False]), (1.3, [False, False])],
    ids=["both-met", "routed-missed", "both-missed"],
)
def test_targets_latency_limits(student_ms, expected):
    targets = benchmark.evaluate_targets(_report(student_ms))
    full, routed = targets[0], targets[1]
    # Full: 3.0 / (0.8 * (2 + 1)) = 1.25 ms. Routed: 0.6 * 2.0 = 1.2 ms.
    assert full["limit"] == pytest.approx(1.25)
    assert routed["limit"] == pytest.approx(1.2)
    assert [full["met"], routed["met"]] == expected
    assert full["student"] == "student (qat-int8)"


@pytest.mark.parametrize(
    ("top1", "met"), [(0.7, True), (0.69, False)], ids=["equal", "below"]
)
def test_targets_top1_against_routed(top1, met):
    targets = benchmark.evaluate_targets(_report(1.0, student_top1=top1))
    assert targets[-1]["met"] is met


def test_targets_without_int8_student_not_measured():
    report = _report(1.0)
    report["systems"] = [
        s for s in report["systems"] if s["mode"] != "qat-int8"
    ]
    targets = benchmark.evaluate_targets(report)
    assert all(t["met"] is None for t in targets)
    markdown_lines = benchmark._render_targets(report | {"targets": targets})
    assert any("no int8 student export" in line for line in markdown_lines)


# ---------------------------------------------------------------------------
# benchmark_model log parser


def test_parse_sample_log_runs():
    runs, device = benchmark.parse_benchmark_model_log(SAMPLE_LOG.read_text())
    assert len(runs) == 12
    assert device["model"] == "Pixel 6a"
    assert device["cores"] == "8"
    first = runs[0]
    assert first["graph"] == "/data/local/tmp/kc_bench/student_qat-int8.tflite"
    assert first["num_threads"] == 1
    assert first["model_size_mb"] == 0.318
    # "Inference timings in us: Init: 5912, First inference: 1085, ..."
    assert first["init_ms"] == pytest.approx(5.912)
    assert first["first_inference_ms"] == pytest.approx(1.085)
    assert first["inference_avg_ms"] == pytest.approx(0.402593)
    # "count=2487 first=410 curr=403 min=338 max=886 avg=402.593 std=28
    # p5=355 median=403 p95=442"
    assert first["inference"]["count"] == 2487
    assert first["inference"]["median"] == pytest.approx(0.403)
    assert first["inference"]["p95"] == pytest.approx(0.442)
    assert first["inference"]["std"] == pytest.approx(0.028)
    assert first["warmup"]["count"] == 1243
    assert first["memory_overall_mb"] == pytest.approx(2.3878)
    assert first["peak_memory_mb"] == pytest.approx(9.0178)


def test_parse_log_without_percentiles():
    # Some benchmark_model builds print no p5, median or p95.
    runs, _ = benchmark.parse_benchmark_model_log(SAMPLE_LOG.read_text())
    float_runs = [r for r in runs if r["graph"].endswith("float32.tflite")]
    assert len(float_runs) == 2
    assert "median" not in float_runs[0]["inference"]
    assert float_runs[0]["inference"]["mean"] > 0


def test_parse_log_single_warmup_run():
    text = (
        "INFO: STARTING!\nINFO: Num threads: [4]\n"
        "INFO: Graph: [/data/local/tmp/m.tflite]\n"
        "INFO: count=1 curr=1041765\n\n"
        "INFO: count=50 first=977738 curr=964908 min=911877 max=1112273 "
        "avg=971535 std=39112\n\n"
        "INFO: Inference timings in us: Init: 6418, First inference: "
        "1041765, Warmup (avg): 1.04176e+06, Inference (avg): 971535\n"
    )
    runs, device = benchmark.parse_benchmark_model_log(text)
    assert device == {}
    assert runs[0]["warmup"]["mean"] == pytest.approx(1041.765)
    assert runs[0]["warmup_avg_ms"] == pytest.approx(1041.76)
    assert runs[0]["inference"]["mean"] == pytest.approx(971.535)
    assert "peak_memory_mb" not in runs[0]


def test_parse_log_skips_incomplete_run():
    cut = "INFO: STARTING!\nINFO: Graph: [/x/broken.tflite]\nSegmentation\n"
    runs, _ = benchmark.parse_benchmark_model_log(SAMPLE_LOG.read_text() + cut)
    assert len(runs) == 12
    assert all("broken" not in run["graph"] for run in runs)


def test_parse_log_without_runs_raises():
    with pytest.raises(TFLiteError, match="no complete benchmark_model run"):
        benchmark.parse_benchmark_model_log("adb: device offline\n")


def test_benchmark_model_report_estimates_ensembles():
    report = benchmark.benchmark_model_report(SAMPLE_LOG.read_text())
    systems = {s["name"]: s for s in report["systems"]}
    generalist = systems["generalist (ptq-int8)"]
    specialists = [systems[f"specialist {k} (ptq-int8)"] for k in range(3)]
    full = systems["full ensemble (ptq-int8, estimated)"]
    routed = systems["routed ensemble (ptq-int8, estimated)"]
    for index, threads in enumerate((1, 2)):
        parts = [generalist["threads"][index]["latency_ms"]["mean"]] + [
            s["threads"][index]["latency_ms"]["mean"] for s in specialists
        ]
        assert full["threads"][index]["threads_requested"] == threads
        assert full["threads"][index]["latency_ms"]["mean"] == pytest.approx(
            sum(parts)
        )
        assert routed["threads"][index]["latency_ms"]["mean"] == (
            pytest.approx(parts[0] + sum(parts[1:]) / 3)
        )
    assert full["model_bytes"] == generalist["model_bytes"] + sum(
        s["model_bytes"] for s in specialists
    )
    assert report["taxonomy"]["verticals"] == [
        "vertical 0",
        "vertical 1",
        "vertical 2",
    ]
    assert report["settings"]["threads"] == [1, 2]
    assert report["settings"]["latency_statistic"] == "mean"
    # Four latency targets (two per thread count) plus top-1, which
    # benchmark_model cannot measure.
    assert [t["met"] is not None for t in report["targets"]] == [
        True,
        True,
        True,
        True,
        False,
    ]


def test_parse_benchmark_model_cli_writes_reports(tmp_path):
    code = benchmark.main(
        [
            "--parse-benchmark-model",
            str(SAMPLE_LOG),
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["source"] == "benchmark_model"
    assert report["machine"]["cpu"] == "Pixel 6a"
    markdown = (tmp_path / "bench.md").read_text()
    assert "student (qat-int8)" in markdown
    assert "## Targets" in markdown


def test_parse_benchmark_model_missing_log(tmp_path, capsys):
    missing = tmp_path / "none.log"
    code = benchmark.main(
        ["--parse-benchmark-model", str(missing), "--out", str(tmp_path)]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert str(missing) in err
    assert "android_benchmark.sh" in err


# ---------------------------------------------------------------------------
# android_benchmark.sh against a fake adb

FAKE_ADB = r"""#!/usr/bin/env bash
# Stand-in for adb: records each call and prints benchmark_model output.
echo "$*" >> "$FAKE_ADB_CALLS"
case "$1" in
  get-state) echo device ;;
  shell)
    case "$2" in
      getprop) echo "Fake $3" ;;
      nproc) echo 4 ;;
      */benchmark_model)
        for arg in "$@"; do
          case "$arg" in
            --graph=*) graph="${arg#--graph=}" ;;
            --num_threads=*) threads="${arg#--num_threads=}" ;;
          esac
        done
        echo "INFO: STARTING!"
        echo "INFO: Num threads: [$threads]"
        echo "INFO: Graph: [$graph]"
        echo "INFO: The input model file size (MB): 0.5"
        us=$((400 / threads))
        echo "INFO: count=10 first=900 curr=400 min=390 max=900 avg=450" \
          "std=20"
        echo "INFO: count=50 first=410 curr=400 min=380 max=700 avg=$us" \
          "std=15"
        echo "INFO: Inference timings in us: Init: 3000, First inference:" \
          "900, Warmup (avg): 450, Inference (avg): $us"
        ;;
    esac
    ;;
esac
"""


def test_android_script_with_fake_adb(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    adb = bin_dir / "adb"
    adb.write_text(FAKE_ADB)
    adb.chmod(0o755)
    binary = tmp_path / "benchmark_model"
    binary.write_bytes(b"\x7fELF")
    models = tmp_path / "tflite"
    models.mkdir()
    for name in ("student_qat-int8", "generalist_ptq-int8"):
        (models / f"{name}.tflite").write_bytes(b"model")
    out = tmp_path / "bench"
    calls = tmp_path / "calls.txt"
    env = dict(
        os.environ,
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        FAKE_ADB_CALLS=str(calls),
    )
    completed = subprocess.run(
        [
            "bash",
            str(ANDROID_SCRIPT),
            "--binary",
            str(binary),
            "--models",
            str(models),
            "--out",
            str(out),
            "--threads",
            "1 4",
            "--python",
            sys.executable,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert completed.returncode == 0, completed.stderr
    recorded = calls.read_text()
    assert "push" in recorded
    assert "student_qat-int8.tflite" in recorded
    assert "--num_threads=4" in recorded
    assert "shell rm -rf /data/local/tmp/kc_bench" in recorded
    report = json.loads((out / "bench.json").read_text())
    names = [s["name"] for s in report["systems"]]
    assert names == ["student (qat-int8)", "generalist (ptq-int8)"]
    assert report["settings"]["threads"] == [1, 4]
    student = report["systems"][0]["threads"]
    assert student[1]["latency_ms"]["mean"] == pytest.approx(0.1)
    assert report["machine"]["cpu"] == "Fake ro.product.model"
    assert (out / "benchmark_model.log").is_file()


def test_android_script_without_device(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    adb = bin_dir / "adb"
    adb.write_text("#!/usr/bin/env bash\necho unknown\nexit 1\n")
    adb.chmod(0o755)
    binary = tmp_path / "benchmark_model"
    binary.write_bytes(b"\x7fELF")
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    completed = subprocess.run(
        ["bash", str(ANDROID_SCRIPT), "--binary", str(binary), "--models",
         str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )  # fmt: skip
    assert completed.returncode == 2
    assert "no Android device ready" in completed.stderr
