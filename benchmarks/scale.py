"""Measure the student pipeline's cost from 1,000 to 100,000 classes.

For each number of classes N, a child process generates the `synthetic`
dataset, trains small teachers and writes the soft-target cache. It then
distils the FC-SC student from the cache and online, converts it to int8
TFLite and runs the exports with LiteRT. PTQ runs in the child and QAT in
the converter's own grandchild process. The child records the wall time
and the peak resident memory (VmHWM, reset between stages through
/proc/self/clear_refs) of each stage. It writes one JSON file per N,
atomically, so an interrupted run resumes at the first unfinished N. The
parent then writes scale.json, scale.md and scale.png with the log-log
slope of every figure against N.

Teachers stay tiny (a one-block CNN with 4 filters, a few steps) because
the point is the student pipeline's cost at large N, not teacher accuracy.
Every stage uses a fixed number of images whatever N is (`ScaleConfig`), so
the slopes measure the cost of the classes alone.

    python -m benchmarks.scale                  # N = 1,000, 10,000, 100,000
    python -m benchmarks.scale --quick          # N = 1,000, tiny settings
"""

import argparse
import dataclasses
import json
import logging
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from kc_keras import io_utils
from kc_keras.errors import KCError

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results"
DEFAULT_WORK = ROOT / "runs" / "scale"
SIZES_FOLDER = "scale_sizes"
FORMAT_VERSION = 1
# Export variants: (mode, logits_output). The probability outputs follow
# the export contract, a softmax with int8 output. The logits output is the
# fix for large N, where an int8 softmax rounds most probabilities to zero.
# A QAT logits export is left out by default because each QAT export costs
# a child process of minutes at N = 100,000 on 2 cores. The dynamic-range
# export (int8 weights, float activations and output) separates the error
# of the int8 weights from that of the int8 activations.
EXPORTS = (
    ("ptq-int8", False),
    ("ptq-int8", True),
    ("qat-int8", False),
    ("dynamic", True),
)
EXPORT_MODES = ("ptq-int8", "qat-int8", "dynamic")
# Below this top-1 agreement an export is flagged in the report.
AGREEMENT_TARGET = 0.98


@dataclasses.dataclass(frozen=True)
class ScaleConfig:
    """Settings of one scale run.

    Attributes:
        sizes: the numbers of classes N to measure.
        num_verticals: verticals of the synthetic taxonomy, the same at
            every N.
        quick_data: generate at most 8 training images per class.
        train_images: training images used by the teachers, the
            soft-target cache, distillation and QAT (a seeded subset).
        validation_images: validation images used by teacher training.
        eval_images: test images for agreement and accuracy.
        teacher_filters: filters of the teachers' one-block CNN.
        teacher_steps: training steps of the generalist and of each
            specialist.
        student_filters: filters of the student's first CNN block.
        student_blocks: CNN blocks of the student.
        fc_units: units of the student's shared FC layer.
        sc_width: hidden units of each SC block.
        batch_size: global batch size of distillation.
        cached_steps: timed distillation steps from the cache.
        online_steps: timed distillation steps with the teachers running.
        warmup_steps: untimed steps before each timing (graph tracing).
        qat_steps: QAT fine-tuning steps.
        representative_images: calibration images of the converter.
        latency_runs: timed batch-1 LiteRT invocations per export.
        exports: the (mode, logits_output) exports to convert and run.
        seed: seed of the data, the subsets and the weights.
    """

    sizes: tuple = (1000, 10000, 100000)
    num_verticals: int = 20
    quick_data: bool = False
    train_images: int = 8192
    validation_images: int = 2000
    eval_images: int = 1000
    teacher_filters: int = 4
    teacher_steps: int = 10
    student_filters: int = 8
    student_blocks: int = 2
    fc_units: int = 128
    sc_width: int = 32
    batch_size: int = 128
    cached_steps: int = 150
    online_steps: int = 10
    warmup_steps: int = 3
    qat_steps: int = 20
    representative_images: int = 200
    latency_runs: int = 200
    exports: tuple = EXPORTS
    seed: int = 0

    def __post_init__(self):
        if not self.sizes:
            raise KCError("no class counts given; pass --sizes 1000,10000")
        for mode, _ in self.exports:
            if mode not in EXPORT_MODES:
                raise KCError(
                    f"unknown scale export mode {mode!r}; use one of "
                    f"{', '.join(EXPORT_MODES)}"
                )
        for size in self.sizes:
            if size < 2 * self.num_verticals:
                raise KCError(
                    f"N={size} classes is too small for "
                    f"{self.num_verticals} verticals; every vertical needs "
                    f"2 classes, so pass N >= {2 * self.num_verticals}"
                )
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, int) and not isinstance(value, bool):
                minimum = 0 if field.name == "seed" else 1
                if value < minimum:
                    raise KCError(
                        f"scale setting {field.name}={value} is invalid; "
                        f"use {minimum} or more"
                    )

    @classmethod
    def quick(cls, **overrides):
        """Return the settings of the quick variant: N = 1,000, tiny runs."""
        settings = {
            "sizes": (1000,),
            # Four verticals keep the quick run (the test's) to five
            # teachers.
            "num_verticals": 4,
            "quick_data": True,
            "train_images": 1024,
            "validation_images": 256,
            "eval_images": 250,
            "teacher_steps": 2,
            "student_filters": 4,
            "student_blocks": 1,
            "fc_units": 32,
            "sc_width": 8,
            "batch_size": 64,
            "cached_steps": 5,
            "online_steps": 3,
            "warmup_steps": 1,
            "qat_steps": 2,
            "representative_images": 32,
            "latency_runs": 20,
        }
        settings.update(overrides)
        return cls(**settings)

    def to_dict(self):
        data = dataclasses.asdict(self)
        data["sizes"] = list(self.sizes)
        data["exports"] = [list(export) for export in self.exports]
        return data

    @classmethod
    def from_dict(cls, data):
        data = dict(data)
        data["sizes"] = tuple(data["sizes"])
        data["exports"] = tuple(
            (str(mode), bool(logits)) for mode, logits in data["exports"]
        )
        return cls(**data)

    def measurement_key(self):
        """Return the settings a stored per-N result must match to be kept."""
        data = self.to_dict()
        del data["sizes"]
        return data


