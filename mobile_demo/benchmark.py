"""Run and benchmark kc-keras TFLite exports on a device.

This file needs only numpy and a TFLite runtime (ai-edge-litert, or
tflite-runtime on old boards). Copy it with a run's `tflite/` folder to a
Raspberry Pi, a Linux ARM board or a phone (Termux) and run it there.

The library parts (`TFLiteModel`, `read_metadata`, the ensemble rules) are
also imported by kc-keras's converters, so host and device run the same code.
"""

import argparse
import dataclasses
import datetime
import importlib
import io
import json
import logging
import os
import platform
import re
import struct
import subprocess
import sys
import tempfile
import time
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
    hint = (
        " (tflite-runtime 2.14 needs numpy<2)"
        if "tflite_runtime" in candidates
        else ""
    )
    raise TFLiteError(
        f"no TFLite runtime could be imported ({'; '.join(errors)}); "
        f"install one with: pip install {packages}{hint}"
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
    """Return the kc-keras metadata JSON of a .tflite file, or {}.

    Raises:
        TFLiteError: the file is not a readable TFLite model; the message
            names the file.
    """
    try:
        entries = read_metadata(Path(path).read_bytes())
    except TFLiteError as error:
        raise TFLiteError(f"{path}: {error}") from error
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
        labels = self.metadata.get("labels")
        if labels is not None and len(labels) != self.num_outputs:
            raise TFLiteError(
                f"{self.path}: metadata lists {len(labels)} labels but the "
                f"model has {self.num_outputs} outputs; re-export it with "
                "`kc tflite`"
            )

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


# ---------------------------------------------------------------------------
# Statistics (pure functions, tested on fixed timings)


def latency_stats(timings_s):
    """Summarize per-image latencies.

    Args:
        timings_s: latencies in seconds, one per timed run (warm-up runs
            excluded).

    Returns:
        A dict with `count` and, in milliseconds, `median`, `p90`, `p99`,
        `min`, `max`, `mean` and `std` (population standard deviation).
        Percentiles interpolate linearly between the closest ranks.

    Raises:
        TFLiteError: `timings_s` is empty.
    """
    values = np.asarray(timings_s, dtype=np.float64) * 1e3
    if values.size == 0:
        raise TFLiteError("no timed runs; pass --runs 1 or more")
    return {
        "count": int(values.size),
        "median": float(np.median(values)),
        "p90": float(np.percentile(values, 90)),
        "p99": float(np.percentile(values, 99)),
        "min": float(values.min()),
        "max": float(values.max()),
        "mean": float(values.mean()),
        "std": float(values.std()),
    }


def top_k_accuracy(scores, labels, k):
    """Return the fraction of rows whose label is among the k top scores."""
    scores = np.asarray(scores)
    labels = np.asarray(labels)
    if labels.size == 0:
        return float("nan")
    k = min(k, scores.shape[1])
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    return float(np.mean(np.any(top == labels[:, None], axis=1)))


def accuracy_report(scores, labels, class_vertical, vertical_names):
    """Return top-1, top-5 and per-vertical top-1 accuracy as a dict."""
    return {
        "top1": top_k_accuracy(scores, labels, 1),
        "top5": top_k_accuracy(scores, labels, 5),
        "per_vertical_top1": per_vertical_top1(
            scores, labels, class_vertical, vertical_names
        ),
        "images": int(len(labels)),
    }


def per_vertical_top1(scores, labels, class_vertical, vertical_names):
    """Return {vertical name: top-1 accuracy on that vertical's images}.

    A vertical without test images maps to None.
    """
    class_vertical = np.asarray(class_vertical)
    labels = np.asarray(labels)
    predictions = np.argmax(scores, axis=1)
    result = {}
    for v, name in enumerate(vertical_names):
        rows = class_vertical[labels] == v
        if not rows.any():
            result[name] = None
            continue
        result[name] = float(np.mean(predictions[rows] == labels[rows]))
    return result


# ---------------------------------------------------------------------------
# Exports and systems

EXPORT_MODES = ("float32", "float16", "dynamic", "ptq-int8", "qat-int8")
# The deployable student is the quantization-aware one, with PTQ as the
# fallback.
STUDENT_TARGET_MODES = ("qat-int8", "ptq-int8")
DEFAULT_ENSEMBLE_MODES = ("ptq-int8",)
# Test images contain raw pixels in these dtypes, which
# `TFLiteModel.quantize_input` accepts.
PIXEL_DTYPES = (np.uint8, np.float32)
KIND_LABELS = {
    "student": "student",
    "generalist": "generalist",
    "routed": "routed ensemble",
    "full": "full ensemble",
}


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """Settings of one benchmark run. Each field maps to a command-line option.

    Args:
        models: folder of .tflite exports (a run's `tflite/` folder).
        test: .npz file with uint8 `images` and int32 `labels`.
        out: folder for bench.json, bench.md and bench.png.
        runtime: "auto", "ai_edge_litert" or "tflite_runtime".
        threads: interpreter thread counts; 1 and 2 are always measured.
        warmup: untimed runs per system and thread count.
        runs: timed runs per system and thread count.
        limit: use only `limit` test images, evenly spaced (None: all).
        modes: student export modes (None: every mode present).
        ensemble_modes: teacher export modes for the generalist and the
            ensembles (empty: benchmark the students only).
        command: the command line recorded in bench.json.
    """

    models: Path
    test: Path
    out: Path
    runtime: str = "auto"
    threads: tuple = (1, 2)
    warmup: int = 10
    runs: int = 100
    limit: int | None = None
    modes: tuple | None = None
    ensemble_modes: tuple = DEFAULT_ENSEMBLE_MODES
    command: str = ""


@dataclasses.dataclass(frozen=True)
class SystemSpec:
    """One benchmarked system: a student, the generalist or an ensemble.

    Args:
        kind: "student", "generalist", "routed" or "full".
        mode: export mode of its models.
        models: .tflite file names; for ensembles the generalist comes
            first, then one specialist per vertical in vertical order.
    """

    kind: str
    mode: str
    models: tuple

    @property
    def name(self):
        return f"{KIND_LABELS[self.kind]} ({self.mode})"


def _model_file(role, mode, vertical=None):
    if role == "specialist":
        return f"specialist_{vertical}_{mode}.tflite"
    return f"{role}_{mode}.tflite"


def _parse_mode(path, role):
    stem = path.stem
    prefix = f"{role}_"
    if role == "specialist":
        # specialist_<k>_<mode>
        parts = stem.split("_", 2)
        return parts[2] if len(parts) == 3 else None
    return stem[len(prefix) :] if stem.startswith(prefix) else None


def find_modes(models_dir, role):
    """Return the export modes present for `role`, in EXPORT_MODES order."""
    found = {
        _parse_mode(path, role)
        for path in Path(models_dir).glob(f"{role}_*.tflite")
    }
    return tuple(mode for mode in EXPORT_MODES if mode in found)


def read_taxonomy(models_dir, model_names):
    """Return the taxonomy dict stored with the first model that has one.

    Looks in each model's metadata entry, then in its `<model>.json`
    sidecar.

    Raises:
        TFLiteError: no model carries a taxonomy.
    """
    models_dir = Path(models_dir)
    for name in model_names:
        path = models_dir / name
        metadata = read_model_metadata(path) if path.is_file() else {}
        if not metadata.get("taxonomy"):
            sidecar = path.with_suffix(".json")
            if sidecar.is_file():
                metadata = json.loads(sidecar.read_text(encoding="utf-8"))
        taxonomy = metadata.get("taxonomy")
        if taxonomy and taxonomy.get("class_vertical"):
            return taxonomy
    raise TFLiteError(
        f"no taxonomy found in the metadata or <model>.json sidecars of "
        f"{', '.join(model_names)} in {models_dir}; re-export the models "
        "with `kc tflite`"
    )


def plan_systems(models_dir, modes=None, ensemble_modes=DEFAULT_ENSEMBLE_MODES):
    """List the systems to benchmark from the files in `models_dir`.

    Args:
        models_dir: folder of exports.
        modes: student modes to include; None for every mode present.
        ensemble_modes: teacher modes for the generalist and ensembles.
            When none is requested explicitly and the folder has no
            generalist at all, only the students are benchmarked.

    Returns:
        A tuple (list of SystemSpec, taxonomy dict).

    Raises:
        TFLiteError: the folder is missing, a requested export is missing,
            or an ensemble lacks a vertical's specialist.
    """
    models_dir = Path(models_dir)
    if not models_dir.is_dir():
        raise TFLiteError(
            f"models folder not found: {models_dir}; pass the run's tflite/ "
            "folder exported by `kc tflite`"
        )
    for mode in tuple(modes or ()) + tuple(ensemble_modes):
        if mode not in EXPORT_MODES:
            raise TFLiteError(
                f"unknown export mode {mode!r}; expected one of "
                f"{', '.join(EXPORT_MODES)}"
            )
    student_modes = find_modes(models_dir, "student")
    if modes is None:
        modes = student_modes
    for mode in modes:
        if mode not in student_modes:
            raise TFLiteError(
                f"model file not found: "
                f"{models_dir / _model_file('student', mode)}; export it "
                f"with `kc tflite` or drop {mode} from --modes"
            )
    teacher_modes = find_modes(models_dir, "generalist")
    if not teacher_modes and tuple(ensemble_modes) == DEFAULT_ENSEMBLE_MODES:
        logger.warning(
            "no generalist_*.tflite in %s: benchmarking the students only",
            models_dir,
        )
        ensemble_modes = ()
    systems = [
        SystemSpec("student", mode, (_model_file("student", mode),))
        for mode in modes
    ]
    names = [s.models[0] for s in systems] + [
        _model_file("generalist", mode) for mode in ensemble_modes
    ]
    if not names:
        raise TFLiteError(
            f"no student or generalist .tflite exports found in {models_dir}"
            "; run `kc tflite --run RUN` first"
        )
    taxonomy = read_taxonomy(models_dir, names)
    num_verticals = len(taxonomy["verticals"])
    for mode in ensemble_modes:
        generalist = _model_file("generalist", mode)
        if not (models_dir / generalist).is_file():
            raise TFLiteError(
                f"model file not found: {models_dir / generalist}; export "
                f"the {mode} teachers with `kc tflite` or pass "
                "--ensemble-modes with a mode that is present"
            )
        specialists = tuple(
            _model_file("specialist", mode, k) for k in range(num_verticals)
        )
        for k, name in enumerate(specialists):
            if not (models_dir / name).is_file():
                raise TFLiteError(
                    f"ensemble incomplete: {models_dir / name} not found "
                    f"(vertical {k} {taxonomy['verticals'][k]!r} of "
                    f"{num_verticals}); export every {mode} specialist with "
                    "`kc tflite`"
                )
        systems.append(SystemSpec("generalist", mode, (generalist,)))
        systems.append(SystemSpec("routed", mode, (generalist,) + specialists))
        systems.append(SystemSpec("full", mode, (generalist,) + specialists))
    return systems, taxonomy


def load_test_set(path, limit=None):
    """Load test images and labels from an .npz file.

    Args:
        path: .npz file with uint8 `images` (N, height, width, channels)
            and integer `labels` (N,).
        limit: keep only `limit` images, evenly spaced over the file.

    Returns:
        A tuple (images, labels as int64).

    Raises:
        TFLiteError: the file is missing or its arrays are invalid.
    """
    path = Path(path)
    if not path.is_file():
        raise TFLiteError(
            f"test set not found: {path}; `kc tflite` writes it as "
            "tflite/test.npz, or pass --test"
        )
    try:
        with np.load(path) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError) as error:
        raise TFLiteError(
            f"test set {path} could not be read ({error}); re-export it"
        ) from error
    for key in ("images", "labels"):
        if key not in arrays:
            raise TFLiteError(
                f"test set {path} has no {key!r} array (found "
                f"{sorted(arrays)}); re-export it with `kc tflite`"
            )
    images, labels = arrays["images"], arrays["labels"]
    if images.ndim != 4:
        raise TFLiteError(
            f"test images in {path} have shape {images.shape} and dtype "
            f"{images.dtype.name}; expected uint8 pixels of shape "
            "(N, height, width, channels)"
        )
    if labels.shape != (len(images),) or labels.dtype.kind not in "iu":
        raise TFLiteError(
            f"test labels in {path} have dtype {labels.dtype.name} and "
            f"shape {labels.shape}; expected integers of shape "
            f"({len(images)},)"
        )
    if limit is not None and limit < len(images):
        # Evenly spaced rows rather than the first ones: a test set sorted
        # by class keeps every class.
        rows = np.round(np.linspace(0, len(images) - 1, limit)).astype(int)
        images, labels = images[rows], labels[rows]
    if len(images) == 0:
        raise TFLiteError(f"test set {path} has no images; re-export it")
    return images, labels.astype(np.int64)


