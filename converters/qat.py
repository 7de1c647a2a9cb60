"""Quantization-aware training (QAT) of a Keras model in tf-keras.

tensorflow-model-optimization 0.8.1 quantizes only tf-keras (Keras 2)
functional or sequential models, and importing it sets
TF_USE_LEGACY_KERAS=1 for the whole process. So `qat_export`, called from
the Keras 3 process, writes the weights and data to a temporary folder and
runs `python -m converters.qat SPEC.json` in a child process. The child
builds the same architecture in tf-keras and copies the weights by layer
name. It then annotates every layer and applies `quantize_apply` (what
`quantize_model` does, plus the configs below), fine-tunes and converts to
a full-integer TFLite model. Nothing in the calling process imports tfmot
or tf-keras.

The Rescaling input layer is not in tfmot's default registry. It gets
`RescalingQuantizeConfig`, which quantizes its output only. With a zero
offset the converted model then starts with one int8 MUL.
"""

import argparse
import dataclasses
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from kc_keras.errors import KCError

logger = logging.getLogger(__name__)

# A one-line error from the child starts with this marker on stderr.
ERROR_MARKER = "kc-qat-error: "
EXIT_INPUT_ERROR = 2


@dataclasses.dataclass(frozen=True)
class QATConfig:
    """Fine-tuning settings of quantization-aware training.

    Attributes:
        epochs: passes over the fine-tuning images.
        steps_per_epoch: batches per epoch; None runs each epoch over all
            images.
        batch_size: images per batch.
        learning_rate: Adam learning rate; small, because the weights are
            already trained.
        seed: seed of the shuffling.
    """

    epochs: int = 2
    steps_per_epoch: int | None = None
    batch_size: int = 64
    learning_rate: float = 1e-4
    seed: int = 0

    def __post_init__(self):
        if self.epochs < 0:
            raise KCError(f"QAT epochs must be 0 or more, got {self.epochs}")
        if self.batch_size < 1:
            raise KCError(
                f"QAT batch size must be positive, got {self.batch_size}"
            )


