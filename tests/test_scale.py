"""Tests of the scale benchmark (benchmarks/scale.py).

The end-to-end test runs the quick variant (N = 1,000, tiny models) through
the same child process, stages and report writers as `make bench-scale`,
then checks the files and their fields. The other tests cover the pure
helpers on fixed inputs.
"""

import json
import os

import numpy as np
import pytest

from benchmarks import scale
from kc_keras.errors import KCError


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("scale_out")
    work = tmp_path_factory.mktemp("scale_work")
    config = scale.ScaleConfig.quick()
    report = scale.run_scale(config, out, work, quick=True)
    return config, out, work, report


@pytest.mark.slow
def test_quick_run_writes_reports(quick_report):
    _, out, _, report = quick_report
    for name in ("scale.json", "scale.md", "scale.png"):
        assert (out / name).is_file(), name
    assert (out / "scale.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stored = json.loads((out / "scale.json").read_text())
    assert stored["quick"] is True
    assert [r["num_classes"] for r in stored["results"]] == [1000]
    assert stored["wall_s"] > 0
    assert set(stored["summary"]) == set(scale.METRICS)
    assert stored == json.loads(json.dumps(report))
    markdown = (out / "scale.md").read_text()
    assert "| N=1,000 |" in markdown
    assert "student parameters" in markdown


@pytest.mark.slow
def test_quick_run_measures_every_stage(quick_report):
    config, _, _, report = quick_report
    result = report["results"][0]
    assert result["num_verticals"] == config.num_verticals
    assert result["images"]["test"] == config.eval_images
    expected_stages = {
        "data",
        "teachers",
        "cache_write",
        "cache_read",
        "distill_cached",
        "distill_online",
    } | {
        f"convert_{scale._export_name(mode, logits)}"
        for mode, logits in config.exports
    }
    assert set(result["stages"]) == expected_stages
    for name, stage in result["stages"].items():
        assert stage["seconds"] >= 0, name
        assert stage["peak_mib"] >= stage["start_mib"] > 0, name
    # The QAT conversion runs in a grandchild; its peak comes from
    # RUSAGE_CHILDREN.
    assert result["stages"]["convert_student_qat-int8"]["child_peak_mib"] > 0
    assert result["step_seconds"]["cached"] > 0
    assert result["step_seconds"]["online"] > 0
    assert result["parameters"]["head"] > 0
    assert 0.0 <= result["diagnostics"]["l2_rounding_top1"] <= 1.0
    assert result["diagnostics"]["keras_top1_margin_median"] >= 0.0
    assert result["parameters"]["total"] > result["parameters"]["head"]


@pytest.mark.slow
def test_quick_run_cache_and_exports(quick_report):
    config, _, _, report = quick_report
    result = report["results"][0]
    cache = result["cache"]
    # 1,000 classes fit int16 indices; the generalist keeps its top 100.
    assert cache["index_dtype"] == "int16"
    assert cache["top_k"]["generalist"] == 100
    assert cache["bytes_per_image"] > 0
    names = {scale._export_name(m, lg) for m, lg in config.exports}
    assert set(result["exports"]) == names
    for name, entry in result["exports"].items():
        assert entry["size_bytes"] > entry["model_bytes"] > 0, name
        agreement = entry["agreement"]
        for key in ("top1", "top5", "top5_overlap"):
            assert 0.0 <= agreement[key] <= 1.0, (name, key)
        # Only quantized outputs have a step to measure margins against.
        quantized = entry["output_quantization"]["dtype"] == "int8"
        assert ("clear_fraction" in agreement) == quantized, name
        assert agreement["top5"] >= agreement["top1"], name
        assert entry["latency_ms"]["count"] == config.latency_runs, name
        weights = entry["weights"]
        assert weights["per_channel"] + weights["per_tensor"] > 0, name
    logits = result["exports"]["student_ptq-int8_logits"]
    assert logits["output"] == "logits"
    assert logits["output_quantization"]["dtype"] == "int8"


@pytest.mark.slow
def test_rerun_reuses_finished_sizes(quick_report):
    config, out, work, report = quick_report
    path = scale.size_path(out, 1000)
    before = os.stat(path).st_mtime_ns
    again = scale.run_scale(config, out, work, quick=True)
    assert os.stat(path).st_mtime_ns == before
    assert again["results"] == report["results"]


def test_changed_settings_invalidate_result(tmp_path):
    config = scale.ScaleConfig.quick()
    path = scale.size_path(tmp_path, 1000)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"key": config.measurement_key()}))
    assert scale.load_finished(tmp_path, config, 1000) is not None
    other = scale.ScaleConfig.quick(cached_steps=7)
    assert scale.load_finished(tmp_path, other, 1000) is None
    assert scale.load_finished(tmp_path, config, 2000) is None


