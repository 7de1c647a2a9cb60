"""Teacher models: one generalist and one specialist per vertical.

The generalist classifies all classes. The specialist of vertical `k` starts
from the generalist's weights: the backbone is copied, and its head keeps
the generalist's weight columns of that vertical's classes plus one dustbin
output ("an image of another vertical") initialised from the mean of the
other columns. It is then fine-tuned on its vertical's images and a sample
of other verticals' images labelled as the dustbin.

Fine-tuning starts every specialist at the generalist's accuracy. In an
earlier trio-30 measurement with small CNNs, specialists trained from
scratch on their vertical alone scored below the generalist on that
vertical (digits 96.0 % vs 97.8 % top-1). The routed ensemble then fell
below the generalist (92.1 % vs 92.8 %).

`train_teachers` writes everything under `RUN/teachers/` (see
`kc_keras.run`) and resumes an interrupted run; `load_teachers` reads the
result back for the student and export stages.
"""

import dataclasses
import logging
import shutil
from pathlib import Path

import keras
import numpy as np

from kc_keras import evaluation
from kc_keras import io_utils
from kc_keras import training
from kc_keras.data.base import Preprocessing
from kc_keras.data.base import Taxonomy
from kc_keras.errors import KCError
from kc_keras.models.backbones import BackboneSpec
from kc_keras.models.backbones import build_features
from kc_keras.run import RunDir

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
GENERALIST = "generalist"
MANIFEST_FILE = "teachers.json"
TAXONOMY_FILE = "taxonomy.json"
LABELS_FILE = "labels.txt"
METRICS_FILE = "metrics.json"
CONFIG_FILE = "config.json"
HEAD_LAYER = "logits"
CLUSTER_METHODS = ("spectral", "agglomerative")
# Clustering builds a dense (N, N) confusion matrix and several float64
# copies of it, 0.8 GB each at 10,000 classes. Larger label spaces need a
# taxonomy file.
MAX_CLUSTER_CLASSES = 10_000


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
    """How the teachers are built and trained.

    Attributes:
        backbone: the backbone of every teacher.
        epochs: generalist training epochs.
        specialist_epochs: fine-tuning epochs of each specialist.
        specialist_steps_per_epoch: batches per specialist epoch, or None
            for one pass over its training images. A fixed count gives
            every specialist the same training time: a small vertical's
            images are repeated and a large vertical's epoch ends early.
        batch_size: images per training batch.
        learning_rate: initial Adam learning rate of the generalist; it
            follows a cosine decay to zero over the training.
        specialist_learning_rate: initial learning rate of the specialist
            fine-tuning, lower than the generalist's so fine-tuning does
            not undo the copied weights.
        freeze_batch_norm: keep the copied batch-normalization layers
            fixed (inference mode) while a specialist is fine-tuned. Their
            statistics then stay those of all classes, because the
            specialist's inputs include other verticals' images through
            the dustbin.
        dustbin_fraction: number of other verticals' images in a
            specialist's training data, as a fraction of its own
            vertical's images.
        steps_per_epoch: batches per epoch of every teacher, or None
            for the default (`--quick` sets a few). It overrides
            `specialist_steps_per_epoch`.
        seed: seed of weight initialisation and dustbin sampling.
    """

    backbone: BackboneSpec = BackboneSpec()
    epochs: int = 10
    specialist_epochs: int = 2
    specialist_steps_per_epoch: int | None = 200
    batch_size: int = 128
    learning_rate: float = 2e-3
    specialist_learning_rate: float = 5e-4
    freeze_batch_norm: bool = True
    dustbin_fraction: float = 0.5
    steps_per_epoch: int | None = None
    seed: int = 0

    def __post_init__(self):
        for name in (
            "epochs",
            "specialist_epochs",
            "batch_size",
        ):
            if getattr(self, name) < 1:
                raise KCError(
                    f"teacher {name}={getattr(self, name)} is invalid; "
                    "use 1 or more"
                )
        for name in ("steps_per_epoch", "specialist_steps_per_epoch"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise KCError(
                    f"teacher {name}={value} is invalid; use 1 or more, "
                    "or None for whole epochs"
                )
        for name in ("learning_rate", "specialist_learning_rate"):
            if not getattr(self, name) > 0:
                raise KCError(
                    f"teacher {name}={getattr(self, name)} is invalid; "
                    "use a positive value"
                )
        if self.dustbin_fraction < 0:
            raise KCError(
                f"dustbin_fraction={self.dustbin_fraction} is invalid; use "
                "0 or more"
            )

    def to_dict(self):
        data = dataclasses.asdict(self)
        data["backbone"] = self.backbone.to_dict()
        return data

    @classmethod
    def from_dict(cls, data):
        data = dict(data)
        data["backbone"] = BackboneSpec.from_dict(data["backbone"])
        return cls(**data)


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
    """Clustering settings that derive verticals for a dataset without a
    taxonomy.

    Attributes:
        num_verticals: number of verticals K, or None for about
            sqrt(num_classes), at least 2, with at least 2 classes per
            vertical.
        method: "spectral" or "agglomerative" clustering of the
            generalist's confusion matrix.
    """

    num_verticals: int | None = None
    method: str = "spectral"

    def __post_init__(self):
        if self.method not in CLUSTER_METHODS:
            raise KCError(
                f"unknown cluster method {self.method!r}; expected one of "
                f"{', '.join(CLUSTER_METHODS)}"
            )
        if self.num_verticals is not None and self.num_verticals < 2:
            raise KCError(
                f"number of verticals {self.num_verticals} is invalid for "
                "clustering; pass --verticals 2 or more"
            )

    def resolve_num_verticals(self, num_classes):
        """Return K for `num_classes` classes.

        Raises:
            KCError: K verticals cannot each get 2 classes.
        """
        if self.num_verticals is None:
            return max(2, min(num_classes // 2, round(num_classes**0.5)))
        if 2 * self.num_verticals > num_classes:
            raise KCError(
                f"--verticals {self.num_verticals} is too many for "
                f"{num_classes} classes; each vertical needs at least 2 "
                f"classes, so use at most {num_classes // 2}"
            )
        return self.num_verticals

    def to_dict(self):
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Teachers:
    """Trained teachers loaded from a run folder.

    Attributes:
        generalist: Keras model, one logit per class.
        specialists: tuple of Keras models indexed by vertical; each outputs
            its vertical's class logits (ascending class index) and then a
            dustbin logit.
        taxonomy: the `Taxonomy` the specialists were trained on.
        preprocessing: the models' input format.
        manifest: the content of teachers.json.
    """

    generalist: object
    specialists: tuple
    taxonomy: Taxonomy
    preprocessing: Preprocessing
    manifest: dict

    def output_classes(self, vertical):
        """Return the class index of each output of a specialist (-1 for
        the dustbin)."""
        return specialist_output_classes(self.taxonomy, vertical)


# ---------------------------------------------------------------------------
# Models


def specialist_name(vertical):
    return f"specialist_{vertical}"


def specialist_output_classes(taxonomy, vertical):
    """Return the class index of each specialist output, -1 for the
    dustbin."""
    return list(taxonomy.vertical_classes(vertical)) + [-1]


def build_generalist(num_classes, preprocessing, backbone):
    """Build the generalist: backbone features and one logit per class.

    Args:
        num_classes: number of classes.
        preprocessing: the dataset's `Preprocessing`.
        backbone: a `BackboneSpec`.

    Returns:
        An uncompiled Keras 3 functional model.
    """
    inputs = keras.Input(preprocessing.input_shape, name="pixels")
    features = _build_features(inputs, backbone, preprocessing)
    logits = keras.layers.Dense(num_classes, name=HEAD_LAYER)(features)
    return keras.Model(inputs, logits, name=GENERALIST)


def _build_features(inputs, backbone, preprocessing):
    # keras.applications raise ValueError for inputs they cannot take
    # (MobileNetV3Small needs at least 32x32 pixels).
    try:
        return build_features(inputs, backbone, preprocessing, keras)
    except ValueError as error:
        raise KCError(
            f"backbone {backbone.name!r} cannot take images of shape "
            f"{preprocessing.input_shape} ({error}); use --backbone "
            "small-cnn or larger images"
        ) from error


def build_specialist(generalist, taxonomy, vertical, preprocessing, backbone):
    """Build the specialist of `vertical` initialised from the generalist.

    Every backbone layer gets the generalist's weights. The head has one
    output per class of the vertical (ascending class index) with the
    generalist's weight column and bias of that class. The last output is
    the dustbin. Its column is the mean of the other classes' columns and
    its bias is their mean plus log(number of other classes), a rough
    match of the log of their summed probabilities.

    Args:
        generalist: the trained generalist, built by `build_generalist`
            with the same `preprocessing` and `backbone`.
        taxonomy: the dataset's `Taxonomy`.
        vertical: vertical index.
        preprocessing: the dataset's `Preprocessing`.
        backbone: a `BackboneSpec`.

    Returns:
        An uncompiled Keras 3 functional model.

    Raises:
        KCError: the generalist's architecture does not match `backbone`.
    """
    own = np.asarray(taxonomy.vertical_classes(vertical))
    other = np.setdiff1d(np.arange(taxonomy.num_classes), own)
    inputs = keras.Input(preprocessing.input_shape, name="pixels")
    features = _build_features(inputs, backbone, preprocessing)
    logits = keras.layers.Dense(len(own) + 1, name=HEAD_LAYER)(features)
    model = keras.Model(inputs, logits, name=specialist_name(vertical))

    source_layers = [
        layer for layer in generalist.layers if layer.name != HEAD_LAYER
    ]
    target_layers = [
        layer for layer in model.layers if layer.name != HEAD_LAYER
    ]
    if len(source_layers) != len(target_layers):
        raise KCError(
            f"the generalist has {len(source_layers)} backbone layers but "
            f"backbone {backbone.name!r} builds {len(target_layers)}; train "
            "the teachers again with --overwrite"
        )
    for source, target in zip(source_layers, target_layers, strict=True):
        target.set_weights(source.get_weights())

    kernel, bias = generalist.get_layer(HEAD_LAYER).get_weights()
    dustbin_kernel = kernel[:, other].mean(axis=1, keepdims=True)
    dustbin_bias = bias[other].mean() + np.log(len(other))
    model.get_layer(HEAD_LAYER).set_weights(
        [
            np.concatenate([kernel[:, own], dustbin_kernel], axis=1),
            np.concatenate([bias[own], [dustbin_bias]]).astype(bias.dtype),
        ]
    )
    return model


def freeze_batch_norm(model):
    """Make every batch-normalization layer of `model` non-trainable.

    In Keras 3 a non-trainable `BatchNormalization` layer runs in inference
    mode, so its moving statistics stop updating as well. Nested models
    (keras.applications backbones) are searched too.
    """
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
        elif hasattr(layer, "layers"):
            freeze_batch_norm(layer)


def compile_model(model, learning_rate, total_steps):
    """Compile with Adam, cosine learning-rate decay and logit
    cross-entropy."""
    schedule = keras.optimizers.schedules.CosineDecay(
        learning_rate, decay_steps=max(1, total_steps)
    )
    model.compile(
        optimizer=keras.optimizers.Adam(schedule),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )


# ---------------------------------------------------------------------------
# Training data


def specialist_dataset(dataset, vertical, dustbin_fraction, seed):
    """Return `dataset` with the training data of one specialist.

    The train and validation splits keep every image of the vertical and a
    random sample of other verticals' images, `dustbin_fraction` times as
    many (or all of them when there are fewer). The test split is kept
    whole. Labels stay class indices: map them with
    `evaluation.specialist_label_map`.

    Args:
        dataset: the full `Dataset`.
        vertical: vertical index.
        dustbin_fraction: other images per image of the vertical.
        seed: seed of the sample.

    Returns:
        A `Dataset` sharing the image arrays' content.
    """
    class_vertical = np.asarray(dataset.taxonomy.class_vertical)
    rng = np.random.default_rng([seed, vertical])
    splits = dict(dataset.splits)
    for name in ("train", "validation"):
        split = dataset.split(name)
        in_vertical = class_vertical[split.labels] == vertical
        own = np.flatnonzero(in_vertical)
        other = np.flatnonzero(~in_vertical)
        count = min(len(other), int(round(dustbin_fraction * len(own))))
        sample = rng.choice(other, size=count, replace=False)
        splits[name] = split.subset(np.sort(np.concatenate([own, sample])))
    return dataclasses.replace(dataset, splits=splits)


def _train(
    model,
    dataset,
    run_dir,
    config,
    epochs,
    steps_per_epoch,
    learning_rate,
    label_map,
    extra_callbacks,
):
    """Compile and fit one teacher, resuming from its backup if any.

    `steps_per_epoch` None means one pass over the training split per
    epoch. Otherwise the training data repeats, so an epoch may cover a
    split more than once or only part of it.
    """
    if config.steps_per_epoch is not None:
        steps_per_epoch = config.steps_per_epoch
    repeat = steps_per_epoch is not None
    steps = steps_per_epoch
    if steps is None:
        steps = max(1, -(-len(dataset.split("train")) // config.batch_size))
    compile_model(model, learning_rate, steps * epochs)
    train = dataset.pipeline(
        "train", config.batch_size, label_map=label_map, repeat=repeat
    )
    validation = None
    if len(dataset.split("validation")):
        validation = dataset.pipeline(
            "validation", config.batch_size, label_map=label_map
        )
    if training.has_backup(run_dir, model.name):
        logger.info("resuming %s from its backup", model.name)
    training.fit(
        model,
        train,
        validation,
        epochs=epochs,
        steps_per_epoch=steps if repeat else None,
        callbacks=training.run_callbacks(
            run_dir, model.name, extra=extra_callbacks
        ),
    )


# ---------------------------------------------------------------------------
# The whole stage


def train_teachers(
    dataset,
    run_dir,
    config=TeacherConfig(),
    *,
    overwrite=False,
    cluster=None,
    extra_callbacks=(),
):
    """Train, evaluate and save the generalist and every specialist.

    Models already saved in `RUN/teachers/` are loaded instead of trained,
    and an interrupted training resumes from its backup, so rerunning after
    a kill continues where it stopped.

    Args:
        dataset: the loaded `Dataset`.
        run_dir: a `RunDir` or a path.
        config: a `TeacherConfig`.
        overwrite: delete existing teachers and backups first, and accept
            a run folder of another dataset.
        cluster: a `ClusterConfig`, used only when the dataset's taxonomy
            is provisional (an image folder without a taxonomy file): the
            verticals are then derived by clustering the generalist's
            confusion matrix on the validation split. None means
            `ClusterConfig()`.
        extra_callbacks: Keras callbacks added to every `fit` (tests use
            them to interrupt training).

    Returns:
        The metrics dict written to metrics.json.

    Raises:
        KCError: the run folder belongs to another dataset or its teachers
            were trained with other settings, and `overwrite` is False.
    """
    run_dir = RunDir(run_dir) if not isinstance(run_dir, RunDir) else run_dir
    cluster = cluster or ClusterConfig()
    run_dir.claim(dataset.spec, overwrite=overwrite)
    if overwrite:
        _remove_teachers(run_dir)
    _check_config(run_dir, dataset, config, cluster)
    if dataset.taxonomy_provisional:
        check_cluster_size(dataset.taxonomy.num_classes)

    generalist = _generalist(dataset, run_dir, config, extra_callbacks)
    clustered = dataset.taxonomy_provisional
    taxonomy = _taxonomy(dataset, run_dir, generalist, cluster, config.seed)
    dataset = dataset.with_taxonomy(taxonomy)
    io_utils.write_json(
        run_dir.run_file,
        {**run_dir.read_run_info(), "taxonomy": taxonomy.to_dict()},
    )
    io_utils.write_text(
        run_dir.teachers / LABELS_FILE,
        "".join(f"{name}\n" for name in taxonomy.class_names),
    )

    specialists = [
        _specialist(dataset, run_dir, config, generalist, v, extra_callbacks)
        for v in range(taxonomy.num_verticals)
    ]
    metrics = evaluate_teachers(generalist, specialists, dataset)
    io_utils.write_json(
        run_dir.teachers / METRICS_FILE, evaluation.json_safe(metrics)
    )
    io_utils.write_json(
        run_dir.teachers / MANIFEST_FILE,
        _manifest(dataset, config, clustered),
    )
    _warn_weak_specialists(metrics)
    return metrics


def _remove_teachers(run_dir):
    """Delete the teachers, their training logs and their backups."""
    if run_dir.teachers.exists():
        shutil.rmtree(run_dir.teachers)
    for folder in (run_dir.logs, run_dir.logs / training.BACKUP_FOLDER):
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            if path.name == GENERALIST or path.name.startswith("specialist_"):
                shutil.rmtree(path)


def _check_config(run_dir, dataset, config, cluster):
    """Record the settings, or reject ones that differ from a previous
    run's."""
    settings = {
        "config": config.to_dict(),
        "cluster": (
            cluster.to_dict() if dataset.taxonomy_provisional else None
        ),
        "taxonomy": (
            None if dataset.taxonomy_provisional else dataset.taxonomy.to_dict()
        ),
    }
    path = run_dir.teachers / CONFIG_FILE
    if path.exists():
        previous = io_utils.read_json(path)
        if previous != settings:
            changed = sorted(
                key for key in settings if previous.get(key) != settings[key]
            )
            raise KCError(
                f"the teachers in {run_dir.teachers} were trained with "
                f"other settings ({', '.join(changed)} differ); pass "
                "--overwrite to train them again or use another --run folder"
            )
        return
    io_utils.write_json(path, settings)


def _generalist(dataset, run_dir, config, extra_callbacks):
    path = run_dir.generalist_path()
    if path.exists():
        logger.info("using the trained generalist %s", path)
        model = training.load_model(path)
        _check_outputs(model, path, dataset.taxonomy.num_classes)
        return model
    keras.utils.set_random_seed(config.seed)
    model = build_generalist(
        dataset.taxonomy.num_classes, dataset.preprocessing, config.backbone
    )
    logger.info(
        "training the generalist: %d classes, %d training images",
        dataset.taxonomy.num_classes,
        len(dataset.split("train")),
    )
    _train(
        model,
        dataset,
        run_dir,
        config,
        config.epochs,
        None,
        config.learning_rate,
        None,
        extra_callbacks,
    )
    training.save_model(model, path)
    training.remove_backup(run_dir, GENERALIST)
    return model


def _taxonomy(dataset, run_dir, generalist, cluster, seed):
    """Return the dataset's taxonomy, or cluster one from confusions."""
    path = run_dir.teachers / TAXONOMY_FILE
    if not dataset.taxonomy_provisional:
        io_utils.write_json(path, dataset.taxonomy.to_dict())
        return dataset.taxonomy
    if path.exists():
        logger.info("using the clustered taxonomy %s", path)
        return Taxonomy.from_dict(io_utils.read_json(path))
    taxonomy = cluster_taxonomy(generalist, dataset, cluster, seed)
    io_utils.write_json(path, taxonomy.to_dict())
    return taxonomy


def check_cluster_size(num_classes):
    """Raise `KCError` when clustering `num_classes` needs too much memory."""
    if num_classes > MAX_CLUSTER_CLASSES:
        raise KCError(
            f"clustering {num_classes} classes into verticals needs a dense "
            f"{num_classes} x {num_classes} confusion matrix, over the limit "
            f"of {MAX_CLUSTER_CLASSES} classes; pass a --taxonomy file"
        )


def cluster_taxonomy(generalist, dataset, cluster, seed):
    """Group confusable classes into verticals.

    Args:
        generalist: the trained generalist.
        dataset: the `Dataset`; its validation split is used.
        cluster: a `ClusterConfig`.
        seed: clustering seed.

    Returns:
        A `Taxonomy` with the dataset's class names and verticals named
        `vertical_<k>`. Clustering may return fewer verticals than
        requested when it merges single-class clusters.

    Raises:
        KCError: the validation split is empty, or the classes cannot be
            split into the requested number of verticals.
    """
    from kc_keras.data.clustering import cluster_confusion

    split = dataset.split("validation")
    if not len(split):
        raise KCError(
            "clustering classes into verticals needs validation images, "
            "but the validation split is empty; pass a --taxonomy file"
        )
    num_classes = dataset.taxonomy.num_classes
    check_cluster_size(num_classes)
    num_verticals = cluster.resolve_num_verticals(num_classes)
    predicted = []
    for start in range(0, len(split), evaluation.EVALUATION_BATCH_SIZE):
        images = split.images[start : start + evaluation.EVALUATION_BATCH_SIZE]
        logits = training.predict_logits(generalist, images)
        predicted.append(np.argmax(logits, axis=1))
    predicted = np.concatenate(predicted)
    confusion = evaluation.confusion_counts(
        predicted, split.labels, num_classes
    )
    class_vertical = cluster_confusion(
        confusion, num_verticals, cluster.method, seed
    )
    class_vertical = tuple(int(v) for v in class_vertical)
    taxonomy = Taxonomy(
        class_names=dataset.taxonomy.class_names,
        vertical_names=tuple(
            f"vertical_{k}" for k in range(max(class_vertical) + 1)
        ),
        class_vertical=class_vertical,
    )
    logger.info(
        "clustered %d classes into %d verticals of sizes %s (%s)",
        taxonomy.num_classes,
        taxonomy.num_verticals,
        list(taxonomy.vertical_sizes),
        cluster.method,
    )
    return taxonomy


def _specialist(dataset, run_dir, config, generalist, vertical, callbacks):
    taxonomy = dataset.taxonomy
    path = run_dir.specialist_path(vertical)
    num_outputs = len(taxonomy.vertical_classes(vertical)) + 1
    if path.exists():
        logger.info("using the trained specialist %s", path)
        model = training.load_model(path)
        _check_outputs(model, path, num_outputs)
        return model

    keras.utils.set_random_seed(config.seed + 1 + vertical)
    model = build_specialist(
        generalist,
        taxonomy,
        vertical,
        dataset.preprocessing,
        config.backbone,
    )
    if config.freeze_batch_norm:
        freeze_batch_norm(model)

    data = specialist_dataset(
        dataset, vertical, config.dustbin_fraction, config.seed
    )
    logger.info(
        "training specialist %d (%s): %d classes + dustbin, %d training images",
        vertical,
        taxonomy.vertical_names[vertical],
        num_outputs - 1,
        len(data.split("train")),
    )
    _train(
        model,
        data,
        run_dir,
        config,
        config.specialist_epochs,
        config.specialist_steps_per_epoch,
        config.specialist_learning_rate,
        evaluation.specialist_label_map(taxonomy.class_vertical, vertical),
        callbacks,
    )

    training.save_model(model, path)
    training.remove_backup(run_dir, model.name)
    return model


def _check_outputs(model, path, expected):
    outputs = int(model.output_shape[-1])
    if outputs != expected:
        raise KCError(
            f"{path} has {outputs} outputs but {expected} are expected for "
            "this taxonomy; train the teachers again with --overwrite"
        )


def _manifest(dataset, config, clustered):
    taxonomy = dataset.taxonomy
    models = [
        {
            "name": GENERALIST,
            "file": f"{GENERALIST}.keras",
            "role": "generalist",
            "vertical": None,
            "output_classes": list(range(taxonomy.num_classes)),
        }
    ]
    for v in range(taxonomy.num_verticals):
        models.append(
            {
                "name": specialist_name(v),
                "file": f"{specialist_name(v)}.keras",
                "role": "specialist",
                "vertical": v,
                "vertical_name": taxonomy.vertical_names[v],
                "output_classes": specialist_output_classes(taxonomy, v),
            }
        )
    return {
        "format_version": FORMAT_VERSION,
        "dataset": dataset.spec,
        "config": config.to_dict(),
        "clustered": clustered,
        "taxonomy": taxonomy.to_dict(),
        "preprocessing": dataset.preprocessing.to_dict(),
        "models": models,
    }


# ---------------------------------------------------------------------------
# Evaluation


def evaluate_teachers(generalist, specialists, dataset, split="test"):
    """Score every teacher and both ensembles on one split.

    Args:
        generalist: the generalist Keras model.
        specialists: specialist Keras models indexed by vertical.
        dataset: the `Dataset` (its taxonomy must be the specialists').
        split: the split to score.

    Returns:
        `{"split", "num_images", "models": {name: report}, "ensembles":
        {"routed": report, "full": report}}` with the reports of
        `kc_keras.evaluation`.
    """
    taxonomy = dataset.taxonomy
    data = dataset.split(split)

    def batches():
        for start in range(0, len(data), evaluation.EVALUATION_BATCH_SIZE):
            images = data.images[
                start : start + evaluation.EVALUATION_BATCH_SIZE
            ]
            yield (
                data.labels[start : start + evaluation.EVALUATION_BATCH_SIZE],
                training.predict_logits(generalist, images),
                [training.predict_logits(s, images) for s in specialists],
            )
            # The consumer asks for the next batch once this one is scored.
            evaluation.log_progress(start, len(images), len(data))

    reports = evaluation.stream_teacher_reports(
        batches(), taxonomy.class_vertical, taxonomy.vertical_names
    )
    models = {GENERALIST: reports["models"]["generalist"]}
    for v in range(len(specialists)):
        models[specialist_name(v)] = reports["models"][f"specialist_{v}"]
    return {
        "split": split,
        "num_images": len(data),
        "models": models,
        "ensembles": reports["ensembles"],
    }


def _warn_weak_specialists(metrics):
    for name, report in metrics["models"].items():
        own = report.get("own_vertical")
        if own is None or not own["num_images"]:
            continue
        if not own["gain"] > 0:
            logger.warning(
                "%s does not beat the generalist on vertical %s: top-1 "
                "%.4f vs %.4f on %d test images",
                name,
                report["vertical_name"],
                own["top1"],
                own["generalist_top1"],
                own["num_images"],
            )


# ---------------------------------------------------------------------------
# Loading


def load_teachers(run_dir):
    """Load the teachers of a run folder and check they fit together.

    Args:
        run_dir: a `RunDir` or a path.

    Returns:
        A `Teachers`.

    Raises:
        KCError: teachers.json or a model file is missing, a vertical has
            no specialist, or a model's output size does not match the
            taxonomy.
    """
    run_dir = RunDir(run_dir) if not isinstance(run_dir, RunDir) else run_dir
    manifest_path = run_dir.teachers / MANIFEST_FILE
    if not manifest_path.is_file():
        raise KCError(
            f"no teachers in {run_dir.root} ({manifest_path} not found); "
            f"run `kc teachers --run {run_dir.root}` first"
        )
    manifest = io_utils.read_json(manifest_path)
    taxonomy = Taxonomy.from_dict(manifest["taxonomy"])
    preprocessing = Preprocessing.from_dict(manifest["preprocessing"])
    entries = {}
    for entry in manifest["models"]:
        key = GENERALIST if entry["role"] == GENERALIST else entry["vertical"]
        entries[key] = entry

    generalist = _load_entry(
        run_dir,
        entries.get(GENERALIST),
        f"{GENERALIST}.keras",
        list(range(taxonomy.num_classes)),
    )
    specialists = tuple(
        _load_entry(
            run_dir,
            entries.get(v),
            f"{specialist_name(v)}.keras",
            specialist_output_classes(taxonomy, v),
        )
        for v in range(taxonomy.num_verticals)
    )
    return Teachers(
        generalist=generalist,
        specialists=specialists,
        taxonomy=taxonomy,
        preprocessing=preprocessing,
        manifest=manifest,
    )


def _load_entry(run_dir, entry, default_file, output_classes):
    if entry is None:
        raise KCError(
            f"{run_dir.teachers / MANIFEST_FILE} lists no {default_file}; "
            "train the teachers again with `kc teachers --overwrite`"
        )
    path = Path(run_dir.teachers) / entry["file"]
    if not path.is_file():
        raise KCError(
            f"teacher model {path} not found; rerun `kc teachers --run "
            f"{run_dir.root}` to train it"
        )
    if list(entry["output_classes"]) != list(output_classes):
        raise KCError(
            f"{path}: teachers.json lists output classes "
            f"{entry['output_classes']} but the taxonomy gives "
            f"{output_classes}; train the teachers again with --overwrite"
        )
    model = training.load_model(path)
    _check_outputs(model, path, len(output_classes))
    return model
