"""Synthetic dataset of confusable classes, for tests and scale runs.

Each vertical has a random base pattern and each class adds a small random
perturbation to its vertical's pattern, so classes of one vertical are
harder to tell apart than classes of different verticals. An image is its
class prototype plus Gaussian noise, shifted by up to one pixel. Images are
16x16 grayscale so that 100,000 classes fit in memory.

Images per class fall as the number of classes grows (see
`images_per_class`): 40 train, 10 validation and 10 test up to 1,000
classes, down to 2 train, 1 validation and 1 test from 20,000 classes on.
Generation is vectorised numpy and deterministic for a given seed.
"""

import logging

import numpy as np

from kc_keras.data.base import Dataset
from kc_keras.data.base import Preprocessing
from kc_keras.data.base import Split
from kc_keras.data.base import Taxonomy
from kc_keras.errors import KCError

logger = logging.getLogger(__name__)

IMAGE_SIZE = 16
# Prototypes are drawn on a coarse grid and upsampled, so a one-pixel shift
# changes an image less than a change of class does.
GRID = 8
# Relative amplitudes of the vertical pattern, the class perturbation and
# the per-image noise, before mapping to pixel values.
CLASS_AMPLITUDE = 0.45
NOISE_AMPLITUDE = 0.3
# Images are generated in chunks to bound the float32 working memory.
CHUNK = 65536
DEFAULT_NUM_CLASSES = 30
MAX_NUM_CLASSES = 1_000_000


def default_num_verticals(num_classes):
    """Return about sqrt(N) verticals, with at least 10 classes each."""
    return max(1, min(num_classes // 10, round(num_classes**0.5)))


def images_per_class(num_classes, quick=False):
    """Return the (train, validation, test) images per class.

    The total number of training images stays near 40,000 until every class
    is down to 2 training images.
    """
    train = int(np.clip(40_000 // num_classes, 2, 40))
    held_out = max(1, train // 4)
    if quick:
        train = min(train, 8)
        held_out = min(held_out, 2)
    return train, held_out, held_out


def build_taxonomy(num_classes, num_verticals):
    """Return a taxonomy with contiguous, near-equal verticals."""
    class_vertical = np.arange(num_classes) * num_verticals // num_classes
    class_width = len(str(num_classes - 1))
    vertical_width = len(str(num_verticals - 1))
    return Taxonomy(
        class_names=tuple(
            f"class_{c:0{class_width}d}" for c in range(num_classes)
        ),
        vertical_names=tuple(
            f"vertical_{v:0{vertical_width}d}" for v in range(num_verticals)
        ),
        class_vertical=tuple(int(v) for v in class_vertical),
    )


def check_sizes(num_classes, num_verticals):
    """Raise `KCError` unless the class and vertical counts are usable."""
    if not 2 <= num_classes <= MAX_NUM_CLASSES:
        raise KCError(
            f"synthetic num_classes={num_classes} is invalid; use 2 to "
            f"{MAX_NUM_CLASSES}"
        )
    if not 1 <= num_verticals <= num_classes // 2:
        raise KCError(
            f"synthetic num_verticals={num_verticals} is invalid for "
            f"{num_classes} classes; use 1 to {num_classes // 2} so every "
            "vertical has at least 2 classes"
        )


def render_images(prototypes, labels, rng):
    """Return uint8 images of `labels`: prototype, noise and a small shift.

    Args:
        prototypes: float32 array (num_classes, GRID, GRID).
        labels: int array of class indices.
        rng: a numpy Generator.

    Returns:
        uint8 array (len(labels), IMAGE_SIZE, IMAGE_SIZE, 1).
    """
    repeat = IMAGE_SIZE // GRID
    out = np.empty((len(labels), IMAGE_SIZE, IMAGE_SIZE, 1), np.uint8)
    for start in range(0, len(labels), CHUNK):
        chunk = labels[start : start + CHUNK]
        coarse = prototypes[chunk]
        images = coarse.repeat(repeat, axis=1).repeat(repeat, axis=2)
        images = images + NOISE_AMPLITUDE * rng.standard_normal(
            images.shape, dtype=np.float32
        )
        # A wrapped one-pixel border lets every image pick one of the 3x3
        # shifted 16x16 windows, which equals np.roll by -1, 0 or 1.
        padded = np.pad(images, ((0, 0), (1, 1), (1, 1)), mode="wrap")
        windows = np.lib.stride_tricks.sliding_window_view(
            padded, (IMAGE_SIZE, IMAGE_SIZE), axis=(1, 2)
        )
        shifts = rng.integers(0, 3, size=(2, len(chunk)))
        images = windows[np.arange(len(chunk)), shifts[0], shifts[1]]
        pixels = np.clip(128.0 + 60.0 * images, 0.0, 255.0)
        out[start : start + len(chunk), :, :, 0] = pixels.astype(np.uint8)
    return out


def load(num_classes=None, num_verticals=None, quick=False, seed=0):
    """Generate the synthetic dataset.

    Args:
        num_classes: number of classes, 2 to 1,000,000 (default 30).
        num_verticals: number of verticals (default about sqrt(N), with at
            least 10 classes per vertical); each needs at least 2 classes.
        quick: generate at most 8 train, 2 validation and 2 test images per
            class.
        seed: seed of the prototypes and the images.

    Returns:
        (taxonomy, preprocessing, splits): the parts of a `Dataset`.

    Raises:
        KCError: invalid class or vertical counts.
    """
    num_classes = DEFAULT_NUM_CLASSES if num_classes is None else num_classes
    num_classes = int(num_classes)
    if num_verticals is None:
        num_verticals = default_num_verticals(num_classes)
    num_verticals = int(num_verticals)
    check_sizes(num_classes, num_verticals)
    taxonomy = build_taxonomy(num_classes, num_verticals)
    rng = np.random.default_rng(seed)
    vertical_patterns = rng.standard_normal(
        (num_verticals, GRID, GRID), dtype=np.float32
    )
    class_vertical = np.asarray(taxonomy.class_vertical)
    prototypes = vertical_patterns[class_vertical] + (
        CLASS_AMPLITUDE
        * rng.standard_normal((num_classes, GRID, GRID), dtype=np.float32)
    )
    splits = {}
    counts = images_per_class(num_classes, quick=quick)
    for name, per_class in zip(
        ("train", "validation", "test"), counts, strict=True
    ):
        labels = np.repeat(np.arange(num_classes, dtype=np.int32), per_class)
        images = render_images(prototypes, labels, rng)
        splits[name] = Split(images, labels)
    preprocessing = Preprocessing(IMAGE_SIZE, IMAGE_SIZE, 1)
    return taxonomy, preprocessing, splits


def load_dataset(spec, num_classes, num_verticals, quick, seed):
    """Return the synthetic `Dataset` described by `spec`."""
    taxonomy, preprocessing, splits = load(
        num_classes=num_classes,
        num_verticals=num_verticals,
        quick=quick,
        seed=seed,
    )
    return Dataset(
        name="synthetic",
        spec=spec,
        taxonomy=taxonomy,
        preprocessing=preprocessing,
        splits=splits,
        augment=None,
        seed=seed,
    )