def read_labels(models_dir):
    """Return the class names in labels.txt, or None when it is absent."""
    path = Path(models_dir) / "labels.txt"
    if not path.is_file():
        return None
    return [line for line in path.read_text("utf-8").splitlines() if line]


def validate_exports(models_dir, systems, taxonomy, images, labels, runtime):
    """Load every model once and check it against the labels and images.

    Raises:
        TFLiteError: a model is corrupt, its output size does not match
            labels.txt or its vertical, or its input does not match the
            test images.
    """
    models_dir = Path(models_dir)
    class_names = read_labels(models_dir)
    class_vertical = np.asarray(taxonomy["class_vertical"])
    num_classes = len(class_vertical)
    if class_names is not None and len(class_names) != num_classes:
        raise TFLiteError(
            f"{models_dir / 'labels.txt'} has {len(class_names)} labels but "
            f"the models' taxonomy has {num_classes} classes; re-export "
            "labels.txt with the models (`kc tflite`)"
        )
    if labels.min() < 0 or labels.max() >= num_classes:
        raise TFLiteError(
            f"test labels range from {labels.min()} to {labels.max()} but "
            f"the models have {num_classes} classes; re-export test.npz "
            "with the models"
        )
    names = sorted({name for system in systems for name in system.models})
    for name in names:
        model = TFLiteModel(models_dir / name, runtime=runtime, num_threads=1)
        if name.startswith("specialist_"):
            vertical = int(name.split("_")[1])
            expected = int(np.sum(class_vertical == vertical)) + 1
            what = f"{expected - 1} classes of vertical {vertical} + 1 dustbin"
        else:
            expected = num_classes
            what = f"{num_classes} classes in labels.txt and the taxonomy"
        if model.num_outputs != expected:
            raise TFLiteError(
                f"{name} outputs {model.num_outputs} scores but expected "
                f"{expected} ({what}); re-export the model and labels.txt "
                "together"
            )
        shape_ok = tuple(images.shape[1:]) == model.input_shape
        if not shape_ok or images.dtype not in PIXEL_DTYPES:
            raise TFLiteError(
                f"test images have shape {images.shape} and dtype "
                f"{images.dtype.name}, but {name} takes "
                f"{model.describe_input()}; export test.npz with the same "
                "image size as the models (uint8 pixels in [0, 255])"
            )


