"""Dataset contract shared by every source and every later stage.

A dataset is labelled images, class names, a taxonomy that assigns each
class to one vertical, and fixed train/validation/test splits. Images are
kept as uint8 arrays of shape (num_images, height, width, channels). Models
take float32 pixel values in [0, 255] and embed the scaling themselves (see
`Preprocessing`), so the same test images feed Keras, TFLite and the web demo.
"""

import collections
import dataclasses
import logging

import numpy as np

from kc_keras.errors import KCError

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """Input format of every model trained on a dataset.

    Models receive float32 pixels in [0, 255] with shape
    (height, width, channels) and compute `pixel * scale + offset` in their
    first layer. An int8 TFLite model therefore takes the raw pixel minus 128
    (input scale 1, zero point -128) with no loss.

    Attributes:
        height: image height in pixels.
        width: image width in pixels.
        channels: 1 for grayscale, 3 for RGB.
        scale: multiplier applied to raw pixels inside the model.
        offset: value added after scaling inside the model.
    """

    height: int
    width: int
    channels: int
    scale: float = 1.0 / 255.0
    offset: float = 0.0

    @property
    def input_shape(self):
        return (self.height, self.width, self.channels)

    def to_dict(self):
        return {
            "height": self.height,
            "width": self.width,
            "channels": self.channels,
            "input_range": [0, 255],
            "scale": self.scale,
            "offset": self.offset,
        }

    @classmethod
    def from_dict(cls, data):
        return cls(
            height=int(data["height"]),
            width=int(data["width"]),
            channels=int(data["channels"]),
            scale=float(data["scale"]),
            offset=float(data["offset"]),
        )


@dataclasses.dataclass(frozen=True)
class Taxonomy:
    """Class names and the vertical each class belongs to.

    Class index `c` has name `class_names[c]` and vertical
    `class_vertical[c]`, an index into `vertical_names`. Classes of one
    vertical need not be contiguous.

    Attributes:
        class_names: one unique name per class, in label order.
        vertical_names: one unique name per vertical.
        class_vertical: vertical index of each class.
    """

    class_names: tuple
    vertical_names: tuple
    class_vertical: tuple

    def __post_init__(self):
        self.validate()

    @property
    def num_classes(self):
        return len(self.class_names)

    @property
    def num_verticals(self):
        return len(self.vertical_names)

    def vertical_classes(self, vertical):
        """Return the sorted class indices of vertical index `vertical`."""
        return tuple(
            c for c, v in enumerate(self.class_vertical) if v == vertical
        )

    @property
    def vertical_sizes(self):
        # One counting pass, so validating 100,000 classes stays fast.
        counts = collections.Counter(self.class_vertical)
        return tuple(counts[v] for v in range(self.num_verticals))

    @property
    def is_contiguous(self):
        """True when the classes are sorted by vertical."""
        return list(self.class_vertical) == sorted(self.class_vertical)

    def validate(self):
        """Raise `KCError` on duplicates, bad indices or tiny verticals."""
        if len(self.class_names) != len(self.class_vertical):
            raise KCError(
                f"taxonomy has {len(self.class_names)} class names but "
                f"{len(self.class_vertical)} vertical assignments; give one "
                "vertical per class"
            )
        if len(self.class_names) < 2:
            raise KCError(
                f"dataset has {len(self.class_names)} class; at least 2 "
                "classes are needed"
            )
        for names, kind in (
            (self.class_names, "class"),
            (self.vertical_names, "vertical"),
        ):
            seen = set()
            for name in names:
                if name in seen:
                    raise KCError(
                        f"duplicate {kind} name {name!r} in taxonomy; names "
                        "must be unique"
                    )
                seen.add(name)
        for c, v in enumerate(self.class_vertical):
            if not 0 <= v < len(self.vertical_names):
                raise KCError(
                    f"class {self.class_names[c]!r} has vertical index {v}, "
                    f"outside 0..{len(self.vertical_names) - 1}"
                )
        for v, size in enumerate(self.vertical_sizes):
            if size < 2:
                raise KCError(
                    f"vertical {self.vertical_names[v]!r} has {size} "
                    "class(es); a specialist needs at least 2: merge it "
                    "into another vertical"
                )

    def to_dict(self):
        return {
            "classes": list(self.class_names),
            "verticals": list(self.vertical_names),
            "class_vertical": list(self.class_vertical),
        }

    @classmethod
    def from_dict(cls, data):
        return cls(
            class_names=tuple(data["classes"]),
            vertical_names=tuple(data["verticals"]),
            class_vertical=tuple(int(v) for v in data["class_vertical"]),
        )