# ---------------------------------------------------------------------------
# Memory and timing of one stage (child process)


def _status_kib(field):
    """Return a kB field of /proc/self/status, or None off Linux."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_memory():
    """Reset VmHWM to the current resident size; return False if unable.

    Writing 5 to /proc/self/clear_refs resets the peak resident size on
    Linux 4.0 and later, so each stage's peak excludes earlier stages'.
    """
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as refs:
            refs.write("5")
    except OSError:
        return False
    return True


def _children_peak_mib():
    # ru_maxrss of RUSAGE_CHILDREN is the largest peak among the waited-for
    # child processes, in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


class StageMeter:
    """Record the wall time and peak memory of one stage into `stages`.

    The entry has `seconds`, `start_mib` (resident size at the start),
    `peak_mib` (VmHWM at the end, after a reset at the start) and, when a
    child process set a new high, `child_peak_mib`.

    Args:
        name: the stage's key in `stages`.
        stages: the dict that receives the entry.
        label: progress prefix for the log, such as "N=1000".
    """

    def __init__(self, name, stages, label):
        self.name = name
        self.stages = stages
        self.label = label

    def __enter__(self):
        self.peak_reset = reset_peak_memory()
        self.start_mib = (_status_kib("VmRSS") or 0) / 1024
        self.children_before = _children_peak_mib()
        logger.info("%s: %s", self.label, self.name)
        self.start = time.perf_counter()
        return self

    def __exit__(self, exc_type, exc, traceback):
        if exc_type is not None:
            return False
        seconds = time.perf_counter() - self.start
        entry = {
            "seconds": round(seconds, 3),
            "start_mib": round(self.start_mib, 1),
            "peak_mib": round((_status_kib("VmHWM") or 0) / 1024, 1),
            "peak_reset": self.peak_reset,
        }
        children_after = _children_peak_mib()
        if children_after > self.children_before:
            entry["child_peak_mib"] = round(children_after, 1)
        self.stages[self.name] = entry
        logger.info(
            "%s: %s took %.1f s, peak %.0f MiB",
            self.label,
            self.name,
            seconds,
            entry["peak_mib"],
        )
        return False


# ---------------------------------------------------------------------------
# One N (child process)


def _subset(split, count, rng):
    from kc_keras.data.base import Split

    if count >= len(split):
        return split
    indices = np.sort(rng.choice(len(split), count, replace=False))
    return Split(split.images[indices], split.labels[indices])


def scale_dataset(config, num_classes):
    """Load the synthetic dataset and keep fixed-size seeded subsets.

    Args:
        config: a `ScaleConfig`.
        num_classes: N.

    Returns:
        A `Dataset` whose splits hold at most `train_images`,
        `validation_images` and `eval_images` images.
    """
    from kc_keras.data import load_dataset

    dataset = load_dataset(
        "synthetic",
        num_classes=num_classes,
        num_verticals=config.num_verticals,
        quick=config.quick_data,
        seed=config.seed,
    )
    rng = np.random.default_rng(config.seed)
    counts = {
        "train": config.train_images,
        "validation": config.validation_images,
        "test": config.eval_images,
    }
    splits = {
        name: _subset(dataset.split(name), counts[name], rng)
        for name in ("train", "validation", "test")
    }
    return dataclasses.replace(dataset, splits=splits)


def _student_config(config):
    from kc_keras.models import backbones
    from kc_keras.models.student import StudentConfig

    return StudentConfig(
        backbone=backbones.BackboneSpec(
            filters=config.student_filters, blocks=config.student_blocks
        ),
        fc_units=config.fc_units,
        head="fc-sc",
        sc_width=config.sc_width,
    )


def _distil(config, dataset, teachers, loss_config, data, steps):
    """Train a fresh student on `data` and return (student, step seconds).

    Builds the student and the `Distiller` with `kc_keras.distill.train`'s
    own builders, under the default strategy.
    """
    import keras

    from kc_keras.distill import train as train_lib
    from kc_keras.distill.config import TrainConfig
    from kc_keras.models import student as student_lib

    total = config.warmup_steps + steps
    train_config = TrainConfig(
        epochs=1, batch_size=config.batch_size, seed=config.seed
    )
    keras.utils.set_random_seed(config.seed)
    student = student_lib.build_student(
        _student_config(config), dataset.taxonomy, dataset.preprocessing
    )
    trainer = train_lib.build_trainer(
        "distill",
        student,
        teachers,
        dataset.taxonomy,
        loss_config,
        train_config,
        total,
    )
    timer = train_lib.StepTimer(warmup=config.warmup_steps)
    trainer.fit(
        data, epochs=1, steps_per_epoch=total, callbacks=[timer], verbose=0
    )
    return student, timer.mean


def _folder_bytes(folder):
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file())


def weight_granularity(tflite_bytes):
    """Return how the int8 weights of fully connected layers are quantized.

    Returns:
        A dict with `per_channel` and `per_tensor`: the number of int8
        rank-2 constant tensors (the FULLY_CONNECTED weights) with one
        scale per output channel or a single scale.
    """
    from tensorflow.lite.python import schema_py_generated as schema

    model = schema.ModelT.InitFromObj(
        schema.Model.GetRootAsModel(bytearray(tflite_bytes), 0)
    )
    counts = {"per_channel": 0, "per_tensor": 0}
    for tensor in model.subgraphs[0].tensors:
        if tensor.type != schema.TensorType.INT8 or len(tensor.shape) != 2:
            continue
        buffer = model.buffers[tensor.buffer]
        if buffer.data is None or not len(buffer.data):
            continue
        scales = tensor.quantization.scale if tensor.quantization else None
        if scales is not None and len(scales) > 1:
            counts["per_channel"] += 1
        else:
            counts["per_tensor"] += 1
    return counts


def top_margin(scores):
    """Return each row's gap between its largest and second-largest score."""
    top2 = -np.partition(-scores, 1, axis=1)[:, :2]
    return top2[:, 0] - top2[:, 1]