@dataclasses.dataclass(frozen=True)
class QATData:
    """Arrays handed to the QAT child process.

    Attributes:
        train_images: uint8 fine-tuning images (N, height, width, channels).
        train_labels: int32 class labels (N,).
        representative: uint8 calibration images for the converter.
        reference_images: a few images to check the weight copy.
        reference_logits: the Keras 3 model's logits on them.
        targets: teacher soft targets of the training images as
            {role: (int32 indices (N, K), float32 probabilities (N, K))},
            the format of `kc_keras.distill.soft_targets.TeacherTargets`;
            empty for hard labels only.
        loss: the distillation `LossConfig` the targets were made with,
            or None for hard labels only.
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    representative: np.ndarray
    reference_images: np.ndarray
    reference_logits: np.ndarray
    targets: dict = dataclasses.field(default_factory=dict)
    loss: object = None


# ---------------------------------------------------------------------------
# Calling process (Keras 3): never imports tfmot or tf-keras.


def model_weights(model):
    """Return {"layer_name/index": array} for every weighted layer."""
    weights = {}
    for layer in model.layers:
        for index, value in enumerate(layer.get_weights()):
            weights[f"{layer.name}/{index}"] = np.asarray(value)
    return weights


def qat_export(
    model,
    builder,
    builder_kwargs,
    data,
    config,
    options,
    timeout_s=3600,
):
    """Quantization-aware train `model` in a child process and convert it.

    Args:
        model: the trained Keras 3 model (float32 pixels in, logits out).
        builder: "module:function" that builds the same architecture; it is
            called as `function(**builder_kwargs, keras_module=tf_keras)` in
            the child, and its layer names must match `model`'s.
        builder_kwargs: JSON-serialisable keyword arguments of `builder`.
        data: `QATData`.
        config: `QATConfig`.
        options: `converters.export.ExportOptions`.
        timeout_s: seconds before the child is stopped.

    Returns:
        The full-integer .tflite content as bytes (no metadata yet).

    Raises:
        KCError: the child failed; the message is the child's one-line
            error, such as a layer that QAT cannot handle.
    """
    with tempfile.TemporaryDirectory(prefix="kc-qat-") as folder:
        folder = Path(folder)
        arrays = {
            "train_images": data.train_images,
            "train_labels": data.train_labels,
            "representative": data.representative,
            "reference_images": data.reference_images,
            "reference_logits": data.reference_logits,
        }
        for role, (indices, probabilities) in data.targets.items():
            arrays[f"targets:{role}:indices"] = np.asarray(indices, np.int32)
            arrays[f"targets:{role}:probabilities"] = np.asarray(
                probabilities, np.float32
            )
        for key, value in model_weights(model).items():
            arrays[f"weights:{key}"] = value
        np.savez(folder / "arrays.npz", **arrays)
        spec = {
            "builder": builder,
            "builder_kwargs": builder_kwargs,
            "arrays": str(folder / "arrays.npz"),
            "output": str(folder / "model.tflite"),
            "config": dataclasses.asdict(config),
            "loss": None if data.loss is None else data.loss.to_dict(),
            "uint8_input": options.uint8_input,
            "allow_float_ops": options.allow_float_ops,
            "logits_output": options.logits_output,
        }
        spec_path = folder / "spec.json"
        spec_path.write_text(json.dumps(spec), encoding="utf-8")
        env = dict(os.environ, TF_USE_LEGACY_KERAS="1")
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        # The child must import this checkout's packages even when the
        # caller runs from another working directory.
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(
            [root] + [p for p in [env.get("PYTHONPATH")] if p]
        )
        logger.info("QAT: starting the tf-keras child process")
        try:
            result = subprocess.run(
                [sys.executable, "-m", "converters.qat", str(spec_path)],
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired as error:
            raise KCError(
                f"QAT child process timed out after {timeout_s} s; lower "
                "--qat-epochs"
            ) from error
        _forward_child_log(result.stderr)
        if result.returncode != 0:
            raise KCError(_child_error(result))
        return (folder / "model.tflite").read_bytes()


def _forward_child_log(stderr):
    for line in stderr.splitlines():
        if line.startswith("kc-qat: "):
            logger.info("QAT child: %s", line[len("kc-qat: ") :])


def _child_error(result):
    for line in reversed(result.stderr.splitlines()):
        if line.startswith(ERROR_MARKER):
            return line[len(ERROR_MARKER) :]
    tail = " | ".join(result.stderr.strip().splitlines()[-5:])
    return (
        f"QAT child process failed with exit code {result.returncode}: {tail}"
    )


# ---------------------------------------------------------------------------
# Child process (tf-keras and tfmot).


def _rescaling_quantize_config_class():
    import tensorflow_model_optimization as tfmot

    quantize = tfmot.quantization.keras

    class RescalingQuantizeConfig(quantize.QuantizeConfig):
        """Quantize a Rescaling layer's output; it has no weights."""

        def get_weights_and_quantizers(self, layer):
            return []

        def get_activations_and_quantizers(self, layer):
            return []

        def set_quantize_weights(self, layer, quantize_weights):
            pass

        def set_quantize_activations(self, layer, quantize_activations):
            pass

        def get_output_quantizers(self, layer):
            return [
                quantize.quantizers.MovingAverageQuantizer(
                    num_bits=8,
                    per_axis=False,
                    symmetric=False,
                    narrow_range=False,
                )
            ]

        def get_config(self):
            return {}

    return RescalingQuantizeConfig


