"""Hard and soft losses of the distiller, computed in float32.

Teacher targets travel as top-K pairs: int32 class indices and float32
probabilities of shape (batch, K), padded with probability 0. They are
scattered into (batch, num_classes) only inside the loss, so no tensor
grows with the number of teachers times the number of classes. Every
function returns one loss per image; the distiller averages them.
"""

import logging

import tensorflow as tf

logger = logging.getLogger(__name__)


def dense_targets(indices, probabilities, num_classes):
    """Scatter top-K pairs into a (batch, num_classes) float32 tensor.

    Padding entries (probability 0) add nothing, whatever their index.

    Args:
        indices: int tensor (batch, K) of class indices.
        probabilities: float tensor (batch, K).
        num_classes: width of the result.

    Returns:
        A float32 tensor (batch, num_classes), zero outside the top K.
    """
    indices = tf.cast(indices, tf.int32)
    probabilities = tf.cast(probabilities, tf.float32)
    batch = tf.shape(indices)[0]
    top_k = tf.shape(indices)[1]
    rows = tf.repeat(tf.range(batch), top_k)
    positions = tf.stack([rows, tf.reshape(indices, [-1])], axis=1)
    return tf.scatter_nd(
        positions, tf.reshape(probabilities, [-1]), [batch, num_classes]
    )


def hard_loss(labels, logits):
    """Return the softmax cross-entropy of each image over all classes."""
    return tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=tf.cast(labels, tf.int32), logits=tf.cast(logits, tf.float32)
    )


def kl_loss(targets, logits, temperature):
    """Return T^2 * KL(teacher || student) per image.

    The teacher's top-K probabilities are renormalised to sum to 1, and the
    student's softmax is taken at temperature T. Multiplying by T^2 keeps
    the gradient's scale independent of T, because the gradient of the
    softened softmax shrinks as 1/T^2 (Hinton et al., "Distilling the
    Knowledge in a Neural Network", 2015).

    Args:
        targets: float32 (batch, num_classes) teacher probabilities.
        logits: student logits (batch, num_classes).
        temperature: softmax temperature T > 0.

    Returns:
        A float32 tensor (batch,).
    """
    targets = tf.cast(targets, tf.float32)
    total = tf.reduce_sum(targets, axis=1, keepdims=True)
    targets = tf.math.divide_no_nan(targets, total)
    log_student = tf.nn.log_softmax(
        tf.cast(logits, tf.float32) / temperature, axis=1
    )
    divergence = tf.reduce_sum(
        tf.math.xlogy(targets, targets) - targets * log_student, axis=1
    )
    return divergence * (temperature**2)


def sigmoid_loss(targets, logits):
    """Return the binary cross-entropy per image, summed over classes.

    Each class is an independent binary target: sigmoid(student logit)
    against the teacher's probability (0 outside its top K).

    Args:
        targets: float32 (batch, num_classes) teacher probabilities.
        logits: student logits (batch, num_classes).

    Returns:
        A float32 tensor (batch,).
    """
    per_class = tf.nn.sigmoid_cross_entropy_with_logits(
        labels=tf.cast(targets, tf.float32),
        logits=tf.cast(logits, tf.float32),
    )
    return tf.reduce_sum(per_class, axis=1)


def soft_loss(kind, indices, probabilities, logits, temperature):
    """Return one teacher's soft loss per image.

    Args:
        kind: `kl` or `sigmoid` (see `LossConfig`).
        indices: int tensor (batch, K) of class indices.
        probabilities: float tensor (batch, K) of teacher probabilities.
        logits: student logits (batch, num_classes).
        temperature: softmax temperature T (used by `kl`; the teacher's
            probabilities already include it).

    Returns:
        A float32 tensor (batch,).
    """
    num_classes = tf.shape(logits)[1]
    targets = dense_targets(indices, probabilities, num_classes)
    if kind == "kl":
        return kl_loss(targets, logits, temperature)
    return sigmoid_loss(targets, logits)
