"""Tests of chief election and of non-chief writes in distillation."""

import types

import pytest
import tensorflow as tf
from distill_helpers import TINY_BACKBONE
from distill_helpers import tiny_dataset
from distill_helpers import tiny_student_config

from kc_keras import training
from kc_keras.distill import workers
from kc_keras.distill.config import LossConfig
from kc_keras.distill.config import TrainConfig
from kc_keras.distill.train import RunOptions
from kc_keras.distill.train import distill_run
from kc_keras.models import teachers as teachers_lib
from kc_keras.run import RunDir


def _strategy(cluster, task_type, task_id):
    # Creating a real MultiWorkerMirroredStrategy needs a running cluster,
    # so the stand-in carries only the real resolver that `is_chief` reads.
    resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
        tf.train.ClusterSpec(cluster), task_type=task_type, task_id=task_id
    )
    return types.SimpleNamespace(cluster_resolver=resolver)


WORKERS = {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}
WITH_CHIEF = {"chief": ["127.0.0.1:3"], **WORKERS}


@pytest.mark.parametrize(
    "cluster, task_type, task_id, expected",
    [
        (WORKERS, "worker", 0, True),
        (WORKERS, "worker", 1, False),
        (WITH_CHIEF, "chief", 0, True),
        (WITH_CHIEF, "worker", 0, False),
        (WORKERS, None, None, True),
    ],
    ids=[
        "worker-0-no-chief",
        "worker-1",
        "chief-task",
        "worker-0-beside-chief",
        "no-task-type",
    ],
)
def test_is_chief_of_cluster(cluster, task_type, task_id, expected):
    strategy = _strategy(cluster, task_type, task_id)
    assert workers.is_chief(strategy) is expected


@pytest.mark.parametrize(
    "strategy",
    [tf.distribute.get_strategy, tf.distribute.MirroredStrategy],
    ids=["default", "mirrored"],
)
def test_is_chief_outside_cluster(strategy):
    assert workers.is_chief(strategy())


def test_non_chief_writes_to_removed_temp_folder(tmp_path):
    run = RunDir(tmp_path / "run")
    backup = training.backup_dir(run, "student")
    backup.mkdir(parents=True)
    (backup / "latest.weights.h5").write_bytes(b"weights")
    strategy = _strategy(WORKERS, "worker", 1)
    with workers.writable_run_dir(run, strategy) as output:
        root = output.root
        assert root != run.root
        assert output.teachers == run.teachers
        assert output.run_file == run.run_file
        copied = training.backup_dir(output, "student")
        assert (copied / "latest.weights.h5").read_bytes() == b"weights"
    assert not root.exists()


def test_chief_writes_to_run_folder(tmp_path):
    run = RunDir(tmp_path / "run")
    strategy = _strategy(WORKERS, "worker", 0)
    with workers.writable_run_dir(run, strategy) as output:
        assert output is run


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


def test_non_chief_distill_leaves_run_unchanged(run_folder, monkeypatch):
    before = sorted(path for path in run_folder.rglob("*"))
    monkeypatch.setattr(workers, "is_chief", lambda strategy: False)
    metrics = distill_run(
        run_folder,
        tiny_student_config(),
        LossConfig(top_k=2),
        TrainConfig(batch_size=32),
        RunOptions(cache_soft_targets=True, quick=True),
    )
    assert set(metrics["test"]) == {"student", "generalist", "routed_ensemble"}
    assert sorted(path for path in run_folder.rglob("*")) == before
