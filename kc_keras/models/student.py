"""The student: a small backbone, a shared FC layer and a per-vertical head.

`build_student` defines the architecture once for Keras 3 (training) and
tf-keras (quantization-aware training); `copy_weights` moves trained weights
between the two, layer by layer by name.

Heads:
- `fc-sc`: structurally connected (SC) blocks, one per vertical: Dense(width)
  with ReLU, then Dense(vertical size). Each block reads the shared FC
  output and writes only its vertical's logits, which are concatenated and,
  when the classes of a vertical are not contiguous, gathered back into
  class-index order.
- `fc-fc`: a plain baseline, Dense(hidden) with ReLU, then Dense(classes).

Self-paced learning L2-normalises each vertical's logits and multiplies
them by a learnable gamma initialised at sqrt(vertical size): one gamma per
vertical (`vertical`), one per class (`class`) or none (`none`).

Only standard Keras layers are used apart from `ClassGather` and
`SelfPacedScale` (kc_keras/models/layers.py): one Dense per vertical plus
Concatenate quantizes to int8 with tfmot's default registry.
"""

import dataclasses
import logging

import keras
import numpy as np

from kc_keras.errors import KCError
from kc_keras.models import backbones
from kc_keras.models import layers as kc_layers

logger = logging.getLogger(__name__)

HEADS = ("fc-sc", "fc-fc")
SELF_PACED_MODES = ("vertical", "class", "none")
HEAD_PREFIX = "head_"


@dataclasses.dataclass(frozen=True)
class StudentConfig:
    """Architecture of the student.

    Attributes:
        backbone: backbone spec; the default is narrower than the
            teachers' default (`BackboneSpec()`, 32 filters).
        fc_units: units of the shared FC layer.
        head: `fc-sc` or `fc-fc`.
        sc_width: hidden units of each vertical's SC block.
        fc_hidden: hidden units of the `fc-fc` head; None picks the width
            whose parameter count is closest to the `fc-sc` head's.
        self_paced: `vertical`, `class` or `none`.
    """

    backbone: backbones.BackboneSpec = backbones.BackboneSpec(
        filters=16, blocks=2
    )
    fc_units: int = 128
    head: str = "fc-sc"
    sc_width: int = 32
    fc_hidden: int | None = None
    self_paced: str = "vertical"

    def __post_init__(self):
        if self.head not in HEADS:
            raise KCError(
                f"unknown student head {self.head!r}; expected one of "
                f"{', '.join(HEADS)}"
            )
        if self.self_paced not in SELF_PACED_MODES:
            raise KCError(
                f"unknown self-paced mode {self.self_paced!r}; expected one "
                f"of {', '.join(SELF_PACED_MODES)}"
            )
        for name in ("fc_units", "sc_width"):
            if getattr(self, name) < 1:
                raise KCError(
                    f"student {name} must be positive, got "
                    f"{getattr(self, name)}"
                )
        if self.fc_hidden is not None and self.fc_hidden < 1:
            raise KCError(
                f"student fc_hidden must be positive or None, got "
                f"{self.fc_hidden}"
            )

    def to_dict(self):
        data = dataclasses.asdict(self)
        data["backbone"] = self.backbone.to_dict()
        return data

    @classmethod
    def from_dict(cls, data):
        data = dict(data)
        data["backbone"] = backbones.BackboneSpec.from_dict(data["backbone"])
        return cls(**data)


def sc_head_parameters(fc_units, sc_width, taxonomy):
    """Return the parameter count of the `fc-sc` head."""
    total = 0
    for size in taxonomy.vertical_sizes:
        total += (fc_units + 1) * sc_width + (sc_width + 1) * size
    return total


def fc_head_parameters(fc_units, hidden, num_classes):
    """Return the parameter count of the `fc-fc` head."""
    return (fc_units + 1) * hidden + (hidden + 1) * num_classes


def matched_fc_hidden(config, taxonomy):
    """Return the `fc-fc` width whose head size is closest to `fc-sc`'s."""
    target = sc_head_parameters(config.fc_units, config.sc_width, taxonomy)
    per_unit = config.fc_units + 1 + taxonomy.num_classes
    return max(1, round((target - taxonomy.num_classes) / per_unit))


def _self_paced(x, vertical, size, config, keras_module):
    """Apply the configured self-paced scaling to one vertical's logits."""
    if config.self_paced == "none":
        return x
    layer_classes = kc_layers.custom_layers(keras_module)
    return layer_classes["SelfPacedScale"](
        gamma_init=kc_layers.initial_gamma(size),
        per_class=config.self_paced == "class",
        dtype="float32",
        name=f"{HEAD_PREFIX}v{vertical}_self_paced",
    )(x)


def _reorder(logits, order, keras_module, name):
    """Gather concatenated per-vertical logits back into class order."""
    if list(order) == sorted(order):
        return logits
    inverse = np.argsort(np.asarray(order))
    layer_classes = kc_layers.custom_layers(keras_module)
    return layer_classes["ClassGather"](
        indices=inverse.tolist(), dtype="float32", name=name
    )(logits)


