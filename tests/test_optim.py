import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from simsiam_tf import optim
from simsiam_tf.config import default_config
from tests.helpers import bn_free_simsiam, random_views


def test_lr_scaling_and_schedule():
    assert optim.scaled_lr(0.05, 512) == pytest.approx(0.1)
    s = optim.WarmupCosine(0.1, total_steps=100, warmup_steps=10)
    assert float(s(0)) == pytest.approx(0.0)
    assert float(s(5)) == pytest.approx(0.05)
    assert float(s(10)) == pytest.approx(0.1)
    assert float(s(55)) == pytest.approx(0.05, abs=1e-6)
    assert float(s(100)) == pytest.approx(0.0, abs=1e-7)
    s = optim.WarmupCosine(0.1, total_steps=100)
    assert float(s(25)) == pytest.approx(0.05 * (1 + math.cos(math.pi / 4)))


def test_torch_sgd_matches_pytorch_update_rule_with_changing_lr():
    """buf = m * buf + (g + wd * w); w -= lr_t * buf, with lr changing every step."""
    lrs = [0.1, 0.05, 0.02, 0.01]

    class Steps(keras.optimizers.schedules.LearningRateSchedule):
        def __call__(self, step):
            return tf.gather(tf.constant(lrs), tf.cast(step, tf.int32))

    opt = optim.TorchSGD(learning_rate=Steps(), momentum=0.9, l2_weight_decay=0.01)
    w = tf.Variable([1.0, -2.0, 3.0])
    rng = np.random.default_rng(0)
    ref_w, buf = np.array([1.0, -2.0, 3.0]), np.zeros(3)
    for lr in lrs:
        g = rng.normal(size=3).astype(np.float32)
        opt.apply([tf.constant(g)], [w])
        buf = 0.9 * buf + (g + 0.01 * ref_w)
        ref_w = ref_w - lr * buf
        np.testing.assert_allclose(w.numpy(), ref_w, rtol=1e-5)


def _one_step(config, data, seed=0):
    net = bn_free_simsiam(seed=seed)
    net(data["view1"][:1])
    opt = optim.build_optimizer(config.optim, 16, 10, net.predictor.trainable_variables)
    net.compile(optimizer=opt)
    before = [v.numpy().copy() for v in net.trainable_variables]
    net.train_on_batch(data)
    return net, before


def test_weight_decay_changes_the_update():
    data = random_views()
    c = default_config()
    c.optim.weight_decay = 0.0
    a, before = _one_step(c, data)
    c.optim.weight_decay = 0.1
    b, _ = _one_step(c, data)
    lr = optim.scaled_lr(c.optim.base_lr, 16)
    # The difference of the two updates is exactly lr * wd * w (first step, empty momentum).
    for va, vb, w0 in zip(a.trainable_variables, b.trainable_variables, before):
        np.testing.assert_allclose(va.numpy() - vb.numpy(), lr * 0.1 * w0, atol=1e-6)
    assert any(np.abs(w0).max() > 0 for w0 in before)


def test_fix_pred_lr_keeps_predictor_at_initial_lr_while_encoder_decays():
    c = default_config()
    c.optim.fix_pred_lr = True
    c.optim.epochs = 1
    net = bn_free_simsiam()
    net(random_views()["view1"][:1])
    opt = optim.build_optimizer(c.optim, 16, 4, net.predictor.trainable_variables)
    opt.build(net.trainable_variables)
    pred_ids = {id(v) for v in net.predictor.trainable_variables}
    fixed = [opt.uses_fixed_lr(v) for v in net.trainable_variables]
    assert fixed == [id(v) in pred_ids for v in net.trainable_variables]
    assert sum(fixed) == len(pred_ids) > 0
    peak = optim.scaled_lr(c.optim.base_lr, 16)
    assert opt.fixed_lr == pytest.approx(peak)
    # Late in the schedule: the encoder's lr has decayed, the predictor's has not, so with the
    # same gradient the predictor moves by peak * g while the encoder moves by schedule(t) * g.
    opt.iterations.assign(3)
    lr_t = float(opt.learning_rate)
    assert lr_t < 0.2 * peak
    grads = [tf.ones_like(v) for v in net.trainable_variables]
    before = [v.numpy().copy() for v in net.trainable_variables]
    opt.apply(grads, net.trainable_variables)
    for v, b, is_fixed in zip(net.trainable_variables, before, fixed):
        g = 1.0 + c.optim.weight_decay * b
        step = peak if is_fixed else lr_t
        np.testing.assert_allclose(b - v.numpy(), step * g, rtol=1e-4)


def _adjust_learning_rate(init_lr, epoch, epochs):
    """main_simsiam.py's adjust_learning_rate, as written there."""
    return init_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


def test_per_epoch_schedule_is_adjust_learning_rate_to_the_bit():
    """lr constant over each epoch's steps, the official float of that epoch rounded once;
    held at the last epoch's value past the end."""
    s = optim.EpochCosine(0.1, epochs=7, steps_per_epoch=3)
    got = s(tf.range(23)).numpy()
    want = [_adjust_learning_rate(0.1, min(t // 3, 6), 7) for t in range(23)]
    np.testing.assert_array_equal(got, np.float32(want))
    assert got[0] == np.float32(0.1) and got[2] == got[0] and got[3] < got[2]
    keras.config.set_floatx("float64")
    try:
        np.testing.assert_array_equal(s(tf.range(23)).numpy(), want)
    finally:
        keras.config.set_floatx("float32")
    # A resumed run rebuilds the schedule from its config: the same value at every step.
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(s))
    np.testing.assert_array_equal(again(tf.range(23)).numpy(), got)


def test_build_optimizer_per_epoch_schedule_and_its_checks():
    c = default_config().optim
    c.lr_schedule, c.epochs, c.fix_pred_lr = "per_epoch", 5, True
    opt = optim.build_optimizer(c, 512, 4)
    assert isinstance(opt._learning_rate, optim.EpochCosine)
    assert opt.fixed_lr == optim.scaled_lr(c.base_lr, 512) == 0.06
    lrs = [float(opt._learning_rate(t)) for t in range(20)]
    assert lrs == [float(np.float32(_adjust_learning_rate(0.06, t // 4, 5))) for t in range(20)]
    c.warmup_epochs = 1.0
    with pytest.raises(ValueError, match="warmup_epochs=1.0 with optim.lr_schedule='per_epoch'"):
        optim.build_optimizer(c, 512, 4)
    c.warmup_epochs, c.lr_schedule = 0.0, "per_day"
    with pytest.raises(ValueError, match="optim.lr_schedule='per_day' is not known"):
        optim.build_optimizer(c, 512, 4)
