"""`tf.distribute` strategies for distillation, chosen by name."""

import logging

from kc_keras.errors import KCError

logger = logging.getLogger(__name__)

STRATEGIES = ("none", "mirrored", "multi-worker", "tpu")


def make_strategy(name):
    """Create the distribution strategy called `name`.

    Args:
        name: `none` (the default strategy: one device), `mirrored` (every
            local GPU, or the CPU), `multi-worker` (synchronous training
            across the machines listed in the TF_CONFIG environment
            variable) or `tpu` (a Cloud TPU found by
            `TPUClusterResolver()`, which reads the TPU_NAME environment
            variable or the TPU VM's metadata).

    Returns:
        A `tf.distribute.Strategy`. Build and compile models inside its
        `scope()`.

    Raises:
        KCError: unknown name, or no TPU found.
    """
    import tensorflow as tf

    if name == "none":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        strategy = tf.distribute.MirroredStrategy()
    elif name == "multi-worker":
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    elif name == "tpu":
        # NOTE: not tested here (no TPU); follows the TensorFlow 2.21 guide.
        try:
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
            tf.config.experimental_connect_to_cluster(resolver)
            tf.tpu.experimental.initialize_tpu_system(resolver)
        except (ValueError, tf.errors.NotFoundError) as error:
            raise KCError(
                f"no TPU found ({error}); set TPU_NAME or pick another "
                "--strategy"
            ) from error
        strategy = tf.distribute.TPUStrategy(resolver)
    else:
        raise KCError(
            f"unknown strategy {name!r}; expected one of "
            f"{', '.join(STRATEGIES)}"
        )
    logger.info(
        "distribution strategy %s with %d replicas",
        name,
        strategy.num_replicas_in_sync,
    )
    return strategy
