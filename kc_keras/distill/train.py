"""Distil the teachers of a run folder into a student, and score it.

`distill_run` is what `kc distill` runs: it loads the run's dataset and
teachers, checks they belong together, trains the student (multi-teacher
distillation, hard labels only, or Keras's built-in `keras.distillation.
Distiller` from the generalist), saves only the student to
RUN/student/<output>.keras, and writes the test-split metrics of the
student, the optional baselines, the generalist and the routed ensemble.
"""

import dataclasses
import logging
import time

import keras
import numpy as np

from kc_keras import evaluation
from kc_keras import io_utils
from kc_keras import training
from kc_keras.data import load_dataset
from kc_keras.data.base import Taxonomy
from kc_keras.distill import soft_targets
from kc_keras.distill import workers
from kc_keras.distill.config import LossConfig
from kc_keras.distill.distiller import Distiller
from kc_keras.distill.distiller import NonFiniteLossStop
from kc_keras.distill.distiller import StudentCheckpoint
from kc_keras.distill.strategy import make_strategy
from kc_keras.errors import KCError
from kc_keras.models import backbones
from kc_keras.models import student as student_lib
from kc_keras.models import teachers as teachers_lib
from kc_keras.run import RunDir

logger = logging.getLogger(__name__)

MODES = ("distill", "no-distill", "keras-distiller")
BASELINE_NAMES = {
    "no-distill": "no_distill",
    "keras-distiller": "keras_distiller",
}
QUICK_STEPS = 5
# Steps skipped before timing, so graph tracing does not count.
WARMUP_STEPS = 3
TIMING_STEPS = 20


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """Students that `distill_run` trains, and where it writes them.

    Attributes:
        mode: `distill` (multi-teacher), `no-distill` (hard labels only) or
            `keras-distiller` (Keras's Distiller from the generalist).
        baselines: also train `no-distill` and `keras-distiller` students
            after the main one and score them.
        cache_soft_targets: train from RUN/soft_targets/, computing it
            first when missing or stale, instead of running the teachers
            every step.
        output: file name (without .keras) of the student in RUN/student/.
        quick: one epoch of a few steps, for smoke runs.
    """

    mode: str = "distill"
    baselines: bool = False
    cache_soft_targets: bool = False
    output: str = "student"
    quick: bool = False

    def __post_init__(self):
        if self.mode not in MODES:
            raise KCError(
                f"unknown distillation mode {self.mode!r}; expected one of "
                f"{', '.join(MODES)}"
            )
        if not self.output or "/" in self.output or self.output[0] == ".":
            raise KCError(
                f"output name {self.output!r} is invalid; pass a plain file "
                "name such as student"
            )


def load_run_inputs(run_dir):
    """Load a run's dataset and teachers and check they belong together.

    Args:
        run_dir: a `RunDir`.

    Returns:
        (dataset, teachers): the `Dataset` with the run's final taxonomy
        and the loaded `Teachers`.

    Raises:
        KCError: no run or teachers, teachers of another dataset or
            taxonomy, or a specialist missing for a vertical.
    """
    info = run_dir.read_run_info()
    spec = info.get("dataset")
    if not spec:
        raise KCError(
            f"{run_dir.run_file} names no dataset; run `kc teachers --run "
            f"{run_dir.root}` first"
        )
    teachers = teachers_lib.load_teachers(run_dir)
    if teachers.manifest.get("dataset") != spec:
        raise KCError(
            f"the teachers in {run_dir.teachers} were trained on dataset "
            f"{teachers.manifest.get('dataset')}, not this run's {spec}; "
            "train them again with `kc teachers --overwrite`"
        )
    dataset = load_dataset(**spec)
    if "taxonomy" in info:
        dataset = dataset.with_taxonomy(Taxonomy.from_dict(info["taxonomy"]))
    if teachers.taxonomy != dataset.taxonomy:
        raise KCError(
            f"the teachers in {run_dir.teachers} use another taxonomy than "
            f"run {run_dir.root} ({teachers.taxonomy.num_verticals} vs "
            f"{dataset.taxonomy.num_verticals} verticals); train them again "
            "with `kc teachers --overwrite`"
        )
    soft_targets.check_teachers(
        teachers.generalist, teachers.specialists, dataset.taxonomy
    )
    return dataset, teachers


