"""Custom layers of the student, defined for Keras 3 and for tf-keras.

The student is built in Keras 3 for training and in tf-keras (Keras 2) for
quantization-aware training, so every custom layer exists twice: the
Keras 3 classes are module attributes, and `custom_layers(tf_keras)` returns
the tf-keras twins. Both are registered serializable under the package
`kc_keras` with the same class names, so a saved model needs no
`custom_objects` and loads with `safe_mode=True`.

The layers use TensorFlow ops directly because both Keras versions run on
the TensorFlow backend in this project, and the ops (`gather`, the L2
normalisation pattern and `multiply`) convert to int8 TFLite kernels.
"""

import logging
import math

import keras
import tensorflow as tf

logger = logging.getLogger(__name__)

PACKAGE = "kc_keras"

_DEFINED = {}


def _define_layers(keras_module, register):
    """Define the custom layer classes on top of `keras_module`."""

    @register(package=PACKAGE)
    class ClassGather(keras_module.layers.Layer):
        """Select or reorder the last axis by a constant list of indices.

        Output column `i` is input column `indices[i]`. The student uses it
        to put per-vertical logits back into class-index order when the
        classes of a vertical are not contiguous, and to split plain logits
        by vertical.

        Args:
            indices: input column of each output column.
            **kwargs: standard layer arguments (`name`, `dtype`, ...).
        """

        def __init__(self, indices, **kwargs):
            super().__init__(**kwargs)
            self.indices = [int(i) for i in indices]

        def call(self, inputs):
            return tf.gather(inputs, self.indices, axis=-1)

        def compute_output_shape(self, input_shape):
            return tuple(input_shape[:-1]) + (len(self.indices),)

        def get_config(self):
            config = super().get_config()
            config["indices"] = list(self.indices)
            return config

    @register(package=PACKAGE)
    class SelfPacedScale(keras_module.layers.Layer):
        """L2-normalise logits and multiply them by a learnable gamma.

        The output is `gamma * x / max(||x||_2, sqrt(epsilon))` over the last
        axis. Normalising each vertical's logits bounds their scale, and the
        learnable gamma (initialised at sqrt(vertical size)) lets training
        decide how peaked each vertical's distribution gets.

        Args:
            gamma_init: initial value of gamma.
            per_class: one gamma per input column instead of one in all.
            epsilon: floor of the squared norm, which avoids division by
                zero on all-zero logits.
            **kwargs: standard layer arguments (`name`, `dtype`, ...).
        """

        def __init__(
            self, gamma_init, per_class=False, epsilon=1e-12, **kwargs
        ):
            super().__init__(**kwargs)
            self.gamma_init = float(gamma_init)
            self.per_class = bool(per_class)
            self.epsilon = float(epsilon)

        def build(self, input_shape):
            units = int(input_shape[-1]) if self.per_class else 1
            self.gamma = self.add_weight(
                name="gamma",
                shape=(units,),
                initializer=keras_module.initializers.Constant(self.gamma_init),
                trainable=True,
            )
            super().build(input_shape)

        def call(self, inputs):
            normalised = tf.math.l2_normalize(
                inputs, axis=-1, epsilon=self.epsilon
            )
            return normalised * tf.cast(self.gamma, normalised.dtype)

        def compute_output_shape(self, input_shape):
            return tuple(input_shape)

        def get_config(self):
            config = super().get_config()
            config.update(
                gamma_init=self.gamma_init,
                per_class=self.per_class,
                epsilon=self.epsilon,
            )
            return config

    return {"ClassGather": ClassGather, "SelfPacedScale": SelfPacedScale}


def custom_layers(keras_module=keras):
    """Return the custom layer classes for `keras_module`.

    Args:
        keras_module: `keras` (Keras 3) or `tf_keras`.

    Returns:
        A dict from class name to layer class, also usable as
        `custom_objects`.
    """
    key = keras_module.__name__
    if key not in _DEFINED:
        if keras_module is keras:
            register = keras.saving.register_keras_serializable
        else:
            register = keras_module.utils.register_keras_serializable
        _DEFINED[key] = _define_layers(keras_module, register)
    return dict(_DEFINED[key])


def initial_gamma(vertical_size):
    """Return the initial self-paced gamma of a vertical: sqrt(size)."""
    return math.sqrt(vertical_size)


_KERAS3_LAYERS = custom_layers(keras)
ClassGather = _KERAS3_LAYERS["ClassGather"]
SelfPacedScale = _KERAS3_LAYERS["SelfPacedScale"]
