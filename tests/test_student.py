"""Tests of the student model, its custom layers and its int8 QAT path."""

import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest
import tf_keras
from distill_helpers import INTERLEAVED
from distill_helpers import SMALL_IMAGES
from distill_helpers import tiny_student
from distill_helpers import tiny_student_config

from kc_keras.errors import KCError
from kc_keras.models import backbones
from kc_keras.models import layers as kc_layers
from kc_keras.models import student as student_lib

REPO = Path(__file__).resolve().parents[1]
HEAD_MODES = [
    (head, mode)
    for head in student_lib.HEADS
    for mode in student_lib.SELF_PACED_MODES
]


def _images(count=4, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 255, (count,) + SMALL_IMAGES.input_shape).astype(
        np.float32
    )


@pytest.mark.parametrize(
    "head,self_paced", HEAD_MODES, ids=[f"{h}-{m}" for h, m in HEAD_MODES]
)
def test_student_trains_and_round_trips(tmp_path, head, self_paced):
    model = tiny_student(
        INTERLEAVED, SMALL_IMAGES, head=head, self_paced=self_paced
    )
    assert model.output_shape == (None, INTERLEAVED.num_classes)
    model.compile(
        keras.optimizers.SGD(0.1),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    before = [w.copy() for w in model.get_weights()]
    loss = model.train_on_batch(_images(8), np.arange(8) % 7)
    assert np.isfinite(loss)
    changed = [
        not np.array_equal(a, b)
        for a, b in zip(before, model.get_weights(), strict=True)
    ]
    assert any(changed)

    path = tmp_path / "student.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    images = _images()
    np.testing.assert_array_equal(
        np.asarray(model(images)), np.asarray(loaded(images))
    )


@pytest.mark.parametrize("self_paced", ["vertical", "class"])
def test_self_paced_logits_have_gamma_norm(self_paced):
    model = tiny_student(INTERLEAVED, SMALL_IMAGES, self_paced=self_paced)
    # Non-zero biases keep the raw logits away from the all-zero vector,
    # which a tiny network with dead ReLUs can produce.
    for vertical in range(INTERLEAVED.num_verticals):
        layer = model.get_layer(f"head_v{vertical}")
        kernel, bias = layer.get_weights()
        layer.set_weights([kernel, np.arange(1, bias.size + 1, dtype="f4")])
    logits = np.asarray(model(_images()))
    for vertical in range(INTERLEAVED.num_verticals):
        classes = list(INTERLEAVED.vertical_classes(vertical))
        size = len(classes)
        # In both modes every gamma starts at sqrt(vertical size).
        norms = np.linalg.norm(logits[:, classes], axis=1)
        np.testing.assert_allclose(norms, np.sqrt(size), rtol=1e-5)
        gamma = model.get_layer(f"head_v{vertical}_self_paced").gamma
        expected_shape = (size,) if self_paced == "class" else (1,)
        assert tuple(gamma.shape) == expected_shape


def test_sc_head_keeps_verticals_separate():
    # Zeroing vertical 0's SC block must leave the other verticals' logits
    # unchanged: each block writes only its own vertical's logits.
    model = tiny_student(INTERLEAVED, SMALL_IMAGES, self_paced="none")
    images = _images()
    before = np.asarray(model(images))
    layer = model.get_layer("head_v0")
    layer.set_weights([np.zeros_like(w) for w in layer.get_weights()])
    after = np.asarray(model(images))
    own = list(INTERLEAVED.vertical_classes(0))
    others = [c for c in range(INTERLEAVED.num_classes) if c not in own]
    np.testing.assert_array_equal(before[:, others], after[:, others])
    np.testing.assert_array_equal(after[:, own], 0.0)


@pytest.mark.parametrize(
    "head,self_paced",
    [("fc-sc", "vertical"), ("fc-fc", "class")],
    ids=["fc-sc-vertical", "fc-fc-class"],
)
def test_weights_copy_to_tf_keras(head, self_paced):
    config = tiny_student_config(head=head, self_paced=self_paced)
    source = tiny_student(
        INTERLEAVED, SMALL_IMAGES, head=head, self_paced=self_paced
    )
    # Move gamma away from its initial value so the copy is observable.
    for layer in source.layers:
        if isinstance(layer, kc_layers.SelfPacedScale):
            layer.gamma.assign(layer.gamma * 1.5)
    target = student_lib.build_student(
        config, INTERLEAVED, SMALL_IMAGES, tf_keras
    )
    student_lib.copy_weights(source, target)
    images = _images()
    np.testing.assert_array_equal(
        np.asarray(source(images)), target(images).numpy()
    )


def test_copy_weights_rejects_other_architecture():
    source = tiny_student(INTERLEAVED, SMALL_IMAGES, head="fc-sc")
    target = tiny_student(INTERLEAVED, SMALL_IMAGES, head="fc-fc")
    with pytest.raises(KCError, match="head_v0_hidden"):
        student_lib.copy_weights(source, target)


@pytest.mark.parametrize(
    "layer",
    [
        kc_layers.ClassGather(indices=[2, 0, 1], name="gather"),
        kc_layers.SelfPacedScale(
            gamma_init=2.5, per_class=True, epsilon=1e-6, name="scale"
        ),
    ],
    ids=["class-gather", "self-paced-scale"],
)
def test_custom_layer_config_mirrors_constructor(layer):
    config = layer.get_config()
    clone = type(layer).from_config(config)
    assert clone.get_config() == config
    registered = keras.saving.get_registered_object(
        f"{kc_layers.PACKAGE}>{type(layer).__name__}"
    )
    assert registered is type(layer)


def test_fc_fc_head_matches_sc_head_size():
    config = student_lib.StudentConfig(fc_units=128, sc_width=32)
    sc = student_lib.sc_head_parameters(128, 32, INTERLEAVED)
    hidden = student_lib.matched_fc_hidden(config, INTERLEAVED)
    fc = student_lib.fc_head_parameters(128, hidden, INTERLEAVED.num_classes)
    per_unit = 128 + 1 + INTERLEAVED.num_classes
    assert abs(fc - sc) <= per_unit


@pytest.mark.parametrize(
    "field,value",
    [("head", "fc-xx"), ("self_paced", "layer"), ("sc_width", 0)],
    ids=["head", "self-paced", "sc-width"],
)
def test_student_config_rejects_bad_values(field, value):
    with pytest.raises(KCError, match=str(value)):
        student_lib.StudentConfig(**{field: value})


# Runs in a child process because importing tfmot switches tf.keras to
# tf-keras for the whole process. tfmot does not support the backbone's
# Rescaling layer, so only the shared FC layer and the head are annotated.
# The converter still quantizes the backbone from the representative data.
QAT_SCRIPT = textwrap.dedent(
    """
    import json
    import sys

    import numpy as np
    import tensorflow as tf
    import tensorflow_model_optimization as tfmot
    import tf_keras
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    sys.path.insert(0, "tests")
    from converters import quantize_configs
    from distill_helpers import INTERLEAVED, SMALL_IMAGES, tiny_student_config
    from kc_keras.models import student

    quantize = tfmot.quantization.keras
    op_names = {
        value: name
        for name, value in vars(schema.BuiltinOperator).items()
        if not name.startswith("_")
    }
    type_names = {
        value: name
        for name, value in vars(schema.TensorType).items()
        if not name.startswith("_")
    }


    def annotate(layer):
        if not (layer.name.startswith("head_") or layer.name == "shared_fc"):
            return layer
        if type(layer).__name__ in ("SelfPacedScale", "ClassGather"):
            config = quantize_configs.quantize_config_for(layer)
            return quantize.quantize_annotate_layer(layer, config)
        return quantize.quantize_annotate_layer(layer)


    result = {}
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (16,) + SMALL_IMAGES.input_shape)
    images = images.astype("float32")
    for head, mode in (("fc-sc", "vertical"), ("fc-fc", "class")):
        model = student.build_student(
            tiny_student_config(head=head, self_paced=mode),
            INTERLEAVED,
            SMALL_IMAGES,
            tf_keras,
        )
        with quantize.quantize_scope(quantize_configs.quantize_scope_objects()):
            annotated = tf_keras.models.clone_model(
                model, clone_function=annotate
            )
            qat = quantize.quantize_apply(annotated)
        qat.compile(
            "adam",
            tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        qat.fit(images, np.arange(16) % 7, epochs=1, verbose=0)
        converter = tf.lite.TFLiteConverter.from_keras_model(qat)
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: (
            [images[i : i + 1]] for i in range(16)
        )
        converter.target_spec.supported_ops = [
            tf.lite.OpsSet.TFLITE_BUILTINS_INT8
        ]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
        flat = flatbuffer_utils.convert_bytearray_to_object(converter.convert())
        graph = flat.subgraphs[0]
        ops = []
        for op in graph.operators:
            code = flat.operatorCodes[op.opcodeIndex]
            builtin = max(code.builtinCode, code.deprecatedBuiltinCode)
            used = [i for i in list(op.inputs) + list(op.outputs) if i >= 0]
            tensors = [graph.tensors[i] for i in used]
            ops.append({
                "op": op_names[builtin],
                "types": sorted({type_names[t.type] for t in tensors}),
            })
        result[f"{head}-{mode}"] = ops
    print("RESULT " + json.dumps(result))
    """
)


@pytest.mark.slow
def test_qat_head_converts_to_int8(tmp_path):
    completed = subprocess.run(
        [sys.executable, "-c", QAT_SCRIPT],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    line = next(
        line
        for line in completed.stdout.splitlines()
        if line.startswith("RESULT ")
    )
    result = json.loads(line[len("RESULT ") :])
    for name, ops in result.items():
        op_types = [op["op"] for op in ops]
        # Self-paced scaling: one L2 normalisation and one multiply per
        # vertical, all int8.
        assert op_types.count("L2_NORMALIZATION") == 3, name
        assert op_types.count("MUL") >= 3, name
        assert "FULLY_CONNECTED" in op_types, name
        assert "GATHER" in op_types, name
        # No float island: nothing converts back to float inside the model.
        assert "DEQUANTIZE" not in op_types, name
        for op in ops:
            floats = {"FLOAT32", "FLOAT16"} & set(op["types"])
            assert not floats, f"{name}: {op['op']} has {floats}"
            if op["op"] in ("FULLY_CONNECTED", "L2_NORMALIZATION", "MUL"):
                assert "INT8" in op["types"], f"{name}: {op['op']}"
    sc_ops = [op["op"] for op in result["fc-sc-vertical"]]
    # One hidden and one output Dense per vertical, plus the shared FC.
    assert sc_ops.count("FULLY_CONNECTED") == 7
    assert "CONCATENATION" in sc_ops


def test_flatten_backbone_keeps_every_position():
    average = tiny_student_config().backbone
    flatten = dataclasses.replace(average, name="small-cnn-flatten")
    inputs = keras.Input(SMALL_IMAGES.input_shape)
    pooled = backbones.build_features(inputs, average, SMALL_IMAGES, keras)
    flat = backbones.build_features(inputs, flatten, SMALL_IMAGES, keras)
    # One block halves 8x8 to 4x4 with 4 filters.
    assert tuple(pooled.shape) == (None, 4)
    assert tuple(flat.shape) == (None, 4 * 4 * 4)


def test_flatten_student_copies_to_tf_keras():
    config = dataclasses.replace(
        tiny_student_config(),
        backbone=dataclasses.replace(
            tiny_student_config().backbone, name="small-cnn-flatten"
        ),
    )
    keras.utils.set_random_seed(0)
    source = student_lib.build_student(config, INTERLEAVED, SMALL_IMAGES)
    assert source.get_layer("flatten") is not None
    target = student_lib.build_student(
        config, INTERLEAVED, SMALL_IMAGES, tf_keras
    )
    student_lib.copy_weights(source, target)
    images = _images()
    np.testing.assert_allclose(
        np.asarray(source(images)), target(images).numpy(), atol=1e-6
    )


@pytest.mark.parametrize(
    "name,dataset_backbone,expected",
    [
        ("small-cnn", "small-cnn-flatten", "small-cnn-flatten"),
        ("small-cnn", "small-cnn", "small-cnn"),
        ("small-cnn-flatten", "small-cnn", "small-cnn-flatten"),
        ("mobilenet-v3-small", "small-cnn-flatten", "mobilenet-v3-small"),
        ("small-cnn", "mobilenet-v3-small", "small-cnn"),
    ],
)
def test_backbone_for_dataset(name, dataset_backbone, expected):
    spec = backbones.BackboneSpec(name=name, filters=8, blocks=3)
    result = backbones.for_dataset(spec, dataset_backbone)
    assert result == dataclasses.replace(spec, name=expected)


def test_student_loads_in_fresh_process(tmp_path):
    path = tmp_path / "student.keras"
    tiny_student(INTERLEAVED, SMALL_IMAGES).save(path)
    script = (
        "import sys; from kc_keras import training; "
        "model = training.load_model(sys.argv[1]); "
        "print('LAYERS', len(model.layers))"
    )
    completed = subprocess.run(
        [sys.executable, "-c", script, str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "LAYERS" in completed.stdout
