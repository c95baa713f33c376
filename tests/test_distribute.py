"""Multi-replica training on 2 logical CPU devices (conftest splits the CPU)."""

import numpy as np
import pytest
import tensorflow as tf

from simsiam_tf import config as config_lib
from simsiam_tf import distribute, optim
from simsiam_tf.config import default_config
from tests.helpers import bn_free_simsiam, random_views, run_python


def _train_one_step(strategy, data, steps=2):
    c = default_config()
    c.optim.weight_decay = 1e-2
    c.optim.fix_pred_lr = True
    c.optim.epochs = 1
    with strategy.scope():
        net = bn_free_simsiam(seed=3)
        net(data["view1"][:1])
        opt = optim.build_optimizer(c.optim, 32, 10, net.predictor.trainable_variables)
        net.compile(optimizer=opt)
    ds = tf.data.Dataset.from_tensors(data).repeat(steps)
    history = net.fit(ds, epochs=1, steps_per_epoch=steps, verbose=0)
    return [v.numpy() for v in net.trainable_variables], history.history["loss"][-1]


def test_two_replicas_make_the_same_update_as_one_on_the_global_batch(two_replicas):
    data = random_views(n=32)
    two = two_replicas
    assert two.num_replicas_in_sync == 2
    w2, loss2 = _train_one_step(two, data)
    w1, loss1 = _train_one_step(tf.distribute.get_strategy(), data)
    for a, b in zip(w1, w2):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert loss1 == pytest.approx(loss2, abs=1e-5)
    # And the step did move the weights (the comparison is not of two no-ops).
    w0, _ = _train_one_step(tf.distribute.get_strategy(), data, steps=1)
    assert max(np.abs(a - b).max() for a, b in zip(w0, w1)) > 1e-4


def test_make_strategy_uses_logical_cpu_devices():
    strategy = distribute.make_strategy(cpu_devices=2)
    assert strategy.num_replicas_in_sync == 2
    assert distribute.make_strategy(cpu_devices=0).num_replicas_in_sync == 1


def test_global_batch_must_divide_over_replicas():
    c = default_config()
    c.optim.batch_size = 15
    with pytest.raises(ValueError, match=r"optim.batch_size=15.*2 replicas"):
        config_lib.validate(c, num_replicas=2)
    c.optim.batch_size = 16
    config_lib.validate(c, num_replicas=2)


def test_knn_features_under_two_replicas_have_one_row_per_image(two_replicas):
    """Keras 3's predict_on_batch returns a copy per replica under MirroredStrategy; the kNN
    features must still be one row per image, equal to the single-device features."""
    import keras

    from simsiam_tf import knn

    with two_replicas.scope():
        keras.utils.set_random_seed(0)
        mirrored = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    plain = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    plain.set_weights(mirrored.get_weights())
    images = np.random.default_rng(0).normal(size=(10, 4)).astype(np.float32)
    ds = tf.data.Dataset.from_tensor_slices((images, np.arange(10))).batch(4)
    feats, labels = knn.extract_features(mirrored, ds)
    ref, _ = knn.extract_features(plain, ds)
    assert feats.shape == (10, 3) and list(labels) == list(range(10))
    np.testing.assert_allclose(feats, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.slow  # 18 s, two processes: make test-slow
def test_intra_op_threads_auto_is_one_beside_an_accelerator_and_the_default_without():
    """data.intra_op_threads: -1 gives 1 with a TPU (or GPUs) and leaves TensorFlow's default
    on the CPU alone; N is applied before the runtime starts; below -1 is a config error. In
    fresh processes: the pool can only be set before TensorFlow starts."""
    code = (
        "import sys, tensorflow as tf\n"
        "from simsiam_tf import distribute\n"
        "args = eval(sys.argv[1])\n"
        "print(distribute.set_intra_op_threads(*args),"
        " tf.config.threading.get_intra_op_parallelism_threads())\n"
    )
    seen = {}
    for args in ((-1,), (-1, "grpc://10.0.0.1:8470"), (3,)):
        proc = run_python("-c", code, repr(args))
        assert proc.returncode == 0, proc.stderr[-2000:]
        seen[args] = proc.stdout.split()[-2:]
    assert seen[(-1,)] == ["0", "0"]  # no GPU here: TensorFlow's default pool
    assert seen[(-1, "grpc://10.0.0.1:8470")] == ["1", "1"]
    assert seen[(3,)] == ["3", "3"]
    with pytest.raises(config_lib.ConfigError, match="data.intra_op_threads=-2"):
        distribute.set_intra_op_threads(-2)
