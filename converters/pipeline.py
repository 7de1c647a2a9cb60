"""Export a run's student and teachers to TFLite and measure parity.

`export_run` writes into RUN/tflite/:

- student_<mode>.tflite for each student mode (default qat-int8), and
  generalist_<mode>.tflite and specialist_<k>_<mode>.tflite for the teacher
  modes (ptq-int8 and float32), each with a `<model>.json` sidecar;
- labels.txt, the class names in class order;
- test.npz, the test images (uint8) and labels (int32);
- golden.json, expected inputs and top-5 outputs of a few test images for
  the Android app's unit tests;
- parity.json, one entry per export: agreement with the Keras model,
  accuracy, output difference, size, operators and quantization.
"""

import dataclasses
import functools
import logging

import numpy as np

from converters import export as export_lib
from converters import qat as qat_lib
from kc_keras import io_utils
from kc_keras.errors import KCError
from kc_keras.run import RunDir

logger = logging.getLogger(__name__)

STUDENT_FILE = "student.keras"
# Written by `kc distill`. It contains the StudentConfig and LossConfig
# dicts.
STUDENT_METRICS_FILE = "metrics.json"
GOLDEN_TOP_K = 5
# Test images per parity step: 64 x 100,000 float32 outputs take 25.6 MB.
PARITY_BATCH_SIZE = 64


@dataclasses.dataclass(frozen=True)
class TFLiteConfig:
    """Settings of a run export (`kc tflite`).

    Attributes:
        modes: student export modes.
        teacher_modes: export modes of the generalist and specialists;
            empty to skip the teachers.
        qat: fine-tuning settings of qat-int8.
        options: conversion options shared by every export.
        representative_size: training images used to calibrate ptq-int8
            and qat-int8.
        qat_images: training images used for QAT fine-tuning; None for
            the whole training split.
        max_test_images: test images kept in test.npz; a larger test split
            is replaced by a seeded random subset of this size.
        golden_images: test images recorded in golden.json.
        seed: seed of every subset.
    """

    modes: tuple = export_lib.STUDENT_MODES
    teacher_modes: tuple = export_lib.TEACHER_MODES
    qat: qat_lib.QATConfig = qat_lib.QATConfig()
    options: export_lib.ExportOptions = export_lib.ExportOptions()
    representative_size: int = 300
    qat_images: int | None = None
    max_test_images: int = 10000
    golden_images: int = 5
    seed: int = 0

    def __post_init__(self):
        if not self.modes:
            raise KCError("no student export mode given; pass --modes")
        for mode in self.modes + self.teacher_modes:
            export_lib.check_mode(mode)
        if "qat-int8" in self.teacher_modes:
            raise KCError(
                "teachers cannot be exported as qat-int8 (QAT fine-tunes "
                "the student only); use ptq-int8"
            )
        for name in ("representative_size", "max_test_images"):
            if getattr(self, name) < 1:
                raise KCError(
                    f"{name} must be positive, got {getattr(self, name)}"
                )

    @classmethod
    def quick(cls, **overrides):
        """Return settings for a smoke run: a few steps on small subsets."""
        settings = {
            "qat": qat_lib.QATConfig(epochs=1, steps_per_epoch=5),
            "representative_size": 64,
            "qat_images": 512,
            "max_test_images": 500,
        }
        settings.update(overrides)
        return cls(**settings)


# ---------------------------------------------------------------------------
# Inputs


def require_student(run):
    """Return the student's path, or raise `KCError` when it is missing."""
    path = run.student / STUDENT_FILE
    if not path.is_file():
        raise KCError(
            f"no distilled student in {run.root} ({path} not found); run "
            f"`kc distill --run {run.root}` first"
        )
    return path


def load_keras_model(path):
    """Load a Keras 3 model saved by kc-keras, custom layers included."""
    import keras

    from kc_keras.models import layers as kc_layers

    try:
        return keras.saving.load_model(
            path,
            custom_objects=kc_layers.custom_layers(keras),
            safe_mode=True,
        )
    except (OSError, ValueError, TypeError) as error:
        raise KCError(
            f"cannot load Keras model {path} ({error}); re-run the stage "
            "that wrote it"
        ) from error


def read_student_config(run):
    """Return the student's StudentConfig and LossConfig dicts.

    `kc distill` stores both in RUN/student/metrics.json.

    Returns:
        A tuple (student config dict or None, loss config dict or None).
    """
    path = run.student / STUDENT_METRICS_FILE
    if not path.is_file():
        return None, None
    data = io_utils.read_json(path)
    return data.get("student_config"), data.get("loss_config")