def _student_quantize_hooks(tf_keras):
    """Return the student's custom objects and a QuantizeConfig lookup.

    The lookup maps a layer to the QuantizeConfig that
    `converters.quantize_configs` defines for the student's custom layers,
    or to None for any other layer.
    """
    from converters import quantize_configs
    from kc_keras.models import layers as kc_layers

    custom_names = set(kc_layers.custom_layers(tf_keras))

    def config_for(layer):
        if type(layer).__name__ in custom_names:
            return quantize_configs.quantize_config_for(layer)
        return None

    return quantize_configs.quantize_scope_objects(), config_for


def _import_builder(target):
    import importlib

    module_name, _, attribute = target.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise KCError(
            f"cannot import the QAT model builder {target!r} ({error})"
        ) from error


def _copy_weights(tf_model, arrays):
    for layer in tf_model.layers:
        count = len(layer.get_weights())
        if count == 0:
            continue
        keys = [f"weights:{layer.name}/{i}" for i in range(count)]
        missing = [k for k in keys if k not in arrays]
        if missing:
            raise KCError(
                f"layer {layer.name!r} of the tf-keras model has no "
                "matching weights in the Keras 3 model; the builder must "
                "use the same layer names"
            )
        layer.set_weights([arrays[k] for k in keys])


def _check_copy(tf_model, arrays):
    images = arrays["reference_images"].astype(np.float32)
    expected = arrays["reference_logits"]
    actual = tf_model.predict(images, verbose=0)
    error = float(np.max(np.abs(actual - expected)))
    tolerance = 1e-3 * max(1.0, float(np.max(np.abs(expected))))
    if error > tolerance:
        raise KCError(
            f"the tf-keras rebuild differs from the Keras 3 model by {error} "
            "(max absolute logit difference); the builder does not rebuild "
            "the same architecture"
        )
    return error


def _annotate(tf_model, tf_keras, quantize, config_for):
    rescaling_config = _rescaling_quantize_config_class()

    def annotate(layer):
        clone = layer.__class__.from_config(layer.get_config())
        if isinstance(layer, tf_keras.layers.InputLayer):
            return clone
        if isinstance(layer, tf_keras.layers.Rescaling):
            return quantize.quantize_annotate_layer(clone, rescaling_config())
        config = config_for(layer)
        if config is not None:
            return quantize.quantize_annotate_layer(clone, config)
        return quantize.quantize_annotate_layer(clone)

    annotated = tf_keras.models.clone_model(tf_model, clone_function=annotate)
    annotated.set_weights(tf_model.get_weights())
    return annotated, {"RescalingQuantizeConfig": rescaling_config}


def _quantize(tf_model, tf_keras):
    import tensorflow_model_optimization as tfmot

    quantize = tfmot.quantization.keras
    custom_objects, config_for = _student_quantize_hooks(tf_keras)
    annotated, own_objects = _annotate(tf_model, tf_keras, quantize, config_for)
    with quantize.quantize_scope({**custom_objects, **own_objects}):
        try:
            return quantize.quantize_apply(annotated)
        except RuntimeError as error:
            match = re.search(r"Layer (\S+):<class '([^']+)'>", str(error))
            if match is None:
                raise
            raise KCError(
                f"layer {match.group(1)!r} of class "
                f"{match.group(2).rsplit('.', 1)[-1]} cannot be "
                "quantization-aware trained by tfmot; give it a "
                "QuantizeConfig in converters/quantize_configs.py or "
                "replace the layer"
            ) from error


def _loss_terms(arrays, loss):
    """Return [(weight, role)] of the soft terms and the hard-loss weight."""
    roles = sorted(
        {key.split(":")[1] for key in arrays if key.startswith("targets:")}
    )
    if loss is None or not roles:
        return [], 1.0
    weights = {
        "specialist": loss["specialist_weight"],
        "generalist": loss["generalist_weight"],
    }
    return [(weights[role], role) for role in roles], loss["alpha"]


