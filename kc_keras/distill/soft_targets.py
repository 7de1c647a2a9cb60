"""Teacher soft targets: computed online, or cached once per run.

A soft target of one teacher for one image is its top-K classes (int
indices) and their probabilities at temperature T, padded to a fixed K
with probability 0. The specialist target of an image comes from the
specialist of the image's TRUE vertical. The generalist target, used when
its weight is not 0, comes from the generalist.

Cache layout (RUN/soft_targets/), sized for 100,000 classes because no file
has a column per class:

    index.json                         settings, fingerprints, shard list
    <role>_indices_<shard>.npy         int16 (under 32,768 classes) or int32
    <role>_probabilities_<shard>.npy   float16

Rows follow the training split's image order, so row i belongs to image i.
The folder is written under a temporary name and renamed when complete.
"""

import hashlib
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import tensorflow as tf

from kc_keras import io_utils
from kc_keras.errors import KCError

logger = logging.getLogger(__name__)

SPECIALIST = "specialist"
GENERALIST = "generalist"
FORMAT_VERSION = 1
INDEX_FILE = "index.json"
SHARD_ROWS = 65536
BATCH_SIZE = 256


class TeacherTargets:
    """Compute top-K teacher targets for a batch, inside a `tf.function`.

    Each specialist runs only on the images of its own vertical (selected
    by true label), so one batch costs one specialist pass per image plus
    one generalist pass when the generalist is used. Teachers run with
    `training=False`, so BatchNorm uses and keeps its moving statistics.

    Args:
        generalist: the generalist Keras model (one logit per class).
        specialists: one Keras model per vertical (vertical logits, then a
            dustbin logit).
        taxonomy: the run's `Taxonomy`.
        loss_config: a `LossConfig` (temperature, top-K, teacher weights).

    Raises:
        KCError: a specialist is missing or a teacher's output size does
            not match the taxonomy.
    """

    def __init__(self, generalist, specialists, taxonomy, loss_config):
        check_teachers(generalist, specialists, taxonomy)
        self.generalist = generalist
        self.specialists = tuple(specialists)
        self.taxonomy = taxonomy
        self.loss_config = loss_config
        self.temperature = float(loss_config.temperature)
        self.specialist_k = loss_config.specialist_top_k(taxonomy)
        self.generalist_k = loss_config.generalist_top_k(taxonomy)
        self.use_generalist = loss_config.generalist_weight > 0
        self.class_vertical = tf.constant(taxonomy.class_vertical, tf.int32)
        self.vertical_classes = [
            tf.constant(taxonomy.vertical_classes(v), tf.int32)
            for v in range(taxonomy.num_verticals)
        ]

    @property
    def roles(self):
        """The teacher roles this object produces targets for."""
        if self.use_generalist:
            return (SPECIALIST, GENERALIST)
        return (SPECIALIST,)

    @property
    def widths(self):
        """The padded K of each role."""
        return {
            SPECIALIST: max(self.specialist_k),
            GENERALIST: self.generalist_k,
        }

    def __call__(self, images, labels):
        """Return `{role: (indices int32 (batch, K), probabilities float32
        (batch, K))}` for a batch of float32 images and int labels."""
        targets = {SPECIALIST: self._specialist_targets(images, labels)}
        if self.use_generalist:
            logits = self.generalist(images, training=False)
            probabilities = tf.nn.softmax(
                tf.cast(logits, tf.float32) / self.temperature, axis=1
            )
            top = tf.math.top_k(probabilities, k=self.generalist_k)
            targets[GENERALIST] = (top.indices, top.values)
        return targets

    def _specialist_targets(self, images, labels):
        width = max(self.specialist_k)
        batch = tf.shape(labels)[0]
        image_vertical = tf.gather(
            self.class_vertical, tf.cast(labels, tf.int32)
        )
        indices = tf.zeros([batch, width], tf.int32)
        probabilities = tf.zeros([batch, width], tf.float32)
        for vertical, model in enumerate(self.specialists):
            rows = tf.where(tf.equal(image_vertical, vertical))[:, 0]
            rows = tf.cast(rows, tf.int32)
            # One extra image (row 0) keeps the specialist's batch non-empty:
            # Keras 3 rejects an empty batch in eager calls, and TensorFlow
            # 2.21 fails on one inside BatchNormalization in graph mode. In
            # inference mode each output row depends only on its own image,
            # so dropping the extra row changes nothing.
            padded_rows = tf.concat([rows, tf.zeros([1], tf.int32)], axis=0)
            logits = model(tf.gather(images, padded_rows), training=False)
            logits = logits[:-1]
            # The softmax covers the vertical's classes and the dustbin. The
            # dustbin's share is then dropped, so a specialist that doubts
            # the image belongs to its vertical gives weaker targets.
            vertical_probabilities = tf.nn.softmax(
                tf.cast(logits, tf.float32) / self.temperature, axis=1
            )[:, :-1]
            k = self.specialist_k[vertical]
            top = tf.math.top_k(vertical_probabilities, k=k)
            global_indices = tf.gather(
                self.vertical_classes[vertical], top.indices
            )
            padding = [[0, 0], [0, width - k]]
            indices = tf.tensor_scatter_nd_update(
                indices, rows[:, None], tf.pad(global_indices, padding)
            )
            probabilities = tf.tensor_scatter_nd_update(
                probabilities, rows[:, None], tf.pad(top.values, padding)
            )
        return indices, probabilities