def load_run_teachers(run):
    """Return the run's `Teachers`, or None when it has no teachers."""
    from kc_keras.models import teachers as teachers_lib

    if not (run.teachers / teachers_lib.MANIFEST_FILE).is_file():
        return None
    return teachers_lib.load_teachers(run)


def test_subset(split, max_images, seed):
    """Return (images, labels, info) of the test images to evaluate on."""
    count = len(split)
    if count <= max_images:
        indices = np.arange(count)
    else:
        rng = np.random.default_rng(seed)
        indices = np.sort(rng.choice(count, max_images, replace=False))
    info = {
        "split": "test",
        "split_images": int(count),
        "images": int(len(indices)),
        "subset": bool(len(indices) < count),
        "seed": int(seed),
    }
    return split.images[indices], split.labels[indices].astype(np.int32), info


def random_subset(split, size, seed):
    """Return a seeded random subset of a split, at most `size` images."""
    if size is None or size >= len(split):
        return split.images, split.labels
    rng = np.random.default_rng(seed)
    indices = np.sort(rng.choice(len(split), size, replace=False))
    return split.images[indices], split.labels[indices]


def keras_outputs(model, images, logits_output, batch_size=256):
    """Return the Keras model's probabilities (or logits) as float32."""
    logits = model.predict(
        images.astype(np.float32), batch_size=batch_size, verbose=0
    )
    logits = np.asarray(logits, np.float32)
    if logits_output:
        return logits
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


# ---------------------------------------------------------------------------
# Parity


def parity_entry(
    path, record, reference, images, labels, batch_size=PARITY_BATCH_SIZE
):
    """Compare an exported model with its Keras model on the test images.

    The model runs through `mobile_demo.benchmark.TFLiteModel`, which
    quantizes the pixels with the model's input scale and zero point and
    dequantizes its outputs. Both models are compared batch by batch, so
    only one batch of outputs is held at a time.

    Args:
        path: the .tflite file.
        record: the dict returned by `write_export`.
        reference: Keras outputs on `images` (probabilities, or logits
            for a logits export), as a (num_images, num_outputs) array or
            as a function that returns them for a batch of images.
        images: uint8 test images.
        labels: the expected output index of each image.
        batch_size: images compared per step.

    Returns:
        The parity dict of this model.
    """
    from mobile_demo.benchmark import TFLiteModel

    model = TFLiteModel(path)
    predicted, expected = [], []
    max_abs_diff = 0.0
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        if callable(reference):
            keras_batch = reference(batch)
        else:
            keras_batch = reference[start : start + batch_size]
        outputs = model.predict(batch)
        predicted.append(outputs.argmax(axis=1))
        expected.append(np.asarray(keras_batch).argmax(axis=1))
        # np.maximum, unlike max(), keeps a NaN difference.
        batch_diff = np.max(np.abs(outputs - keras_batch))
        max_abs_diff = float(np.maximum(max_abs_diff, batch_diff))
    predicted = np.concatenate(predicted)
    expected = np.concatenate(expected)
    return {
        "name": path.stem,
        "file": path.name,
        "role": model.metadata["role"],
        "mode": model.metadata["mode"],
        "vertical": model.metadata["vertical"],
        "size_bytes": record["size_bytes"],
        "top1_accuracy": float(np.mean(predicted == labels)),
        "keras_top1_accuracy": float(np.mean(expected == labels)),
        "top1_agreement": float(np.mean(predicted == expected)),
        "max_abs_diff": max_abs_diff,
        "output_kind": model.metadata["output"]["kind"],
        "input": record["input"],
        "output": record["output"],
        "op_histogram": record["op_histogram"],
        "float_ops": record["float_ops"],
    }


