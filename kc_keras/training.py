"""Keras training helpers shared by the teacher and student stages.

Each model trained into a run folder gets its per-epoch metrics in
`RUN/logs/<model>/history.csv`, TensorBoard logs in `RUN/logs/<model>/`
when the `tensorboard` package is installed, and a `BackupAndRestore`
checkpoint under `RUN/logs/backup/<model>/`, so a killed run resumes from
its last finished epoch. Import this module only where TensorFlow may be
imported.
"""

import contextlib
import importlib.util
import logging
import os
import shutil
import sys
from pathlib import Path

import keras
import numpy as np

from kc_keras.errors import KCError

logger = logging.getLogger(__name__)

BACKUP_FOLDER = "backup"


def progress_verbosity():
    """Return Keras's `verbose`: 1 (progress bar) on a terminal, else 2."""
    return 1 if sys.stderr.isatty() else 2


def backup_dir(run_dir, model_name):
    """Return the `BackupAndRestore` folder of `model_name` in a run."""
    return Path(run_dir.logs) / BACKUP_FOLDER / model_name


def has_backup(run_dir, model_name):
    """Return True when an interrupted training of `model_name` can resume."""
    return (backup_dir(run_dir, model_name) / "latest.weights.h5").exists()


def remove_backup(run_dir, model_name):
    """Delete the backup of `model_name`, once its model is saved."""
    shutil.rmtree(backup_dir(run_dir, model_name), ignore_errors=True)


def run_callbacks(run_dir, model_name, extra=()):
    """Build the callbacks every training in a run folder uses.

    The backup is kept after `fit` returns (`delete_checkpoint=False`):
    the caller deletes it with `remove_backup` only after the model file is
    saved, so a kill between the two steps does not lose the training.
    `double_checkpoint` keeps the previous epoch's backup as well, in case
    the process dies while the latest one is being written.

    TensorFlow 2.21 does not depend on the `tensorboard` package, and
    Keras's TensorBoard callback fails at the first epoch without it, so
    that callback is added only when the package is installed.

    Args:
        run_dir: a `kc_keras.run.RunDir`.
        model_name: folder name under `logs/` (`generalist`, ...).
        extra: more callbacks, appended last.

    Returns:
        A list of Keras callbacks.
    """
    log_dir = Path(run_dir.logs) / model_name
    log_dir.mkdir(parents=True, exist_ok=True)
    callbacks = [
        keras.callbacks.BackupAndRestore(
            backup_dir=str(backup_dir(run_dir, model_name)),
            save_freq="epoch",
            double_checkpoint=True,
            delete_checkpoint=False,
        ),
        # Appending keeps the epochs of an interrupted run in the history.
        keras.callbacks.CSVLogger(str(log_dir / "history.csv"), append=True),
    ]
    if tensorboard_installed():
        callbacks.append(
            keras.callbacks.TensorBoard(
                log_dir=str(log_dir), write_graph=False, profile_batch=0
            )
        )
    else:
        logger.debug(
            "tensorboard is not installed; %s logs only history.csv "
            "(pip install tensorboard for TensorBoard logs)",
            model_name,
        )
    return [*callbacks, *extra]


def tensorboard_installed():
    """Return True when the `tensorboard` package can be imported."""
    return importlib.util.find_spec("tensorboard") is not None


def fit(model, train, validation, epochs, steps_per_epoch, callbacks):
    """Run `model.fit` with progress on stderr.

    Keras writes its progress bar to stdout, which the CLI keeps for
    results, so stdout is redirected to stderr while training.

    Args:
        model: a compiled Keras model.
        train: a `tf.data.Dataset` of (pixels, label) batches.
        validation: a `tf.data.Dataset` or None.
        epochs: number of epochs.
        steps_per_epoch: batches per epoch, or None for the whole dataset
            (required when `train` repeats forever).
        callbacks: Keras callbacks.

    Returns:
        The Keras `History`.
    """
    with contextlib.redirect_stdout(sys.stderr):
        return model.fit(
            train,
            validation_data=validation,
            epochs=epochs,
            steps_per_epoch=steps_per_epoch,
            callbacks=callbacks,
            # The pipelines shuffle themselves; Keras ignores `shuffle`
            # for a tf.data.Dataset and warns when it is True.
            shuffle=False,
            verbose=progress_verbosity(),
        )


def predict_logits(model, images, batch_size=256):
    """Return the model's float32 outputs for uint8 or float32 images.

    Args:
        model: a Keras model taking float32 pixels in [0, 255].
        images: array (num_images, height, width, channels).
        batch_size: images per forward pass.

    Returns:
        A float32 array (num_images, num_outputs).
    """
    images = np.asarray(images)
    outputs = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size].astype(np.float32)
        outputs.append(np.asarray(model(batch, training=False)))
    if not outputs:
        return np.zeros((0, model.output_shape[-1]), np.float32)
    return np.concatenate(outputs).astype(np.float32)


def save_model(model, path):
    """Save a Keras model to `path` atomically.

    Keras only saves to names ending in `.keras`, so the temporary file is
    `.<name>.<pid>.tmp.keras` in the same folder, renamed when complete.

    Args:
        model: the Keras model.
        path: final path ending in `.keras`.

    Raises:
        KCError: `path` does not end in `.keras`.
    """
    path = Path(path)
    if path.suffix != ".keras":
        raise KCError(f"model path {path} must end in .keras")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.keras")
    try:
        model.save(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_model(path):
    """Load a Keras model saved by `save_model`.

    Raises:
        KCError: the file is missing or Keras cannot read it.
    """
    # Importing the layers module registers the student's custom layers,
    # so a student loads without the caller importing them first.
    from kc_keras.models import layers  # noqa: F401

    path = Path(path)
    if not path.is_file():
        raise KCError(f"model file not found: {path}")
    try:
        return keras.models.load_model(path, compile=False)
    except (ValueError, OSError) as error:
        raise KCError(
            f"{path} could not be loaded as a Keras model ({error}); "
            "retrain it with --overwrite"
        ) from error