# ---------------------------------------------------------------------------
# Running one system


class LoadedSystem:
    """The interpreters of one system, ready to score images.

    Args:
        spec: the SystemSpec.
        models_dir: folder of its .tflite files.
        class_vertical: vertical index of each class.
        runtime: runtime name passed to TFLiteModel.
        num_threads: threads of each interpreter.
    """

    def __init__(self, spec, models_dir, class_vertical, runtime, num_threads):
        self.spec = spec
        self.class_vertical = np.asarray(class_vertical)
        self.models = [
            TFLiteModel(Path(models_dir) / name, runtime, num_threads)
            for name in spec.models
        ]

    @staticmethod
    def probabilities(model, images):
        """Return a model's class probabilities for a batch of images.

        Models exported with a logits output (metadata output kind
        "logits") get a softmax here, because the ensemble rules combine
        probabilities.
        """
        outputs = model.predict(images)
        if model.metadata.get("output", {}).get("kind") != "logits":
            return outputs
        shifted = np.exp(outputs - outputs.max(axis=1, keepdims=True))
        return shifted / shifted.sum(axis=1, keepdims=True)

    def scores(self, images):
        """Return (batch, num_classes) scores for a batch of images."""
        if self.spec.kind in ("student", "generalist"):
            return self.probabilities(self.models[0], images)
        generalist = self.probabilities(self.models[0], images)
        specialists = [
            self.probabilities(model, images) for model in self.models[1:]
        ]
        if self.spec.kind == "routed":
            return routed_scores(generalist, specialists, self.class_vertical)
        return full_ensemble_scores(
            generalist, specialists, self.class_vertical
        )

    def score_one(self, image):
        """Score one image as a device would: only the models it needs.

        The routed ensemble runs the generalist, then only the specialist
        of the vertical it picks, so its latency covers both models.
        """
        batch = image[None]
        if self.spec.kind != "routed":
            return self.scores(batch)
        generalist = self.probabilities(self.models[0], batch)
        vertical = self.class_vertical[int(np.argmax(generalist[0]))]
        specialists = [None] * (len(self.models) - 1)
        specialists[vertical] = self.probabilities(
            self.models[1 + vertical], batch
        )
        return routed_scores(generalist, specialists, self.class_vertical)