def golden_entries(path, images, labels, class_names, count):
    """Return golden.json's cases: input tensors and LiteRT top-5 outputs.

    Args:
        path: the .tflite model.
        images: uint8 test images.
        labels: their class labels.
        class_names: the label of each output index.
        count: number of cases.
    """
    from mobile_demo.benchmark import TFLiteModel

    model = TFLiteModel(path)
    cases = []
    for index in range(min(count, len(images))):
        pixels = images[index : index + 1]
        tensor = model.quantize_input(pixels)
        scores = model.dequantize_output(model.invoke(tensor))[0]
        top = np.argsort(-scores, kind="stable")[:GOLDEN_TOP_K]
        cases.append(
            {
                "test_index": index,
                "label": int(labels[index]),
                "shape": list(pixels.shape),
                "pixels": pixels.reshape(-1).tolist(),
                "input_tensor": tensor.reshape(-1).tolist(),
                "top5": [
                    {
                        "index": int(i),
                        "label": class_names[i],
                        "score": float(scores[i]),
                    }
                    for i in top
                ],
            }
        )
    return {
        "model": path.name,
        "input": {
            "dtype": model.input_dtype.name,
            "scale": model.input_quantization[0],
            "zero_point": model.input_quantization[1],
        },
        "cases": cases,
    }


# ---------------------------------------------------------------------------
# Export


@dataclasses.dataclass(frozen=True)
class _Context:
    run: RunDir
    config: TFLiteConfig
    taxonomy: object
    preprocessing: object
    representative: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def _export_one(context, model, mode, info, path, reference, labels, qat):
    options = context.config.options
    logger.info("exporting %s", path.name)
    if mode == "qat-int8":
        tflite_bytes = qat()
    else:
        tflite_bytes = export_lib.convert_keras(
            model, mode, context.representative, options
        )
    record = export_lib.write_export(
        tflite_bytes,
        path,
        mode,
        info,
        context.taxonomy,
        context.preprocessing,
        options,
    )
    return parity_entry(path, record, reference, context.test_images, labels)


def _qat_data(student, dataset, teachers, loss, context):
    config = context.config
    images, labels = random_subset(
        dataset.split("train"), config.qat_images, config.seed
    )
    targets, loss_config = {}, None
    if teachers is not None:
        from kc_keras.distill.config import LossConfig
        from kc_keras.distill.soft_targets import TeacherTargets

        loss_config = LossConfig(**loss) if loss else LossConfig()
        compute = TeacherTargets(
            teachers.generalist,
            teachers.specialists,
            teachers.taxonomy,
            loss_config,
        )
        parts = {}
        for start in range(0, len(images), 256):
            batch = compute(
                images[start : start + 256].astype(np.float32),
                labels[start : start + 256],
            )
            for role, (indices, probabilities) in batch.items():
                parts.setdefault(role, []).append(
                    (np.asarray(indices), np.asarray(probabilities))
                )
        targets = {
            role: (
                np.concatenate([p[0] for p in chunks]),
                np.concatenate([p[1] for p in chunks]),
            )
            for role, chunks in parts.items()
        }
    reference_images = context.test_images[:8]
    return qat_lib.QATData(
        train_images=images,
        train_labels=labels.astype(np.int32),
        representative=context.representative,
        reference_images=reference_images,
        reference_logits=keras_outputs(student, reference_images, True),
        targets=targets,
        loss=loss_config,
    )


def _specialist_labels(taxonomy, vertical, labels):
    classes = taxonomy.vertical_classes(vertical)
    local = np.full(taxonomy.num_classes, len(classes), np.int32)
    local[list(classes)] = np.arange(len(classes))
    return local[labels]


