"""Run and benchmark kc-keras TFLite exports on a device.

This file needs only numpy and a TFLite runtime (ai-edge-litert, or
tflite-runtime on old boards). Copy it with a run's `tflite/` folder to a
Raspberry Pi, a Linux ARM board or a phone (Termux) and run it there.

The library parts (`TFLiteModel`, `read_metadata`, the ensemble rules) are
also imported by kc-keras's converters, so host and device run the same code.
"""

import importlib
import json
import logging
import struct
from pathlib import Path

import numpy as np

logger = logging.getLogger("kc_benchmark")

METADATA_NAME = "kc_keras"
RUNTIMES = ("ai_edge_litert", "tflite_runtime")
RUNTIME_PACKAGES = {
    "ai_edge_litert": "ai-edge-litert",
    "tflite_runtime": "tflite-runtime",
}


class TFLiteError(ValueError):
    """A model file, runtime or input array that cannot be used."""


# ---------------------------------------------------------------------------
# Runtime selection


def load_runtime(name="auto"):
    """Import a TFLite runtime.

    Args:
        name: "ai_edge_litert", "tflite_runtime", or "auto" for the first of
            those that imports.

    Returns:
        A tuple (runtime name, version string, Interpreter class).

    Raises:
        TFLiteError: the runtime is unknown or not installed.
    """
    if name not in ("auto",) + RUNTIMES:
        raise TFLiteError(
            f"unknown runtime {name!r}; expected auto, {', '.join(RUNTIMES)}"
        )
    candidates = RUNTIMES if name == "auto" else (name,)
    errors = []
    for candidate in candidates:
        try:
            module = importlib.import_module(f"{candidate}.interpreter")
        except ImportError as error:
            errors.append(f"{candidate}: {error}")
            continue
        version = _package_version(candidate)
        return candidate, version, module.Interpreter
    packages = " or ".join(RUNTIME_PACKAGES[c] for c in candidates)
    raise TFLiteError(
        f"no TFLite runtime could be imported ({'; '.join(errors)}); "
        f"install one with: pip install {packages}"
    )


def _package_version(runtime):
    from importlib import metadata

    try:
        return metadata.version(RUNTIME_PACKAGES[runtime])
    except metadata.PackageNotFoundError:
        module = importlib.import_module(runtime)
        return getattr(module, "__version__", "unknown")


# ---------------------------------------------------------------------------
# Model metadata stored in the .tflite flatbuffer


def _read_uoffset(data, pos):
    return pos + struct.unpack_from("<I", data, pos)[0]


def _table_field(data, table, field):
    """Return the absolute position of `field` in `table`, or None."""
    vtable = table - struct.unpack_from("<i", data, table)[0]
    vtable_size = struct.unpack_from("<H", data, vtable)[0]
    entry = 4 + 2 * field
    if entry >= vtable_size:
        return None
    offset = struct.unpack_from("<H", data, vtable + entry)[0]
    return table + offset if offset else None


def _vector(data, pos):
    start = _read_uoffset(data, pos)
    length = struct.unpack_from("<I", data, start)[0]
    return start + 4, length


def read_metadata(model_bytes):
    """Return the metadata entries of a TFLite model as {name: bytes}.

    Reads the flatbuffer directly (Model.metadata -> Model.buffers), so it
    needs no TensorFlow or flatbuffers package.

    Args:
        model_bytes: the content of a .tflite file.

    Raises:
        TFLiteError: the bytes are not a TFLite flatbuffer.
    """
    data = memoryview(model_bytes)
    if len(data) < 8 or bytes(data[4:8]) != b"TFL3":
        raise TFLiteError(
            "not a TFLite model: the file identifier is missing (expected "
            "'TFL3' at byte 4); re-export the model"
        )
    try:
        model = _read_uoffset(data, 0)
        buffers_field = _table_field(data, model, 4)
        metadata_field = _table_field(data, model, 6)
        if buffers_field is None or metadata_field is None:
            return {}
        buffers_start, _ = _vector(data, buffers_field)
        entries_start, count = _vector(data, metadata_field)
        result = {}
        for i in range(count):
            entry = _read_uoffset(data, entries_start + 4 * i)
            name_field = _table_field(data, entry, 0)
            buffer_field = _table_field(data, entry, 1)
            if name_field is None or buffer_field is None:
                continue
            name_start, name_len = _vector(data, name_field)
            name = bytes(data[name_start : name_start + name_len]).decode()
            index = struct.unpack_from("<I", data, buffer_field)[0]
            buffer = _read_uoffset(data, buffers_start + 4 * index)
            result[name] = _buffer_bytes(data, buffer)
        return result
    except (struct.error, IndexError, UnicodeDecodeError) as error:
        raise TFLiteError(
            f"corrupt TFLite model: metadata could not be read ({error}); "
            "re-export the model"
        ) from error