def agreement(reference_logits, outputs, labels, step=None, softmax=False):
    """Compare an export's outputs with the Keras float logits.

    Args:
        reference_logits: Keras float32 logits (images, N).
        outputs: the export's dequantized outputs (images, N).
        labels: the images' class labels.
        step: the export's output quantization scale. With it, the result
            also reports agreement on the images whose Keras top-1 leads
            by more than 2 steps.
        softmax: the export outputs probabilities, so margins are taken
            between the Keras model's softmax probabilities.

    Returns:
        A dict of fractions of images, except `mean_max_ties`:
        `top1`: same top-1 class.
        `top5`: the Keras top-1 class is among the export's top 5.
        `top5_overlap`: mean shared fraction of the two top-5 sets.
        `export_top1_accuracy` and `keras_top1_accuracy`: top-1 accuracy.
        `mean_max_ties`: mean number of classes that share the export's
        maximum output. argmax breaks such ties by taking the lowest index.
        `all_equal_fraction`: images whose outputs are all equal, such as
        an int8 softmax that rounds every probability to zero.
        With `step`: `clear_fraction`, the images whose Keras top-1 leads
        by more than 2 steps, and `top1_clear`, the top-1 agreement on
        them (None when there are none).
    """
    keras_top1 = reference_logits.argmax(axis=1)
    export_top1 = outputs.argmax(axis=1)
    k = min(5, outputs.shape[1])
    keras_top5 = np.argpartition(-reference_logits, k - 1, axis=1)[:, :k]
    export_top5 = np.argpartition(-outputs, k - 1, axis=1)[:, :k]
    overlap = [
        len(np.intersect1d(a, b)) / k
        for a, b in zip(keras_top5, export_top5, strict=True)
    ]
    maxima = outputs.max(axis=1, keepdims=True)
    result = {
        "top1": float(np.mean(keras_top1 == export_top1)),
        "top5": float(np.mean(np.any(export_top5 == keras_top1[:, None], 1))),
        "top5_overlap": float(np.mean(overlap)),
        "export_top1_accuracy": float(np.mean(export_top1 == labels)),
        "keras_top1_accuracy": float(np.mean(keras_top1 == labels)),
        "mean_max_ties": float(np.mean(np.sum(outputs == maxima, axis=1))),
        "all_equal_fraction": float(
            np.mean(outputs.min(axis=1) == maxima[:, 0])
        ),
    }
    if step:
        reference = reference_logits
        if softmax:
            shifted = reference_logits - reference_logits.max(1, keepdims=True)
            reference = np.exp(shifted)
            reference /= reference.sum(axis=1, keepdims=True)
        clear = top_margin(reference) > 2 * step
        result["clear_fraction"] = float(np.mean(clear))
        result["top1_clear"] = (
            float(np.mean(keras_top1[clear] == export_top1[clear]))
            if clear.any()
            else None
        )
    return result


# TFLite's int8 L2_NORMALIZATION kernel has a fixed output scale of 1/128
# (zero point 0), whatever the calibration data.
L2_NORMALIZATION_STEP = 1.0 / 128


