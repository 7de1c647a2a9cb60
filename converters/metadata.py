"""The kc_keras metadata entry inside a .tflite file and its sidecars.

The JSON layout is described in docs/ARCHITECTURE.md. It is stored in the
flatbuffer's `metadata` list (name `kc_keras`, content in a buffer), so a
model file carries its labels, taxonomy and input format wherever it goes.
`mobile_demo.benchmark.read_model_metadata` reads it back without TensorFlow.
"""

import json
import logging
from pathlib import Path

import numpy as np

from kc_keras import io_utils
from kc_keras.errors import KCError
from mobile_demo.benchmark import METADATA_NAME

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
ROLES = ("student", "generalist", "specialist")


def build_metadata(
    *,
    name,
    role,
    mode,
    taxonomy,
    preprocessing,
    io,
    output_classes,
    output_kind,
    vertical=None,
):
    """Assemble the metadata dict of one exported model.

    Args:
        name: model name, such as "student_qat-int8".
        role: "student", "generalist" or "specialist".
        mode: export mode, such as "qat-int8".
        taxonomy: the dataset's `Taxonomy`.
        preprocessing: the dataset's `Preprocessing`.
        io: `converters.ops.io_details` of the converted model.
        output_classes: class index of each output; -1 for a specialist's
            dustbin output.
        output_kind: "probabilities" or "logits".
        vertical: the specialist's vertical index, None otherwise.

    Returns:
        The metadata dict.

    Raises:
        KCError: unknown role, or an output class outside the taxonomy.
    """
    if role not in ROLES:
        raise KCError(f"unknown role {role!r}; expected one of {ROLES}")
    labels = []
    for index in output_classes:
        if index == -1:
            labels.append("other vertical")
        elif 0 <= index < taxonomy.num_classes:
            labels.append(taxonomy.class_names[index])
        else:
            raise KCError(
                f"output class {index} of {name} is outside 0.."
                f"{taxonomy.num_classes - 1} (use -1 for a dustbin)"
            )
    return {
        "format_version": FORMAT_VERSION,
        "name": name,
        "role": role,
        "mode": mode,
        "vertical": vertical,
        "output_classes": [int(c) for c in output_classes],
        "labels": labels,
        "taxonomy": taxonomy.to_dict(),
        "preprocessing": preprocessing.to_dict(),
        "input": dict(io["input"]),
        "output": dict(io["output"], kind=output_kind),
    }


def _output_size(model):
    subgraph = model.subgraphs[0]
    return int(subgraph.tensors[subgraph.outputs[0]].shape[-1])


def add_metadata(tflite_bytes, metadata):
    """Return a copy of a TFLite model with the kc_keras metadata entry.

    An existing kc_keras entry is replaced; other metadata entries (such as
    the converter's `min_runtime_version`) are kept.

    Args:
        tflite_bytes: the content of a .tflite file.
        metadata: JSON-serialisable dict (see `build_metadata`).

    Returns:
        The new model as bytes.

    Raises:
        KCError: the bytes are not a TFLite model, or the number of labels
            differs from the model's output size.
    """
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    if len(tflite_bytes) < 8 or bytes(tflite_bytes[4:8]) != b"TFL3":
        raise KCError(
            "cannot add metadata: not a TFLite model (the file identifier "
            "'TFL3' is missing at byte 4)"
        )
    model = flatbuffer_utils.convert_bytearray_to_object(
        bytearray(tflite_bytes)
    )
    labels = metadata.get("labels")
    if labels is not None and len(labels) != _output_size(model):
        raise KCError(
            f"metadata of {metadata.get('name', 'the model')} lists "
            f"{len(labels)} labels but the model has {_output_size(model)} "
            "outputs; give one label per output"
        )
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(
        json.dumps(metadata, ensure_ascii=False).encode("utf-8"), np.uint8
    )
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name = METADATA_NAME
    entry.buffer = len(model.buffers) - 1
    # The replaced entry's buffer stays in the file, unreferenced: buffer
    # indices of the other entries and tensors must not shift.
    existing = [
        m for m in (model.metadata or []) if m.name.decode() != METADATA_NAME
    ]
    model.metadata = existing + [entry]
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def write_sidecars(model_path, metadata):
    """Write `<model>.json` and `labels.txt` beside a .tflite file.

    labels.txt contains the taxonomy's class names, one a line in class
    order, which is the same for every model of a run.
    """
    model_path = Path(model_path)
    io_utils.write_json(model_path.with_suffix(".json"), metadata)
    class_names = metadata["taxonomy"]["classes"]
    io_utils.write_text(
        model_path.parent / "labels.txt", "\n".join(class_names) + "\n"
    )
