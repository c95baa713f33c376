"""A float64 model computes in float64 end to end: no constant of the recipe (the input mean and
std, BN momentum, SGD momentum, weight decay, the learning rates) passes through float32.

This is what the exact parity check (tools/parity.py, float64 on both sides) relies on: with
any such constant rounded to float32, two implementations of the same steps drift apart by
~1e-8 per step, which ten steps amplify to 1e-1.
"""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from simsiam_tf import losses, model, optim

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


@pytest.fixture
def float64():
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    yield
    keras.config.set_floatx("float32")
    keras.config.set_dtype_policy("float32")


def test_input_normalisation_in_float64_is_torchvisions_to_the_last_bits(float64):
    x = np.random.default_rng(0).random((2, 5, 5, 3))
    out = model.Normalize(model.IMAGENET_MEAN, model.IMAGENET_STD)(x)
    assert out.dtype == tf.float64
    np.testing.assert_allclose(out.numpy(), (x - MEAN) / STD, rtol=1e-15, atol=0)


def test_input_normalisation_in_float32_is_torchvisions_order_of_operations():
    """(x - mean) / std in float32, as torchvision's Normalize on a float32 tensor."""
    x = np.random.default_rng(1).random((2, 5, 5, 3)).astype(np.float32)
    out = model.Normalize(model.IMAGENET_MEAN, model.IMAGENET_STD)(x).numpy()
    want = (x - MEAN.astype(np.float32)) / STD.astype(np.float32)
    np.testing.assert_array_equal(out, want)


def test_batchnorm_statistics_in_float64(float64):
    bn = model._bn(False, "bn")
    bn.build((None, 6))
    x = np.random.default_rng(2).normal(1.0, 2.0, (16, 6))
    bn.moving_mean.assign(np.full(6, 0.3))
    bn.moving_variance.assign(np.full(6, 1.7))
    bn(x, training=True)
    np.testing.assert_allclose(bn.moving_mean.numpy(), 0.9 * 0.3 + 0.1 * x.mean(0), rtol=1e-14)
    unbiased = x.var(0, ddof=1)
    np.testing.assert_allclose(bn.moving_variance.numpy(), 0.9 * 1.7 + 0.1 * unbiased, rtol=1e-14)


def test_torch_sgd_in_float64_with_decay_momentum_and_a_fixed_lr(float64):
    """Two variables, one on the schedule and one at the fixed lr, three steps of torch's rule."""
    schedule = optim.WarmupCosine(0.05, total_steps=6)
    opt = optim.TorchSGD(schedule, momentum=0.9, l2_weight_decay=5e-4, fixed_lr=0.05)
    a = tf.Variable(np.array([1.0, -2.0, 3.0]))
    b = tf.Variable(np.array([0.5, 0.25]))
    opt.set_fixed_lr_variables([b])
    rng = np.random.default_rng(3)
    ref = {"a": a.numpy().copy(), "b": b.numpy().copy()}
    buf = {"a": np.zeros(3), "b": np.zeros(2)}
    for t in range(3):
        grads = {"a": rng.normal(size=3), "b": rng.normal(size=2)}
        opt.apply([tf.constant(grads["a"]), tf.constant(grads["b"])], [a, b])
        lrs = {"a": 0.05 * 0.5 * (1.0 + math.cos(math.pi * t / 6)), "b": 0.05}
        for k in ref:
            buf[k] = 0.9 * buf[k] + (grads[k] + 5e-4 * ref[k])
            ref[k] = ref[k] - lrs[k] * buf[k]
    np.testing.assert_allclose(a.numpy(), ref["a"], rtol=1e-15)
    np.testing.assert_allclose(b.numpy(), ref["b"], rtol=1e-15)


def test_schedule_is_the_official_formula_rounded_once():
    """main_simsiam.py: init_lr * 0.5 * (1 + cos(pi * t / T)) in Python floats; the schedule
    gives exactly that number rounded to the run's float type."""
    s = optim.WarmupCosine(0.05, total_steps=7)
    for t in range(8):
        official = 0.05 * 0.5 * (1.0 + math.cos(math.pi * t / 7))
        assert s(t).dtype == tf.float32
        assert float(s(t)) == float(np.float32(official))


def test_schedule_in_float64(float64):
    s = optim.WarmupCosine(0.05, total_steps=7, warmup_steps=2)
    assert s(1).dtype == tf.float64
    assert float(s(1)) == 0.05 * 1 / 2
    assert float(s(4)) == pytest.approx(0.05 * 0.5 * (1.0 + math.cos(math.pi * 2 / 5)), 1e-15)


def test_loss_in_float64(float64):
    rng = np.random.default_rng(4)
    p1, p2, z1, z2 = (rng.normal(size=(4, 8)) for _ in range(4))

    def cos(a, b):
        return np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)

    loss = losses.simsiam_loss(*(tf.constant(v) for v in (p1, p2, z1, z2)))
    assert loss.dtype == tf.float64
    want = -(cos(p1, z2).mean() + cos(p2, z1).mean()) * 0.5
    assert float(loss) == pytest.approx(want, rel=1e-14)


def _bn_gradients(dtype, x, dy, gamma):
    """(output, d/dx, d/dgamma, d/dbeta) of a training-mode model.BatchNorm in `dtype`."""
    bn = model.BatchNorm(momentum=0.9, epsilon=1e-5, dtype=dtype)
    bn.build(x.shape)
    bn.gamma.assign(gamma)
    x = tf.constant(x.astype(dtype))
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = bn(x, training=True)
        loss = tf.reduce_sum(y * tf.constant(dy.astype(dtype)))
    return [y, *tape.gradient(loss, [x, bn.gamma, bn.beta])]


@pytest.mark.parametrize("zero_gamma", [True, False])
def test_float32_batchnorm_sums_over_the_batch_as_torch_does(zero_gamma):
    """A float32 BN step is as close to float64 as torch's CPU BatchNorm, which accumulates its
    sums in double: conv activations whose mean is large against their spread, 32 x 8 x 8 values
    per channel. Summed in float32, the gamma gradient (a sum of dy * x_hat that nearly cancels)
    was 6e-5 off and the beta gradient 5e-7; torch's float32 gives 3e-6 and 4e-8 here."""
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 0.05, (32, 8, 8, 16)) + rng.normal(0.0, 1.0, (1, 1, 1, 16))
    dy = rng.normal(0.0, 1.0, x.shape)
    gamma = np.zeros(16) if zero_gamma else rng.uniform(0.5, 1.5, 16)
    exact = _bn_gradients("float64", x, dy, gamma)
    got = _bn_gradients("float32", x, dy, gamma)
    err = {
        name: float(np.linalg.norm(a.numpy() - b.numpy()) / max(np.linalg.norm(b.numpy()), 1e-30))
        for name, a, b in zip(("y", "dx", "dgamma", "dbeta"), got, exact)
    }
    assert got[2].dtype == tf.float32 and err["dgamma"] < 5e-6 and err["dbeta"] < 1e-7, err
    if not zero_gamma:
        assert err["dx"] < 5e-7 and err["y"] < 3e-6, err
