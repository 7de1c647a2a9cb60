"""Tests of the distiller: losses, frozen teachers, strategies, precision."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from distill_helpers import first_batch
from distill_helpers import teacher_targets
from distill_helpers import tiny_dataset
from distill_helpers import tiny_student

from kc_keras.distill import losses
from kc_keras.distill import soft_targets
from kc_keras.distill.config import LossConfig
from kc_keras.distill.distiller import Distiller
from kc_keras.distill.distiller import NonFiniteLossStop
from kc_keras.distill.distiller import StudentCheckpoint
from kc_keras.errors import KCError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dataset():
    return tiny_dataset()


def _soft_gradient_norm(temperature, scale_by_t_squared=True):
    rng = np.random.default_rng(0)
    teacher_logits = rng.normal(0, 3, (64, 20)).astype(np.float32)
    student_logits = tf.Variable(rng.normal(0, 3, (64, 20)).astype("f4"))
    targets = tf.nn.softmax(teacher_logits / temperature)
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(
            losses.kl_loss(targets, student_logits, temperature)
        )
        if not scale_by_t_squared:
            loss = loss / temperature**2
    return float(tf.norm(tape.gradient(loss, student_logits)))


def test_kl_gradient_independent_of_temperature():
    norms = {t: _soft_gradient_norm(t) for t in (2.0, 4.0, 8.0)}
    for t in (4.0, 8.0):
        ratio = norms[t] / norms[2.0]
        assert 0.5 < ratio < 2.0, norms
    # Without the T^2 factor the gradient shrinks about 16-fold from T=2
    # to T=8, so the check above can fail.
    unscaled = _soft_gradient_norm(8.0, scale_by_t_squared=False)
    assert unscaled / norms[2.0] < 0.2


def test_kl_loss_is_zero_for_matching_distributions():
    logits = tf.constant([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    targets = tf.nn.softmax(logits / 3.0)
    np.testing.assert_allclose(
        losses.kl_loss(targets, logits, 3.0).numpy(), 0.0, atol=1e-5
    )


def test_sigmoid_loss_matches_binary_cross_entropy():
    logits = tf.constant([[2.0, -1.0, 0.0]])
    targets = tf.constant([[0.7, 0.0, 0.3]])
    probs = 1 / (1 + np.exp(-logits.numpy()))
    expected = -(
        targets.numpy() * np.log(probs)
        + (1 - targets.numpy()) * np.log(1 - probs)
    ).sum(axis=1)
    np.testing.assert_allclose(
        losses.sigmoid_loss(targets, logits).numpy(), expected, rtol=1e-5
    )


def test_dense_targets_scatter_top_k_only():
    indices = tf.constant([[3, 1, 0], [2, 0, 0]])
    values = tf.constant([[0.5, 0.25, 0.0], [0.9, 0.0, 0.0]])
    dense = losses.dense_targets(indices, values, 5).numpy()
    expected = np.zeros((2, 5), np.float32)
    expected[0, 3] = 0.5
    expected[0, 1] = 0.25
    expected[1, 2] = 0.9
    np.testing.assert_array_equal(dense, expected)


@pytest.mark.parametrize("top_k", [1, 2, None], ids=["k1", "k2", "default"])
def test_specialist_targets_masked_to_true_vertical(dataset, top_k):
    taxonomy = dataset.taxonomy
    targets = teacher_targets(dataset, LossConfig(top_k=top_k))
    images, labels = first_batch(dataset)
    result = targets(tf.constant(images), tf.constant(labels))
    indices, probabilities = (t.numpy() for t in result["specialist"])
    k = top_k or max(taxonomy.vertical_sizes)
    assert indices.shape == (len(labels), k)
    for row, label in enumerate(labels):
        vertical = taxonomy.class_vertical[label]
        own = set(taxonomy.vertical_classes(vertical))
        assert set(indices[row]) <= own
        assert np.all(probabilities[row] > 0)
        # Sorted by probability, largest first.
        assert np.all(np.diff(probabilities[row]) <= 0)
    dense = losses.dense_targets(indices, probabilities, 12).numpy()
    assert np.all((dense > 0).sum(axis=1) == k)


def test_generalist_targets_top_k(dataset):
    targets = teacher_targets(dataset, LossConfig(top_k=3))
    images, labels = first_batch(dataset)
    indices, probabilities = targets(tf.constant(images), tf.constant(labels))[
        "generalist"
    ]
    logits = targets.generalist(images, training=False).numpy()
    expected = np.argsort(-logits, axis=1)[:, :3]
    np.testing.assert_array_equal(
        np.sort(indices.numpy(), axis=1), np.sort(expected, axis=1)
    )
    assert probabilities.shape == (len(labels), 3)


def test_training_freezes_teachers(dataset):
    config = LossConfig(kind="sigmoid")
    targets = teacher_targets(dataset, config)
    teachers = [targets.generalist, *targets.specialists]
    before = [[w.copy() for w in t.get_weights()] for t in teachers]
    student = tiny_student(dataset.taxonomy, dataset.preprocessing)
    student_before = [w.copy() for w in student.get_weights()]
    distiller = Distiller(student, config, targets)
    distiller.compile(optimizer=keras.optimizers.Adam(1e-2))
    history = distiller.fit(dataset.pipeline("train", 32), epochs=1, verbose=0)
    assert history.history["soft_loss"][0] > 0
    assert len(distiller.trainable_weights) == len(student.trainable_weights)
    # Bit-identical, BatchNorm moving statistics included.
    for teacher, weights in zip(teachers, before, strict=True):
        for old, new in zip(weights, teacher.get_weights(), strict=True):
            assert np.array_equal(old, new), teacher.name
    changed = [
        not np.array_equal(old, new)
        for old, new in zip(student_before, student.get_weights(), strict=True)
    ]
    assert changed[0]
    assert sum(changed) > len(changed) // 2


def test_loss_combines_hard_and_soft_terms(dataset):
    config = LossConfig(alpha=0.3, specialist_weight=2.0, generalist_weight=0.5)
    targets = teacher_targets(dataset, config)
    student = tiny_student(dataset.taxonomy, dataset.preprocessing)
    distiller = Distiller(student, config, targets)
    images, labels = first_batch(dataset)
    batch = targets(tf.constant(images), tf.constant(labels))
    logits = student(images)
    total, hard, soft = distiller.compute_losses(labels, logits, batch)
    expected_soft = 2.0 * losses.soft_loss(
        "kl", *batch["specialist"], logits, config.temperature
    ) + 0.5 * losses.soft_loss(
        "kl", *batch["generalist"], logits, config.temperature
    )
    np.testing.assert_allclose(soft.numpy(), expected_soft.numpy(), rtol=1e-5)
    np.testing.assert_allclose(
        total.numpy(), 0.3 * hard.numpy() + soft.numpy(), rtol=1e-5
    )


def test_hard_label_distiller_uses_cross_entropy_only(dataset):
    student = tiny_student(dataset.taxonomy, dataset.preprocessing)
    distiller = Distiller(student, LossConfig(alpha=0.2))
    images, labels = first_batch(dataset)
    total, hard, soft = distiller.compute_losses(labels, student(images), {})
    np.testing.assert_array_equal(total.numpy(), hard.numpy())
    assert not np.any(soft.numpy())


def test_mixed_float16_step(dataset):
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        config = LossConfig()
        targets = teacher_targets(dataset, config)
        student = tiny_student(dataset.taxonomy, dataset.preprocessing)
        assert student.get_layer("shared_fc").compute_dtype == "float16"
        distiller = Distiller(student, config, targets)
        optimizer = keras.optimizers.LossScaleOptimizer(
            keras.optimizers.Adam(1e-3)
        )
        distiller.compile(optimizer=optimizer, auto_scale_loss=False)
        images, labels = first_batch(dataset)
        logs = distiller.train_on_batch(images, labels, return_dict=True)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert student.output.dtype == "float32"
    for name in ("loss", "hard_loss", "soft_loss"):
        assert np.isfinite(logs[name]), name
    assert int(optimizer.iterations.numpy()) == 1


class PoisonWeights(keras.callbacks.Callback):
    """Set the student's last kernel to NaN before step `step` (1-based),
    as a diverging optimizer would."""

    def __init__(self, step):
        super().__init__()
        self.step = step
        self.seen = 0

    def on_train_batch_begin(self, batch, logs=None):
        self.seen += 1
        if self.seen == self.step:
            kernel = self.model.student.trainable_variables[-2]
            kernel.assign(np.full(kernel.shape, np.nan, np.float32))


def test_nan_loss_stops_and_keeps_checkpoint(dataset, tmp_path):
    student = tiny_student(
        dataset.taxonomy, dataset.preprocessing, self_paced="none"
    )
    distiller = Distiller(student, LossConfig())
    distiller.compile(optimizer=keras.optimizers.SGD(1e-3))
    images, labels = first_batch(dataset, size=8)
    data = tf.data.Dataset.from_tensors((images, labels)).repeat()
    path = tmp_path / "student.keras"
    # Epoch 1 has two finite steps and saves a checkpoint; step 3 (the
    # first of epoch 2) diverges.
    with pytest.raises(KCError, match="at step 3") as error:
        distiller.fit(
            data,
            epochs=2,
            steps_per_epoch=2,
            callbacks=[
                PoisonWeights(step=3),
                NonFiniteLossStop(),
                StudentCheckpoint(path),
            ],
            verbose=0,
        )
    assert "last finite metrics: accuracy=" in str(error.value)
    assert not np.all(np.isfinite(student.get_weights()[-2]))
    saved = keras.saving.load_model(path, safe_mode=True)
    assert all(np.all(np.isfinite(w)) for w in saved.get_weights())


class InterruptAtEpoch(keras.callbacks.Callback):
    """Raise at the start of epoch `epoch` (0-based), as a killed run would
    stop."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            raise KeyboardInterrupt


