"""Tiny student-like full-int8 TFLite models for the demo tests.

The web demo, the golden-vector and the Android contract tests need a real
.tflite file with the `kc_keras` metadata entry. Training and converting the
real student takes minutes, so these helpers build a 6-class model with the
same input contract (28x28x1 pixels in [0, 255], int8 input with scale 1 and
zero point -128, softmax output) in a few seconds.
"""

import json
import logging

import numpy as np

logger = logging.getLogger(__name__)

HEIGHT = 28
WIDTH = 28
CHANNELS = 1
CLASS_NAMES = ("zero", "one", "shirt", "boot", "cat", "dog")
VERTICAL_NAMES = ("digits", "clothing", "animals")
CLASS_VERTICAL = (0, 0, 1, 1, 2, 2)
NUM_CLASSES = len(CLASS_NAMES)


def make_images(num_images, seed=0):
    """Return (uint8 images, int32 labels) with one bright patch per class.

    Class `c` puts a bright 8x8 patch at a class-specific position on noise,
    so a model trained for a few steps separates the classes clearly and
    top-1 comparisons between runtimes do not depend on near-ties.
    """
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, NUM_CLASSES, size=num_images).astype(np.int32)
    images = rng.integers(0, 60, size=(num_images, HEIGHT, WIDTH, CHANNELS))
    for i, label in enumerate(labels):
        row = 2 + 12 * (label // 3)
        column = 2 + 8 * (label % 3)
        images[i, row : row + 8, column : column + 8, 0] = 255
    return images.astype(np.uint8), labels


def build_keras_model(seed=0):
    """Build and briefly train a tiny classifier on `make_images` data."""
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((HEIGHT, WIDTH, CHANNELS), name="pixels")
    x = keras.layers.Rescaling(1.0 / 255.0)(inputs)
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(x)
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(x)
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(NUM_CLASSES, activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    model.compile(
        optimizer=keras.optimizers.Adam(0.01),
        loss="sparse_categorical_crossentropy",
    )
    images, labels = make_images(512, seed=seed + 1)
    model.fit(
        images.astype(np.float32), labels, epochs=3, batch_size=64, verbose=0
    )
    return model


def convert_int8(model):
    """Convert a Keras model to full-int8 TFLite (int8 input and output)."""
    import tensorflow as tf

    images, _ = make_images(64, seed=7)
    # The calibration set must contain the pixel values 0 and 255, so the
    # input quantization is exactly scale 1 and zero point -128.
    images[0] = 0
    images[1] = 255

    def representative():
        for image in images:
            yield [image[None].astype(np.float32)]

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    return converter.convert()


def make_metadata(tflite_bytes, name="student_qat-int8", labels=None):
    """Return the `kc_keras` metadata dict for a tiny int8 model.

    Args:
        tflite_bytes: the converted model, read for its quantization.
        name: the model name recorded in the metadata.
        labels: label list to record; defaults to `CLASS_NAMES`. Pass a
            list of another length to make a model with invalid metadata.
    """
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=tflite_bytes)
    input_detail = interpreter.get_input_details()[0]
    output_detail = interpreter.get_output_details()[0]
    input_scale, input_zero_point = input_detail["quantization"]
    output_scale, output_zero_point = output_detail["quantization"]
    labels = list(CLASS_NAMES if labels is None else labels)
    return {
        "format_version": 1,
        "name": name,
        "role": "student",
        "mode": "qat-int8",
        "vertical": None,
        "output_classes": list(range(NUM_CLASSES)),
        "labels": labels,
        "taxonomy": {
            "classes": list(CLASS_NAMES),
            "verticals": list(VERTICAL_NAMES),
            "class_vertical": list(CLASS_VERTICAL),
        },
        "preprocessing": {
            "height": HEIGHT,
            "width": WIDTH,
            "channels": CHANNELS,
            "input_range": [0, 255],
            "scale": 1.0 / 255.0,
            "offset": 0.0,
        },
        "input": {
            "dtype": "int8",
            "shape": [int(d) for d in input_detail["shape"]],
            "scale": float(input_scale),
            "zero_point": int(input_zero_point),
        },
        "output": {
            "dtype": "int8",
            "scale": float(output_scale),
            "zero_point": int(output_zero_point),
            "kind": "probabilities",
        },
    }


def add_metadata(tflite_bytes, metadata):
    """Return `tflite_bytes` with `metadata` stored as the `kc_keras` entry.

    Uses the exporter's `converters.metadata.add_metadata` when it exists,
    so the tests read exactly what `kc tflite` writes.
    """
    try:
        from converters.metadata import add_metadata as exporter_add
    except ImportError:
        return write_metadata_entry(tflite_bytes, metadata)
    return exporter_add(tflite_bytes, metadata)


def write_metadata_entry(tflite_bytes, metadata):
    """Store `metadata` as the `kc_keras` entry without validating it.

    The exporter rejects a label count that differs from the output size,
    so models with invalid metadata are written here with TensorFlow's
    flatbuffer utilities.
    """
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(
        bytearray(tflite_bytes)
    )
    buffer = schema.BufferT()
    buffer.data = list(json.dumps(metadata).encode("utf-8"))
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name = "kc_keras"
    entry.buffer = len(model.buffers) - 1
    model.metadata = list(model.metadata or []) + [entry]
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def write_models(folder, seed=0):
    """Write a tiny student and two broken variants into `folder`.

    Returns:
        A dict of paths: `student` (valid metadata), `no_metadata` (no
        `kc_keras` entry) and `bad_labels` (one label too few).
    """
    plain = convert_int8(build_keras_model(seed))
    metadata = make_metadata(plain)
    bad = make_metadata(plain, labels=CLASS_NAMES[:-1])
    paths = {
        "student": folder / "student_qat-int8.tflite",
        "no_metadata": folder / "no_metadata.tflite",
        "bad_labels": folder / "bad_labels.tflite",
    }
    folder.mkdir(parents=True, exist_ok=True)
    paths["student"].write_bytes(add_metadata(plain, metadata))
    paths["no_metadata"].write_bytes(plain)
    paths["bad_labels"].write_bytes(write_metadata_entry(plain, bad))
    (folder / "student_qat-int8.json").write_text(json.dumps(metadata))
    (folder / "labels.txt").write_text("\n".join(CLASS_NAMES) + "\n")
    return paths