def l2_rounding_agreement(student, images):
    """Return the top-1 agreement of the float student with one change.

    Only the L2-normalised logits of each self-paced layer are rounded to
    multiples of 1/128, as the int8 L2_NORMALIZATION kernel outputs them.
    Everything else stays float, so the result isolates that layer's share
    of the int8 export's disagreement. A vertical of n classes has
    normalised entries near 1/sqrt(n), which is only 128/sqrt(n) steps.

    Returns:
        The agreement, or None when the student has no self-paced layer.
    """
    import keras

    scaled = [
        layer
        for layer in student.layers
        if type(layer).__name__ == "SelfPacedScale"
    ]
    if not scaled:
        return None
    probe = keras.Model(student.inputs, [layer.input for layer in scaled])
    parts = probe.predict(images.astype(np.float32), batch_size=128, verbose=0)
    if len(scaled) == 1:
        # A model with one output returns an array, not a list.
        parts = [parts]
    exact, rounded = [], []
    for layer, logits in zip(scaled, parts, strict=True):
        gamma = layer.get_weights()[0]
        norm = np.sqrt(np.maximum(np.sum(logits**2, 1, keepdims=True), 1e-12))
        unit = logits / norm
        steps = np.clip(np.round(unit / L2_NORMALIZATION_STEP), -128, 127)
        exact.append(gamma * unit)
        rounded.append(gamma * steps * L2_NORMALIZATION_STEP)
    exact = np.concatenate(exact, axis=1)
    rounded = np.concatenate(rounded, axis=1)
    return float(np.mean(exact.argmax(axis=1) == rounded.argmax(axis=1)))


def _latency(model, image, runs):
    from mobile_demo.benchmark import latency_stats

    tensor = model.quantize_input(image)
    for _ in range(5):
        model.invoke(tensor)
    timings = []
    for _ in range(runs):
        start = time.perf_counter()
        model.invoke(tensor)
        timings.append(time.perf_counter() - start)
    return latency_stats(timings)


def _export_name(mode, logits_output):
    return f"student_{mode}" + ("_logits" if logits_output else "")


def _train_teachers(config, dataset, run_dir, stages, label):
    """Train the tiny teachers; return them and their summary."""
    from kc_keras.models import backbones
    from kc_keras.models import teachers as teachers_lib

    teacher_config = teachers_lib.TeacherConfig(
        backbone=backbones.BackboneSpec(
            filters=config.teacher_filters, blocks=1
        ),
        epochs=1,
        specialist_epochs=1,
        batch_size=config.batch_size,
        steps_per_epoch=config.teacher_steps,
        seed=config.seed,
    )
    with StageMeter("teachers", stages, label):
        metrics = teachers_lib.train_teachers(
            dataset, run_dir, teacher_config, overwrite=True
        )
        teachers = teachers_lib.load_teachers(run_dir)
    summary = {
        "generalist_parameters": int(teachers.generalist.count_params()),
        "specialist_parameters": int(
            sum(model.count_params() for model in teachers.specialists)
        ),
        "generalist_top1": metrics["models"]["generalist"]["top1"],
    }
    return teachers, summary


def _cache_targets(dataset, teachers, loss_config, run_dir, stages, label):
    """Write and read back the soft-target cache; return arrays, summary."""
    from kc_keras.distill import soft_targets

    with StageMeter("cache_write", stages, label):
        targets = soft_targets.TeacherTargets(
            teachers.generalist,
            teachers.specialists,
            dataset.taxonomy,
            loss_config,
        )
        files = [
            run_dir.teachers / entry["file"]
            for entry in teachers.manifest["models"]
        ]
        key = soft_targets.cache_key(targets, dataset, files)
        soft_targets.write_cache(run_dir.soft_targets, targets, dataset, key)
    with StageMeter("cache_read", stages, label):
        arrays = soft_targets.read_cache(run_dir.soft_targets, key)
    cache_bytes = _folder_bytes(run_dir.soft_targets)
    index_dtype = soft_targets.index_dtype(dataset.taxonomy.num_classes)
    summary = {
        "bytes": cache_bytes,
        "bytes_per_image": cache_bytes / len(dataset.split("train")),
        "top_k": dict(targets.widths),
        "index_dtype": np.dtype(index_dtype).name,
    }
    return arrays, summary


def _qat_inputs(config, dataset, arrays, loss_config, reference, images):
    """Return the `QATData` and `QATConfig` of the QAT export."""
    from converters import qat as qat_lib

    train = dataset.split("train")
    qat_data = qat_lib.QATData(
        train_images=train.images,
        train_labels=train.labels.astype(np.int32),
        representative=images,
        reference_images=dataset.split("test").images[:8],
        reference_logits=reference[:8],
        targets={
            role: (indices.astype(np.int32), values.astype(np.float32))
            for role, (indices, values) in arrays.items()
        },
        loss=loss_config,
    )
    qat_config = qat_lib.QATConfig(
        epochs=1,
        steps_per_epoch=config.qat_steps,
        batch_size=config.batch_size,
        seed=config.seed,
    )
    return qat_data, qat_config


def _representative(config, dataset):
    train = dataset.split("train")
    rng = np.random.default_rng(config.seed)
    count = min(config.representative_images, len(train))
    return train.images[np.sort(rng.choice(len(train), count, replace=False))]


