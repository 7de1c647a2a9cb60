"""Convert Keras 3 models to TFLite and write them with metadata.

Modes `float32`, `float16`, `dynamic` and `ptq-int8` convert the Keras 3
model in this process. `qat-int8` needs tf-keras and runs in a subprocess
(see `converters.qat`); its result goes through the same `write_export`.
"""

import contextlib
import dataclasses
import logging
from io import StringIO

import numpy as np

from converters import metadata as metadata_lib
from converters import ops as ops_lib
from kc_keras import io_utils
from kc_keras.errors import KCError

logger = logging.getLogger(__name__)

MODES = ("float32", "float16", "dynamic", "ptq-int8", "qat-int8")
STUDENT_MODES = MODES
TEACHER_MODES = ("ptq-int8", "float32")


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    """Conversion options of one model.

    Attributes:
        uint8_input: full-integer models take uint8 pixels (zero point 0)
            instead of int8 pixels minus 128.
        allow_float_ops: warn instead of failing when a full-integer model
            keeps float operators.
        logits_output: end the model at the logits instead of a softmax.
    """

    uint8_input: bool = False
    allow_float_ops: bool = False
    logits_output: bool = False

    @property
    def integer_input_dtype(self):
        return "uint8" if self.uint8_input else "int8"

    @property
    def expected_zero_point(self):
        return 0 if self.uint8_input else -128


def check_mode(mode):
    """Raise `KCError` unless `mode` is one of `MODES`."""
    if mode not in MODES:
        raise KCError(
            f"unknown export mode {mode!r}; expected one of {', '.join(MODES)}"
        )


def check_representative(images, input_shape, input_name):
    """Validate representative images before they reach the converter.

    The converter reports a wrong calibration shape or dtype deep inside
    MLIR; checking first gives a message that names the input.

    Args:
        images: array (num_images, height, width, channels) of uint8 or
            float32 pixels in [0, 255].
        input_shape: the model input shape without the batch dimension.
        input_name: model input name used in the message.

    Returns:
        The images as float32.

    Raises:
        KCError: wrong dtype, rank, shape, or no images.
    """
    images = np.asarray(images)
    if images.dtype not in (np.uint8, np.float32):
        raise KCError(
            f"representative dataset for input {input_name!r} has dtype "
            f"{images.dtype.name}; expected uint8 or float32 pixels in "
            "[0, 255]"
        )
    expected = tuple(int(d) for d in input_shape)
    if images.ndim != 4 or tuple(images.shape[1:]) != expected:
        raise KCError(
            f"representative dataset for input {input_name!r} has shape "
            f"{images.shape}; expected (num_images,) + {expected}"
        )
    if len(images) == 0:
        raise KCError(
            f"representative dataset for input {input_name!r} is empty; "
            "give at least one training image"
        )
    return images.astype(np.float32)


def calibration_images(images, input_shape, input_name):
    """Return representative images plus an all-0 and an all-255 image.

    The two extreme images pin the calibrated input range to [0, 255], so
    the int8 input gets scale 1 and zero point -128 exactly whatever the
    training images contain.
    """
    images = check_representative(images, input_shape, input_name)
    extremes = np.stack(
        [np.zeros(images.shape[1:], np.float32)]
        + [np.full(images.shape[1:], 255.0, np.float32)]
    )
    return np.concatenate([images, extremes])


def _inference_model(model, input_shape, logits_output):
    """Wrap `model` with a batch-1 input and, by default, a softmax."""
    import keras

    inputs = keras.Input(input_shape, batch_size=1, name="pixels")
    outputs = model(inputs)
    if not logits_output:
        outputs = keras.layers.Softmax(name="probabilities")(outputs)
    return keras.Model(inputs, outputs, name=f"{model.name}_inference")


