"""image-folder: user images laid out as PATH/<class>/<image>.

Each subfolder of PATH is a class (sorted by name, hidden folders skipped)
and contains .jpg, .jpeg, .png, .bmp, .gif or .webp files. Images are
converted to RGB, centre-cropped to the target aspect ratio and resized to
`image_size` (default 64x64, small enough for CPU training and phone
inference yet large enough for photographs). GIFs contribute their first
frame.

The taxonomy file assigns each class a vertical, as CSV lines
`class,vertical` (an optional header line `class,vertical`), a JSON object
{"class": "vertical"} or a JSON list of [class, vertical] pairs. Without a
taxonomy file every class goes into one vertical named "all" and the
dataset is marked `taxonomy_provisional`: the teachers stage then derives
verticals by clustering the generalist's confusion matrix and installs them
with `Dataset.with_taxonomy`.

Splits are seeded and stratified: 70% train, 15% validation and 15% test of
each class, with at least one image of each class in every split.
"""

import csv
import json
import logging
from pathlib import Path

import numpy as np

from kc_keras.data import splits as splits_lib
from kc_keras.data.base import Dataset
from kc_keras.data.base import Preprocessing
from kc_keras.data.base import Taxonomy
from kc_keras.errors import KCError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
DEFAULT_IMAGE_SIZE = (64, 64)
HELD_OUT_FRACTIONS = (0.15, 0.15)
PROVISIONAL_VERTICAL = "all"
# Photographs tolerate mirror images; border pixels are reflected rather
# than filled with black.
AUGMENT = {
    "shift": 0.1,
    "scale": 0.1,
    "rotation": 0.03,
    "flip": True,
    "fill_mode": "reflect",
}
# Paths listed in the warning about skipped images.
MAX_LISTED_PATHS = 5