def _export_and_run(config, dataset, student, qat_inputs, run_dir, stages):
    """Convert the student to every export of `config` and run each one.

    Args:
        config: a `ScaleConfig`.
        dataset: the scale `Dataset`.
        student: the distilled Keras student.
        qat_inputs: (reference logits on the test images, soft-target
            arrays, `LossConfig`) for the QAT export.
        run_dir: the per-N `RunDir`.
        stages: the stage timings dict.

    Returns:
        `{export name: measurements}`.
    """
    from converters import export as export_lib
    from converters import qat as qat_lib
    from mobile_demo.benchmark import TFLiteModel

    taxonomy = dataset.taxonomy
    label = f"N={taxonomy.num_classes}"
    test = dataset.split("test")
    reference, arrays, loss_config = qat_inputs
    representative = _representative(config, dataset)
    qat_data, qat_config = _qat_inputs(
        config, dataset, arrays, loss_config, reference, representative
    )
    builder_kwargs = {
        "config": _student_config(config).to_dict(),
        "taxonomy": taxonomy.to_dict(),
        "preprocessing": dataset.preprocessing.to_dict(),
    }
    info = export_lib.ModelInfo("student", tuple(range(taxonomy.num_classes)))
    exports = {}
    for mode, logits_output in config.exports:
        name = _export_name(mode, logits_output)
        options = export_lib.ExportOptions(logits_output=logits_output)
        path = run_dir.tflite / f"{name}.tflite"
        with StageMeter(f"convert_{name}", stages, label):
            if mode == "qat-int8":
                tflite_bytes = qat_lib.qat_export(
                    student,
                    "converters.qat:build_student_from_dicts",
                    builder_kwargs,
                    qat_data,
                    qat_config,
                    options,
                )
            else:
                tflite_bytes = export_lib.convert_keras(
                    student, mode, representative, options
                )
            record = export_lib.write_export(
                tflite_bytes,
                path,
                mode,
                info,
                taxonomy,
                dataset.preprocessing,
                options,
            )
        model = TFLiteModel(path, num_threads=1)
        outputs = model.predict(test.images)
        exports[name] = {
            "mode": mode,
            "output": "logits" if logits_output else "probabilities",
            "size_bytes": record["size_bytes"],
            # The converted flatbuffer before the kc_keras metadata, whose
            # JSON lists every class name and grows with N on its own.
            "model_bytes": len(tflite_bytes),
            "output_quantization": record["output"],
            "weights": weight_granularity(tflite_bytes),
            "agreement": agreement(
                reference,
                outputs,
                test.labels,
                step=record["output"]["scale"],
                softmax=not logits_output,
            ),
            "latency_ms": _latency(model, test.images[:1], config.latency_runs),
        }
        del model, outputs
        logger.info(
            "%s: %s top-1 agreement %.4f, %d bytes",
            label,
            name,
            exports[name]["agreement"]["top1"],
            record["size_bytes"],
        )
    return exports


def measure_size(config, num_classes, work_dir):
    """Run every stage at `num_classes` classes and return the measurements.

    Args:
        config: a `ScaleConfig`.
        num_classes: N.
        work_dir: folder of the per-N run folders (teachers, cache,
            student, exports); replaced on each measurement.

    Returns:
        A JSON-serialisable dict of the measurements.
    """
    import keras

    from kc_keras import training
    from kc_keras.distill import soft_targets
    from kc_keras.distill.config import LossConfig
    from kc_keras.models import student as student_lib
    from kc_keras.run import RunDir

    label = f"N={num_classes}"
    stages = {}
    result = {
        "format_version": FORMAT_VERSION,
        "num_classes": num_classes,
        "key": config.measurement_key(),
        "stages": stages,
    }
    run_dir = RunDir(Path(work_dir) / f"n{num_classes}")
    with StageMeter("data", stages, label):
        dataset = scale_dataset(config, num_classes)
    result["num_verticals"] = dataset.taxonomy.num_verticals
    result["images"] = {
        name: len(dataset.split(name))
        for name in ("train", "validation", "test")
    }
    teachers, result["teachers"] = _train_teachers(
        config, dataset, run_dir, stages, label
    )
    loss_config = LossConfig()
    arrays, result["cache"] = _cache_targets(
        dataset, teachers, loss_config, run_dir, stages, label
    )

    with StageMeter("distill_cached", stages, label):
        data = soft_targets.cached_pipeline(
            dataset, arrays, config.batch_size, seed=config.seed
        ).repeat()
        student, cached_step = _distil(
            config, dataset, teachers, loss_config, data, config.cached_steps
        )
    with StageMeter("distill_online", stages, label):
        data = dataset.pipeline("train", config.batch_size, repeat=True)
        _, online_step = _distil(
            config, dataset, teachers, loss_config, data, config.online_steps
        )
    training.save_model(student, run_dir.student / "student.keras")
    result["parameters"] = student_lib.count_parameters(student)
    result["step_seconds"] = {"cached": cached_step, "online": online_step}

    test_images = dataset.split("test").images
    reference = training.predict_logits(student, test_images)
    result["diagnostics"] = {
        "l2_rounding_top1": l2_rounding_agreement(student, test_images),
        "keras_top1_margin_median": float(np.median(top_margin(reference))),
    }
    result["exports"] = _export_and_run(
        config,
        dataset,
        student,
        (reference, arrays, loss_config),
        run_dir,
        stages,
    )
    keras.backend.clear_session()
    return result


# ---------------------------------------------------------------------------
# Driver (parent process)


def size_path(out_dir, num_classes):
    """Return the per-N result file of a scale run."""
    return Path(out_dir) / SIZES_FOLDER / f"n{num_classes}.json"


