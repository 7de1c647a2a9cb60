"""Tests of `kc distill` through click's CliRunner on a tiny run folder."""

import json
import shutil

import keras
import pytest
from click.testing import CliRunner
from distill_helpers import TINY_BACKBONE
from distill_helpers import tiny_dataset

from kc_keras.cli.main import cli
from kc_keras.models import teachers as teachers_lib


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """A run folder with tiny teachers trained for two steps each."""
    root = tmp_path_factory.mktemp("run")
    config = teachers_lib.TeacherConfig(
        backbone=TINY_BACKBONE,
        epochs=1,
        specialist_epochs=1,
        batch_size=32,
        steps_per_epoch=2,
    )
    teachers_lib.train_teachers(tiny_dataset(), root, config)
    return root


@pytest.fixture
def run_copy(run_folder, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(run_folder, target)
    return target


def _invoke(*args):
    return CliRunner().invoke(cli, ["distill", *map(str, args)])


def test_quick_distill_writes_student_and_metrics(run_copy):
    result = _invoke(
        "--run", run_copy, "--quick", "--cache-soft-targets", "--top-k", "2"
    )
    assert result.exit_code == 0, result.output
    assert "routed_ensemble" in result.output
    student = keras.saving.load_model(
        run_copy / "student" / "student.keras", safe_mode=True
    )
    assert student.output_shape == (None, 12)
    metrics = json.loads((run_copy / "student" / "metrics.json").read_text())
    assert set(metrics["test"]) == {"student", "generalist", "routed_ensemble"}
    report = metrics["test"]["student"]
    assert set(report["per_vertical"]) == {
        "vertical_0",
        "vertical_1",
        "vertical_2",
    }
    assert 0.0 <= report["top1"] <= report["top5"] <= 1.0
    assert metrics["step_time_s"]["distill"] > 0
    assert metrics["step_time_s"]["hard_label"] > 0
    assert metrics["parameters"]["head"] > 0
    assert metrics["loss_config"]["top_k"] == 2
    # Only the student is saved, and its backup is gone after saving.
    assert not (run_copy / "logs" / "backup" / "student").exists()
    index = json.loads((run_copy / "soft_targets" / "index.json").read_text())
    assert index["specialist_top_k"] == [2, 2, 2]
    assert index["num_images"] == 96


def _change_dataset(run):
    info = json.loads((run / "run.json").read_text())
    info["dataset"]["seed"] = 7
    (run / "run.json").write_text(json.dumps(info))


def _change_taxonomy(run):
    info = json.loads((run / "run.json").read_text())
    info["taxonomy"]["class_vertical"] = [0] * 6 + [1] * 6
    info["taxonomy"]["verticals"] = ["vertical_0", "vertical_1"]
    (run / "run.json").write_text(json.dumps(info))


def _remove_specialist(run):
    (run / "teachers" / "specialist_1.keras").unlink()


@pytest.mark.parametrize(
    "args,prepare,match",
    [
        (["--temperature", "0"], None, "temperature 0.0 is invalid"),
        (["--alpha", "1.5"], None, "alpha 1.5 is outside [0, 1]"),
        (["--top-k", "5"], None, "top-K 5 is larger than vertical"),
        (["--no-distill", "--keras-distiller"], None, "exclusive"),
        ([], _change_dataset, "trained on dataset"),
        ([], _change_taxonomy, "another taxonomy"),
        ([], _remove_specialist, "specialist_1.keras not found"),
    ],
    ids=[
        "temperature",
        "alpha",
        "top-k",
        "exclusive-modes",
        "other-dataset",
        "other-taxonomy",
        "missing-specialist",
    ],
)
def test_bad_input_exits_2(run_copy, args, prepare, match):
    if prepare is not None:
        prepare(run_copy)
    result = _invoke("--run", run_copy, "--quick", *args)
    assert result.exit_code == 2, result.output
    assert match in result.output
    assert "Traceback" not in result.output
    assert not (run_copy / "student" / "student.keras").exists()


def test_missing_run_folder_exits_2(tmp_path):
    result = _invoke("--run", tmp_path / "absent", "--quick")
    assert result.exit_code == 2
    assert "is not a run folder" in result.output


def test_seed_orders_the_training_images(run_copy, monkeypatch):
    from kc_keras.data.base import Dataset

    real_pipeline = Dataset.pipeline
    seeds = []

    def recording_pipeline(self, split, *args, **kwargs):
        if split == "train":
            seeds.append(self.seed)
        return real_pipeline(self, split, *args, **kwargs)

    monkeypatch.setattr(Dataset, "pipeline", recording_pipeline)
    result = _invoke("--run", run_copy, "--quick", "--seed", "7")
    assert result.exit_code == 0, result.output
    # The run's dataset keeps its own seed 0; the student's training and
    # the hard-label step timing shuffle with 7.
    assert seeds == [7, 7]