@pytest.mark.parametrize(
    ("exponent", "growth"),
    [
        (0.0, "about constant"),
        (0.5, "sublinear"),
        (1.0, "linear"),
        (2.0, "superlinear"),
    ],
    ids=["constant", "sublinear", "linear", "quadratic"],
)
def test_log_log_slope_and_growth(exponent, growth):
    sizes = [1000, 10000, 100000]
    values = [3.0 * n**exponent for n in sizes]
    slope = scale.log_log_slope(sizes, values)
    assert slope == pytest.approx(exponent, abs=1e-9)
    assert scale.growth(slope) == growth


def test_slope_needs_two_positive_values():
    assert scale.log_log_slope([1000, 10000], [5.0, None]) is None
    assert scale.log_log_slope([1000, 10000], [5.0, 0.0]) is None
    assert scale.growth(None) == "n/a"


def test_agreement_counts_ties_and_top5():
    reference = np.array(
        [[0.0, 3.0, 1.0, 0.5, 0.2], [2.0, 0.0, 0.0, 0.0, 1.0]], np.float32
    )
    # Row 0: a tie at the maximum, broken towards index 0, misses the
    # Keras top-1 (class 1); row 1: all outputs equal. With 5 classes the
    # top 5 contains every class.
    outputs = np.array([[4.0, 4.0, 1.0, 0.0, 0.0], [0.0] * 5], np.float32)
    result = scale.agreement(reference, outputs, np.array([1, 4]))
    assert result["top1"] == 0.5
    assert result["top5"] == 1.0
    assert result["mean_max_ties"] == 3.5
    assert result["all_equal_fraction"] == 0.5
    assert result["keras_top1_accuracy"] == 0.5
    assert result["export_top1_accuracy"] == 0.0
    assert "top1_clear" not in result


def test_agreement_on_clear_margins():
    reference = np.array([[0.0, 1.0, 0.9], [3.0, 0.0, 0.0]], np.float32)
    # Row 0 leads by 0.1 logits, under 2 steps of 0.1, and disagrees;
    # row 1 leads clearly and agrees.
    outputs = np.array([[0.0, 0.9, 1.0], [2.9, 0.0, 0.1]], np.float32)
    result = scale.agreement(reference, outputs, np.array([1, 0]), step=0.1)
    assert result["top1"] == 0.5
    assert result["clear_fraction"] == 0.5
    assert result["top1_clear"] == 1.0


def test_agreement_margins_of_softmax_export():
    reference = np.array([[0.0, 5.0, 0.0]], np.float32)
    outputs = np.array([[0.0, 0.98, 0.0]], np.float32)
    # Softmax probabilities lead by about 0.99 - 0.007, far over 2 steps.
    result = scale.agreement(
        reference, outputs, np.array([1]), step=1 / 256, softmax=True
    )
    assert result["clear_fraction"] == 1.0
    assert result["top1_clear"] == 1.0
    logits = scale.agreement(reference, outputs, np.array([1]), step=3.0)
    assert logits["clear_fraction"] == 0.0
    assert logits["top1_clear"] is None


@pytest.mark.parametrize(
    "overrides",
    [
        {"sizes": ()},
        {"sizes": (30,)},
        {"batch_size": 0},
        {"exports": (("float16", False),)},
    ],
    ids=["no-sizes", "too-few-classes", "zero-batch", "bad-export-mode"],
)
def test_config_rejects_invalid_settings(overrides):
    with pytest.raises(KCError):
        scale.ScaleConfig(**overrides)


def test_config_round_trips_through_json():
    config = scale.ScaleConfig.quick()
    data = json.loads(json.dumps(config.to_dict()))
    assert scale.ScaleConfig.from_dict(data) == config


def test_cli_reports_invalid_sizes(capsys):
    code = scale.main(["--sizes", "30", "--verticals", "20", "--out", "x"])
    assert code == 2
    assert "N=30 classes is too small" in capsys.readouterr().err


def _self_paced_model(width):
    import keras

    from kc_keras.models.layers import SelfPacedScale

    inputs = keras.Input((width,))
    logits = keras.layers.Dense(
        width, use_bias=False, kernel_initializer="identity", name="head_v0"
    )(inputs)
    outputs = SelfPacedScale(gamma_init=1.0, name="head_v0_self_paced")(logits)
    return keras.Model(inputs, outputs)


def test_l2_rounding_flips_near_ties():
    model = _self_paced_model(3)
    # Row 0: classes 0 and 1 differ by 0.001 and round to the same 1/128
    # step, so the rounded argmax falls on class 0; row 1 stays clear.
    images = np.array([[1.0, 1.001, 0.2], [1.0, 0.5, 0.0]], np.float32)
    assert scale.l2_rounding_agreement(model, images) == 0.5


def test_l2_rounding_without_self_paced_layer():
    import keras

    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(3)(inputs))
    images = np.zeros((2, 3), np.float32)
    assert scale.l2_rounding_agreement(model, images) is None
