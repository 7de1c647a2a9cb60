"""Read the operators and tensor types of a TFLite model.

The checks here run on the flatbuffer itself (through the schema classes
shipped with TensorFlow), so they see exactly what a device runs.
"""

import collections
import dataclasses
import logging

from kc_keras.errors import KCError

logger = logging.getLogger(__name__)

INT8_MODES = ("ptq-int8", "qat-int8")

# Operators that move between float and integer tensors by design.
CONVERSION_OPS = ("QUANTIZE", "DEQUANTIZE")
FLOAT_TYPES = ("FLOAT32", "FLOAT16")


@dataclasses.dataclass(frozen=True)
class OpInfo:
    """One operator of a TFLite subgraph.

    Attributes:
        op_type: builtin operator name, such as `CONV_2D`, or the custom
            code of a custom operator.
        input_types: tensor type names of the inputs, such as `INT8`.
        output_types: tensor type names of the outputs.
        output_names: names of the output tensors; the converter derives
            them from the Keras layer names.
    """

    op_type: str
    input_types: tuple
    output_types: tuple
    output_names: tuple


def _enum_names(enum_class):
    return {
        value: name
        for name, value in vars(enum_class).items()
        if not name.startswith("_")
    }


def _load_model(tflite_bytes):
    from tensorflow.lite.python import schema_py_generated as schema

    if len(tflite_bytes) < 8 or bytes(tflite_bytes[4:8]) != b"TFL3":
        raise KCError(
            "not a TFLite model: the file identifier 'TFL3' is missing at "
            "byte 4; re-export the model"
        )
    return schema.ModelT.InitFromObj(
        schema.Model.GetRootAsModel(bytearray(tflite_bytes), 0)
    )


def list_ops(tflite_bytes):
    """Return the operators of the main subgraph, in execution order.

    Args:
        tflite_bytes: the content of a .tflite file.

    Returns:
        A list of `OpInfo`.

    Raises:
        KCError: the bytes are not a TFLite model.
    """
    from tensorflow.lite.python import schema_py_generated as schema

    model = _load_model(tflite_bytes)
    op_names = _enum_names(schema.BuiltinOperator)
    type_names = _enum_names(schema.TensorType)
    subgraph = model.subgraphs[0]

    def types(indices):
        return tuple(
            type_names[subgraph.tensors[i].type] for i in indices if i >= 0
        )

    ops = []
    for op in subgraph.operators:
        code = model.operatorCodes[op.opcodeIndex]
        # Builtin codes above 127 live in `builtinCode`; older files use
        # the deprecated 8-bit field, so the larger of the two is valid.
        builtin = max(code.builtinCode, code.deprecatedBuiltinCode)
        if op_names.get(builtin) == "CUSTOM":
            op_type = f"CUSTOM:{code.customCode.decode()}"
        else:
            op_type = op_names.get(builtin, str(builtin))
        ops.append(
            OpInfo(
                op_type=op_type,
                input_types=types(op.inputs),
                output_types=types(op.outputs),
                output_names=tuple(
                    subgraph.tensors[i].name.decode() for i in op.outputs
                ),
            )
        )
    return ops


def op_histogram(ops):
    """Count operators by type and output tensor type.

    Returns:
        A dict such as {"CONV_2D/INT8": 4, "QUANTIZE/INT8": 1}, sorted by
        key.
    """
    counts = collections.Counter(
        f"{op.op_type}/{op.output_types[0] if op.output_types else 'NONE'}"
        for op in ops
    )
    return dict(sorted(counts.items()))


def float_islands(ops):
    """Return the operators that compute in float inside an integer model.

    In a full-integer model every operator except QUANTIZE and DEQUANTIZE
    should read and write integer tensors. A float operator there sits
    between a DEQUANTIZE and a QUANTIZE (a float island) and runs at float
    speed, or not at all on integer-only accelerators.
    """
    return [
        op
        for op in ops
        if op.op_type not in CONVERSION_OPS
        and any(t in FLOAT_TYPES for t in op.input_types + op.output_types)
    ]


def check_integer_ops(ops, model_name, allow_float_ops=False):
    """Raise or warn when a full-integer model contains float operators.

    Args:
        ops: the model's `OpInfo` list.
        model_name: name used in the message.
        allow_float_ops: log a warning instead of raising.

    Returns:
        The float operators found (empty when the model is fully integer).

    Raises:
        KCError: float operators were found and `allow_float_ops` is False.
    """
    islands = float_islands(ops)
    if not islands:
        return islands
    described = "; ".join(
        f"{op.op_type} -> {', '.join(op.output_names)}" for op in islands
    )
    if allow_float_ops:
        logger.warning(
            "%s runs %d operator(s) in float: %s",
            model_name,
            len(islands),
            described,
        )
        return islands
    raise KCError(
        f"{model_name} should be fully int8 but {len(islands)} operator(s) "
        f"run in float: {described}; give those layers a QuantizeConfig or "
        "pass --allow-float-ops to accept them"
    )


def io_details(tflite_bytes):
    """Return the dtype, shape and quantization of the input and output.

    Returns:
        A dict {"input": {...}, "output": {...}}; each has `dtype` (numpy
        name, such as "int8"), `shape`, `scale` and `zero_point` (1.0 and 0
        for float tensors, which have no quantization).
    """
    from tensorflow.lite.python import schema_py_generated as schema

    model = _load_model(tflite_bytes)
    type_names = _enum_names(schema.TensorType)
    subgraph = model.subgraphs[0]
    result = {}
    for key, indices in (
        ("input", subgraph.inputs),
        ("output", subgraph.outputs),
    ):
        tensor = subgraph.tensors[indices[0]]
        quantization = tensor.quantization
        scale, zero_point = 0.0, 0
        if quantization is not None and quantization.scale is not None:
            if len(quantization.scale):
                scale = float(quantization.scale[0])
                zero_point = int(quantization.zeroPoint[0])
        result[key] = {
            "dtype": type_names[tensor.type].lower(),
            "shape": [int(d) for d in tensor.shape],
            "scale": scale,
            "zero_point": zero_point,
        }
    return result