def _proc_status(field):
    """Return an integer field of /proc/self/status, or None off Linux."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_rss_mb():
    """Return this process's peak resident memory in MiB.

    Reads VmHWM from /proc/self/status (Linux, Android); elsewhere falls
    back to getrusage's ru_maxrss (KiB on Linux, bytes on macOS).
    """
    kib = _proc_status("VmHWM")
    if kib is not None:
        return kib / 1024
    import resource

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024


def run_worker(job):
    """Measure one system in this process; called in a child process.

    Args:
        job: dict with `kind` ("baseline" or "system"), `runtime` and, for
            systems: `models_dir`, `test`, `limit`, `system` (SystemSpec
            fields), `class_vertical`, `vertical_names`, `threads`,
            `warmup`, `runs`, `accuracy` (bool).

    Returns:
        A JSON-ready dict of measurements.
    """
    runtime, _, _ = load_runtime(job["runtime"])
    if job["kind"] == "baseline":
        # Only numpy and the runtime are imported: the floor of every
        # system's peak memory.
        return {"peak_rss_mb": peak_rss_mb()}
    images, labels = load_test_set(job["test"], job["limit"])
    spec = SystemSpec(
        **{**job["system"], "models": tuple(job["system"]["models"])}
    )
    threads_before = _proc_status("Threads")
    start = time.perf_counter()
    system = LoadedSystem(
        spec, job["models_dir"], job["class_vertical"], runtime, job["threads"]
    )
    load_s = time.perf_counter() - start
    result = {"threads_requested": job["threads"], "load_ms": load_s * 1e3}
    for i in range(job["warmup"]):
        system.score_one(images[i % len(images)])
    timings = []
    for i in range(job["runs"]):
        image = images[i % len(images)]
        start = time.perf_counter()
        system.score_one(image)
        timings.append(time.perf_counter() - start)
    result["latency_ms"] = latency_stats(timings)
    threads_after = _proc_status("Threads")
    # Thread pools start when an interpreter is created or first invoked.
    # The calling thread takes part in inference, hence the + 1. Each
    # interpreter of an ensemble owns its pool.
    result["threads_started"] = (
        None
        if threads_before is None or threads_after is None
        else threads_after - threads_before + 1
    )
    # Read before the accuracy pass, whose whole-test-set arrays are not
    # part of running the system at batch 1.
    # NOTE: the peak includes the test images this process loaded
    # (settings.images x image_shape bytes), which the baseline excludes.
    result["peak_rss_mb"] = peak_rss_mb()
    if job["accuracy"]:
        result["accuracy"] = accuracy_report(
            system.scores(images),
            labels,
            job["class_vertical"],
            job["vertical_names"],
        )
    return result


def _spawn_worker(job):
    """Run `run_worker(job)` in a fresh Python process and return its dict."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker"]
    completed = subprocess.run(
        command,
        input=json.dumps(job),
        capture_output=True,
        text=True,
        check=False,
    )
    if completed.returncode != 0:
        lines = completed.stderr.strip().splitlines() or ["no output"]
        raise TFLiteError(
            f"the benchmark child process failed with exit code "
            f"{completed.returncode}: {lines[-1]}"
        )
    return json.loads(completed.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------
# The benchmark run


def machine_info():
    """Return the platform, CPU model and core count of this machine."""
    fields = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    # x86 and many ARM kernels name the core in "model name". Boards add
    # "Hardware" (SoC) or "Model" (Raspberry Pi), and some ARM kernels
    # print only those.
    core = fields.get("model name")
    board = fields.get("Model") or fields.get("Hardware")
    parts = [part for part in (core, board) if part]
    cpu = ", ".join(parts) or platform.processor() or "unknown"
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
    }


def thread_counts(requested):
    """Return 1, 2 and every requested thread count, sorted, deduplicated."""
    counts = {1, 2}
    for value in requested:
        if int(value) < 1:
            raise TFLiteError(
                f"invalid thread count {value}; pass positive integers, "
                "e.g. --threads 1,2,4"
            )
        counts.add(int(value))
    return tuple(sorted(counts))


def run_benchmark(config):
    """Benchmark every system in `config.models` and write the reports.

    Each system and thread count is measured in its own child process, so
    peak memory covers exactly that system's interpreters.

    Args:
        config: a BenchConfig.

    Returns:
        The bench.json dict.

    Raises:
        TFLiteError: invalid exports, test set or runtime.
    """
    if config.runs < 1 or config.warmup < 0:
        raise TFLiteError(
            f"invalid --runs {config.runs} / --warmup {config.warmup}; "
            "pass --runs 1 or more and --warmup 0 or more"
        )
    if config.limit is not None and config.limit < 1:
        raise TFLiteError(
            f"invalid --limit {config.limit}; pass 1 or more test images"
        )
    runtime, runtime_version, _ = load_runtime(config.runtime)
    threads = thread_counts(config.threads)
    systems, taxonomy = plan_systems(
        config.models, config.modes, config.ensemble_modes
    )
    images, labels = load_test_set(config.test, config.limit)
    validate_exports(config.models, systems, taxonomy, images, labels, runtime)
    logger.info(
        "benchmarking %d systems on %d images with %s %s, threads %s",
        len(systems),
        len(images),
        runtime,
        runtime_version,
        ",".join(map(str, threads)),
    )
    baseline = _spawn_worker({"kind": "baseline", "runtime": runtime})
    results = []
    for spec in systems:
        entry = {
            "name": spec.name,
            "kind": spec.kind,
            "mode": spec.mode,
            "models": list(spec.models),
            "model_bytes": sum(
                (Path(config.models) / name).stat().st_size
                for name in spec.models
            ),
            "accuracy": None,
            "threads": [],
        }
        for count in threads:
            logger.info("%s: %d thread(s)", spec.name, count)
            measured = _spawn_worker(
                {
                    "kind": "system",
                    "runtime": runtime,
                    "models_dir": str(config.models),
                    "test": str(config.test),
                    "limit": config.limit,
                    "system": dataclasses.asdict(spec),
                    "class_vertical": list(taxonomy["class_vertical"]),
                    "vertical_names": list(taxonomy["verticals"]),
                    "threads": count,
                    "warmup": config.warmup,
                    "runs": config.runs,
                    "accuracy": entry["accuracy"] is None,
                }
            )
            if "accuracy" in measured:
                entry["accuracy"] = measured.pop("accuracy")
            measured["peak_rss_above_baseline_mb"] = (
                measured["peak_rss_mb"] - baseline["peak_rss_mb"]
            )
            entry["threads"].append(measured)
        results.append(entry)
    report = {
        "source": "benchmark.py",
        "date": datetime.datetime.now(datetime.UTC).isoformat(
            timespec="seconds"
        ),
        "command": config.command,
        "machine": machine_info(),
        "runtime": {"name": runtime, "version": runtime_version},
        "numpy_version": np.__version__,
        "settings": {
            "models": str(config.models),
            "test": str(config.test),
            "images": int(len(images)),
            "image_shape": list(images.shape[1:]),
            "warmup_runs": config.warmup,
            "timed_runs": config.runs,
            "threads": list(threads),
            "batch_size": 1,
            "latency_statistic": "median",
        },
        "memory_baseline_mb": baseline["peak_rss_mb"],
        "taxonomy": {
            "classes": len(taxonomy["class_vertical"]),
            "verticals": list(taxonomy["verticals"]),
        },
        "systems": results,
    }
    report["targets"] = evaluate_targets(report)
    write_reports(report, config.out)
    return report


# ---------------------------------------------------------------------------
# Targets


def _pick(systems, kind, modes):
    for mode in modes:
        for system in systems:
            if system["kind"] == kind and system["mode"] == mode:
                return system
    candidates = [s for s in systems if s["kind"] == kind]
    return candidates[0] if candidates else None


