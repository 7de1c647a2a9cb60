"""The multi-teacher distiller and its training callbacks.

`Distiller` is a `keras.Model` whose `train_step` follows Keras 3's
TensorFlow trainer: the student's logits are computed once under the
gradient tape, the teachers run outside it with `training=False`, and only
the student's trainable variables receive gradients. The loss is averaged
over the replica's batch and divided by the number of replicas, so the
gradients that `tf.distribute` sums across replicas equal those of the
global batch on one device.
"""

import logging
import math

import keras
import tensorflow as tf

from kc_keras import training
from kc_keras.distill import losses
from kc_keras.distill import soft_targets
from kc_keras.errors import KCError

logger = logging.getLogger(__name__)


def _is_multi_worker(strategy):
    """Return True under MultiWorkerMirroredStrategy with several workers."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return False
    resolver = strategy.cluster_resolver
    if resolver is None:
        return False
    tasks = resolver.cluster_spec().as_dict().values()
    return sum(len(addresses) for addresses in tasks) > 1


class Distiller(keras.Model):
    """Train a student from hard labels and frozen teachers' soft targets.

    Training batches are `(images, labels)`, with soft targets computed on
    the fly by `teacher_targets`, or `(images, labels, cached)` with
    `cached` the `{role: (indices, probabilities)}` dict of a soft-target
    cache, in which case no teacher runs. Validation batches are
    `(images, labels)` and report the hard-label loss and accuracy only.

    Args:
        student: the student Keras model (logits).
        loss_config: a `LossConfig`.
        teacher_targets: a `TeacherTargets`, or None to train from hard
            labels or cached targets only.
        **kwargs: standard `keras.Model` arguments.
    """

    def __init__(self, student, loss_config, teacher_targets=None, **kwargs):
        super().__init__(**kwargs)
        self.student = student
        self.loss_config = loss_config
        self.teacher_targets = teacher_targets
        if teacher_targets is not None:
            # Frozen teachers: excluded from trainable_weights, so they get
            # no gradients and the optimizer creates no slots for them.
            teacher_targets.generalist.trainable = False
            for specialist in teacher_targets.specialists:
                specialist.trainable = False
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.hard_loss_tracker = keras.metrics.Mean(name="hard_loss")
        self.soft_loss_tracker = keras.metrics.Mean(name="soft_loss")
        self.accuracy_tracker = keras.metrics.Mean(name="accuracy")

    @property
    def metrics(self):
        return [
            self.loss_tracker,
            self.hard_loss_tracker,
            self.soft_loss_tracker,
            self.accuracy_tracker,
        ]

    def call(self, inputs, training=False):
        return self.student(inputs, training=training)

    def compute_losses(self, labels, logits, targets):
        """Return the per-image total, hard and soft losses (float32).

        Args:
            labels: int class indices (batch,).
            logits: student logits (batch, num_classes).
            targets: `{role: (indices, probabilities)}` or an empty dict
                for hard labels only.
        """
        config = self.loss_config
        logits = tf.cast(logits, tf.float32)
        hard = losses.hard_loss(labels, logits)
        soft = tf.zeros_like(hard)
        weights = {
            soft_targets.SPECIALIST: config.specialist_weight,
            soft_targets.GENERALIST: config.generalist_weight,
        }
        for role, (indices, probabilities) in targets.items():
            if weights[role] == 0:
                continue
            soft += weights[role] * losses.soft_loss(
                config.kind,
                indices,
                probabilities,
                logits,
                config.temperature,
            )
        alpha = config.alpha if targets else 1.0
        return alpha * hard + soft, hard, soft

    def _unpack(self, data):
        # `train_on_batch(x, y)` passes (x, y, None): None is a missing
        # sample weight, not a cache row.
        if len(data) == 3 and data[2] is not None:
            return data
        images, labels = data[:2]
        if self.teacher_targets is None:
            return images, labels, {}
        return images, labels, self.teacher_targets(images, labels)

    def train_step(self, data):
        images, labels, targets = self._unpack(data)
        with tf.GradientTape() as tape:
            logits = self.student(images, training=True)
            total, hard, soft = self.compute_losses(labels, logits, targets)
            loss = tf.reduce_mean(total) / tf.cast(
                tf.distribute.get_strategy().num_replicas_in_sync,
                tf.float32,
            )
            scaled_loss = self.optimizer.scale_loss(loss)
        variables = self.student.trainable_variables
        gradients = tape.gradient(scaled_loss, variables)
        self.optimizer.apply_gradients(zip(gradients, variables, strict=True))
        self._update_metrics(labels, logits, total, hard, soft)
        return self._metric_results()

    def test_step(self, data):
        images, labels = data[:2]
        logits = self.student(images, training=False)
        hard = losses.hard_loss(labels, logits)
        self._update_metrics(labels, logits, hard, hard, tf.zeros_like(hard))
        return self._metric_results()

    def _metric_results(self):
        results = {metric.name: metric.result() for metric in self.metrics}
        if _is_multi_worker(tf.distribute.get_strategy()):
            # Keras 3.15 averages each returned value across workers along
            # axis 0, which a scalar lacks. A (1,) tensor reduces to the
            # scalar mean of the workers' running means, which is the global
            # mean when every worker gets batches of the same size.
            results = {
                name: tf.reshape(value, [1]) for name, value in results.items()
            }
        return results

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Keras 3.15 builds a model under a strategy from one input batch
        # that it reduces across replicas. Under MultiWorkerMirroredStrategy
        # that reduction fails, and it also opens an extra iterator, which
        # reshuffles a dataset that reshuffles each iteration. A built
        # distiller only needs its optimizer's variables.
        # NOTE: this overrides a private method of Keras 3.15's TensorFlow
        # trainer; check it when upgrading Keras.
        if self.built and all(layer.built for layer in self._flatten_layers()):
            if self.optimizer is not None and not self.optimizer.built:
                with self.distribute_strategy.scope():
                    self.optimizer.build(self.trainable_variables)
            return
        super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    def _update_metrics(self, labels, logits, total, hard, soft):
        correct = tf.cast(
            tf.equal(
                tf.argmax(logits, axis=1, output_type=tf.int32),
                tf.cast(labels, tf.int32),
            ),
            tf.float32,
        )
        self.loss_tracker.update_state(total)
        self.hard_loss_tracker.update_state(hard)
        self.soft_loss_tracker.update_state(soft)
        self.accuracy_tracker.update_state(correct)


class NonFiniteLossStop(keras.callbacks.Callback):
    """Stop training with a `KCError` when the loss becomes NaN or Inf.

    The error names the step and the last finite metrics. It is raised
    before the epoch ends, so the epoch's checkpoint callbacks never save
    the diverged student and the last good checkpoint stays on disk.
    """

    def __init__(self):
        super().__init__()
        self.step = 0
        self.last_finite = None

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        values = {name: float(value) for name, value in (logs or {}).items()}
        loss = values.get("loss", 0.0)
        if math.isfinite(loss):
            self.last_finite = values
            return
        self.model.stop_training = True
        last = (
            ", ".join(f"{k}={v:.4g}" for k, v in self.last_finite.items())
            if self.last_finite
            else "none"
        )
        raise KCError(
            f"distillation loss became {loss} at step {self.step}; last "
            f"finite metrics: {last}. Lower the learning rate or use "
            "--precision float32; the last good student checkpoint is kept"
        )


class StudentCheckpoint(keras.callbacks.Callback):
    """Save the distiller's student atomically at the end of every epoch.

    Args:
        path: the .keras file to write.
    """

    def __init__(self, path):
        super().__init__()
        self.path = path

    def on_epoch_end(self, epoch, logs=None):
        training.save_model(self.model.student, self.path)