def convert_keras(model, mode, representative=None, options=None):
    """Convert a Keras 3 model that takes float32 pixels in [0, 255].

    Args:
        model: a Keras 3 model with one image input and logits output.
        mode: "float32", "float16", "dynamic" or "ptq-int8".
        representative: training images for "ptq-int8" calibration.
        options: `ExportOptions`; defaults apply when None.

    Returns:
        The .tflite content as bytes.

    Raises:
        KCError: unsupported mode, or a bad representative dataset.
    """
    import tensorflow as tf

    options = options or ExportOptions()
    check_mode(mode)
    if mode == "qat-int8":
        raise KCError(
            "qat-int8 needs tf-keras: export it with converters.qat.qat_export"
        )
    input_shape = tuple(model.inputs[0].shape[1:])
    input_name = model.inputs[0].name
    converter = tf.lite.TFLiteConverter.from_keras_model(
        _inference_model(model, input_shape, options.logits_output)
    )
    if mode == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif mode == "dynamic":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    elif mode == "ptq-int8":
        if representative is None:
            raise KCError("ptq-int8 needs representative training images")
        images = calibration_images(representative, input_shape, input_name)
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: (
            [images[i : i + 1]] for i in range(len(images))
        )
        converter.target_spec.supported_ops = [
            tf.lite.OpsSet.TFLITE_BUILTINS_INT8
        ]
        if options.allow_float_ops:
            # Operators without an int8 kernel fall back to float; the
            # operator check then lists them as a warning.
            converter.target_spec.supported_ops.append(
                tf.lite.OpsSet.TFLITE_BUILTINS
            )
        converter.inference_input_type = (
            tf.uint8 if options.uint8_input else tf.int8
        )
        converter.inference_output_type = tf.int8
    # Keras prints the exported signature (dozens of lines a model) to
    # stdout, which carries the command's results: log it at debug level.
    signature = StringIO()
    with contextlib.redirect_stdout(signature):
        tflite_bytes = bytes(converter.convert())
    logger.debug("converter output:\n%s", signature.getvalue())
    return tflite_bytes


def check_integer_io(io, name, options):
    """Raise `KCError` unless a full-integer model has the pixel input format.

    The input must be int8 with scale 1 and zero point -128 (uint8 with zero
    point 0 under `uint8_input`) so raw pixels convert exactly, and the
    output must be int8.
    """
    expected_dtype = options.integer_input_dtype
    expected_zero_point = options.expected_zero_point
    source = io["input"]
    if (
        source["dtype"] != expected_dtype
        or not np.isclose(source["scale"], 1.0)
        or source["zero_point"] != expected_zero_point
    ):
        raise KCError(
            f"{name} input is {source['dtype']} with scale "
            f"{source['scale']} and zero point {source['zero_point']}; "
            f"expected {expected_dtype} with scale 1.0 and zero point "
            f"{expected_zero_point} (check the representative images)"
        )
    if io["output"]["dtype"] != "int8":
        raise KCError(
            f"{name} output is {io['output']['dtype']}; expected int8"
        )


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """Role and outputs of one exported model, as recorded in its metadata.

    Attributes:
        role: "student", "generalist" or "specialist".
        output_classes: class index of each output, -1 for a dustbin.
        vertical: a specialist's vertical index, None otherwise.
    """

    role: str
    output_classes: tuple
    vertical: int | None = None


def write_export(
    tflite_bytes, path, mode, info, taxonomy, preprocessing, options
):
    """Check a converted model, add metadata and write it with sidecars.

    Args:
        tflite_bytes: the converted model.
        path: destination .tflite path; its stem is the model name.
        mode: the export mode.
        info: `ModelInfo`.
        taxonomy: the dataset's `Taxonomy`.
        preprocessing: the dataset's `Preprocessing`.
        options: `ExportOptions`.

    Returns:
        A dict with the path, size, operator histogram, float operators
        and input/output details.

    Raises:
        KCError: float operators in a full-integer model (unless allowed),
            wrong input quantization, or labels that do not match the
            output size. Nothing is written in that case.
    """
    name = path.stem
    ops = ops_lib.list_ops(tflite_bytes)
    io = ops_lib.io_details(tflite_bytes)
    islands = []
    if mode in ops_lib.INT8_MODES:
        islands = ops_lib.check_integer_ops(ops, name, options.allow_float_ops)
        check_integer_io(io, name, options)
    metadata = metadata_lib.build_metadata(
        name=name,
        role=info.role,
        mode=mode,
        taxonomy=taxonomy,
        preprocessing=preprocessing,
        io=io,
        output_classes=info.output_classes,
        output_kind="logits" if options.logits_output else "probabilities",
        vertical=info.vertical,
    )
    final_bytes = metadata_lib.add_metadata(tflite_bytes, metadata)
    io_utils.write_bytes(path, final_bytes)
    metadata_lib.write_sidecars(path, metadata)
    logger.info("wrote %s (%d bytes)", path, len(final_bytes))
    return {
        "path": str(path),
        "size_bytes": len(final_bytes),
        "op_histogram": ops_lib.op_histogram(ops),
        "float_ops": [
            f"{op.op_type} -> {', '.join(op.output_names)}" for op in islands
        ],
        "input": io["input"],
        "output": io["output"],
    }