def _latency(system, threads, statistic):
    for measured in system["threads"]:
        if measured["threads_requested"] == threads:
            latency = measured.get("latency_ms") or {}
            return latency.get(statistic)
    return None


def _compare(name, value, limit, threads, relation="<="):
    met = None
    if value is not None and limit is not None:
        met = bool(value <= limit) if relation == "<=" else value >= limit
    return {
        "target": name,
        "threads": threads,
        "value": value,
        "limit": limit,
        "relation": relation,
        "met": met,
    }


def evaluate_targets(report):
    """Compare the int8 student with the teacher ensembles.

    The targets: student latency at most 1 / (0.8 * (M + 1)) of the full
    ensemble's and at most 0.6 of the routed ensemble's (M = number of
    specialists), both per thread count on the latency statistic named in
    the report's settings (the median by default); student top-1 at
    least the routed ensemble's. They are reported, never enforced.

    Returns:
        A list of target dicts with `met` True, False or None (not
        measurable: a system is missing).
    """
    systems = report["systems"]
    student = _pick(systems, "student", STUDENT_TARGET_MODES)
    if student is not None and student["mode"] not in STUDENT_TARGET_MODES:
        student = None
    modes = DEFAULT_ENSEMBLE_MODES
    routed = _pick(systems, "routed", modes)
    full = _pick(systems, "full", modes)
    specialists = len(report["taxonomy"]["verticals"])
    targets = []
    threads = report["settings"]["threads"]
    factor = 1.0 / (0.8 * (specialists + 1))
    statistic = report["settings"].get("latency_statistic", "median")
    for count in threads:
        student_ms = _latency(student, count, statistic) if student else None
        full_ms = _latency(full, count, statistic) if full else None
        routed_ms = _latency(routed, count, statistic) if routed else None
        targets.append(
            _compare(
                f"student latency <= 1/(0.8*(M+1)) = {factor:.3f} x full "
                "ensemble latency",
                student_ms,
                None if full_ms is None else factor * full_ms,
                count,
            )
        )
        targets.append(
            _compare(
                "student latency <= 0.6 x routed ensemble latency",
                student_ms,
                None if routed_ms is None else 0.6 * routed_ms,
                count,
            )
        )
    student_top1 = ((student or {}).get("accuracy") or {}).get("top1")
    routed_top1 = ((routed or {}).get("accuracy") or {}).get("top1")
    targets.append(
        _compare(
            "student top-1 >= routed ensemble top-1",
            student_top1,
            routed_top1,
            None,
            ">=",
        )
    )
    for target in targets:
        target["student"] = student["name"] if student else None
        target["routed"] = routed["name"] if routed else None
        target["full"] = full["name"] if full else None
    return targets


# ---------------------------------------------------------------------------
# Reports