def teacher_files(run_dir, teachers):
    """Return the paths of the teacher model files."""
    return [
        run_dir.teachers / entry["file"]
        for entry in teachers.manifest["models"]
    ]


class StepTimer(keras.callbacks.Callback):
    """Measure the wall time of training steps after a warm-up."""

    def __init__(self, warmup=WARMUP_STEPS):
        super().__init__()
        self.warmup = warmup
        self.seen = 0
        self.durations = []
        self._start = None

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.seen += 1
        if self.seen > self.warmup:
            self.durations.append(time.perf_counter() - self._start)

    @property
    def mean(self):
        return float(np.mean(self.durations)) if self.durations else None


def make_optimizer(train_config, total_steps):
    """Return Adam with cosine decay, loss-scaled under mixed_float16."""
    schedule = keras.optimizers.schedules.CosineDecay(
        train_config.learning_rate, decay_steps=max(1, total_steps)
    )
    optimizer = keras.optimizers.Adam(schedule)
    if train_config.precision == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def steps_per_epoch(dataset, train_config, quick):
    steps = -(-len(dataset.split("train")) // train_config.batch_size)
    if train_config.steps_per_epoch is not None:
        steps = min(steps, train_config.steps_per_epoch)
    if quick:
        steps = min(steps, QUICK_STEPS)
    return steps


def build_trainer(
    mode, student, teachers, taxonomy, loss_config, train_config, total_steps
):
    """Build and compile the model that trains `student` in `mode`.

    Returns:
        A compiled `Distiller` or `keras.distillation.Distiller`.
    """
    optimizer = make_optimizer(train_config, total_steps)
    if mode == "keras-distiller":
        trainer = keras.distillation.Distiller(
            teacher=teachers.generalist,
            student=student,
            distillation_losses=keras.distillation.LogitsDistillation(
                temperature=loss_config.temperature
            ),
            student_loss_weight=loss_config.alpha,
        )
        trainer.compile(
            optimizer=optimizer,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
            auto_scale_loss=False,
        )
        _build(trainer, student)
        return trainer
    targets = None
    if mode == "distill":
        targets = soft_targets.TeacherTargets(
            teachers.generalist, teachers.specialists, taxonomy, loss_config
        )
    trainer = Distiller(student, loss_config, targets)
    trainer.compile(optimizer=optimizer, auto_scale_loss=False)
    _build(trainer, student)
    return trainer


def _build(trainer, student):
    # BackupAndRestore needs a built model before `fit`; one call on a
    # blank image builds it (the student itself is already built).
    shape = (1,) + tuple(student.input_shape[1:])
    trainer(np.zeros(shape, np.float32))


def train_student(
    run_dir,
    dataset,
    teachers,
    mode,
    name,
    student_config,
    loss_config,
    train_config,
    options,
    strategy,
):
    """Train one student, save it to RUN/student/<name>.keras.

    A killed run resumes from `BackupAndRestore` in RUN/logs/backup/<name>:
    the trainer is rebuilt from code and the saved teachers, and only its
    weights and optimizer state are restored.

    Returns:
        (student, history dict, mean step time in seconds or None).
    """
    taxonomy = dataset.taxonomy
    steps = steps_per_epoch(dataset, train_config, options.quick)
    epochs = 1 if options.quick else train_config.epochs
    keras.utils.set_random_seed(train_config.seed)
    with strategy.scope():
        student = student_lib.build_student(
            student_config, taxonomy, dataset.preprocessing
        )
        trainer = build_trainer(
            mode,
            student,
            teachers,
            taxonomy,
            loss_config,
            train_config,
            steps * epochs,
        )
    counts = student_lib.count_parameters(student)
    logger.info(
        "student %s (%s, head %s, self-paced %s): %d parameters, head %d",
        name,
        mode,
        student_config.head,
        student_config.self_paced,
        counts["total"],
        counts["head"],
    )
    if mode == "distill" and options.cache_soft_targets:
        train = _cached_training_data(
            run_dir, dataset, teachers, trainer, train_config
        )
    else:
        train = _training_pipeline(dataset, train_config)
    validation = dataset.pipeline("validation", train_config.batch_size)
    path = run_dir.student / f"{name}.keras"
    # A run shorter than the warm-up still reports a (tracing-inflated)
    # step time rather than none.
    timer = StepTimer(warmup=min(WARMUP_STEPS, steps * epochs - 1))
    callbacks = training.run_callbacks(
        run_dir,
        name,
        extra=[NonFiniteLossStop(), StudentCheckpoint(path), timer],
    )
    history = training.fit(trainer, train, validation, epochs, steps, callbacks)
    training.save_model(student, path)
    training.remove_backup(run_dir, name)
    logger.info("saved %s", path)
    return student, history.history, timer.mean


def _training_pipeline(dataset, train_config):
    """Return the repeating training pipeline, shuffled by the training seed.

    The training seed, not the dataset's, orders and augments the images,
    so students of one run differ by seed.
    """
    seeded = dataclasses.replace(dataset, seed=train_config.seed)
    return seeded.pipeline("train", train_config.batch_size, repeat=True)


def _cached_training_data(run_dir, dataset, teachers, trainer, train_config):
    targets = trainer.teacher_targets
    key = soft_targets.cache_key(
        targets, dataset, teacher_files(run_dir, teachers)
    )
    arrays = soft_targets.read_cache(run_dir.soft_targets, key)
    if arrays is None:
        arrays = soft_targets.write_cache(
            run_dir.soft_targets, targets, dataset, key
        )
    if dataset.augment:
        logger.warning(
            "training from cached soft targets with augmentation: the "
            "targets were computed on unaugmented images"
        )
    data = soft_targets.cached_pipeline(
        dataset,
        arrays,
        train_config.batch_size,
        augment=True,
        seed=train_config.seed,
    )
    return data.repeat()


def score_models(dataset, teachers, students):
    """Return test-split accuracy reports of students and teachers.

    Args:
        dataset: the `Dataset`.
        teachers: the `Teachers`.
        students: `{name: Keras student}`.

    Returns:
        `{name: report}` for every student, `generalist` and
        `routed_ensemble` (see `kc_keras.evaluation.accuracy_report`).
    """
    taxonomy = dataset.taxonomy
    test = dataset.split("test")
    class_vertical = taxonomy.class_vertical
    names = taxonomy.vertical_names
    counters = {
        name: evaluation.AccuracyCounter(class_vertical, names)
        for name in students
    }
    generalist = evaluation.AccuracyCounter(class_vertical, names)
    routed = evaluation.EnsembleCounter(
        class_vertical, names, rules=("routed",)
    )
    # Batch by batch: at 100,000 classes the whole test set's outputs would
    # take 40 GB per model.
    for start in range(0, len(test), evaluation.EVALUATION_BATCH_SIZE):
        images = test.images[start : start + evaluation.EVALUATION_BATCH_SIZE]
        labels = test.labels[start : start + evaluation.EVALUATION_BATCH_SIZE]
        for name, model in students.items():
            counters[name].update(
                training.predict_logits(model, images), labels
            )
        generalist_probs = evaluation.softmax(
            training.predict_logits(teachers.generalist, images)
        )
        generalist.update(generalist_probs, labels)
        specialist_probs = [
            evaluation.softmax(training.predict_logits(model, images))
            for model in teachers.specialists
        ]
        routed.update(generalist_probs, specialist_probs, labels)
        evaluation.log_progress(start, len(labels), len(test))
    reports = {name: counter.report() for name, counter in counters.items()}
    reports["generalist"] = generalist.report()
    reports["routed_ensemble"] = routed.reports()["routed"]
    return reports


def measure_hard_label_step(
    dataset, teachers, student_config, train_config, quick=False
):
    """Return the mean step time of a plain hard-label student.

    Runs a few steps of a throwaway student when no `no-distill` student
    is trained, so the distillation overhead is always reported.
    """
    warmup, timed = (1, QUICK_STEPS) if quick else (WARMUP_STEPS, TIMING_STEPS)
    with make_strategy(train_config.strategy).scope():
        student = student_lib.build_student(
            student_config, dataset.taxonomy, dataset.preprocessing
        )
        trainer = build_trainer(
            "no-distill",
            student,
            teachers,
            dataset.taxonomy,
            LossConfig(),
            train_config,
            warmup + timed,
        )
    timer = StepTimer(warmup=warmup)
    data = _training_pipeline(dataset, train_config)
    trainer.fit(
        data,
        epochs=1,
        steps_per_epoch=warmup + timed,
        callbacks=[timer],
        verbose=0,
    )
    return timer.mean


def distill_run(
    run_path, student_config, loss_config, train_config, options=RunOptions()
):
    """Train and score the student of a run folder.

    Args:
        run_path: the run folder.
        student_config: a `StudentConfig`. A small-CNN backbone takes the
            dataset's variant (`backbones.for_dataset`).
        loss_config: a `LossConfig`.
        train_config: a `TrainConfig`.
        options: a `RunOptions`.

    Under a multi-worker strategy only the chief writes to the run
    folder; the other workers write to temporary folders (see
    `kc_keras.distill.workers`).

    Returns:
        The metrics dict written to RUN/student/metrics.json (or
        metrics_<output>.json for another --output name).

    Raises:
        KCError: invalid run, teachers or settings, or a NaN/Inf loss.
    """
    run_dir = RunDir(run_path)
    previous_policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(train_config.precision)
    try:
        strategy = make_strategy(train_config.strategy)
        with strategy.scope():
            dataset, teachers = load_run_inputs(run_dir)
        student_config = dataclasses.replace(
            student_config,
            backbone=backbones.for_dataset(
                student_config.backbone, dataset.backbone
            ),
        )
        # Validates top-K against the vertical sizes before any training.
        loss_config.specialist_top_k(dataset.taxonomy)
        with workers.writable_run_dir(run_dir, strategy) as output_dir:
            return _distill(
                output_dir,
                dataset,
                teachers,
                student_config,
                loss_config,
                train_config,
                options,
                strategy,
            )
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)