def check_teachers(generalist, specialists, taxonomy):
    """Raise `KCError` unless the teachers match `taxonomy`.

    Args:
        generalist: the generalist Keras model.
        specialists: a sequence of specialist models, one per vertical.
        taxonomy: the run's `Taxonomy`.
    """
    if len(specialists) != taxonomy.num_verticals:
        raise KCError(
            f"got {len(specialists)} specialists for "
            f"{taxonomy.num_verticals} verticals; a specialist is missing "
            "for a vertical: train the teachers again with `kc teachers`"
        )
    outputs = int(generalist.output_shape[-1])
    if outputs != taxonomy.num_classes:
        raise KCError(
            f"the generalist outputs {outputs} logits but the taxonomy has "
            f"{taxonomy.num_classes} classes; use teachers trained on this "
            "run's dataset"
        )
    for vertical, model in enumerate(specialists):
        if model is None:
            raise KCError(
                f"the specialist of vertical "
                f"{taxonomy.vertical_names[vertical]!r} is missing; train "
                "the teachers again with `kc teachers`"
            )
        expected = len(taxonomy.vertical_classes(vertical)) + 1
        outputs = int(model.output_shape[-1])
        if outputs != expected:
            raise KCError(
                f"the specialist of vertical "
                f"{taxonomy.vertical_names[vertical]!r} outputs {outputs} "
                f"logits, expected {expected} (its classes and a dustbin); "
                "use teachers trained on this run's taxonomy"
            )


# ---------------------------------------------------------------------------
# Cache


def cache_key(targets, dataset, teacher_files):
    """Return the settings a cache must match to be reused.

    Args:
        targets: a `TeacherTargets`.
        dataset: the `Dataset` whose training split is cached.
        teacher_files: paths of the teacher model files; their sizes and
            modification times detect retrained teachers.
    """
    labels = np.ascontiguousarray(dataset.split("train").labels)
    files = []
    for path in teacher_files:
        stat = os.stat(path)
        files.append([Path(path).name, stat.st_size, stat.st_mtime_ns])
    return {
        "format_version": FORMAT_VERSION,
        "dataset": dataset.spec,
        "taxonomy": targets.taxonomy.to_dict(),
        "train_labels_sha256": hashlib.sha256(labels.tobytes()).hexdigest(),
        "teacher_files": files,
        "temperature": targets.temperature,
        "specialist_top_k": list(targets.specialist_k),
        "generalist_top_k": targets.generalist_k,
        "roles": list(targets.roles),
    }


def index_dtype(num_classes):
    """Return the smallest integer dtype that can store every class index."""
    return np.int16 if num_classes <= np.iinfo(np.int16).max + 1 else np.int32