def load_finished(out_dir, config, num_classes):
    """Return a stored result of N measured with `config`, or None."""
    path = size_path(out_dir, num_classes)
    if not path.is_file():
        return None
    stored = io_utils.read_json(path)
    if stored.get("key") != config.measurement_key():
        logger.info(
            "%s was measured with other settings; measuring again", path
        )
        return None
    return stored


def run_child(config, num_classes, out_dir, work_dir, timeout_s=None):
    """Measure one N in a child process and return its stored result.

    Raises:
        KCError: the child failed or timed out.
    """
    path = size_path(out_dir, num_classes)
    command = [
        sys.executable,
        "-m",
        "benchmarks.scale",
        "measure",
        "--size",
        str(num_classes),
        "--config",
        json.dumps(config.to_dict()),
        "--result",
        str(path),
        "--work",
        str(work_dir),
    ]
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p]
    )
    start = time.perf_counter()
    try:
        completed = subprocess.run(
            command, env=env, cwd=ROOT, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired as error:
        raise KCError(
            f"measuring N={num_classes} timed out after {timeout_s} s; "
            "lower the step counts or the sizes"
        ) from error
    if completed.returncode != 0 or not path.is_file():
        raise KCError(
            f"measuring N={num_classes} failed with exit code "
            f"{completed.returncode}; see the log above"
        )
    logger.info(
        "N=%d measured in %.0f s", num_classes, time.perf_counter() - start
    )
    return io_utils.read_json(path)


def log_log_slope(sizes, values):
    """Return the least-squares slope of log(value) against log(N).

    Returns None unless at least two sizes have a positive value.
    """
    points = [
        (math.log(n), math.log(v))
        for n, v in zip(sizes, values, strict=True)
        if v is not None and v > 0
    ]
    if len(points) < 2:
        return None
    x, y = np.array(points).T
    return float(np.polyfit(x, y, 1)[0])


def growth(slope):
    """Describe a log-log slope: constant, sublinear, linear or worse."""
    if slope is None:
        return "n/a"
    if slope < 0.2:
        return "about constant"
    if slope < 0.8:
        return "sublinear"
    if slope <= 1.2:
        return "linear"
    return "superlinear"


def _stage(result, name, field):
    entry = result["stages"].get(name, {})
    return entry.get(field)


def _increase(result, name):
    entry = result["stages"].get(name)
    if entry is None:
        return None
    return max(0.0, entry["peak_mib"] - entry["start_mib"])


# name: (description, unit, function of a per-N result)
METRICS = {
    "parameters": (
        "student parameters",
        "count",
        lambda r: r["parameters"]["total"],
    ),
    "head_parameters": (
        "student head parameters",
        "count",
        lambda r: r["parameters"]["head"],
    ),
    "cache_bytes_per_image": (
        "soft-target cache per image",
        "bytes",
        lambda r: r["cache"]["bytes_per_image"],
    ),
    "cached_step_ms": (
        "distillation step from the cache",
        "ms",
        lambda r: 1e3 * r["step_seconds"]["cached"],
    ),
    "online_step_ms": (
        "distillation step with online teachers",
        "ms",
        lambda r: 1e3 * r["step_seconds"]["online"],
    ),
    "distill_peak_mib": (
        "peak memory of cached distillation",
        "MiB",
        lambda r: _stage(r, "distill_cached", "peak_mib"),
    ),
    "distill_increase_mib": (
        "memory added by cached distillation",
        "MiB",
        lambda r: _increase(r, "distill_cached"),
    ),
    "ptq_seconds": (
        "PTQ int8 conversion",
        "s",
        lambda r: _stage(r, "convert_student_ptq-int8", "seconds"),
    ),
    "ptq_peak_mib": (
        "peak memory of PTQ conversion",
        "MiB",
        lambda r: _stage(r, "convert_student_ptq-int8", "peak_mib"),
    ),
    "qat_seconds": (
        "QAT int8 fine-tuning and conversion",
        "s",
        lambda r: _stage(r, "convert_student_qat-int8", "seconds"),
    ),
    "qat_peak_mib": (
        "peak memory of the QAT child",
        "MiB",
        lambda r: _stage(r, "convert_student_qat-int8", "child_peak_mib"),
    ),
    "tflite_bytes": (
        ".tflite file size with metadata (QAT int8)",
        "bytes",
        lambda r: r["exports"]["student_qat-int8"]["size_bytes"],
    ),
    "tflite_model_bytes": (
        ".tflite model without metadata (QAT int8)",
        "bytes",
        lambda r: r["exports"]["student_qat-int8"]["model_bytes"],
    ),
    "latency_ms": (
        "LiteRT latency, batch 1, median (QAT int8)",
        "ms",
        lambda r: r["exports"]["student_qat-int8"]["latency_ms"]["median"],
    ),
}


def summarize(results):
    """Return per-metric values and log-log slopes over the measured N.

    Args:
        results: per-N result dicts, sorted by N.

    Returns:
        `{metric: {"description", "unit", "values", "slope", "growth",
        "top_slope", "top_growth"}}`, where `top_slope` is the slope
        between the two largest N.
    """
    sizes = [r["num_classes"] for r in results]
    summary = {}
    for name, (description, unit, value_of) in METRICS.items():
        values = []
        for result in results:
            try:
                values.append(value_of(result))
            except (KeyError, TypeError):
                values.append(None)
        slope = log_log_slope(sizes, values)
        # Fixed costs flatten the fit over all N; the slope between the
        # two largest N shows the growth that large N approaches.
        top_slope = log_log_slope(sizes[-2:], values[-2:])
        summary[name] = {
            "description": description,
            "unit": unit,
            "values": values,
            "slope": slope,
            "growth": growth(slope),
            "top_slope": top_slope,
            "top_growth": growth(top_slope),
        }
    return summary


def _cell(value, digits=1):
    if value is None:
        return "n/a"
    if isinstance(value, int) or float(value).is_integer():
        return f"{int(value):,}"
    if abs(value) < 10:
        return f"{value:.3g}"
    return f"{value:,.{digits}f}"


def render_markdown(report):
    """Return scale.md: the per-N table, the exports and the slopes."""
    results = report["results"]
    sizes = [r["num_classes"] for r in results]
    lines = [
        "# Student pipeline cost against the number of classes",
        "",
        f"Measured by `python -m benchmarks.scale"
        f"{' --quick' if report['quick'] else ''}` on "
        f"{report['machine']['cpu']} ({report['machine']['cores']} cores); "
        f"wall time {report['wall_s']:.0f} s. Teachers are tiny "
        "(a one-block CNN, a few steps): the figures are the student "
        "pipeline's cost, not its accuracy. Every N uses "
        f"{report['config']['train_images']:,} training images and "
        f"{report['config']['eval_images']:,} test images.",
        "",
        "| metric | unit | "
        + " | ".join(f"N={n:,}" for n in sizes)
        + " | slope | growth | slope, 2 largest N | growth there |",
        "|---|---|" + "---:|" * len(sizes) + "---:|---|---:|---|",
    ]
    for row in report["summary"].values():
        slope = "n/a" if row["slope"] is None else f"{row['slope']:.2f}"
        top = row.get("top_slope")
        top = "n/a" if top is None else f"{top:.2f}"
        lines.append(
            f"| {row['description']} | {row['unit']} | "
            + " | ".join(_cell(v) for v in row["values"])
            + f" | {slope} | {row['growth']} | {top} | "
            + f"{row.get('top_growth', 'n/a')} |"
        )
    lines += [
        "",
        "## int8 exports against the Keras float student",
        "",
        f"Top-1 agreement below {AGREEMENT_TARGET:.0%} is marked with !. "
        "Top-5 agreement: the Keras top-1 class is among the export's top "
        "5. Clear: images whose Keras top-1 leads the runner-up by more "
        "than 2 output quantization steps, and the top-1 agreement on "
        "them. Max ties: mean number of classes sharing the export's "
        "maximum output.",
        "",
        "| N | export | output | top-1 agr. | top-5 agr. | clear | "
        "top-1 agr. clear | max ties | model KiB | median ms | "
        "weights per-channel / per-tensor |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for result in results:
        for entry in result["exports"].values():
            agree = entry["agreement"]
            flag = " !" if agree["top1"] < AGREEMENT_TARGET else ""
            lines.append(
                f"| {result['num_classes']:,} | {entry['mode']} | "
                f"{entry['output']} | {agree['top1']:.3f}{flag} | "
                f"{agree['top5']:.3f} | "
                f"{_cell(agree.get('clear_fraction'))} | "
                f"{_cell(agree.get('top1_clear'))} | "
                f"{agree['mean_max_ties']:.2f} | "
                f"{entry['model_bytes'] / 1024:,.0f} | "
                f"{entry['latency_ms']['median']:.3f} | "
                f"{entry['weights']['per_channel']} / "
                f"{entry['weights']['per_tensor']} |"
            )
    lines += [
        "",
        "Float student with only its L2-normalised logits rounded to the "
        "1/128 steps of TFLite's int8 L2_NORMALIZATION output (everything "
        "else float): top-1 agreement "
        + ", ".join(
            f"{_cell(r.get('diagnostics', {}).get('l2_rounding_top1'))} at "
            f"N={r['num_classes']:,}"
            for r in results
        )
        + ". Median Keras top-1 logit margin: "
        + ", ".join(
            f"{_cell(r.get('diagnostics', {}).get('keras_top1_margin_median'))}"
            for r in results
        )
        + ".",
    ]
    lines += [
        "",
        "## Peak resident memory per stage (MiB)",
        "",
        "| N | stage | seconds | start | peak | child peak |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for result in results:
        for stage, entry in result["stages"].items():
            lines.append(
                f"| {result['num_classes']:,} | {stage} | "
                f"{entry['seconds']:.1f} | {entry['start_mib']:.0f} | "
                f"{entry['peak_mib']:.0f} | "
                f"{_cell(entry.get('child_peak_mib'), 0)} |"
            )
    return "\n".join(lines) + "\n"


def render_plot(report, path):
    """Write scale.png: times and memory against N, log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [r["num_classes"] for r in report["results"]]
    summary = report["summary"]
    panels = (
        (
            "time",
            ("cached_step_ms", "online_step_ms", "latency_ms"),
            ("ptq_seconds", "qat_seconds"),
        ),
        (
            "memory and size",
            ("distill_peak_mib", "ptq_peak_mib", "qat_peak_mib"),
            (),
        ),
    )
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for axis, (title, names, seconds_names) in zip(axes, panels, strict=True):
        for name in names + seconds_names:
            row = summary[name]
            points = [
                (n, v)
                for n, v in zip(sizes, row["values"], strict=True)
                if v is not None and v > 0
            ]
            if not points:
                continue
            x, y = zip(*points, strict=True)
            slope = (
                "" if row["slope"] is None else f", slope {row['slope']:.2f}"
            )
            axis.plot(
                x,
                y,
                marker="o",
                label=f"{row['description']} ({row['unit']}{slope})",
            )
        size_names = ("tflite_bytes", "tflite_model_bytes")
        for name in size_names if title == "memory and size" else ():
            row = summary[name]
            points = [
                (n, v / 2**20)
                for n, v in zip(sizes, row["values"], strict=True)
                if v
            ]
            if points:
                x, y = zip(*points, strict=True)
                axis.plot(x, y, marker="s", label=f"{row['description']} (MiB)")
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("number of classes N")
        axis.set_title(title)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    with io_utils.atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    plt.close(figure)


def machine():
    from mobile_demo.benchmark import machine_info

    info = machine_info()
    info["memory_gib"] = round(
        os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1
    )
    return info


def run_scale(config, out_dir, work_dir, quick=False, force=False):
    """Measure every N of `config` and write scale.json, .md and .png.

    A per-N result already stored with the same settings is reused unless
    `force` is set, so a killed run resumes at the first unfinished N.

    Args:
        config: a `ScaleConfig`.
        out_dir: folder of the reports and of the per-N results.
        work_dir: folder of the per-N run folders.
        quick: record that the quick variant ran.
        force: measure every N again.

    Returns:
        The report dict written to scale.json.

    Raises:
        KCError: a child process failed.
    """
    out_dir = Path(out_dir)
    start = time.perf_counter()
    results = []
    for num_classes in sorted(config.sizes):
        stored = None if force else load_finished(out_dir, config, num_classes)
        if stored is not None:
            logger.info("N=%d already measured; skipping", num_classes)
        else:
            stored = run_child(config, num_classes, out_dir, work_dir)
        results.append(stored)
    report = {
        "format_version": FORMAT_VERSION,
        "quick": quick,
        "config": config.to_dict(),
        "machine": machine(),
        # Wall time of the measurements themselves, summed over the N,
        # so a resumed run reports the total, not only its last part.
        "wall_s": float(sum(r["wall_s"] for r in results)),
        "this_invocation_s": time.perf_counter() - start,
        "results": results,
        "summary": summarize(results),
    }
    io_utils.write_json(out_dir / "scale.json", report)
    io_utils.write_text(out_dir / "scale.md", render_markdown(report))
    render_plot(report, out_dir / "scale.png")
    logger.info("wrote %s", out_dir / "scale.json")
    return report


# ---------------------------------------------------------------------------
# Command line


def _parse_sizes(text):
    try:
        sizes = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as error:
        raise argparse.ArgumentTypeError(
            f"invalid --sizes {text!r}; pass integers such as 1000,10000"
        ) from error
    if not sizes:
        raise argparse.ArgumentTypeError("--sizes is empty")
    return sizes


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.scale",
        description="Measure the student pipeline at 1,000 to 100,000 "
        "classes and write scale.json, scale.md and scale.png.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="N=1,000 with tiny models and step counts (the test's run).",
    )
    parser.add_argument(
        "--sizes",
        type=_parse_sizes,
        help="Comma-separated numbers of classes (default 1000,10000,100000"
        "; 1000 with --quick).",
    )
    parser.add_argument(
        "--verticals",
        type=int,
        help="Verticals of the synthetic taxonomy (default 20).",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="Report folder (default benchmarks/results, or "
        "runs/scale-quick/results with --quick).",
    )
    parser.add_argument(
        "--work",
        type=Path,
        help="Folder of the per-N run folders (default runs/scale, or "
        "runs/scale-quick with --quick).",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="Measure every N again instead of reusing stored results.",
    )
    return parser


def build_child_parser():
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale measure")
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--config", required=True, help="ScaleConfig JSON.")
    parser.add_argument("--result", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    return parser


def measure_main(argv):
    """Child entry point: measure one N and write its result file."""
    args = build_child_parser().parse_args(argv)
    config = ScaleConfig.from_dict(json.loads(args.config))
    start = time.perf_counter()
    result = measure_size(config, args.size, args.work)
    result["wall_s"] = time.perf_counter() - start
    io_utils.write_json(args.result, result)
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(name)s: %(message)s",
    )
    try:
        if argv[:1] == ["measure"]:
            return measure_main(argv[1:])
        args = build_parser().parse_args(argv)
        overrides = {}
        if args.sizes:
            overrides["sizes"] = args.sizes
        if args.verticals:
            overrides["num_verticals"] = args.verticals
        if args.quick:
            config = ScaleConfig.quick(**overrides)
        else:
            config = ScaleConfig(**overrides)
        quick_work = DEFAULT_WORK.with_name("scale-quick")
        out = args.out or (
            quick_work / "results" if args.quick else DEFAULT_OUT
        )
        work = args.work or (quick_work if args.quick else DEFAULT_WORK)
        report = run_scale(
            config, out, work, quick=args.quick, force=args.force
        )
    except KCError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(report["summary"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
