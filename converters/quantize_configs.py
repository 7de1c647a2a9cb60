"""tfmot QuantizeConfigs for the student's custom layers.

Importing this module imports tensorflow_model_optimization, which makes
`tf.keras` resolve to tf-keras for the whole process, so import it only in
a process that does quantization-aware training (see docs/ARCHITECTURE.md).

Usage:

    with tfmot.quantization.keras.quantize_scope(quantize_scope_objects()):
        model = tfmot.quantization.keras.quantize_apply(annotated)

where `annotated` marks each custom layer with `quantize_annotate_layer(
layer, quantize_config_for(layer))`. The standard layers (Dense,
Concatenate, ...) use tfmot's default 8-bit registry.
"""

import logging

import tensorflow_model_optimization as tfmot
import tf_keras

from kc_keras.errors import KCError
from kc_keras.models import layers as kc_layers

logger = logging.getLogger(__name__)

_quantizers = tfmot.quantization.keras.quantizers
_QuantizeConfig = tfmot.quantization.keras.QuantizeConfig


class SelfPacedScaleQuantizeConfig(_QuantizeConfig):
    """Quantize gamma (8-bit, symmetric) and the layer output (8-bit).

    The L2 normalisation inside the layer converts to TFLite's int8
    L2_NORMALIZATION kernel, whose output scale is fixed (1/128), so only
    the scaled output needs a learned range.
    """

    def get_weights_and_quantizers(self, layer):
        return [
            (
                layer.gamma,
                _quantizers.LastValueQuantizer(
                    num_bits=8,
                    per_axis=False,
                    symmetric=True,
                    narrow_range=False,
                ),
            )
        ]

    def get_activations_and_quantizers(self, layer):
        return []

    def set_quantize_weights(self, layer, quantize_weights):
        layer.gamma = quantize_weights[0]

    def set_quantize_activations(self, layer, quantize_activations):
        pass

    def get_output_quantizers(self, layer):
        return [
            _quantizers.MovingAverageQuantizer(
                num_bits=8, per_axis=False, symmetric=False, narrow_range=False
            )
        ]

    def get_config(self):
        return {}


class ClassGatherQuantizeConfig(_QuantizeConfig):
    """Leave a gather unquantized: it copies values, so its output keeps
    the input's quantization range and converts to an int8 GATHER."""

    def get_weights_and_quantizers(self, layer):
        return []

    def get_activations_and_quantizers(self, layer):
        return []

    def set_quantize_weights(self, layer, quantize_weights):
        pass

    def set_quantize_activations(self, layer, quantize_activations):
        pass

    def get_output_quantizers(self, layer):
        return []

    def get_config(self):
        return {}


_CONFIGS = {
    "SelfPacedScale": SelfPacedScaleQuantizeConfig,
    "ClassGather": ClassGatherQuantizeConfig,
}


def quantize_config_for(layer):
    """Return a new QuantizeConfig for a custom student layer.

    Args:
        layer: a tf-keras `SelfPacedScale` or `ClassGather` layer.

    Raises:
        KCError: the layer is not one of the student's custom layers.
    """
    name = type(layer).__name__
    if name not in _CONFIGS:
        raise KCError(
            f"layer {layer.name!r} of type {name} has no kc_keras "
            f"QuantizeConfig; expected one of {', '.join(sorted(_CONFIGS))}"
        )
    return _CONFIGS[name]()


def quantize_scope_objects():
    """Return the custom objects for `tfmot...quantize_scope`.

    The dict contains the tf-keras custom layers and their QuantizeConfigs, so
    tfmot can clone and deserialize a quantized student.
    """
    objects = kc_layers.custom_layers(tf_keras)
    for config_class in _CONFIGS.values():
        objects[config_class.__name__] = config_class
    return objects