def _fine_tune(q_model, arrays, config, loss, tf):
    """Fine-tune with the distillation loss of `kc_keras.distill.losses`.

    The loss functions use only TensorFlow ops, so the same code serves the
    Keras 3 distiller and this tf-keras model.
    """
    import tf_keras

    from kc_keras.distill import losses

    images = arrays["train_images"].astype(np.float32)
    labels = arrays["train_labels"].astype(np.int32)
    soft_terms, alpha = _loss_terms(arrays, loss)
    kind = loss["kind"] if loss else "kl"
    temperature = float(loss["temperature"]) if loss else 1.0
    optimizer = tf_keras.optimizers.Adam(config.learning_rate)
    rng = np.random.default_rng(config.seed)
    batches = max(1, int(np.ceil(len(images) / config.batch_size)))
    steps = config.steps_per_epoch or batches

    @tf.function
    def train_step(x, y, targets):
        with tf.GradientTape() as tape:
            logits = q_model(x, training=True)
            total = alpha * losses.hard_loss(y, logits)
            for weight, role in soft_terms:
                indices, probabilities = targets[role]
                total += weight * losses.soft_loss(
                    kind, indices, probabilities, logits, temperature
                )
            value = tf.reduce_mean(total)
        variables = q_model.trainable_variables
        gradients = tape.gradient(value, variables)
        optimizer.apply_gradients(zip(gradients, variables, strict=True))
        return value

    for epoch in range(config.epochs):
        order = rng.permutation(len(images))
        values = []
        for step in range(steps):
            start = (step % batches) * config.batch_size
            index = order[start : start + config.batch_size]
            targets = {
                role: (
                    arrays[f"targets:{role}:indices"][index],
                    arrays[f"targets:{role}:probabilities"][index],
                )
                for _, role in soft_terms
            }
            values.append(
                float(train_step(images[index], labels[index], targets))
            )
        _log(f"epoch {epoch + 1}/{config.epochs}: loss {np.mean(values):.4f}")


def _freeze_batch_norm(q_model, tf_keras):
    """Run every BatchNormalization layer in inference mode from now on.

    A tf-keras BatchNormalization layer with `trainable=False` normalises
    with its moving statistics even in a training-mode call. Range
    calibration and fine-tuning then see the activations that inference
    (and the converted model) computes, and the trained statistics stay
    as they are.
    """
    for layer in q_model.layers:
        inner = getattr(layer, "layer", layer)
        if isinstance(inner, tf_keras.layers.BatchNormalization):
            inner.trainable = False


def _calibrate_ranges(q_model, images):
    """Set every moving-average activation range from one batch.

    tfmot 0.8.1's MovingAverageQuantizer starts its ranges at [-6, 6] and
    updates them with a hard-coded EMA decay of 0.999, so a fine-tune of a
    few hundred steps would keep much of that arbitrary start. One forward
    pass with decay 0 sets each range to the batch's min and max instead.
    Layers run in order, so each range is measured on inputs that were
    already quantized with calibrated upstream ranges. BatchNormalization
    moving statistics are restored afterwards in case a layer still updates
    them.
    """
    from tensorflow_model_optimization.python.core.quantization.keras import (
        quant_ops,
    )

    original = quant_ops.MovingAvgQuantize

    def without_averaging(*args, **kwargs):
        kwargs["ema_decay"] = 0.0
        return original(*args, **kwargs)

    saved = [
        (variable, variable.numpy())
        for variable in q_model.variables
        if "moving_" in variable.name
    ]
    quant_ops.MovingAvgQuantize = without_averaging
    try:
        q_model(images, training=True)
    finally:
        quant_ops.MovingAvgQuantize = original
    for variable, value in saved:
        variable.assign(value)