def write_atomic(path, data):
    """Write bytes to `path` through a temporary file and a rename.

    A reader never sees a half-written report. This mirrors
    kc_keras.io_utils, which this standalone script cannot import.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=".tmp", dir=path.parent
    )
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _fmt(value, digits=3, scale=1.0):
    if value is None:
        return "n/a"
    return f"{value * scale:.{digits}f}"


def _ratio(numerator, denominator):
    if numerator is None or not denominator:
        return "n/a"
    return f"{numerator / denominator:.3f}"


def _measured(system, threads):
    for measured in system["threads"]:
        if measured["threads_requested"] == threads:
            return measured
    return {}


def _render_header(report):
    """Return the bench.md lines that describe the machine and settings."""
    machine = report["machine"]
    runtime = report["runtime"]
    settings = report["settings"]
    lines = [
        "# On-device benchmark",
        "",
        f"- Date: {report['date']}",
        f"- Machine: {machine.get('cpu')}, {machine.get('cores')} cores, "
        f"{machine.get('platform')}",
        f"- Runtime: {runtime['name']} {runtime['version']}"
        + (
            f", numpy {report['numpy_version']}"
            if report.get("numpy_version")
            else ""
        ),
    ]
    if settings.get("images") is not None:
        lines.append(
            f"- Test images: {settings['images']}, batch size 1, "
            f"{settings['warmup_runs']} warm-up runs (not timed), "
            f"{settings['timed_runs']} timed runs"
        )
    lines.append(f"- Command: `{report.get('command') or 'n/a'}`")
    if report.get("memory_baseline_mb") is not None:
        lines.append(
            "- Peak memory of a process with only numpy and the runtime "
            f"imported: {report['memory_baseline_mb']:.1f} MiB"
        )
    lines += [f"- {note}" for note in report.get("notes", [])]
    return lines


def render_markdown(report):
    """Return bench.md: results per thread count, ratios and targets."""
    settings = report["settings"]
    lines = _render_header(report)
    lines.append("")
    for threads in settings["threads"]:
        lines += [
            f"## {threads} thread(s)",
            "",
            "| System | Top-1 | Top-5 | Median ms | p90 ms | p99 ms | "
            "Min ms | Mean ms | Std ms | Load ms | Size KiB | Peak RSS MiB | "
            "Above baseline MiB | OS threads started |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for system in report["systems"]:
            accuracy = system.get("accuracy") or {}
            measured = _measured(system, threads)
            latency = measured.get("latency_ms") or {}
            lines.append(
                f"| {system['name']} | {_fmt(accuracy.get('top1'))} | "
                f"{_fmt(accuracy.get('top5'))} | "
                f"{_fmt(latency.get('median'))} | "
                f"{_fmt(latency.get('p90'))} | "
                f"{_fmt(latency.get('p99'))} | "
                f"{_fmt(latency.get('min'))} | "
                f"{_fmt(latency.get('mean'))} | "
                f"{_fmt(latency.get('std'))} | "
                f"{_fmt(measured.get('load_ms'), 1)} | "
                f"{_fmt(system.get('model_bytes'), 1, 1 / 1024)} | "
                f"{_fmt(measured.get('peak_rss_mb'), 1)} | "
                f"{_fmt(measured.get('peak_rss_above_baseline_mb'), 1)} | "
                f"{_fmt(measured.get('threads_started'), 0)} |"
            )
        lines.append("")
    lines += _render_verticals(report) + _render_ratios(report)
    lines += _render_targets(report)
    return "\n".join(lines) + "\n"


def _render_verticals(report):
    verticals = report.get("taxonomy", {}).get("verticals") or []
    systems = [s for s in report["systems"] if s.get("accuracy")]
    if not verticals or not systems:
        return []
    lines = [
        "## Top-1 per vertical",
        "",
        "| System | " + " | ".join(verticals) + " |",
        "|---|" + "---|" * len(verticals),
    ]
    for system in systems:
        per_vertical = system["accuracy"]["per_vertical_top1"]
        cells = [_fmt(per_vertical.get(name)) for name in verticals]
        lines.append(f"| {system['name']} | " + " | ".join(cells) + " |")
    return lines + [""]


def _metric(measured, key, sub=None):
    value = measured.get(key)
    if sub is None or value is None:
        return value
    return value.get(sub)


def _render_ratios(report):
    targets = report.get("targets") or []
    names = targets[0] if targets else {}
    by_name = {s["name"]: s for s in report["systems"]}
    student = by_name.get(names.get("student"))
    routed = by_name.get(names.get("routed"))
    full = by_name.get(names.get("full"))
    if student is None or (routed is None and full is None):
        return []
    lines = [
        f"## Ratios: {student['name']} / ensembles",
        "",
        "Values below 1 mean the student is faster, smaller or lighter. "
        "Memory ratios use peak resident memory above the baseline "
        "process (same imports, no model), because the Python and runtime "
        "baseline is common to every system.",
        "",
        "| Metric | student / routed | student / full |",
        "|---|---|---|",
    ]
    metrics = (
        ("Median latency", "latency_ms", "median"),
        ("Mean latency", "latency_ms", "mean"),
        ("Peak RSS above baseline", "peak_rss_above_baseline_mb", None),
        ("Peak RSS", "peak_rss_mb", None),
    )
    for threads in report["settings"]["threads"]:
        measured = [
            _measured(system, threads) if system else {}
            for system in (student, routed, full)
        ]
        for label, key, sub in metrics:
            s, r, f = (_metric(m, key, sub) for m in measured)
            lines.append(
                f"| {label}, {threads} thread(s) | {_ratio(s, r)} | "
                f"{_ratio(s, f)} |"
            )
    lines.append(
        "| Model bytes | "
        f"{_ratio(student['model_bytes'], (routed or {}).get('model_bytes'))}"
        f" | {_ratio(student['model_bytes'], (full or {}).get('model_bytes'))}"
        " |"
    )
    return lines + [""]


def _render_targets(report):
    targets = report.get("targets") or []
    if not targets:
        return []
    lines = [
        "## Targets",
        "",
        f"Student: {targets[0]['student'] or 'no int8 student export'}; "
        f"routed: {targets[0]['routed'] or 'none'}; "
        f"full: {targets[0]['full'] or 'none'}.",
        "",
        "| Target | Threads | Value | Limit | Result |",
        "|---|---|---|---|---|",
    ]
    for target in targets:
        result = {True: "met", False: "NOT MET", None: "not measured"}[
            target["met"]
        ]
        lines.append(
            f"| {target['target']} | {target['threads'] or 'any'} | "
            f"{_fmt(target['value'])} | {_fmt(target['limit'])} | {result} |"
        )
    met = sum(t["met"] is True for t in targets)
    missed = sum(t["met"] is False for t in targets)
    lines += [
        "",
        "Latency values and limits are median milliseconds at batch 1; "
        "top-1 values are fractions of the test images.",
        "",
        f"{met} target(s) met, {missed} not met.",
    ]
    return lines


def render_plot(report):
    """Return bench.png bytes (top-1 against median latency), or None.

    Returns None when matplotlib is not importable (common on boards) or no
    system has both figures.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot
    except ImportError:
        logger.info("matplotlib is not installed: bench.png skipped")
        return None
    threads = report["settings"]["threads"][0]
    points = []
    for system in report["systems"]:
        accuracy = system.get("accuracy") or {}
        latency = _measured(system, threads).get("latency_ms") or {}
        if accuracy.get("top1") is not None and latency.get("median"):
            points.append((latency["median"], accuracy["top1"], system["name"]))
    if not points:
        logger.info("no system has both top-1 and latency: bench.png skipped")
        return None
    figure, axes = pyplot.subplots(figsize=(7, 4.5))
    markers = "osD^v<>ph*"
    # A legend rather than text labels: systems with similar figures
    # would print their names on top of each other.
    for index, (latency, top1, name) in enumerate(points):
        axes.scatter(
            latency, top1, marker=markers[index % len(markers)], label=name
        )
    axes.legend(fontsize=8, loc="best")
    axes.set_xscale("log")
    axes.set_xlabel(f"median latency per image, ms ({threads} thread(s), log)")
    axes.set_ylabel("top-1 accuracy")
    axes.set_title(
        f"{report['machine'].get('cpu')}, {report['runtime']['name']}"
    )
    axes.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    pyplot.close(figure)
    return buffer.getvalue()


def write_reports(report, out_dir):
    """Write bench.json, bench.md and, with matplotlib, bench.png."""
    out_dir = Path(out_dir)
    write_atomic(
        out_dir / "bench.json",
        (json.dumps(report, indent=2) + "\n").encode("utf-8"),
    )
    write_atomic(out_dir / "bench.md", render_markdown(report).encode("utf-8"))
    png = render_plot(report)
    if png is not None:
        write_atomic(out_dir / "bench.png", png)
    logger.info("wrote %s", out_dir)


# ---------------------------------------------------------------------------
# LiteRT's benchmark_model tool (phones, through android_benchmark.sh)

_PAIR_RE = re.compile(r"\b([a-z0-9]+)=([-+0-9.eE]+)")
_TIMINGS_RE = re.compile(
    r"Inference timings in us: Init: ([-+0-9.eE]+), First inference: "
    r"([-+0-9.eE]+), Warmup \(avg\): ([-+0-9.eE]+), Inference \(avg\): "
    r"([-+0-9.eE]+)"
)
_MEMORY_DELTA_RE = re.compile(
    r"Memory footprint delta from the start of the tool \(MB\): "
    r"init=([-+0-9.eE]+) overall=([-+0-9.eE]+)"
)
_PEAK_RE = re.compile(
    r"Overall peak memory footprint \(MB\) via periodic monitoring: "
    r"([-+0-9.eE]+)"
)
_GRAPH_RE = re.compile(r"Graph: \[([^\]]*)\]")
_THREADS_RE = re.compile(r"Num threads: \[(-?\d+)\]")
_SIZE_RE = re.compile(r"The input model file size \(MB\): ([-+0-9.eE]+)")
_DEVICE_RE = re.compile(r"^# device\.(\w+): (.*)$")


