"""Tiny models for tests of the export path and of the demos.

The same builder runs with `keras` (Keras 3) or `tf_keras`, with fixed
layer names, so weights copy across by name as they do for the student.
"""

import logging

logger = logging.getLogger(__name__)


def build_tiny_classifier(
    num_classes,
    height=8,
    width=8,
    channels=1,
    scale=1.0 / 255.0,
    offset=0.0,
    keras_module=None,
    extra_layer=None,
):
    """Build a Rescaling -> Conv2D -> BatchNorm -> ReLU -> Dense classifier.

    Args:
        num_classes: number of output logits.
        height: input height in pixels.
        width: input width in pixels.
        channels: input channels.
        scale: pixel scale of the Rescaling layer.
        offset: pixel offset of the Rescaling layer.
        keras_module: `keras` (default) or `tf_keras`.
        extra_layer: None, or "layer-norm" to insert a LayerNormalization
            before the classifier (tfmot 0.8.1 cannot quantize it).

    Returns:
        A functional model from float32 pixels in [0, 255] to logits.
    """
    if keras_module is None:
        import keras as keras_module
    layers = keras_module.layers
    inputs = keras_module.Input((height, width, channels), name="pixels")
    x = layers.Rescaling(scale, offset, name="rescale")(inputs)
    x = layers.Conv2D(8, 3, padding="same", use_bias=False, name="conv")(x)
    x = layers.BatchNormalization(name="conv_bn")(x)
    x = layers.ReLU(name="conv_relu")(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    x = layers.Dense(16, activation="relu", name="fc")(x)
    if extra_layer == "layer-norm":
        x = layers.LayerNormalization(name="extra_norm")(x)
    elif extra_layer is not None:
        raise ValueError(f"unknown extra_layer {extra_layer!r}")
    outputs = layers.Dense(num_classes, name="logits")(x)
    return keras_module.Model(inputs, outputs, name="tiny_classifier")