def _pin_input_range(q_model):
    """Set the input quantizer's range to [0, 255].

    With that range the converted int8 input has scale 1 and zero point
    -128, so raw pixels convert exactly. tfmot otherwise keeps the range
    it observed during fine-tuning.
    """
    pinned = 0
    for layer in q_model.layers:
        if type(layer).__name__ != "QuantizeLayer":
            continue
        for variable in layer.weights:
            name = variable.name.split(":")[0]
            if name.endswith("_min"):
                variable.assign(0.0)
                pinned += 1
            elif name.endswith("_max"):
                variable.assign(255.0)
                pinned += 1
    if pinned != 2:
        raise KCError(
            f"expected one input quantizer with a min and a max, found "
            f"{pinned} range variables; the tfmot version may differ from "
            "0.8.1"
        )


def _convert(q_model, arrays, spec, tf, tf_keras):
    outputs = q_model.output
    if not spec["logits_output"]:
        outputs = tf_keras.layers.Softmax(name="probabilities")(outputs)
    inference = tf_keras.Model(q_model.input, outputs)
    images = arrays["representative"].astype(np.float32)
    images = np.concatenate(
        [
            images,
            np.zeros((1,) + images.shape[1:], np.float32),
            np.full((1,) + images.shape[1:], 255.0, np.float32),
        ]
    )
    converter = tf.lite.TFLiteConverter.from_keras_model(inference)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: (
        [images[i : i + 1]] for i in range(len(images))
    )
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    if spec["allow_float_ops"]:
        converter.target_spec.supported_ops.append(
            tf.lite.OpsSet.TFLITE_BUILTINS
        )
    converter.inference_input_type = (
        tf.uint8 if spec["uint8_input"] else tf.int8
    )
    converter.inference_output_type = tf.int8
    return bytes(converter.convert())


def _log(message):
    print(f"kc-qat: {message}", file=sys.stderr, flush=True)  # noqa: T201


def run_child(spec):
    """Build, quantize, fine-tune and convert as `spec` describes."""
    if os.environ.get("TF_USE_LEGACY_KERAS") != "1":
        raise KCError(
            "converters.qat must run with TF_USE_LEGACY_KERAS=1; call "
            "converters.qat.qat_export instead of running it directly"
        )
    import tensorflow as tf
    import tf_keras

    arrays = dict(np.load(spec["arrays"]))
    config = QATConfig(**spec["config"])
    builder = _import_builder(spec["builder"])
    tf_model = builder(**spec["builder_kwargs"], keras_module=tf_keras)
    _copy_weights(tf_model, arrays)
    error = _check_copy(tf_model, arrays)
    _log(f"weights copied; max logit difference {error:.2e}")
    q_model = _quantize(tf_model, tf_keras)
    tf.random.set_seed(config.seed)
    _freeze_batch_norm(q_model, tf_keras)
    _calibrate_ranges(q_model, arrays["representative"].astype(np.float32))
    _fine_tune(q_model, arrays, config, spec["loss"], tf)
    _pin_input_range(q_model)
    Path(spec["output"]).write_bytes(
        _convert(q_model, arrays, spec, tf, tf_keras)
    )
    _log("converted")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", help="JSON file written by qat_export")
    args = parser.parse_args(argv)
    spec = json.loads(Path(args.spec).read_text(encoding="utf-8"))
    try:
        run_child(spec)
    except KCError as error:
        print(f"{ERROR_MARKER}{error}", file=sys.stderr, flush=True)  # noqa: T201
        return EXIT_INPUT_ERROR
    return 0


def build_student_from_dicts(config, taxonomy, preprocessing, keras_module):
    """Build the student from the JSON forms of its settings.

    This is the QAT builder of the distilled student: the child process
    receives only JSON, so the `StudentConfig`, `Taxonomy` and
    `Preprocessing` travel as dicts.
    """
    from kc_keras.data.base import Preprocessing
    from kc_keras.data.base import Taxonomy
    from kc_keras.models import student

    return student.build_student(
        student.StudentConfig.from_dict(config),
        Taxonomy.from_dict(taxonomy),
        Preprocessing.from_dict(preprocessing),
        keras_module=keras_module,
    )


if __name__ == "__main__":
    sys.exit(main())
