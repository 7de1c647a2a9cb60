"""Tests of teacher training, saving, resuming and loading.

Every model is tiny (one 4-filter block) and trains a few steps on random
images, so the tests check plumbing, file contents and weight copies, not
accuracy.
"""

import dataclasses
import json
import os
import shutil

import keras
import numpy as np
import pytest
from click.testing import CliRunner

from kc_keras import evaluation
from kc_keras import io_utils
from kc_keras import training
from kc_keras.cli.main import cli
from kc_keras.data.base import Dataset
from kc_keras.data.base import Preprocessing
from kc_keras.data.base import Split
from kc_keras.data.base import Taxonomy
from kc_keras.errors import KCError
from kc_keras.models import teachers
from kc_keras.models.backbones import BackboneSpec
from kc_keras.run import RunDir

TINY = BackboneSpec(filters=4, blocks=1)
CONFIG = teachers.TeacherConfig(
    backbone=TINY,
    epochs=1,
    specialist_epochs=1,
    batch_size=8,
    steps_per_epoch=2,
)
# Seven classes in two non-contiguous verticals of sizes 3 and 4, so the
# specialists have different output sizes and their classes interleave.
CLASS_VERTICAL = (0, 1, 0, 1, 1, 0, 1)
PREPROCESSING = Preprocessing(height=8, width=8, channels=1)


def make_dataset(per_class=6, name="tiny", provisional=False):
    rng = np.random.default_rng(0)
    num_classes = len(CLASS_VERTICAL)
    splits = {}
    for split in ("train", "validation", "test"):
        labels = np.repeat(np.arange(num_classes), per_class).astype(np.int32)
        images = rng.integers(0, 256, (len(labels), 8, 8, 1), dtype=np.uint8)
        splits[split] = Split(images, labels)
    if provisional:
        taxonomy = Taxonomy(
            class_names=tuple(f"c{c}" for c in range(num_classes)),
            vertical_names=("all",),
            class_vertical=(0,) * num_classes,
        )
    else:
        taxonomy = Taxonomy(
            class_names=tuple(f"c{c}" for c in range(num_classes)),
            vertical_names=("odd", "even"),
            class_vertical=CLASS_VERTICAL,
        )
    return Dataset(
        name=name,
        spec={"name": name, "seed": 0},
        taxonomy=taxonomy,
        preprocessing=PREPROCESSING,
        splits=splits,
        taxonomy_provisional=provisional,
    )


class Recorder(keras.callbacks.Callback):
    """Record which model starts which epoch."""

    def __init__(self):
        super().__init__()
        self.epochs = []
        self.batches = {}

    def on_epoch_begin(self, epoch, logs=None):
        self.epochs.append((self.model.name, epoch))

    def on_train_batch_end(self, batch, logs=None):
        self.batches[self.model.name] = self.batches.get(self.model.name, 0)
        self.batches[self.model.name] += 1

    def trained(self):
        return sorted({name for name, _ in self.epochs})

    def first_epoch(self, name):
        return min(epoch for model, epoch in self.epochs if model == name)


class Interrupted(Exception):
    """Exception that simulates a killed process."""


class Interrupt(keras.callbacks.Callback):
    """Raise in the given epoch of the named model, like a killed run."""

    def __init__(self, model_name, epoch):
        super().__init__()
        self.model_name = model_name
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.model.name == self.model_name and self._epoch == self.epoch:
            raise Interrupted(self.model_name)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    teachers.train_teachers(make_dataset(), run, CONFIG)
    return run


