"""Tiny teachers, students and data shared by the student and distiller
tests.

The teachers follow the contract of `kc_keras.models.teachers`: the
generalist outputs one logit per class, the specialist of vertical k its
classes' logits then a dustbin logit.
"""

import keras
import numpy as np

from kc_keras.data import load_dataset
from kc_keras.data.base import Preprocessing
from kc_keras.data.base import Taxonomy
from kc_keras.distill import soft_targets
from kc_keras.distill.config import LossConfig
from kc_keras.models import backbones
from kc_keras.models import student as student_lib

TINY_BACKBONE = backbones.BackboneSpec(filters=4, blocks=1)

# Classes of each vertical are interleaved, so the student needs its
# class-order gather layer.
INTERLEAVED = Taxonomy(
    class_names=tuple(f"c{c}" for c in range(7)),
    vertical_names=("x", "y", "z"),
    class_vertical=(0, 1, 0, 2, 1, 2, 0),
)
SMALL_IMAGES = Preprocessing(8, 8, 1)


def tiny_dataset(num_classes=12, num_verticals=3, seed=0):
    """Load a small synthetic dataset (16x16 images, 8 per class)."""
    return load_dataset(
        "synthetic",
        num_classes=num_classes,
        num_verticals=num_verticals,
        quick=True,
        seed=seed,
    )


def tiny_teacher(num_outputs, preprocessing, name, seed, backbone=None):
    """Build a random small CNN teacher with BatchNorm."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(preprocessing.input_shape, name="pixels")
    features = backbones.build_features(
        inputs, backbone or TINY_BACKBONE, preprocessing, keras
    )
    logits = keras.layers.Dense(num_outputs, name="logits")(features)
    return keras.Model(inputs, logits, name=name)


def tiny_teachers(taxonomy, preprocessing, seed=0, backbone=None):
    """Return (generalist, specialists) for `taxonomy`."""
    generalist = tiny_teacher(
        taxonomy.num_classes, preprocessing, "generalist", seed, backbone
    )
    specialists = tuple(
        tiny_teacher(
            len(taxonomy.vertical_classes(v)) + 1,
            preprocessing,
            f"specialist_{v}",
            seed + 1 + v,
            backbone,
        )
        for v in range(taxonomy.num_verticals)
    )
    return generalist, specialists


def tiny_student_config(head="fc-sc", self_paced="vertical"):
    return student_lib.StudentConfig(
        backbone=TINY_BACKBONE,
        fc_units=8,
        head=head,
        sc_width=4,
        self_paced=self_paced,
    )


def tiny_student(taxonomy, preprocessing, seed=0, **config):
    keras.utils.set_random_seed(seed)
    return student_lib.build_student(
        tiny_student_config(**config), taxonomy, preprocessing
    )


def teacher_targets(dataset, loss_config=None, seed=0, backbone=None):
    """Return a `TeacherTargets` over tiny random teachers of `dataset`."""
    generalist, specialists = tiny_teachers(
        dataset.taxonomy, dataset.preprocessing, seed, backbone
    )
    return soft_targets.TeacherTargets(
        generalist,
        specialists,
        dataset.taxonomy,
        loss_config or LossConfig(),
    )


def first_batch(dataset, size=16):
    split = dataset.split("train")
    order = np.random.default_rng(0).permutation(len(split))[:size]
    return (
        split.images[order].astype(np.float32),
        split.labels[order].astype(np.int32),
    )
