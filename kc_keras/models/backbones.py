"""Image backbones shared by the teachers and the student.

Each builder takes the Keras module to build with, so the same architecture
can be built in Keras 3 (training) and in tf-keras (Keras 2, for
quantization-aware training); weights then copy across layer by layer.
"""

import dataclasses
import logging

from kc_keras.errors import KCError

logger = logging.getLogger(__name__)

BACKBONES = (
    "small-cnn",
    "small-cnn-flatten",
    "mobilenet-v3-small",
    "efficientnet-b0",
)
# The small CNNs differ only in how the last feature map becomes a vector:
# `small-cnn` averages it over space, `small-cnn-flatten` keeps every
# position, which characters need because their class depends on where
# each stroke lies.
SMALL_CNNS = ("small-cnn", "small-cnn-flatten")


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """Backbone architecture and width.

    Attributes:
        name: one of `BACKBONES`. `small-cnn` is sized for 28x28 images on a
            CPU and averages its last feature map over space;
            `small-cnn-flatten` flattens it instead, for images whose class
            depends on the position of their parts (characters). The
            `keras.applications` models suit larger RGB images.
        filters: filters of the first small-CNN block; each later block
            doubles them.
        blocks: number of small-CNN blocks (two 3x3 convolutions and a
            2x2 max pooling each).
        weights: path to a local weights file for a `keras.applications`
            backbone, or None for random initialisation. Nothing is ever
            downloaded.
    """

    name: str = "small-cnn"
    filters: int = 32
    blocks: int = 2
    weights: str | None = None

    def __post_init__(self):
        if self.name not in BACKBONES:
            raise KCError(
                f"unknown backbone {self.name!r}; expected one of "
                f"{', '.join(BACKBONES)}"
            )
        if self.filters < 1 or self.blocks < 1:
            raise KCError(
                f"backbone filters and blocks must be positive, got "
                f"filters={self.filters}, blocks={self.blocks}"
            )

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data):
        return cls(**data)


def rescale(inputs, preprocessing, keras_module, name="rescale"):
    """Apply the dataset's pixel scaling as the model's first layer."""
    return keras_module.layers.Rescaling(
        preprocessing.scale, preprocessing.offset, name=name
    )(inputs)


def build_features(inputs, spec, preprocessing, keras_module, prefix=""):
    """Build backbone layers on `inputs` and return the pooled features.

    Args:
        inputs: a Keras input tensor of float32 pixels in [0, 255].
        spec: a `BackboneSpec`.
        preprocessing: the dataset's `Preprocessing`.
        keras_module: `keras` (Keras 3) or `tf_keras`.
        prefix: prefix for layer names, so a model can hold two backbones.

    Returns:
        A rank-2 feature tensor (batch, features).
    """
    layers = keras_module.layers
    if spec.name in SMALL_CNNS:
        x = rescale(inputs, preprocessing, keras_module, f"{prefix}rescale")
        filters = spec.filters
        for block in range(spec.blocks):
            for conv in range(2):
                name = f"{prefix}block{block + 1}_conv{conv + 1}"
                x = layers.Conv2D(
                    filters, 3, padding="same", use_bias=False, name=name
                )(x)
                x = layers.BatchNormalization(name=f"{name}_bn")(x)
                x = layers.ReLU(name=f"{name}_relu")(x)
            x = layers.MaxPooling2D(2, name=f"{prefix}block{block + 1}_pool")(x)
            filters *= 2
        if spec.name == "small-cnn-flatten":
            return layers.Flatten(name=f"{prefix}flatten")(x)
        return layers.GlobalAveragePooling2D(name=f"{prefix}pool")(x)
    application = {
        "mobilenet-v3-small": keras_module.applications.MobileNetV3Small,
        "efficientnet-b0": keras_module.applications.EfficientNetB0,
    }[spec.name]
    kwargs = {}
    if spec.name == "mobilenet-v3-small":
        # The application rescales [0, 255] inputs itself.
        kwargs["include_preprocessing"] = True
    base = application(
        input_shape=tuple(inputs.shape[1:]),
        include_top=False,
        weights=spec.weights,
        pooling="avg",
        **kwargs,
    )
    base.name = f"{prefix}{base.name}"
    return base(inputs)


def for_dataset(spec, dataset_backbone):
    """Return `spec` with the small-CNN variant that the dataset needs.

    A dataset names its backbone in `Dataset.backbone`. When that is a
    small CNN and `spec` is the default `small-cnn`, the result is the
    dataset's variant with the widths of `spec`. Any other `spec` comes
    back unchanged.

    Args:
        spec: a `BackboneSpec`.
        dataset_backbone: the dataset's `Dataset.backbone` name.

    Returns:
        A `BackboneSpec`.
    """
    if spec.name == "small-cnn" and dataset_backbone in SMALL_CNNS:
        return dataclasses.replace(spec, name=dataset_backbone)
    return spec
