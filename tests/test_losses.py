import numpy as np
import pytest
import tensorflow as tf

from simsiam_tf import losses


def _np_neg_cos(p, z):
    p = p / np.linalg.norm(p, axis=1, keepdims=True)
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    return -np.mean(np.sum(p * z, axis=1))


def test_loss_matches_numpy_reference():
    rng = np.random.default_rng(0)
    p1, p2, z1, z2 = (rng.normal(size=(16, 32)).astype(np.float32) for _ in range(4))
    got = losses.simsiam_loss(p1, p2, z1, z2).numpy()
    want = 0.5 * _np_neg_cos(p1, z2) + 0.5 * _np_neg_cos(p2, z1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # Asymmetric: D(p1, z2) only.
    got = losses.simsiam_loss(p1, p2, z1, z2, symmetric=False).numpy()
    np.testing.assert_allclose(got, _np_neg_cos(p1, z2), rtol=1e-5, atol=1e-6)


def test_identical_inputs_give_minus_one_and_scale_does_not_matter():
    x = tf.random.normal((8, 64), seed=1)
    assert losses.negative_cosine(x, x).numpy() == pytest.approx(-1.0, abs=1e-6)
    assert losses.negative_cosine(x, 3.0 * x).numpy() == pytest.approx(-1.0, abs=1e-6)
    assert losses.negative_cosine(x, -x).numpy() == pytest.approx(1.0, abs=1e-6)


def test_loss_is_symmetric_in_the_two_views():
    rng = np.random.default_rng(1)
    p1, p2, z1, z2 = (rng.normal(size=(8, 16)).astype(np.float32) for _ in range(4))
    a = losses.simsiam_loss(p1, p2, z1, z2).numpy()
    b = losses.simsiam_loss(p2, p1, z2, z1).numpy()
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_stop_gradient_blocks_z_but_not_p():
    p = tf.Variable(tf.random.normal((8, 16), seed=2))
    z = tf.Variable(tf.random.normal((8, 16), seed=3))
    with tf.GradientTape() as tape:
        loss = losses.negative_cosine(p, z)
    gp, gz = tape.gradient(loss, [p, z])
    assert gz is None
    assert float(tf.reduce_max(tf.abs(gp))) > 1e-4


def test_without_stop_gradient_gradient_reaches_z():
    p = tf.Variable(tf.random.normal((8, 16), seed=2))
    z = tf.Variable(tf.random.normal((8, 16), seed=3))
    with tf.GradientTape() as tape:
        loss = losses.negative_cosine(p, z, stop_gradient=False)
    gz = tape.gradient(loss, z)
    assert gz is not None and float(tf.reduce_max(tf.abs(gz))) > 1e-4


def test_channel_std_healthy_vs_collapsed():
    d = 256
    healthy = tf.random.normal((2048, d), seed=4)
    # Gaussian rows normalised: per-channel std ~ 1/sqrt(d).
    assert losses.channel_std(healthy).numpy() * np.sqrt(d) == pytest.approx(1.0, abs=0.05)
    collapsed = tf.ones((2048, d)) + 1e-7 * tf.random.normal((2048, d), seed=5)
    assert losses.channel_std(collapsed).numpy() * np.sqrt(d) < 1e-3