def write_cache(folder, targets, dataset, key):
    """Run the teachers once over the training split and cache the targets.

    Args:
        folder: the cache folder (RUN/soft_targets), replaced when complete.
        targets: a `TeacherTargets`.
        dataset: the `Dataset`.
        key: the dict from `cache_key`, stored in index.json.

    Returns:
        The cached arrays, as returned by `read_cache`.
    """
    split = dataset.split("train")
    num_images = len(split)
    dtype = index_dtype(dataset.taxonomy.num_classes)
    arrays = {
        role: (
            np.zeros((num_images, targets.widths[role]), dtype),
            np.zeros((num_images, targets.widths[role]), np.float16),
        )
        for role in targets.roles
    }
    compute = tf.function(targets, reduce_retracing=True)
    for start in range(0, num_images, BATCH_SIZE):
        stop = min(start + BATCH_SIZE, num_images)
        images = tf.constant(split.images[start:stop], tf.float32)
        labels = tf.constant(split.labels[start:stop], tf.int32)
        for role, (indices, probabilities) in compute(images, labels).items():
            arrays[role][0][start:stop] = indices.numpy()
            arrays[role][1][start:stop] = probabilities.numpy()
    logger.info(
        "computed soft targets of %d training images for %s",
        num_images,
        ", ".join(targets.roles),
    )

    folder = Path(folder)
    with io_utils.atomic_path(folder) as tmp:
        tmp.mkdir()
        shards = []
        for shard, start in enumerate(range(0, max(num_images, 1), SHARD_ROWS)):
            stop = min(start + SHARD_ROWS, num_images)
            entry = {"start": start, "stop": stop, "files": {}}
            for role, (indices, probabilities) in arrays.items():
                names = {
                    "indices": f"{role}_indices_{shard:05d}.npy",
                    "probabilities": f"{role}_probabilities_{shard:05d}.npy",
                }
                np.save(tmp / names["indices"], indices[start:stop])
                np.save(tmp / names["probabilities"], probabilities[start:stop])
                entry["files"][role] = names
            shards.append(entry)
        index = dict(key, num_images=num_images, shards=shards)
        io_utils.write_json(tmp / INDEX_FILE, index)
        if folder.exists():
            shutil.rmtree(folder)
    logger.info("wrote the soft-target cache %s", folder)
    return arrays


def read_cache(folder, key):
    """Load cached targets, or return None when absent or stale.

    Args:
        folder: the cache folder.
        key: the dict from `cache_key`; a cache built with other settings,
            data or teachers is stale.

    Returns:
        `{role: (indices, probabilities)}` numpy arrays with one row per
        training image, or None.
    """
    index_path = Path(folder) / INDEX_FILE
    if not index_path.is_file():
        return None
    index = io_utils.read_json(index_path)
    stale = [name for name, value in key.items() if index.get(name) != value]
    if stale:
        logger.info(
            "soft-target cache %s is stale (%s differ); recomputing",
            folder,
            ", ".join(stale),
        )
        return None
    arrays = {}
    for role in key["roles"]:
        parts = {"indices": [], "probabilities": []}
        for shard in index["shards"]:
            for kind, name in shard["files"][role].items():
                parts[kind].append(np.load(Path(folder) / name))
        arrays[role] = (
            np.concatenate(parts["indices"]),
            np.concatenate(parts["probabilities"]),
        )
        if len(arrays[role][0]) != index["num_images"]:
            raise KCError(
                f"soft-target cache {folder} has {len(arrays[role][0])} "
                f"rows of {role} targets but lists {index['num_images']} "
                "images; delete the folder to rebuild it"
            )
    logger.info("loaded the soft-target cache %s", folder)
    return arrays


def cached_pipeline(dataset, arrays, batch_size, augment=False, seed=0):
    """Build a training pipeline of images zipped with their cached targets.

    Args:
        dataset: the `Dataset`; its training split must be in the order
            the cache was written in.
        arrays: `{role: (indices, probabilities)}` from `read_cache` or
            `write_cache`.
        batch_size: images per batch.
        augment: apply `dataset.augment`. The cached targets were computed
            on the unaugmented images, so they are stale for augmented
            ones.
        seed: shuffle and augmentation seed.

    Returns:
        A `tf.data.Dataset` of `(images, labels, {role: (indices,
        probabilities)})` batches, reshuffled every epoch.
    """
    from kc_keras.data import pipeline as pipeline_lib

    split = dataset.split("train")
    data = tf.data.Dataset.from_tensor_slices(
        (split.images, split.labels, arrays)
    )
    data = data.cache().shuffle(
        len(split), seed=seed, reshuffle_each_iteration=True
    )
    data = data.batch(int(batch_size))

    def to_model_input(images, labels, targets):
        targets = {
            role: (tf.cast(indices, tf.int32), tf.cast(values, tf.float32))
            for role, (indices, values) in targets.items()
        }
        return tf.cast(images, tf.float32), tf.cast(labels, tf.int32), targets

    data = data.map(to_model_input, num_parallel_calls=tf.data.AUTOTUNE)
    if augment and dataset.augment:
        settings = pipeline_lib.validate_augment(dataset.augment)
        seeds = tf.data.Dataset.random(
            seed=seed, rerandomize_each_iteration=True
        )

        def augment_element(batch, batch_seed):
            images, labels, targets = batch
            stateless_seed = tf.stack([tf.constant(seed, tf.int64), batch_seed])
            images = pipeline_lib.augment_batch(
                images, settings, stateless_seed
            )
            return images, labels, targets

        data = tf.data.Dataset.zip((data, seeds)).map(
            augment_element, num_parallel_calls=tf.data.AUTOTUNE
        )
    return data.prefetch(tf.data.AUTOTUNE)