def _train_students(
    run_dir,
    dataset,
    teachers,
    student_config,
    loss_config,
    train_config,
    options,
    strategy,
):
    """Train the main student and the requested baselines.

    Returns:
        (students, histories, step_times): students and histories keyed by
        `student`, `no_distill` and `keras_distiller`; mean step times
        keyed by mode.
    """
    jobs = [(options.mode, options.output)]
    if options.baselines:
        for mode, suffix in BASELINE_NAMES.items():
            if mode != options.mode:
                jobs.append((mode, f"{options.output}_{suffix}"))

    students = {}
    histories = {}
    step_times = {}
    for mode, name in jobs:
        student, history, step_time = train_student(
            run_dir,
            dataset,
            teachers,
            mode,
            name,
            student_config,
            loss_config,
            train_config,
            options,
            strategy,
        )
        key = "student" if name == options.output else BASELINE_NAMES[mode]
        students[key] = student
        histories[key] = {
            metric: [float(v) for v in values]
            for metric, values in history.items()
        }
        step_times[mode] = step_time

    if "no-distill" not in step_times:
        step_times["no-distill"] = measure_hard_label_step(
            dataset, teachers, student_config, train_config, options.quick
        )
    return students, histories, step_times


def _distill(
    run_dir,
    dataset,
    teachers,
    student_config,
    loss_config,
    train_config,
    options,
    strategy,
):
    students, histories, step_times = _train_students(
        run_dir,
        dataset,
        teachers,
        student_config,
        loss_config,
        train_config,
        options,
        strategy,
    )
    reports = score_models(dataset, teachers, students)
    metrics = {
        "mode": options.mode,
        "student_config": student_config.to_dict(),
        "loss_config": loss_config.to_dict(),
        "train_config": train_config.to_dict(),
        "cache_soft_targets": options.cache_soft_targets,
        "quick": options.quick,
        "parameters": student_lib.count_parameters(students["student"]),
        "test": reports,
        "step_time_s": {
            "distill": step_times.get("distill"),
            "hard_label": step_times.get("no-distill"),
            "keras_distiller": step_times.get("keras-distiller"),
        },
        "history": histories,
    }

    filename = (
        "metrics.json"
        if options.output == "student"
        else f"metrics_{options.output}.json"
    )
    io_utils.write_json(
        run_dir.student / filename, evaluation.json_safe(metrics)
    )
    for name, report in reports.items():
        logger.info(
            "%s: test top-1 %.4f, top-5 %.4f",
            name,
            report["top1"],
            report["top5"],
        )
    return metrics