def _buffer_bytes(data, buffer):
    data_field = _table_field(data, buffer, 0)
    if data_field is not None:
        start, length = _vector(data, data_field)
        return bytes(data[start : start + length])
    # Models over 2 GB keep buffer contents after the flatbuffer, addressed
    # by absolute offset and size.
    offset_field = _table_field(data, buffer, 1)
    size_field = _table_field(data, buffer, 2)
    if offset_field is None or size_field is None:
        return b""
    offset = struct.unpack_from("<Q", data, offset_field)[0]
    size = struct.unpack_from("<Q", data, size_field)[0]
    return bytes(data[offset : offset + size])


def read_model_metadata(path):
    """Return the kc-keras metadata JSON of a .tflite file, or {}."""
    entries = read_metadata(Path(path).read_bytes())
    if METADATA_NAME not in entries:
        return {}
    return json.loads(entries[METADATA_NAME].decode("utf-8"))


# ---------------------------------------------------------------------------
# Running a model


class TFLiteModel:
    """A TFLite model with quantized input and dequantized output handled.

    Args:
        path: the .tflite file.
        runtime: "auto", "ai_edge_litert" or "tflite_runtime".
        num_threads: interpreter threads; None lets the runtime choose.

    Raises:
        TFLiteError: the file is missing, truncated or not a TFLite model,
            or no runtime is installed.
    """

    def __init__(self, path, runtime="auto", num_threads=None):
        self.path = Path(path)
        if not self.path.is_file():
            raise TFLiteError(f"model file not found: {self.path}")
        model_bytes = self.path.read_bytes()
        try:
            self.metadata = json.loads(
                read_metadata(model_bytes).get(METADATA_NAME, b"{}")
            )
        except TFLiteError as error:
            raise TFLiteError(f"{self.path}: {error}") from error
        self.runtime, self.runtime_version, interpreter_cls = load_runtime(
            runtime
        )
        self.num_threads = num_threads
        try:
            self._interpreter = interpreter_cls(
                model_content=model_bytes, num_threads=num_threads
            )
            self._interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as error:
            raise TFLiteError(
                f"{self.path}: the runtime could not load the model "
                f"({error}); re-export it"
            ) from error
        self.size_bytes = len(model_bytes)
        self._input = self._interpreter.get_input_details()[0]
        self._output = self._interpreter.get_output_details()[0]

    @property
    def input_dtype(self):
        return np.dtype(self._input["dtype"])

    @property
    def input_shape(self):
        """Input shape without the batch dimension."""
        return tuple(int(d) for d in self._input["shape"][1:])

    @property
    def input_quantization(self):
        """(scale, zero_point) of the input; (0.0, 0) for float inputs."""
        scale, zero_point = self._input["quantization"]
        return float(scale), int(zero_point)

    @property
    def output_dtype(self):
        return np.dtype(self._output["dtype"])

    @property
    def output_quantization(self):
        scale, zero_point = self._output["quantization"]
        return float(scale), int(zero_point)

    @property
    def num_outputs(self):
        return int(self._output["shape"][-1])

    def describe_input(self):
        scale, zero_point = self.input_quantization
        return (
            f"dtype {self.input_dtype.name}, shape "
            f"{(1,) + self.input_shape}, scale {scale}, zero point "
            f"{zero_point}"
        )

    def quantize_input(self, pixels):
        """Convert pixel values in [0, 255] to the model's input tensor.

        Args:
            pixels: uint8 or float32 array (batch, height, width, channels).

        Raises:
            TFLiteError: wrong dtype or shape.
        """
        pixels = np.asarray(pixels)
        if pixels.dtype not in (np.uint8, np.float32):
            raise TFLiteError(
                f"{self.path.name}: images have dtype {pixels.dtype.name}; "
                "expected uint8 or float32 pixels in [0, 255] (the model "
                f"input is {self.describe_input()})"
            )
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != self.input_shape:
            raise TFLiteError(
                f"{self.path.name}: images have shape {pixels.shape}; "
                f"expected (batch,) + {self.input_shape} (the model input "
                f"is {self.describe_input()})"
            )
        if self.input_dtype == np.float32:
            return pixels.astype(np.float32)
        scale, zero_point = self.input_quantization
        info = np.iinfo(self.input_dtype)
        values = np.round(pixels.astype(np.float32) / scale) + zero_point
        return np.clip(values, info.min, info.max).astype(self.input_dtype)

    def dequantize_output(self, raw):
        if self.output_dtype == np.float32:
            return raw.astype(np.float32)
        scale, zero_point = self.output_quantization
        return (raw.astype(np.float32) - zero_point) * scale

    def invoke(self, tensor):
        """Run one batch-1 input tensor already in the model's input format.

        Returns the raw output tensor (still quantized for int8 models).

        Raises:
            TFLiteError: wrong dtype or shape.
        """
        expected = (1,) + self.input_shape
        if tensor.dtype != self.input_dtype or tuple(tensor.shape) != expected:
            raise TFLiteError(
                f"{self.path.name}: input tensor has dtype "
                f"{tensor.dtype.name} and shape {tuple(tensor.shape)}; "
                f"expected {self.describe_input()}"
            )
        self._interpreter.set_tensor(self._input["index"], tensor)
        self._interpreter.invoke()
        return self._interpreter.get_tensor(self._output["index"])

    def predict(self, pixels):
        """Return float32 outputs (batch, num_outputs) for pixel images."""
        tensors = self.quantize_input(pixels)
        outputs = np.empty((len(tensors), self.num_outputs), np.float32)
        for i in range(len(tensors)):
            raw = self.invoke(tensors[i : i + 1])
            outputs[i] = self.dequantize_output(raw)[0]
        return outputs