def _stat_ms(line):
    """Convert a benchmark_model statistics line (microseconds) to ms."""
    pairs = {key: float(value) for key, value in _PAIR_RE.findall(line)}
    names = {"avg": "mean", "curr": "last"}
    stats = {"count": int(pairs.pop("count"))}
    for key, value in pairs.items():
        stats[names.get(key, key)] = value / 1e3
    if stats["count"] == 1 and "mean" not in stats:
        # A single run prints only count= and curr=.
        stats.update(mean=stats["last"], min=stats["last"], max=stats["last"])
    return stats


def parse_benchmark_model_log(text):
    """Parse the output of one or more benchmark_model runs.

    Each run starts with benchmark_model's "STARTING!" line. Times are
    converted from microseconds to milliseconds. Lines may carry a logcat
    or "INFO:" prefix.

    Args:
        text: the collected log.

    Returns:
        A tuple (list of run dicts, device dict from "# device.KEY: VALUE"
        header lines written by android_benchmark.sh).

    Raises:
        TFLiteError: the log contains no complete benchmark_model run.
    """
    runs, device, current = [], {}, None
    for line in text.splitlines():
        device_match = _DEVICE_RE.match(line.strip())
        if device_match:
            device[device_match.group(1)] = device_match.group(2).strip()
            continue
        if "STARTING!" in line:
            current = {"stats": []}
            runs.append(current)
            continue
        if current is None:
            continue
        if match := _GRAPH_RE.search(line):
            current["graph"] = match.group(1)
        elif match := _THREADS_RE.search(line):
            current["num_threads"] = int(match.group(1))
        elif match := _SIZE_RE.search(line):
            current["model_size_mb"] = float(match.group(1))
        elif re.search(r"\bcount=\d+", line):
            current["stats"].append(_stat_ms(line))
        elif match := _TIMINGS_RE.search(line):
            init, first, warmup, inference = map(float, match.groups())
            current.update(
                init_ms=init / 1e3,
                first_inference_ms=first / 1e3,
                warmup_avg_ms=warmup / 1e3,
                inference_avg_ms=inference / 1e3,
            )
        elif match := _MEMORY_DELTA_RE.search(line):
            current["memory_init_mb"] = float(match.group(1))
            current["memory_overall_mb"] = float(match.group(2))
        elif match := _PEAK_RE.search(line):
            current["peak_memory_mb"] = float(match.group(1))
    complete = [run for run in runs if "inference_avg_ms" in run]
    for run in complete:
        stats = run.pop("stats")
        # The first statistics line is the warm-up, the last the timed runs.
        run["warmup"] = stats[0] if len(stats) > 1 else None
        run["inference"] = stats[-1] if stats else None
    if not complete:
        raise TFLiteError(
            "no complete benchmark_model run found in the log (expected "
            "'STARTING!' and 'Inference timings in us:' lines); check that "
            "benchmark_model ran to the end"
        )
    return complete, device


def _classify(model_name):
    """Return (kind, mode, vertical) from an export's file name."""
    stem = Path(model_name).stem
    for role in ("student", "generalist", "specialist"):
        mode = _parse_mode(Path(stem + ".tflite"), role)
        if stem.startswith(role + "_") and mode in EXPORT_MODES:
            vertical = int(stem.split("_")[1]) if role == "specialist" else None
            return role, mode, vertical
    return "model", None, None


def _device_entry(run):
    inference = run["inference"] or {"mean": run["inference_avg_ms"]}
    latency = {
        key: inference.get(key)
        for key in ("count", "median", "min", "max", "mean", "std")
    }
    return {
        "threads_requested": run.get("num_threads"),
        "threads_started": None,
        "load_ms": run.get("init_ms"),
        "first_inference_ms": run.get("first_inference_ms"),
        "latency_ms": latency,
        "peak_rss_mb": run.get("peak_memory_mb"),
        "peak_rss_above_baseline_mb": run.get("memory_overall_mb"),
    }


def benchmark_model_report(text, command=""):
    """Convert benchmark_model logs into the bench.json layout.

    Every model run becomes a system. Where a mode has a generalist and
    specialists 0..M-1 measured at the same thread count, the routed and
    full ensembles are added as estimates: full = generalist + every
    specialist; routed = generalist + the specialists' average, which
    assumes the generalist routes evenly across verticals. benchmark_model
    feeds random inputs, so accuracy is not measured.

    Args:
        text: the log written by android_benchmark.sh.
        command: the command line to record.

    Returns:
        A dict with the same keys as run_benchmark's report; the latency
        statistic is the mean, the only one every benchmark_model version
        prints.
    """
    runs, device = parse_benchmark_model_log(text)
    by_model = {}
    for run in runs:
        name = Path(run.get("graph") or "unknown").name
        by_model.setdefault(name, []).append(run)
    systems = []
    models = {}
    for name, model_runs in by_model.items():
        kind, mode, vertical = _classify(name)
        size = model_runs[0].get("model_size_mb")
        entry = {
            "name": f"{KIND_LABELS.get(kind, kind)} ({mode})"
            if kind != "specialist"
            else f"specialist {vertical} ({mode})",
            "kind": kind,
            "mode": mode,
            "models": [name],
            "model_bytes": None if size is None else int(size * 1e6),
            "accuracy": None,
            "threads": [_device_entry(run) for run in model_runs],
        }
        models[(kind, mode, vertical)] = entry
        systems.append(entry)
    threads = sorted(
        {t["threads_requested"] for s in systems for t in s["threads"]} - {None}
    )
    num_verticals = 0
    for mode in EXPORT_MODES:
        generalist = models.get(("generalist", mode, None))
        specialists = []
        while ("specialist", mode, len(specialists)) in models:
            specialists.append(models[("specialist", mode, len(specialists))])
        if generalist is None or not specialists:
            continue
        num_verticals = max(num_verticals, len(specialists))
        systems += _estimate_ensembles(generalist, specialists, threads, mode)
    report = {
        "source": "benchmark_model",
        "date": datetime.datetime.now(datetime.UTC).isoformat(
            timespec="seconds"
        ),
        "command": command,
        "machine": {
            "platform": device.get("platform", "android"),
            "machine": device.get("abi"),
            "cpu": device.get("model") or device.get("cpu") or "unknown",
            "cores": int(device["cores"]) if device.get("cores") else None,
            "device": device,
        },
        "runtime": {
            "name": "benchmark_model",
            "version": device.get("benchmark_model", "unknown"),
        },
        "numpy_version": None,
        "notes": [
            "Measured by LiteRT's benchmark_model on random inputs, so "
            "accuracy is not measured.",
            "Latency targets use the mean, which every benchmark_model "
            "version prints.",
            "Ensembles marked estimated add up per-model means: full = "
            "generalist + every specialist, routed = generalist + the "
            "specialists' average (even routing assumed).",
            "Peak RSS is benchmark_model's periodic peak memory footprint "
            "(--report_peak_memory_footprint); above baseline is its "
            "overall memory delta from the tool's start.",
        ],
        "settings": {
            "images": None,
            "warmup_runs": None,
            "timed_runs": None,
            "threads": threads,
            "batch_size": 1,
            "latency_statistic": "mean",
        },
        "memory_baseline_mb": None,
        "taxonomy": {
            "verticals": [f"vertical {k}" for k in range(num_verticals)]
        },
        "systems": systems,
    }
    report["targets"] = evaluate_targets(report)
    return report


