"""Synchronised BN across replicas, mixed precision and XLA."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from simsiam_tf import data, train
from tests.helpers import tiny_config


def test_synchronized_bn_uses_the_global_batch_statistics(two_replicas):
    """On 2 replicas, each holding half of a batch whose halves differ, a synchronised BN
    normalises with the statistics of the whole batch; a plain BN with those of its half."""
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, (8, 4)), rng.normal(5, 3, (8, 4))]).astype(np.float32)
    strategy = two_replicas

    def run(synchronized):
        with strategy.scope():
            bn = keras.layers.BatchNormalization(
                synchronized=synchronized, momentum=0.0, epsilon=1e-5, center=False, scale=False
            )
            bn.build((None, 4))
        dist = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors(x))
        out = strategy.run(lambda b: bn(b, training=True), args=(next(iter(dist)),))
        return np.concatenate([t.numpy() for t in strategy.experimental_local_results(out)]), bn

    synced, bn = run(True)
    want = (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5)
    np.testing.assert_allclose(synced, want, atol=1e-4)
    # momentum 0: the moving statistics are the last batch's, i.e. the global ones.
    np.testing.assert_allclose(bn.moving_mean.numpy(), x.mean(0), atol=1e-4)
    np.testing.assert_allclose(bn.moving_variance.numpy(), x.var(0), rtol=1e-3)
    local, _ = run(False)
    half = x[:8]
    np.testing.assert_allclose(
        local[:8], (half - half.mean(0)) / np.sqrt(half.var(0) + 1e-5), atol=1e-4
    )
    assert not np.allclose(local, want, atol=1e-2)


def _one_fit(config):
    source = data.load_source("builtin:digits", "train", max_examples=64)
    net, _ = train.build_model_and_optimizer(config, steps_per_epoch=2)
    ds = data.pretrain_dataset(source, config.data, config.aug, 32, seed=0, num_epochs=1)
    history = net.fit(ds, epochs=1, steps_per_epoch=2, verbose=0)
    return net, history.history["loss"][-1]


@pytest.mark.parametrize(
    "precision,jit,photometric",
    [
        ("mixed_float16", False, "cpu"),
        ("mixed_bfloat16", False, "cpu"),
        ("float32", True, "cpu"),
        ("float32", True, "device"),
        ("mixed_bfloat16", True, "device"),
    ],
)
def test_a_step_runs_with_a_finite_float32_loss(precision, jit, photometric):
    c = tiny_config()
    c.data.image_size = 16
    c.data.photometric = photometric
    c.train.precision = precision
    c.train.jit_compile = jit
    keras.mixed_precision.set_global_policy(precision)
    try:
        net, loss = _one_fit(c)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert np.isfinite(loss) and -1.0 <= loss <= 1.0
    if precision != "float32":
        assert net.backbone.get_layer("conv1").compute_dtype == precision.split("_")[1]
        assert net.backbone.get_layer("conv1").kernel.dtype == "float32"  # master weights
    if precision == "mixed_float16":
        assert isinstance(net.optimizer, keras.optimizers.LossScaleOptimizer)


@pytest.mark.parametrize(
    "dtype,sum_dtype,tol", [("float64", "auto", 1e-12), ("float32", "fused", 2e-4)]
)
def test_synchronized_simsiam_batchnorm_step_is_the_global_batch_step(
    two_replicas, dtype, sum_dtype, tol
):
    """model.BatchNorm(synchronized=True) on 2 replicas, each with half of a batch whose halves
    differ: outputs, input gradients and moving statistics are those of one BN over the whole
    batch, and gamma's and beta's gradients, added over the replicas as the optimiser adds
    them, are the whole batch's (float64, to 1e-12). bn_sums="fused" has no synchronised
    kernel: the synchronised layer takes the two-pass float32 step instead (float32)."""
    from simsiam_tf import model

    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, (4, 3, 3, 5)), rng.normal(5, 3, (4, 3, 3, 5))])
    dy = rng.normal(0, 1, x.shape)
    gamma = rng.uniform(0.5, 1.5, 5)
    x, dy = x.astype(dtype), dy.astype(dtype)

    def layer(synchronized):
        bn = model.BatchNorm(
            synchronized=synchronized, momentum=0.5, epsilon=1e-5, dtype=dtype, sum_dtype=sum_dtype
        )
        bn.build((None, 3, 3, 5))
        bn.gamma.assign(gamma)
        return bn

    def step(bn, x, dy):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = bn(x, training=True)
            loss = tf.reduce_sum(y * dy)
        return (y, *tape.gradient(loss, [x, bn.gamma, bn.beta]))

    want_bn = layer(False)
    want = [t.numpy() for t in step(want_bn, tf.constant(x), tf.constant(dy))]
    with two_replicas.scope():
        bn = layer(True)
    dist = two_replicas.experimental_distribute_dataset(
        tf.data.Dataset.from_tensors((x, dy)).unbatch().batch(8)
    )
    out = two_replicas.run(lambda b: step(bn, *b), args=(next(iter(dist)),))
    parts = [[t.numpy() for t in two_replicas.experimental_local_results(o)] for o in out]
    np.testing.assert_allclose(np.concatenate(parts[0]), want[0], rtol=tol, atol=tol)
    np.testing.assert_allclose(np.concatenate(parts[1]), want[1], rtol=tol, atol=tol)
    for got, expected in zip(parts[2:], want[2:]):
        np.testing.assert_allclose(sum(got), expected, rtol=tol, atol=tol)
    for name in ("moving_mean", "moving_variance"):
        np.testing.assert_allclose(
            getattr(bn, name).numpy(), getattr(want_bn, name).numpy(), rtol=tol
        )