def copy_run(trained_run, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(trained_run, target)
    return target


# ---------------------------------------------------------------------------
# Models


def test_specialist_starts_from_generalist():
    keras.utils.set_random_seed(0)
    dataset = make_dataset()
    generalist = teachers.build_generalist(7, PREPROCESSING, TINY)
    images = dataset.split("test").images.astype(np.float32)
    general_logits = np.asarray(generalist(images, training=False))
    for vertical, own in ((0, [0, 2, 5]), (1, [1, 3, 4, 6])):
        specialist = teachers.build_specialist(
            generalist, dataset.taxonomy, vertical, PREPROCESSING, TINY
        )
        assert specialist.output_shape == (None, len(own) + 1)
        assert specialist.name == f"specialist_{vertical}"
        logits = np.asarray(specialist(images, training=False))
        # Copied backbone and head columns give the generalist's logits of
        # the vertical's classes, in ascending class order.
        np.testing.assert_allclose(
            logits[:, :-1], general_logits[:, own], rtol=1e-5, atol=1e-5
        )
        other = [c for c in range(7) if c not in own]
        kernel, bias = generalist.get_layer("logits").get_weights()
        dustbin_kernel, dustbin_bias = specialist.get_layer(
            "logits"
        ).get_weights()
        np.testing.assert_allclose(
            dustbin_kernel[:, -1], kernel[:, other].mean(axis=1), rtol=1e-6
        )
        assert dustbin_bias[-1] == pytest.approx(
            bias[other].mean() + np.log(len(other))
        )


@pytest.mark.parametrize(
    "vertical, fraction, expected_other",
    [(0, 0.5, 9), (1, 0.5, 12), (0, 0.0, 0), (0, 10.0, 24)],
    ids=["v0-half", "v1-half", "no-dustbin", "all-others"],
)
def test_specialist_dataset_samples_dustbin(vertical, fraction, expected_other):
    dataset = make_dataset()
    data = teachers.specialist_dataset(dataset, vertical, fraction, seed=0)
    labels = data.split("train").labels
    in_vertical = np.asarray(CLASS_VERTICAL)[labels] == vertical
    own_count = 6 * dataset.taxonomy.vertical_sizes[vertical]
    assert in_vertical.sum() == own_count
    assert (~in_vertical).sum() == expected_other
    assert len(data.split("test")) == len(dataset.split("test"))


def test_specialist_pipeline_labels_dustbin():
    dataset = make_dataset()
    data = teachers.specialist_dataset(dataset, 0, 1.0, seed=0)
    label_map = evaluation.specialist_label_map(CLASS_VERTICAL, 0)
    pipeline = data.pipeline("train", 64, shuffle=False, augment=False)
    mapped = data.pipeline(
        "train", 64, shuffle=False, augment=False, label_map=label_map
    )
    classes = np.concatenate([labels.numpy() for _, labels in pipeline])
    local = np.concatenate([labels.numpy() for _, labels in mapped])
    expected = {0: 0, 2: 1, 5: 2, 1: 3, 3: 3, 4: 3, 6: 3}
    assert local.tolist() == [expected[c] for c in classes.tolist()]


def test_mobilenet_backbone_builds_on_32x32():
    preprocessing = Preprocessing(height=32, width=32, channels=3)
    spec = BackboneSpec(name="mobilenet-v3-small")
    generalist = teachers.build_generalist(5, preprocessing, spec)
    assert generalist.output_shape == (None, 5)
    taxonomy = Taxonomy(
        class_names=tuple("abcde"),
        vertical_names=("x", "y"),
        class_vertical=(0, 0, 1, 1, 1),
    )
    specialist = teachers.build_specialist(
        generalist, taxonomy, 1, preprocessing, spec
    )
    assert specialist.output_shape == (None, 4)
    images = np.zeros((2, 32, 32, 3), np.float32)
    assert np.asarray(specialist(images, training=False)).shape == (2, 4)

    # The backbone is a nested model whose batch normalizations freeze too.
    teachers.freeze_batch_norm(specialist)
    nested = [layer for layer in specialist.layers if hasattr(layer, "layers")]
    assert len(nested) == 1
    norms = [
        layer
        for layer in nested[0].layers
        if isinstance(layer, keras.layers.BatchNormalization)
    ]
    assert norms
    assert not any(layer.trainable for layer in norms)
    assert specialist.get_layer("logits").trainable


def test_freeze_batch_norm_keeps_statistics():
    keras.utils.set_random_seed(0)
    dataset = make_dataset()
    generalist = teachers.build_generalist(7, PREPROCESSING, TINY)
    specialist = teachers.build_specialist(
        generalist, dataset.taxonomy, 0, PREPROCESSING, TINY
    )
    teachers.freeze_batch_norm(specialist)
    norm = specialist.get_layer("block1_conv1_bn")
    before = [np.array(w) for w in norm.get_weights()]
    teachers.compile_model(specialist, 1e-2, 4)
    images = dataset.split("train").images.astype(np.float32)
    labels = np.zeros(len(images), np.int32)
    specialist.fit(images, labels, epochs=1, batch_size=16, verbose=0)
    for old, new in zip(before, norm.get_weights(), strict=True):
        np.testing.assert_array_equal(old, new)
    kernel = specialist.get_layer("block1_conv1").get_weights()[0]
    original = generalist.get_layer("block1_conv1").get_weights()[0]
    assert not np.allclose(kernel, original)


def test_mobilenet_backbone_rejects_28x28():
    spec = BackboneSpec(name="mobilenet-v3-small")
    preprocessing = Preprocessing(height=28, width=28, channels=1)
    with pytest.raises(KCError, match="cannot take images of shape"):
        teachers.build_generalist(5, preprocessing, spec)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"epochs": 0}, "epochs=0 is invalid"),
        ({"steps_per_epoch": 0}, "steps_per_epoch=0 is invalid"),
        (
            {"specialist_steps_per_epoch": 0},
            "specialist_steps_per_epoch=0 is invalid",
        ),
        ({"learning_rate": 0.0}, "learning_rate=0.0 is invalid"),
        ({"dustbin_fraction": -0.1}, "dustbin_fraction=-0.1 is invalid"),
    ],
    ids=["epochs", "steps", "specialist-steps", "learning-rate", "dustbin"],
)
def test_teacher_config_rejects_bad_values(changes, message):
    with pytest.raises(KCError, match=message):
        dataclasses.replace(CONFIG, **changes)


