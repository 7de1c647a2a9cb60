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
    model_name="tiny_classifier",
):
    """Build a Rescaling, Conv2D, BatchNorm, ReLU, pooling, Dense classifier.

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
        model_name: the model name, so several tiny models can coexist.

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
    x = layers.MaxPooling2D(2, name="pool")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(16, activation="relu", name="fc")(x)
    if extra_layer == "layer-norm":
        x = layers.LayerNormalization(name="extra_norm")(x)
    elif extra_layer is not None:
        raise ValueError(f"unknown extra_layer {extra_layer!r}")
    outputs = layers.Dense(num_classes, name="logits")(x)
    return keras_module.Model(inputs, outputs, name=model_name)


def fit_classifier(model, images, labels, epochs=20, seed=0):
    """Train a Keras 3 classifier on uint8 images with Adam, in place.

    Returns:
        The model.
    """
    import keras

    keras.utils.set_random_seed(seed)
    model.compile(
        optimizer=keras.optimizers.Adam(0.003),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=False,
    )
    model.fit(
        images.astype("float32"),
        labels,
        epochs=epochs,
        batch_size=32,
        verbose=0,
    )
    return model


def build_tiny_teachers(dataset, epochs=10):
    """Train a tiny generalist and one tiny specialist per vertical.

    Each specialist outputs its vertical's classes and a dustbin logit,
    as the teachers contract requires.

    Returns:
        A `kc_keras.models.teachers.Teachers`.
    """
    import numpy as np

    from kc_keras.models.teachers import Teachers

    taxonomy = dataset.taxonomy
    shape = dataset.preprocessing.input_shape
    train = dataset.split("train")
    generalist = build_tiny_classifier(
        taxonomy.num_classes, *shape, model_name="generalist"
    )
    fit_classifier(generalist, train.images, train.labels, epochs)
    specialists = []
    for vertical in range(taxonomy.num_verticals):
        classes = taxonomy.vertical_classes(vertical)
        local = np.full(taxonomy.num_classes, len(classes), np.int32)
        local[list(classes)] = np.arange(len(classes))
        model = build_tiny_classifier(
            len(classes) + 1, *shape, model_name=f"specialist_{vertical}"
        )
        fit_classifier(model, train.images, local[train.labels], epochs)
        specialists.append(model)
    return Teachers(
        generalist=generalist,
        specialists=tuple(specialists),
        taxonomy=taxonomy,
        preprocessing=dataset.preprocessing,
        manifest={},
    )