def list_classes(root):
    """Return {class name: sorted image paths} for the folder `root`.

    Raises:
        KCError: `root` is missing, has fewer than 2 class folders, or a
            class folder has no image files.
    """
    if root is None:
        raise KCError(
            "dataset image-folder needs a folder; pass --path PATH with "
            "one subfolder of images per class"
        )
    root = Path(root)
    if not root.is_dir():
        raise KCError(
            f"image folder {root} not found; pass --path PATH with one "
            "subfolder of images per class"
        )
    class_dirs = sorted(
        entry
        for entry in root.iterdir()
        if entry.is_dir() and not entry.name.startswith(".")
    )
    if len(class_dirs) < 2:
        raise KCError(
            f"image folder {root} has {len(class_dirs)} class subfolders; "
            "create one subfolder per class, at least 2"
        )
    classes = {}
    empty = []
    for class_dir in class_dirs:
        paths = sorted(
            path
            for path in class_dir.iterdir()
            if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not paths:
            empty.append(class_dir.name)
        classes[class_dir.name] = paths
    if empty:
        raise KCError(
            f"class folders without images in {root}: {', '.join(empty)}; "
            f"add {'/'.join(IMAGE_EXTENSIONS)} files or remove the folders"
        )
    return classes


def read_image(path, size):
    """Return one image as uint8 (height, width, 3).

    Args:
        path: image file.
        size: (height, width).

    Raises:
        OSError, ValueError: Pillow cannot decode the file.
    """
    from PIL import Image
    from PIL import ImageOps

    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        image = image.convert("RGB")
        fitted = ImageOps.fit(
            image, (size[1], size[0]), Image.Resampling.BILINEAR
        )
        return np.asarray(fitted, dtype=np.uint8)


def read_images(classes, size, strict):
    """Decode every image, skipping unreadable ones unless `strict`.

    Returns:
        (images, labels): uint8 (N, height, width, 3) and int labels in the
        order of `classes`.

    Raises:
        KCError: an image is unreadable and `strict` is True, or a class
            is left without readable images.
    """
    from PIL import Image

    images = []
    labels = []
    skipped = []
    for label, (name, paths) in enumerate(classes.items()):
        count = 0
        for path in paths:
            try:
                images.append(read_image(path, size))
            except (OSError, ValueError, Image.DecompressionBombError) as error:
                if strict:
                    raise KCError(
                        f"image {path} is unreadable ({error}); fix or "
                        "remove it, or load without --strict to skip it"
                    ) from error
                skipped.append(str(path))
                continue
            labels.append(label)
            count += 1
        if count == 0:
            raise KCError(
                f"class folder {name!r} has no readable images; add valid "
                "images or remove the folder"
            )
    if skipped:
        listed = ", ".join(skipped[:MAX_LISTED_PATHS])
        more = len(skipped) - MAX_LISTED_PATHS
        logger.warning(
            "skipped %d unreadable images: %s%s",
            len(skipped),
            listed,
            f" and {more} more" if more > 0 else "",
        )
    return np.stack(images), np.asarray(labels)


def read_taxonomy_pairs(path):
    """Return [(class, vertical)] from a CSV or JSON taxonomy file.

    Raises:
        KCError: the file is missing or malformed.
    """
    path = Path(path)
    if not path.is_file():
        raise KCError(
            f"taxonomy file {path} not found; pass a CSV `class,vertical` "
            "or JSON file"
        )
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".json":
        return parse_json_taxonomy(text, path)
    pairs = []
    for line_number, row in enumerate(csv.reader(text.splitlines()), 1):
        if not row or all(not cell.strip() for cell in row):
            continue
        if len(row) != 2:
            raise KCError(
                f"taxonomy file {path} line {line_number} has {len(row)} "
                "fields; write `class,vertical`"
            )
        pair = (row[0].strip(), row[1].strip())
        if (
            not pairs
            and pair[0].lower() == "class"
            and pair[1].lower() == "vertical"
        ):
            continue
        pairs.append(pair)
    return pairs


def parse_json_taxonomy(text, path):
    """Return [(class, vertical)] from JSON text of a taxonomy file."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise KCError(
            f"taxonomy file {path} is not valid JSON ({error}); write "
            '{"class": "vertical"} or [["class", "vertical"], ...]'
        ) from error
    if isinstance(data, dict):
        pairs = list(data.items())
    elif isinstance(data, list):
        pairs = data
    else:
        pairs = None
    valid = pairs is not None and all(
        isinstance(pair, list | tuple)
        and len(pair) == 2
        and all(isinstance(item, str) for item in pair)
        for pair in pairs
    )
    if not valid:
        raise KCError(
            f"taxonomy file {path} has an invalid layout; write "
            '{"class": "vertical"} or [["class", "vertical"], ...]'
        )
    return [(str(name), str(vertical)) for name, vertical in pairs]


def build_taxonomy(class_names, taxonomy_file):
    """Return (taxonomy, provisional) for the folder's classes.

    Raises:
        KCError: the file names unknown classes, assigns a class twice,
            leaves classes unassigned or makes a vertical of one class.
    """
    if taxonomy_file is None:
        taxonomy = Taxonomy(
            class_names=tuple(class_names),
            vertical_names=(PROVISIONAL_VERTICAL,),
            class_vertical=(0,) * len(class_names),
        )
        return taxonomy, True
    pairs = read_taxonomy_pairs(taxonomy_file)
    assigned = {}
    for name, vertical in pairs:
        if name in assigned and assigned[name] != vertical:
            raise KCError(
                f"taxonomy file {taxonomy_file} assigns class {name!r} to "
                f"both {assigned[name]!r} and {vertical!r}; keep one"
            )
        assigned[name] = vertical
    unknown = sorted(set(assigned) - set(class_names))
    if unknown:
        raise KCError(
            f"taxonomy file {taxonomy_file} names classes without a folder: "
            f"{', '.join(unknown)}; fix the names or add the folders"
        )
    missing = [name for name in class_names if name not in assigned]
    if missing:
        raise KCError(
            f"taxonomy file {taxonomy_file} leaves classes unassigned: "
            f"{', '.join(missing)}; give each class a vertical"
        )
    vertical_names = sorted(set(assigned.values()))
    class_vertical = tuple(
        vertical_names.index(assigned[name]) for name in class_names
    )
    sizes = np.bincount(class_vertical, minlength=len(vertical_names))
    single = [
        v for v, size in zip(vertical_names, sizes, strict=True) if size < 2
    ]
    if single:
        raise KCError(
            f"taxonomy file {taxonomy_file} has verticals with one class: "
            f"{', '.join(single)}; a specialist needs at least 2 classes, "
            "so merge them into other verticals"
        )
    taxonomy = Taxonomy(
        class_names=tuple(class_names),
        vertical_names=tuple(vertical_names),
        class_vertical=class_vertical,
    )
    return taxonomy, False


def load(
    path, taxonomy_file=None, image_size=None, strict=False, quick=False, seed=0
):
    """Read the folder, the taxonomy and the splits.

    Args:
        path: root folder with one subfolder per class.
        taxonomy_file: CSV or JSON taxonomy, or None for a provisional
            single vertical.
        image_size: [height, width], or None for 64x64.
        strict: raise on an unreadable image instead of skipping it.
        quick: keep at most 40 train, 10 validation and 10 test images per
            class.
        seed: seed of the stratified split.

    Returns:
        (taxonomy, provisional, preprocessing, splits).
    """
    size = tuple(image_size) if image_size is not None else DEFAULT_IMAGE_SIZE
    classes = list_classes(path)
    taxonomy, provisional = build_taxonomy(list(classes), taxonomy_file)
    images, labels = read_images(classes, size, strict)
    parts = splits_lib.stratified_indices(
        labels, HELD_OUT_FRACTIONS, seed, class_names=taxonomy.class_names
    )
    splits = {
        name: splits_lib.make_split(images[indices], labels[indices])
        for name, indices in zip(
            ("train", "validation", "test"), parts, strict=True
        )
    }
    if quick:
        splits = splits_lib.quick_splits(splits, seed)
    preprocessing = Preprocessing(size[0], size[1], 3)
    return taxonomy, provisional, preprocessing, splits


def load_dataset(spec, path, taxonomy_file, strict, image_size, quick, seed):
    """Return the image-folder `Dataset` described by `spec`."""
    taxonomy, provisional, preprocessing, splits = load(
        path,
        taxonomy_file=taxonomy_file,
        image_size=image_size,
        strict=strict,
        quick=quick,
        seed=seed,
    )
    if provisional:
        logger.info(
            "no taxonomy file: all %d classes are in one provisional "
            "vertical until verticals are derived from a confusion matrix",
            taxonomy.num_classes,
        )
    return Dataset(
        name="image-folder",
        spec=spec,
        taxonomy=taxonomy,
        preprocessing=preprocessing,
        splits=splits,
        augment=dict(AUGMENT),
        seed=seed,
        taxonomy_provisional=provisional,
    )