def test_teacher_config_round_trip():
    assert teachers.TeacherConfig.from_dict(CONFIG.to_dict()) == CONFIG


# ---------------------------------------------------------------------------
# Training, files and loading


def test_train_teachers_writes_every_file(trained_run):
    folder = RunDir(trained_run).teachers
    for name in (
        "generalist.keras",
        "specialist_0.keras",
        "specialist_1.keras",
        "teachers.json",
        "taxonomy.json",
        "labels.txt",
        "metrics.json",
    ):
        assert (folder / name).is_file(), name
    assert not list(folder.glob(".*")), "temporary files left behind"

    assert (folder / "labels.txt").read_text().split() == [
        f"c{c}" for c in range(7)
    ]
    manifest = io_utils.read_json(folder / "teachers.json")
    outputs = {m["name"]: m["output_classes"] for m in manifest["models"]}
    assert outputs == {
        "generalist": list(range(7)),
        "specialist_0": [0, 2, 5, -1],
        "specialist_1": [1, 3, 4, 6, -1],
    }

    metrics = io_utils.read_json(folder / "metrics.json")
    assert set(metrics["models"]) == set(outputs)
    assert set(metrics["ensembles"]) == {"routed", "full"}
    own = metrics["models"]["specialist_1"]["own_vertical"]
    assert own["num_images"] == 24
    assert own["gain"] == pytest.approx(own["top1"] - own["generalist_top1"])

    run_info = io_utils.read_json(RunDir(trained_run).run_file)
    assert run_info["dataset"] == {"name": "tiny", "seed": 0}
    assert not (RunDir(trained_run).logs / "backup" / "generalist").exists()