def test_resume_rebuilds_distiller_from_backup(dataset, tmp_path):
    config = LossConfig()
    images, labels = first_batch(dataset, size=8)
    data = tf.data.Dataset.from_tensors((images, labels)).repeat()
    backup = str(tmp_path / "backup")

    def build(seed):
        student = tiny_student(dataset.taxonomy, dataset.preprocessing, seed)
        distiller = Distiller(student, config, teacher_targets(dataset, config))
        distiller.compile(optimizer=keras.optimizers.Adam(1e-3))
        distiller(images[:1])
        return distiller

    first = build(seed=0)
    with pytest.raises(KeyboardInterrupt):
        first.fit(
            data,
            epochs=3,
            steps_per_epoch=2,
            callbacks=[
                keras.callbacks.BackupAndRestore(backup),
                InterruptAtEpoch(1),
            ],
            verbose=0,
        )
    trained = [w.copy() for w in first.student.get_weights()]

    # A new process would build a new distiller from code and the saved
    # teachers; the backup restores the student and resumes at epoch 2.
    second = build(seed=1)
    restored = []

    class RecordWeights(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            restored.extend(self.model.student.get_weights())

    history = second.fit(
        data,
        epochs=3,
        steps_per_epoch=2,
        callbacks=[keras.callbacks.BackupAndRestore(backup), RecordWeights()],
        verbose=0,
    )
    assert len(history.history["loss"]) == 2
    for old, new in zip(trained, restored, strict=True):
        np.testing.assert_array_equal(old, new)


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("temperature", 0.0, "temperature 0.0"),
        ("temperature", -1.0, "temperature -1.0"),
        ("alpha", 1.5, "alpha 1.5"),
        ("alpha", -0.1, "alpha -0.1"),
        ("kind", "mse", "mse"),
        ("top_k", 0, "top-K 0"),
        ("generalist_weight", -1.0, "generalist_weight -1.0"),
    ],
    ids=[
        "t-zero",
        "t-negative",
        "alpha-high",
        "alpha-low",
        "kind",
        "top-k-zero",
        "weight",
    ],
)
def test_loss_config_rejects_bad_values(field, value, match):
    with pytest.raises(KCError, match=match):
        LossConfig(**{field: value})


