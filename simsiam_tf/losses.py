"""The SimSiam loss (paper section 3, Algorithm 1).

    D(p, z) = -cos(p, stopgrad(z))
    L = D(p1, z2) / 2 + D(p2, z1) / 2

The stop-gradient on z is the whole trick: without it the outputs collapse (paper section 4.1).
"""

import tensorflow as tf


def negative_cosine(p: tf.Tensor, z: tf.Tensor, stop_gradient: bool = True) -> tf.Tensor:
    """Mean over the batch of -cos(p, z), with z detached unless `stop_gradient` is False.

    Args:
      p: predictor output, NxC.
      z: projector output of the other view, NxC.
      stop_gradient: detach z (the paper's method); False only for the collapse ablation.

    Returns:
      A scalar in [-1, 1], float32 (float64 for float64 inputs).
    """
    if stop_gradient:
        z = tf.stop_gradient(z)
    # At least float32 whatever the compute dtype, so mixed precision cannot round it away
    # (float64 stays float64: the exact parity check runs the whole step in it).
    dtype = tf.float64 if p.dtype == tf.float64 else tf.float32
    p = tf.math.l2_normalize(tf.cast(p, dtype), axis=-1)  # NxC
    z = tf.math.l2_normalize(tf.cast(z, dtype), axis=-1)  # NxC
    return -tf.reduce_mean(tf.reduce_sum(p * z, axis=-1))


def simsiam_loss(
    p1: tf.Tensor,
    p2: tf.Tensor,
    z1: tf.Tensor,
    z2: tf.Tensor,
    stop_gradient: bool = True,
    symmetric: bool = True,
) -> tf.Tensor:
    """The symmetric loss D(p1, z2)/2 + D(p2, z1)/2; with `symmetric=False`, D(p1, z2) alone."""
    if not symmetric:
        return negative_cosine(p1, z2, stop_gradient)
    return 0.5 * negative_cosine(p1, z2, stop_gradient) + 0.5 * negative_cosine(
        p2, z1, stop_gradient
    )


def channel_std(x: tf.Tensor) -> tf.Tensor:
    """Mean per-channel std of the L2-normalised rows of x (paper section 4.1, Figure 2 middle).

    For a healthy d-dimensional output it is about 1/sqrt(d); a collapsed output gives 0.
    """
    x = tf.math.l2_normalize(tf.cast(x, tf.float32), axis=-1)
    return tf.reduce_mean(tf.math.reduce_std(x, axis=0))