def test_load_teachers_returns_models(trained_run):
    loaded = teachers.load_teachers(trained_run)
    assert loaded.generalist.output_shape == (None, 7)
    sizes = [model.output_shape[-1] for model in loaded.specialists]
    assert sizes == [4, 5]
    assert loaded.taxonomy.class_vertical == CLASS_VERTICAL
    assert loaded.preprocessing == PREPROCESSING
    assert loaded.output_classes(1) == [1, 3, 4, 6, -1]


def test_load_teachers_missing_specialist(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path)
    os.remove(run / "teachers" / "specialist_1.keras")
    with pytest.raises(KCError, match="specialist_1.keras not found"):
        teachers.load_teachers(run)


def test_load_teachers_specialist_not_listed(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path)
    path = run / "teachers" / "teachers.json"
    manifest = io_utils.read_json(path)
    manifest["models"] = manifest["models"][:2]
    io_utils.write_json(path, manifest)
    with pytest.raises(KCError, match="lists no specialist_1.keras"):
        teachers.load_teachers(run)


def test_load_teachers_output_size_mismatch(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path)
    folder = run / "teachers"
    shutil.copy(folder / "specialist_0.keras", folder / "specialist_1.keras")
    with pytest.raises(KCError, match="has 4 outputs but 5 are expected"):
        teachers.load_teachers(run)


def test_load_teachers_output_classes_mismatch(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path)
    path = run / "teachers" / "teachers.json"
    manifest = io_utils.read_json(path)
    manifest["models"][1]["output_classes"] = [0, 1, 2, -1]
    io_utils.write_json(path, manifest)
    with pytest.raises(KCError, match="lists output classes"):
        teachers.load_teachers(run)


def test_load_teachers_without_teachers(tmp_path):
    with pytest.raises(KCError, match="no teachers in"):
        teachers.load_teachers(tmp_path)


def test_rerun_with_other_settings_rejected(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path)
    other = dataclasses.replace(CONFIG, batch_size=4)
    with pytest.raises(KCError, match="config differ"):
        teachers.train_teachers(make_dataset(), run, other)


def test_resume_after_interruption(tmp_path):
    dataset = make_dataset()
    config = dataclasses.replace(CONFIG, epochs=3, specialist_epochs=2)
    run_dir = RunDir(tmp_path / "run")

    # First run: killed in the generalist's second epoch, after the first
    # epoch's backup was written.
    with pytest.raises(Interrupted):
        teachers.train_teachers(
            dataset,
            run_dir.root,
            config,
            extra_callbacks=[Interrupt("generalist", 1)],
        )
    assert not run_dir.generalist_path().exists()
    assert training.has_backup(run_dir, "generalist")

    # Second run: resumes the generalist at epoch 1, trains specialist 0,
    # and is killed in specialist 1's second epoch.
    recorder = Recorder()
    with pytest.raises(Interrupted):
        teachers.train_teachers(
            dataset,
            run_dir.root,
            config,
            extra_callbacks=[recorder, Interrupt("specialist_1", 1)],
        )
    assert recorder.first_epoch("generalist") == 1
    assert recorder.first_epoch("specialist_0") == 0
    assert run_dir.generalist_path().exists()
    assert run_dir.specialist_path(0).exists()
    assert not run_dir.specialist_path(1).exists()
    assert not training.has_backup(run_dir, "generalist")
    assert training.has_backup(run_dir, "specialist_1")
    generalist_mtime = run_dir.generalist_path().stat().st_mtime_ns

    # Third run: skips the finished models and resumes specialist 1.
    recorder = Recorder()
    teachers.train_teachers(
        dataset, run_dir.root, config, extra_callbacks=[recorder]
    )
    assert recorder.trained() == ["specialist_1"]
    assert recorder.first_epoch("specialist_1") == 1
    assert run_dir.generalist_path().stat().st_mtime_ns == generalist_mtime
    assert (run_dir.teachers / "metrics.json").is_file()
    assert not training.has_backup(run_dir, "specialist_1")

    # A rerun of a finished run trains nothing.
    recorder = Recorder()
    teachers.train_teachers(
        dataset, run_dir.root, config, extra_callbacks=[recorder]
    )
    assert recorder.trained() == []