def _estimate_ensembles(generalist, specialists, threads, mode):
    members = [generalist] + specialists
    estimates = []
    for kind in ("routed", "full"):
        entry = {
            "name": f"{KIND_LABELS[kind]} ({mode}, estimated)",
            "kind": kind,
            "mode": mode,
            "models": [m["models"][0] for m in members],
            "model_bytes": None
            if any(m["model_bytes"] is None for m in members)
            else sum(m["model_bytes"] for m in members),
            "accuracy": None,
            "estimated": True,
            "threads": [],
        }
        for count in threads:
            parts = [_measured(m, count) for m in members]
            means = [p.get("latency_ms", {}).get("mean") for p in parts]
            loads = [p.get("load_ms") for p in parts]
            if None in means:
                continue
            specialist_means = means[1:]
            if kind == "full":
                mean = sum(means)
            else:
                mean = means[0] + sum(specialist_means) / len(specialist_means)
            entry["threads"].append(
                {
                    "threads_requested": count,
                    "threads_started": None,
                    "load_ms": None if None in loads else sum(loads),
                    "latency_ms": {"mean": mean},
                    "peak_rss_mb": None,
                    "peak_rss_above_baseline_mb": None,
                }
            )
        estimates.append(entry)
    return estimates


# ---------------------------------------------------------------------------
# Command line


def _split_list(values):
    """Flatten ["1,2", "4"] into ["1", "2", "4"]."""
    return [item for value in values for item in value.split(",") if item]


def build_arg_parser():
    parser = argparse.ArgumentParser(
        description="Benchmark kc-keras TFLite exports: the student against "
        "the generalist and the teacher ensembles, on this machine.",
    )
    parser.add_argument("--models", type=Path, help="folder of .tflite exports")
    parser.add_argument(
        "--test", type=Path, help="test set .npz (default: MODELS/test.npz)"
    )
    parser.add_argument("--out", type=Path, help="folder for the reports")
    parser.add_argument(
        "--runtime", default="auto", choices=("auto",) + RUNTIMES
    )
    parser.add_argument(
        "--threads",
        nargs="+",
        default=["1,2"],
        help="interpreter thread counts, e.g. 1,2,4 (1 and 2 always run)",
    )
    parser.add_argument(
        "--warmup", type=int, default=10, help="untimed runs per system"
    )
    parser.add_argument(
        "--runs", type=int, default=100, help="timed runs per system"
    )
    parser.add_argument(
        "--limit",
        type=int,
        help="use only N test images, evenly spaced over the test set",
    )
    parser.add_argument(
        "--modes",
        nargs="+",
        help="student export modes (default: every mode present)",
    )
    parser.add_argument(
        "--ensemble-modes",
        nargs="+",
        default=list(DEFAULT_ENSEMBLE_MODES),
        help="teacher export modes for the generalist and the ensembles "
        "(default: ptq-int8; 'none' for students only)",
    )
    parser.add_argument(
        "--parse-benchmark-model",
        type=Path,
        metavar="LOG",
        help="convert a benchmark_model log (android_benchmark.sh) into "
        "bench.json, bench.md and bench.png in --out",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return parser


def config_from_args(args, command=""):
    """Build a BenchConfig from parsed arguments.

    Raises:
        TFLiteError: a required option is missing or a value is invalid.
    """
    if args.models is None or args.out is None:
        raise TFLiteError(
            "--models and --out are required, e.g. --models RUN/tflite "
            "--out RUN/bench"
        )
    try:
        threads = tuple(int(v) for v in _split_list(args.threads))
    except ValueError as error:
        raise TFLiteError(
            f"invalid --threads {' '.join(args.threads)!r}; pass integers "
            "such as 1,2,4"
        ) from error
    ensemble_modes = tuple(_split_list(args.ensemble_modes))
    if ensemble_modes == ("none",):
        ensemble_modes = ()
    return BenchConfig(
        models=args.models,
        test=args.test or args.models / "test.npz",
        out=args.out,
        runtime=args.runtime,
        threads=threads,
        warmup=args.warmup,
        runs=args.runs,
        limit=args.limit,
        modes=tuple(_split_list(args.modes)) if args.modes else None,
        ensemble_modes=ensemble_modes,
        command=command,
    )


def main(argv=None):
    """Run the command line; return the exit code (2 for bad input)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_arg_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            datefmt="%H:%M:%S",
            stream=sys.stderr,
        )
    command = " ".join(["python", sys.argv[0]] + argv)
    try:
        if args.worker:
            result = run_worker(json.loads(sys.stdin.read()))
            print(json.dumps(result))
            return 0
        if args.parse_benchmark_model is not None:
            if args.out is None:
                raise TFLiteError("--out is required, e.g. --out RUN/bench")
            log_path = args.parse_benchmark_model
            if not log_path.is_file():
                raise TFLiteError(
                    f"benchmark_model log not found: {log_path}; run "
                    "mobile_demo/android_benchmark.sh first"
                )
            report = benchmark_model_report(
                log_path.read_text(encoding="utf-8", errors="replace"),
                command,
            )
            write_reports(report, args.out)
        else:
            report = run_benchmark(config_from_args(args, command))
    except TFLiteError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(render_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