def _sc_head(features, config, taxonomy, keras_module):
    layers = keras_module.layers
    outputs = []
    order = []
    for vertical in range(taxonomy.num_verticals):
        classes = taxonomy.vertical_classes(vertical)
        x = layers.Dense(
            config.sc_width,
            activation="relu",
            name=f"{HEAD_PREFIX}v{vertical}_hidden",
        )(features)
        x = layers.Dense(
            len(classes), dtype="float32", name=f"{HEAD_PREFIX}v{vertical}"
        )(x)
        outputs.append(
            _self_paced(x, vertical, len(classes), config, keras_module)
        )
        order.extend(classes)
    logits = layers.Concatenate(dtype="float32", name=f"{HEAD_PREFIX}concat")(
        outputs
    )
    return _reorder(logits, order, keras_module, f"{HEAD_PREFIX}class_order")


def _fc_head(features, config, taxonomy, keras_module):
    layers = keras_module.layers
    hidden = config.fc_hidden or matched_fc_hidden(config, taxonomy)
    x = layers.Dense(hidden, activation="relu", name=f"{HEAD_PREFIX}hidden")(
        features
    )
    logits = layers.Dense(
        taxonomy.num_classes, dtype="float32", name=f"{HEAD_PREFIX}logits"
    )(x)
    if config.self_paced == "none":
        return logits
    # Split the logits by vertical, scale each part, then restore the class
    # order, so both heads share the same self-paced output layer.
    layer_classes = kc_layers.custom_layers(keras_module)
    outputs = []
    order = []
    for vertical in range(taxonomy.num_verticals):
        classes = taxonomy.vertical_classes(vertical)
        part = layer_classes["ClassGather"](
            indices=list(classes),
            dtype="float32",
            name=f"{HEAD_PREFIX}v{vertical}_slice",
        )(logits)
        outputs.append(
            _self_paced(part, vertical, len(classes), config, keras_module)
        )
        order.extend(classes)
    logits = layers.Concatenate(dtype="float32", name=f"{HEAD_PREFIX}concat")(
        outputs
    )
    return _reorder(logits, order, keras_module, f"{HEAD_PREFIX}class_order")


def build_student(config, taxonomy, preprocessing, keras_module=keras):
    """Build the student model.

    Args:
        config: a `StudentConfig`.
        taxonomy: the dataset's `Taxonomy`.
        preprocessing: the dataset's `Preprocessing`.
        keras_module: `keras` (Keras 3) or `tf_keras`.

    Returns:
        A functional model from float32 pixels in [0, 255] to one logit
        per class, in class-index order.
    """
    inputs = keras_module.Input(
        shape=preprocessing.input_shape, dtype="float32", name="pixels"
    )
    features = backbones.build_features(
        inputs, config.backbone, preprocessing, keras_module
    )
    features = keras_module.layers.Dense(
        config.fc_units, activation="relu", name="shared_fc"
    )(features)
    if config.head == "fc-sc":
        logits = _sc_head(features, config, taxonomy, keras_module)
    else:
        logits = _fc_head(features, config, taxonomy, keras_module)
    return keras_module.Model(inputs, logits, name="student")


def count_parameters(model):
    """Return the total and head parameter counts of a student.

    Args:
        model: a model built by `build_student`.

    Returns:
        A dict with `total`, `trainable`, `head` (the layers after the
        shared FC layer) and `shared_fc`.
    """
    head = sum(
        layer.count_params()
        for layer in model.layers
        if layer.name.startswith(HEAD_PREFIX)
    )
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    return {
        "total": int(model.count_params()),
        "trainable": int(trainable),
        "head": int(head),
        "shared_fc": int(model.get_layer("shared_fc").count_params()),
    }


def copy_weights(source, target):
    """Copy weights layer by layer, matching layers by name.

    Works across Keras 3 and tf-keras because `build_student` gives every
    layer the same name in both.

    Args:
        source: the model to copy from.
        target: a model of the same architecture.

    Raises:
        KCError: a layer with weights is missing from `target`, or its
            weight shapes differ.
    """
    target_layers = {layer.name: layer for layer in target.layers}
    for layer in source.layers:
        weights = layer.get_weights()
        if not weights:
            continue
        other = target_layers.get(layer.name)
        if other is None:
            raise KCError(
                f"layer {layer.name!r} of model {source.name!r} is missing "
                f"from model {target.name!r}; build both with the same "
                "StudentConfig"
            )
        shapes = [w.shape for w in weights]
        other_shapes = [tuple(w.shape) for w in other.get_weights()]
        if shapes != other_shapes:
            raise KCError(
                f"layer {layer.name!r} has weight shapes {shapes} in "
                f"{source.name!r} but {other_shapes} in {target.name!r}; "
                "build both with the same StudentConfig"
            )
        other.set_weights(weights)