def test_specialist_steps_per_epoch(tmp_path):
    config = dataclasses.replace(
        CONFIG, steps_per_epoch=None, specialist_steps_per_epoch=3
    )
    recorder = Recorder()
    teachers.train_teachers(
        make_dataset(), tmp_path, config, extra_callbacks=[recorder]
    )
    # The generalist makes one pass: 42 images in batches of 8. Each
    # specialist runs 3 batches although vertical 1 has 36 training images
    # with its dustbin sample and vertical 0 has 27.
    assert recorder.batches == {
        "generalist": 6,
        "specialist_0": 3,
        "specialist_1": 3,
    }


def test_clusters_provisional_taxonomy(tmp_path):
    pytest.importorskip("kc_keras.data.clustering")
    dataset = make_dataset(provisional=True)
    teachers.train_teachers(
        dataset,
        tmp_path,
        CONFIG,
        cluster=teachers.ClusterConfig(num_verticals=2),
    )
    folder = RunDir(tmp_path).teachers
    taxonomy = Taxonomy.from_dict(io_utils.read_json(folder / "taxonomy.json"))
    assert taxonomy.num_verticals == 2
    assert taxonomy.class_names == dataset.taxonomy.class_names
    manifest = io_utils.read_json(folder / "teachers.json")
    assert manifest["clustered"] is True
    assert len(manifest["models"]) == 3
    loaded = teachers.load_teachers(tmp_path)
    assert len(loaded.specialists) == 2


def test_cluster_limit_rejected_before_training(tmp_path, monkeypatch):
    dataset = make_dataset(provisional=True)
    limit = dataset.taxonomy.num_classes - 1
    monkeypatch.setattr(teachers, "MAX_CLUSTER_CLASSES", limit)
    with pytest.raises(KCError, match=f"limit of {limit} classes"):
        teachers.train_teachers(dataset, tmp_path, CONFIG)
    assert not RunDir(tmp_path).generalist_path().exists()


@pytest.mark.parametrize(
    "num_verticals, num_classes, expected",
    [(None, 30, 5), (None, 8, 3), (None, 5, 2), (4, 8, 4)],
    ids=["default-30", "default-8", "default-5", "given"],
)
def test_cluster_config_num_verticals(num_verticals, num_classes, expected):
    config = teachers.ClusterConfig(num_verticals=num_verticals)
    assert config.resolve_num_verticals(num_classes) == expected


def test_cluster_config_too_many_verticals():
    with pytest.raises(KCError, match="at most 3"):
        teachers.ClusterConfig(num_verticals=4).resolve_num_verticals(7)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"num_verticals": 1}, "pass --verticals 2 or more"),
        ({"method": "kmeans"}, "unknown cluster method 'kmeans'"),
    ],
    ids=["one-vertical", "method"],
)
def test_cluster_config_rejects_bad_values(changes, message):
    with pytest.raises(KCError, match=message):
        teachers.ClusterConfig(**changes)


# ---------------------------------------------------------------------------
# Command line

CLI_ARGS = [
    "teachers",
    "--dataset",
    "synthetic",
    "--quick",
    "--filters",
    "4",
    "--blocks",
    "1",
]


def test_cli_trains_and_writes_teachers(tmp_path):
    run = tmp_path / "run"
    result = CliRunner().invoke(cli, [*CLI_ARGS, "--run", str(run)])
    assert result.exit_code == 0, result.output
    assert "routed ensemble" in result.stdout
    assert "specialist_2" in result.stdout
    manifest = io_utils.read_json(run / "teachers" / "teachers.json")
    assert manifest["config"]["steps_per_epoch"] == 5
    assert [m["file"] for m in manifest["models"]] == [
        "generalist.keras",
        "specialist_0.keras",
        "specialist_1.keras",
        "specialist_2.keras",
    ]
    for entry in manifest["models"]:
        assert (run / "teachers" / entry["file"]).is_file()
    metrics = json.loads((run / "teachers" / "metrics.json").read_text())
    assert metrics["split"] == "test"
    assert len(metrics["models"]["generalist"]["per_vertical"]) == 3
    assert (run / "logs" / "generalist" / "history.csv").is_file()