@dataclasses.dataclass(frozen=True)
class Split:
    """Images and integer labels of one split.

    Attributes:
        images: uint8 array (num_images, height, width, channels).
        labels: int32 array (num_images,) of class indices.
    """

    images: np.ndarray
    labels: np.ndarray

    def __len__(self):
        return len(self.labels)

    def subset(self, indices):
        return Split(self.images[indices], self.labels[indices])


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A loaded dataset: splits, taxonomy and preprocessing.

    Attributes:
        name: the name the dataset was loaded by (`trio-30`, ...).
        spec: JSON-serialisable arguments that reload the same dataset
            (stored in the run folder so later stages can check it).
        taxonomy: class names and verticals.
        preprocessing: input format of the models.
        splits: mapping from "train", "validation" and "test" to `Split`.
        augment: augmentation settings for training, or None. Keys are
            `shift` (fraction of size), `scale` (fraction), `rotation`
            (fraction of a full turn) and `stroke` (max pixels of
            dilation or erosion).
        seed: seed of the split and shuffling.
        backbone: the backbone that suits the images (a name of
            `kc_keras.models.backbones.BACKBONES`). `kc teachers` uses it
            when `--backbone` is not given, and a `small-cnn` student takes
            its small-CNN variant (`backbones.for_dataset`).
        taxonomy_provisional: True when the verticals are a placeholder
            (an image folder without a taxonomy file puts every class in
            one vertical). The caller derives verticals, for example by
            clustering a generalist's confusion matrix, and installs them
            with `with_taxonomy`.
    """

    name: str
    spec: dict
    taxonomy: Taxonomy
    preprocessing: Preprocessing
    splits: dict
    augment: dict | None = None
    seed: int = 0
    backbone: str = "small-cnn"
    taxonomy_provisional: bool = False

    def with_taxonomy(self, taxonomy):
        """Return a copy of this dataset with `taxonomy` as final verticals.

        Args:
            taxonomy: a `Taxonomy` with the same class names in the same
                order.

        Returns:
            A `Dataset` sharing the splits, with `taxonomy_provisional`
            False.

        Raises:
            KCError: the class names differ from this dataset's.
        """
        if tuple(taxonomy.class_names) != tuple(self.taxonomy.class_names):
            raise KCError(
                f"new taxonomy has {taxonomy.num_classes} classes that do "
                f"not match the {self.taxonomy.num_classes} classes of "
                f"dataset {self.name!r}; keep the class names and order"
            )
        return dataclasses.replace(
            self, taxonomy=taxonomy, taxonomy_provisional=False
        )

    def split(self, name):
        if name not in self.splits:
            raise KCError(
                f"unknown split {name!r}; expected one of {', '.join(SPLITS)}"
            )
        return self.splits[name]

    def class_counts(self, split="train"):
        """Return the number of images per class in `split`."""
        return np.bincount(
            self.split(split).labels, minlength=self.taxonomy.num_classes
        )

    def pipeline(
        self,
        split,
        batch_size,
        shuffle=None,
        augment=None,
        classes=None,
        label_map=None,
        repeat=False,
    ):
        """Build a `tf.data` pipeline of (float32 pixels, int32 label).

        Args:
            split: "train", "validation" or "test".
            batch_size: images per batch.
            shuffle: shuffle every epoch; defaults to True for "train".
            augment: apply `self.augment`; defaults to True for "train"
                when the dataset defines augmentation.
            classes: keep only images of these class indices.
            label_map: int array mapping each class index to a new label
                (specialists use it for their local labels and dustbin).
            repeat: repeat forever.

        Returns:
            A batched, prefetched `tf.data.Dataset`.
        """
        from kc_keras.data import pipeline as pipeline_lib

        return pipeline_lib.make_pipeline(
            self,
            split,
            batch_size,
            shuffle=split == "train" if shuffle is None else shuffle,
            augment=(
                (split == "train" and self.augment is not None)
                if augment is None
                else augment
            ),
            classes=classes,
            label_map=label_map,
            repeat=repeat,
        )