# ---------------------------------------------------------------------------
# Ensemble rules (numpy only, shared with the training-side evaluation)


def routed_scores(generalist_probs, specialist_probs, class_vertical):
    """Score classes with the routed ensemble.

    The generalist's top-1 class picks the vertical, and that vertical's
    specialist ranks the classes. Classes of the chosen vertical score
    1 + the specialist's probability, so they rank first; every other class
    keeps the generalist's probability, which orders the rest of a top-5.

    Args:
        generalist_probs: (batch, num_classes) probabilities.
        specialist_probs: list, one per vertical, of
            (batch, vertical_size + 1) probabilities; the last column is
            the dustbin ("another vertical").
        class_vertical: vertical index of each class.

    Returns:
        (batch, num_classes) float32 scores.
    """
    class_vertical = np.asarray(class_vertical)
    scores = np.array(generalist_probs, dtype=np.float32, copy=True)
    routed = class_vertical[np.argmax(generalist_probs, axis=1)]
    for v, probs in enumerate(specialist_probs):
        rows = np.flatnonzero(routed == v)
        if rows.size == 0:
            continue
        columns = np.flatnonzero(class_vertical == v)
        scores[np.ix_(rows, columns)] = 1.0 + probs[rows, : len(columns)]
    return scores


def full_ensemble_scores(generalist_probs, specialist_probs, class_vertical):
    """Score classes with the generalist and every specialist together.

    Each class scores the mean of the generalist's probability and the
    probability its vertical's specialist gives it. A specialist that sees
    an image of another vertical puts its mass on the dustbin, so its
    classes gain little.

    Args:
        generalist_probs: (batch, num_classes) probabilities.
        specialist_probs: one (batch, vertical_size + 1) array per vertical.
        class_vertical: vertical index of each class.

    Returns:
        (batch, num_classes) float32 scores.
    """
    class_vertical = np.asarray(class_vertical)
    specialist_part = np.zeros_like(generalist_probs, dtype=np.float32)
    for v, probs in enumerate(specialist_probs):
        columns = np.flatnonzero(class_vertical == v)
        specialist_part[:, columns] = probs[:, : len(columns)]
    return 0.5 * (np.asarray(generalist_probs, np.float32) + specialist_part)