def test_cli_num_classes_and_num_verticals(tmp_path):
    run = tmp_path / "run"
    args = ["--num-classes", "8", "--num-verticals", "2", "--run", str(run)]
    result = CliRunner().invoke(cli, [*CLI_ARGS, *args])
    assert result.exit_code == 0, result.output
    manifest = io_utils.read_json(run / "teachers" / "teachers.json")
    assert manifest["dataset"]["num_classes"] == 8
    assert len(manifest["taxonomy"]["class_vertical"]) == 8
    assert len(manifest["models"]) == 3


def test_cli_run_of_other_dataset(tmp_path):
    run = tmp_path / "run"
    RunDir(run).claim({"name": "trio-30"})
    result = CliRunner().invoke(cli, [*CLI_ARGS, "--run", str(run)])
    assert result.exit_code == 2
    assert "contains a run with other dataset settings" in result.output
    assert "name='trio-30' (now 'synthetic')" in result.output
    assert "--overwrite" in result.output
    assert not (run / "teachers").exists()

    result = CliRunner().invoke(
        cli, [*CLI_ARGS, "--run", str(run), "--overwrite"]
    )
    assert result.exit_code == 0, result.output
    run_info = io_utils.read_json(run / "run.json")
    assert run_info["dataset"]["name"] == "synthetic"
    assert (run / "teachers" / "metrics.json").is_file()


def test_cli_rejects_option_of_other_dataset(tmp_path):
    result = CliRunner().invoke(
        cli, [*CLI_ARGS, "--run", str(tmp_path), "--path", str(tmp_path)]
    )
    assert result.exit_code == 2
    assert "does not apply to dataset 'synthetic'" in result.output


def test_cli_help_shows_config_defaults():
    result = CliRunner().invoke(cli, ["teachers", "--help"])
    assert result.exit_code == 0, result.output
    defaults = teachers.TeacherConfig()
    backbone = BackboneSpec()
    help_text = " ".join(result.output.split())
    for value in (
        defaults.epochs,
        defaults.specialist_epochs,
        defaults.specialist_steps_per_epoch,
        defaults.batch_size,
        defaults.dustbin_fraction,
        backbone.filters,
        backbone.blocks,
    ):
        assert f"(default {value})" in help_text, value


def test_cli_uses_the_dataset_backbone(tmp_path, monkeypatch):
    import kc_keras.data
    import kc_keras.distill.train

    real_load = kc_keras.data.load_dataset

    def load_flatten_dataset(*args, **kwargs):
        dataset = real_load(*args, **kwargs)
        return dataclasses.replace(dataset, backbone="small-cnn-flatten")

    monkeypatch.setattr(kc_keras.data, "load_dataset", load_flatten_dataset)
    monkeypatch.setattr(
        kc_keras.distill.train, "load_dataset", load_flatten_dataset
    )
    run = tmp_path / "run"
    result = CliRunner().invoke(cli, [*CLI_ARGS, "--run", str(run)])
    assert result.exit_code == 0, result.output
    manifest = io_utils.read_json(run / "teachers" / "teachers.json")
    assert manifest["config"]["backbone"]["name"] == "small-cnn-flatten"
    generalist = training.load_model(run / "teachers" / "generalist.keras")
    assert generalist.get_layer("flatten") is not None

    result = CliRunner().invoke(
        cli, ["distill", "--run", str(run), "--quick", "--top-k", "2"]
    )
    assert result.exit_code == 0, result.output
    metrics = io_utils.read_json(run / "student" / "metrics.json")
    assert metrics["student_config"]["backbone"]["name"] == (
        "small-cnn-flatten"
    )
    student = training.load_model(run / "student" / "student.keras")
    assert student.get_layer("flatten") is not None