def export_run(run_dir, config, dataset=None, qat_builder=None):
    """Export a run's student and teachers and write the parity report.

    Args:
        run_dir: the run folder (path or `RunDir`).
        config: a `TFLiteConfig`.
        dataset: the run's `Dataset`; loaded from run.json when None.
        qat_builder: ("module:function", kwargs) that rebuilds the student
            in tf-keras; None uses `build_student` with the student's saved
            StudentConfig.

    Returns:
        The parity report dict (also written to RUN/tflite/parity.json).

    Raises:
        KCError: no distilled student, no StudentConfig for qat-int8, a
            conversion that fails its checks, or any invalid input.
    """
    run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    student_path = require_student(run)
    student_config, loss = read_student_config(run)
    if "qat-int8" in config.modes and qat_builder is None:
        if student_config is None:
            raise KCError(
                f"qat-int8 needs the student's StudentConfig to rebuild it "
                f"in tf-keras, but {run.student / STUDENT_METRICS_FILE} has "
                "no student_config; re-run `kc distill` or pick --modes "
                "ptq-int8"
            )
    if dataset is None:
        from kc_keras.data import load_dataset

        dataset = load_dataset(**run.read_run_info()["dataset"])
    # The teachers give the soft targets of QAT fine-tuning too.
    needs_teachers = bool(config.teacher_modes) or "qat-int8" in config.modes
    teachers = load_run_teachers(run) if needs_teachers else None
    taxonomy = teachers.taxonomy if teachers else dataset.taxonomy
    preprocessing = dataset.preprocessing
    student = load_keras_model(student_path)
    outputs = int(student.outputs[0].shape[-1])
    if outputs != taxonomy.num_classes:
        raise KCError(
            f"student {student_path} has {outputs} outputs but the run's "
            f"taxonomy has {taxonomy.num_classes} classes; distil the "
            "student again"
        )
    representative, _ = random_subset(
        dataset.split("train"), config.representative_size, config.seed
    )
    test_images, test_labels, test_info = test_subset(
        dataset.split("test"), config.max_test_images, config.seed
    )
    context = _Context(
        run,
        config,
        taxonomy,
        preprocessing,
        representative,
        test_images,
        test_labels,
    )
    folder = run.tflite
    folder.mkdir(parents=True, exist_ok=True)
    with io_utils.atomic_path(folder / "test.npz") as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, images=test_images, labels=test_labels)
    logits_output = config.options.logits_output

    if qat_builder is None:
        qat_builder = (
            "converters.qat:build_student_from_dicts",
            {
                "config": student_config,
                "taxonomy": taxonomy.to_dict(),
                "preprocessing": preprocessing.to_dict(),
            },
        )

    def run_qat():
        data = _qat_data(student, dataset, teachers, loss, context)
        return qat_lib.qat_export(
            student,
            qat_builder[0],
            qat_builder[1],
            data,
            config.qat,
            config.options,
        )

    entries = []
    # Keras outputs are recomputed per batch and per export, because the
    # whole test set's outputs take 4 GB at 10,000 images and 100,000
    # classes.
    reference = functools.partial(
        keras_outputs, student, logits_output=logits_output
    )
    student_info = export_lib.ModelInfo(
        "student", tuple(range(taxonomy.num_classes))
    )
    for mode in config.modes:
        path = folder / f"student_{mode}.tflite"
        entries.append(
            _export_one(
                context,
                student,
                mode,
                student_info,
                path,
                reference,
                test_labels,
                run_qat,
            )
        )
    if teachers is not None and config.teacher_modes:
        entries += _export_teachers(context, teachers)
    golden_mode = _golden_mode(config.modes)
    golden = golden_entries(
        folder / f"student_{golden_mode}.tflite",
        test_images,
        test_labels,
        list(taxonomy.class_names),
        config.golden_images,
    )
    io_utils.write_json(folder / "golden.json", golden)
    report = {
        "test_set": dict(test_info, file="test.npz"),
        "qat": {
            **dataclasses.asdict(config.qat),
            "objective": _objective(teachers),
        },
        "options": dataclasses.asdict(config.options),
        "models": entries,
    }
    io_utils.write_json(folder / "parity.json", report)
    return report


def _objective(teachers):
    if teachers is None:
        return "hard labels only (the run has no teachers)"
    return (
        "distillation loss of kc_keras.distill.losses: hard labels plus "
        "teacher top-K soft targets computed online"
    )


def _golden_mode(modes):
    for mode in ("qat-int8", "ptq-int8"):
        if mode in modes:
            return mode
    return modes[0]


def _export_teachers(context, teachers):
    entries = []
    folder = context.run.tflite
    logits_output = context.config.options.logits_output
    taxonomy = teachers.taxonomy
    models = [
        (
            "generalist",
            None,
            teachers.generalist,
            tuple(range(taxonomy.num_classes)),
        )
    ]
    for vertical, model in enumerate(teachers.specialists):
        models.append(
            (
                "specialist",
                vertical,
                model,
                tuple(teachers.output_classes(vertical)),
            )
        )
    for role, vertical, model, output_classes in models:
        reference = functools.partial(
            keras_outputs, model, logits_output=logits_output
        )
        if role == "generalist":
            stem, labels = "generalist", context.test_labels
        else:
            stem = f"specialist_{vertical}"
            labels = _specialist_labels(taxonomy, vertical, context.test_labels)
        info = export_lib.ModelInfo(role, output_classes, vertical)
        for mode in context.config.teacher_modes:
            path = folder / f"{stem}_{mode}.tflite"
            entries.append(
                _export_one(
                    context, model, mode, info, path, reference, labels, None
                )
            )
    return entries
