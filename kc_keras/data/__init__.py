"""Dataset sources: every stage loads its data through `load_dataset`.

Sources:
    trio-30: digits, clothing and animals, 10 classes each, 28x28
        grayscale (`kc_keras.data.trio`).
    kanji-2136: the Joyo kanji rendered from installed fonts, grouped by
        classical radical (`kc_keras.data.kanji`).
    image-folder: PATH/<class>/<image> files with an optional taxonomy
        file (`kc_keras.data.folder`).
    synthetic: N confusable classes in V verticals, for tests and scale
        runs (`kc_keras.data.synthetic`).
"""

import importlib
import logging
from pathlib import Path

import numpy as np

from kc_keras.data.base import Dataset
from kc_keras.data.base import Preprocessing
from kc_keras.data.base import Split
from kc_keras.data.base import Taxonomy
from kc_keras.errors import KCError

logger = logging.getLogger(__name__)

__all__ = [
    "DATASETS",
    "Dataset",
    "Preprocessing",
    "Split",
    "Taxonomy",
    "load_dataset",
]

DATASETS = ("trio-30", "kanji-2136", "image-folder", "synthetic")

# Dataset name -> module with a `load_dataset(spec, ...)` function. Modules
# are imported on first use so loading one source never imports another.
SOURCE_MODULES = {
    "trio-30": "kc_keras.data.trio",
    "kanji-2136": "kc_keras.data.kanji",
    "image-folder": "kc_keras.data.folder",
    "synthetic": "kc_keras.data.synthetic",
}

# Options each source reads besides `quick` and `seed`. Passing another
# option raises `KCError` instead of being silently ignored.
SOURCE_OPTIONS = {
    "trio-30": (),
    "kanji-2136": (),
    "image-folder": ("path", "taxonomy_file", "strict", "image_size"),
    "synthetic": ("num_classes", "num_verticals"),
}


def load_dataset(
    name,
    *,
    path=None,
    taxonomy_file=None,
    quick=False,
    seed=0,
    strict=False,
    num_classes=None,
    num_verticals=None,
    image_size=None,
):
    """Load a dataset by name.

    The returned dataset's `spec` contains exactly these arguments (with
    `name`), in JSON form, so `load_dataset(**dataset.spec)` reloads the
    same data.

    Args:
        name: one of `DATASETS`.
        path: image-folder root (PATH/<class>/<image>).
        taxonomy_file: image-folder taxonomy (CSV `class,vertical` or
            JSON); without it the taxonomy is provisional (see
            `Dataset.taxonomy_provisional`).
        quick: keep a small subset for smoke runs.
        seed: seed of the splits, shuffling and augmentation.
        strict: image-folder only: fail on an unreadable image instead of
            skipping it with a warning.
        num_classes: synthetic only: number of classes.
        num_verticals: synthetic only: number of verticals.
        image_size: image-folder only: int or (height, width).

    Returns:
        A `Dataset`.

    Raises:
        KCError: unknown name, an option the source does not read, or any
            invalid input of the source.
    """
    if name not in DATASETS:
        raise KCError(
            f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}"
        )
    options = {
        "path": path,
        "taxonomy_file": taxonomy_file,
        "strict": strict,
        "num_classes": num_classes,
        "num_verticals": num_verticals,
        "image_size": image_size,
    }
    defaults = {"strict": False}
    for option, value in options.items():
        unused = value is None or value == defaults.get(option)
        if option not in SOURCE_OPTIONS[name] and not unused:
            raise KCError(
                f"option {option}={value!r} does not apply to dataset "
                f"{name!r}; remove it"
            )
    spec = make_spec(name, quick=quick, seed=seed, **options)
    module = importlib.import_module(SOURCE_MODULES[name])
    kwargs = {option: spec[option] for option in SOURCE_OPTIONS[name]}
    dataset = module.load_dataset(
        spec, quick=spec["quick"], seed=spec["seed"], **kwargs
    )
    log_summary(dataset)
    return dataset


def make_spec(name, **options):
    """Return the JSON form of the `load_dataset` arguments.

    Paths become absolute strings and `image_size` a [height, width] list,
    so the spec compares equal after a JSON round trip and reloads the
    same data from another working directory.
    """
    spec = {"name": name}
    spec.update(options)
    for key in ("path", "taxonomy_file"):
        if spec[key] is not None:
            spec[key] = str(Path(spec[key]).expanduser().resolve())
    spec["quick"] = bool(spec["quick"])
    spec["strict"] = bool(spec["strict"])
    spec["seed"] = int(spec["seed"])
    for key in ("num_classes", "num_verticals"):
        if spec[key] is not None:
            spec[key] = int(spec[key])
    if spec["image_size"] is not None:
        spec["image_size"] = normalise_image_size(spec["image_size"])
    return spec


def normalise_image_size(image_size):
    """Return `image_size` (an int or a pair) as a [height, width] list."""
    if isinstance(image_size, int | np.integer):
        sizes = [int(image_size), int(image_size)]
    else:
        try:
            sizes = [int(size) for size in image_size]
        except (TypeError, ValueError) as error:
            raise KCError(
                f"image size {image_size!r} is invalid; pass an int or "
                "(height, width)"
            ) from error
    if len(sizes) != 2 or min(sizes) < 8 or max(sizes) > 1024:
        raise KCError(
            f"image size {image_size!r} is invalid; pass an int or "
            "(height, width) between 8 and 1024 pixels"
        )
    return sizes


def log_summary(dataset):
    counts = {name: len(split) for name, split in dataset.splits.items()}
    logger.info(
        "loaded %s: %d classes in %d verticals, images %s, shape %s",
        dataset.name,
        dataset.taxonomy.num_classes,
        dataset.taxonomy.num_verticals,
        counts,
        dataset.preprocessing.input_shape,
    )