def test_top_k_larger_than_vertical_rejected(dataset):
    with pytest.raises(KCError, match="top-K 5 is larger than vertical"):
        LossConfig(top_k=5).specialist_top_k(dataset.taxonomy)


def test_missing_specialist_rejected(dataset):
    targets = teacher_targets(dataset)
    with pytest.raises(KCError, match="specialist is missing"):
        soft_targets.TeacherTargets(
            targets.generalist,
            targets.specialists[:-1],
            dataset.taxonomy,
            LossConfig(),
        )


# Two logical CPUs must be configured before TensorFlow initialises, so the
# comparison runs in a child process.
MIRRORED_SCRIPT = textwrap.dedent(
    """
    import json
    import sys

    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2
    )
    import keras
    import numpy as np

    sys.path.insert(0, "tests")
    from distill_helpers import first_batch, teacher_targets, tiny_dataset
    from distill_helpers import tiny_student
    from kc_keras.distill.config import LossConfig
    from kc_keras.distill.distiller import Distiller
    from kc_keras.distill.strategy import make_strategy

    dataset = tiny_dataset()
    images, labels = first_batch(dataset, size=16)
    config = LossConfig(generalist_weight=0.5)
    result = {}
    for name in ("none", "mirrored"):
        strategy = make_strategy(name)
        with strategy.scope():
            targets = teacher_targets(dataset, config)
            student = tiny_student(dataset.taxonomy, dataset.preprocessing)
            # Each replica normalises with its own batch statistics, which
            # differ from the global batch's by design. Frozen BatchNorm
            # layers use their moving statistics on every device.
            for layer in student.layers:
                if isinstance(layer, keras.layers.BatchNormalization):
                    layer.trainable = False
            distiller = Distiller(student, config, targets)
            distiller.compile(optimizer=keras.optimizers.SGD(0.1))
        data = tf.data.Dataset.from_tensor_slices((images, labels)).batch(16)
        logs = distiller.fit(data, epochs=1, verbose=0).history
        result[name] = {
            "replicas": strategy.num_replicas_in_sync,
            "loss": logs["loss"][0],
            "soft_loss": logs["soft_loss"][0],
            "weights": [w.tolist() for w in student.get_weights()[-4:]],
        }
    print("RESULT " + json.dumps(result))
    """
)


@pytest.mark.slow
def test_mirrored_loss_equals_single_device():
    completed = subprocess.run(
        [sys.executable, "-c", MIRRORED_SCRIPT],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    line = next(
        line
        for line in completed.stdout.splitlines()
        if line.startswith("RESULT ")
    )
    result = json.loads(line[len("RESULT ") :])
    assert result["mirrored"]["replicas"] == 2
    single, mirrored = result["none"], result["mirrored"]
    np.testing.assert_allclose(mirrored["loss"], single["loss"], rtol=1e-5)
    np.testing.assert_allclose(
        mirrored["soft_loss"], single["soft_loss"], rtol=1e-5
    )
    # One SGD step: equal updates mean the per-replica losses were scaled
    # by 1 / replicas before the gradients were summed.
    for a, b in zip(single["weights"], mirrored["weights"], strict=True):
        np.testing.assert_allclose(np.array(b), np.array(a), atol=1e-5)
