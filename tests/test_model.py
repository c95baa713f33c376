import keras
import numpy as np
import pytest
import tensorflow as tf

from simsiam_tf import config, model
from tests.helpers import tiny_config


@pytest.mark.parametrize(
    "name,size,dim", [("resnet18_cifar", 32, 512), ("resnet50", 64, 2048), ("cnn_small", 16, 256)]
)
def test_backbone_output_dims(name, size, dim):
    net = model.build_backbone(name)
    out = net(tf.zeros((2, size, size, 3)))
    assert out.shape == (2, dim)


def test_resnet18_cifar_stem_keeps_resolution_and_has_no_maxpool():
    net = model.build_backbone("resnet18_cifar")
    assert not any(isinstance(layer, keras.layers.MaxPool2D) for layer in net.layers)
    stem = net.get_layer("stem_conv")
    assert stem.kernel_size == (3, 3) and stem.strides == (1, 1)
    resnet18 = model.build_backbone("resnet18")
    assert any(isinstance(layer, keras.layers.MaxPool2D) for layer in resnet18.layers)


def test_zero_init_residual_zeroes_last_bn_gamma_of_every_block():
    net = model.build_backbone("resnet18_cifar", zero_init_residual=True)
    last_bns = [layer for layer in net.layers if layer.name.endswith("_bn2")]
    assert len(last_bns) == 8
    assert all(np.all(layer.gamma.numpy() == 0) for layer in last_bns)
    assert np.all(net.get_layer("stage1_block1_bn1").gamma.numpy() == 1)
    net = model.build_backbone("resnet18_cifar", zero_init_residual=False)
    assert all(
        np.all(layer.gamma.numpy() == 1) for layer in net.layers if layer.name.endswith("_bn2")
    )


def test_projector_structure():
    proj = model.build_projector(512, dim=2048, hidden=2048, num_layers=3)
    dense = [layer for layer in proj.layers if isinstance(layer, keras.layers.Dense)]
    bns = [layer for layer in proj.layers if isinstance(layer, keras.layers.BatchNormalization)]
    relus = [layer for layer in proj.layers if isinstance(layer, keras.layers.ReLU)]
    assert len(dense) == 3 and all(not d.use_bias for d in dense)
    assert len(bns) == 3 and len(relus) == 2  # ReLU on hidden layers only
    assert bns[-1].center is False and bns[-1].scale is False  # output BN without affine
    assert all(b.center and b.scale for b in bns[:-1])
    assert proj.output.shape[-1] == 2048
    assert (
        len(
            [
                layer
                for layer in model.build_projector(512, num_layers=2).layers
                if isinstance(layer, keras.layers.Dense)
            ]
        )
        == 2
    )


def test_predictor_is_a_bottleneck_with_nothing_on_the_output():
    pred = model.build_predictor(2048, 512)
    fc1, fc2 = pred.get_layer("fc1"), pred.get_layer("fc2")
    assert fc1.units == 512 and not fc1.use_bias
    assert fc2.units == 2048 and fc2.use_bias
    assert pred.layers[-1] is fc2  # no BN or ReLU after the output layer
    assert isinstance(pred.get_layer("bn1"), keras.layers.BatchNormalization)


def test_predictor_ablations():
    z = tf.random.normal((4, 32))
    identity = model.build_predictor(32, 8, kind="identity")
    np.testing.assert_array_equal(identity(z).numpy(), z.numpy())
    fixed = model.build_predictor(32, 8, kind="fixed_random")
    assert fixed.trainable_variables == []
    with pytest.raises(ValueError, match="model.predictor"):
        model.build_predictor(32, 8, kind="nope")


def test_sync_bn_switch():
    c = tiny_config(sync_bn=True)
    net = model.build_simsiam(c.model)
    bns = [
        layer
        for sub in (net.backbone, net.projector, net.predictor)
        for layer in sub.layers
        if isinstance(layer, keras.layers.BatchNormalization)
    ]
    assert bns and all(b.synchronized for b in bns)
    net = model.build_simsiam(tiny_config().model)
    assert not any(
        layer.synchronized
        for layer in net.backbone.layers
        if isinstance(layer, keras.layers.BatchNormalization)
    )


def test_unknown_backbone_is_a_clear_error():
    with pytest.raises(ValueError, match="model.backbone='vit'.*resnet50"):
        model.build_backbone("vit")


def test_each_view_is_its_own_forward_pass_with_its_own_bn_statistics():
    """Encoding the views separately (per-view BN) differs from encoding them concatenated."""
    net = model.build_simsiam(tiny_config().model)
    x1 = tf.random.uniform((8, 16, 16, 3), seed=1)
    x2 = tf.random.uniform((8, 16, 16, 3), seed=2) * 0.3
    z1, _, _, _ = net.forward_views(x1, x2, training=True)
    joint = net.projector(net.backbone(tf.concat([x1, x2], 0), training=True), training=True)
    assert not np.allclose(z1.numpy(), joint[:8].numpy(), atol=1e-3)
    separate = net.projector(net.backbone(x1, training=True), training=True)
    np.testing.assert_allclose(z1.numpy(), separate.numpy(), atol=1e-5)


def test_z_monitor_reads_the_output_bn_in_inference_mode():
    """In training mode the affine-free output BN standardises every channel over the batch,
    which pins std(l2norm(z)) near 1/sqrt(d); the monitor uses the moving statistics instead."""
    from simsiam_tf import losses

    net = model.build_simsiam(tiny_config().model)
    x = tf.random.uniform((16, 16, 16, 3), seed=3)
    z_train, z_monitor = net._project(x, training=True)
    bn = net.projector.layers[-1]
    h = net._proj_body(net.backbone(x, training=True), training=True)
    np.testing.assert_allclose(z_monitor.numpy(), bn(h, training=False).numpy(), atol=1e-5)
    d = z_train.shape[-1]
    assert float(losses.channel_std(z_train)) * np.sqrt(d) == pytest.approx(1.0, abs=0.1)
    # Fresh moving statistics (mean 0, var 1) are far from this batch's: the readings differ.
    assert not np.allclose(z_monitor.numpy(), z_train.numpy(), atol=1e-2)


def test_layers_get_distinct_initial_weights_and_the_seed_fixes_them():
    keras.utils.set_random_seed(1)
    net = model.build_backbone("resnet18_cifar")
    a = net.get_layer("stage1_block1_conv1").kernel.numpy()
    b = net.get_layer("stage1_block2_conv1").kernel.numpy()  # same shape, another layer
    assert a.shape == b.shape and not np.allclose(a, b)
    keras.utils.set_random_seed(1)
    again = model.build_backbone("resnet18_cifar")
    np.testing.assert_array_equal(again.get_layer("stage1_block1_conv1").kernel.numpy(), a)


def _torch_out(size: int, kernel: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - kernel) // stride + 1


@pytest.mark.parametrize("size", [224, 225, 64, 33])
def test_resnet_geometry_is_torchvisions(size):
    """Stem 7x7/2 pad 3, max-pool 3x3/2 pad 1, strided 3x3 pad 1 and 1x1 pad 0, as torch."""
    net = model.build_backbone("resnet50")
    stem = keras.Model(net.input, net.get_layer("stem_pool").output)
    out = _torch_out(_torch_out(size, 7, 2, 3), 3, 2, 1)
    assert stem(tf.zeros((1, size, size, 3))).shape == (1, out, out, 64)
    for _ in range(3):  # stages 2-4 downsample
        out3, out1 = _torch_out(out, 3, 2, 1), _torch_out(out, 1, 2, 0)
        assert out3 == out1
        out = out3
    last = keras.Model(net.input, net.get_layer("stage4_block1_conv2").output)
    assert last(tf.zeros((1, size, size, 3))).shape[1:3] == (out, out)


def test_strided_conv_pads_symmetrically():
    """A strided conv sees the same pixels as tf.nn.conv2d with one zero on every side (torch),
    not Keras' "same", which for an even input pads the bottom/right only."""
    net = model.build_backbone("resnet18_cifar")
    conv = net.get_layer("stage2_block1_conv1")
    pad = net.get_layer("stage2_block1_conv1_pad")
    x = tf.random.normal((2, 8, 8, 64), seed=3)
    ours = conv(pad(x))
    torch_like = tf.nn.conv2d(x, conv.kernel, 2, [[0, 0], [1, 1], [1, 1], [0, 0]])
    np.testing.assert_allclose(ours.numpy(), torch_like.numpy(), rtol=1e-5, atol=1e-5)
    keras_same = tf.nn.conv2d(x, conv.kernel, 2, "SAME")
    assert not np.allclose(ours.numpy(), keras_same.numpy(), atol=1e-3)


def test_batchnorm_running_variance_is_unbiased_as_torch():
    bn = model.BatchNorm(momentum=0.9, epsilon=1e-5)
    x = tf.random.normal((4, 3), seed=4) * 2.0 + 1.0
    y = bn(x, training=True)
    mean, var = np.mean(x.numpy(), 0), np.var(x.numpy(), 0)
    np.testing.assert_allclose(bn.moving_mean.numpy(), 0.1 * mean, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(bn.moving_variance.numpy(), 0.9 + 0.1 * var * 4 / 3, rtol=1e-5)
    np.testing.assert_allclose(y.numpy(), (x.numpy() - mean) / np.sqrt(var + 1e-5), atol=1e-4)
    restored = model.BatchNorm.from_config(bn.get_config())
    assert isinstance(restored, model.BatchNorm) and restored.momentum == bn.momentum


def _bn_step(layer, x, dy):
    """(output, d/dx, d/dgamma, d/dbeta) of a training-mode BN layer for the loss sum(y * dy)."""
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True)
        loss = tf.reduce_sum(y * tf.constant(dy))
    return [t.numpy() for t in (y, *tape.gradient(loss, [x, layer.gamma, layer.beta]))]


def _textbook_bn(dtype, gamma):
    """The formula, differentiated by autodiff: (x - mean) / sqrt(var + eps) * gamma + beta."""
    g = tf.Variable(gamma.astype(dtype))
    b = tf.Variable(np.full_like(gamma, 0.25).astype(dtype))

    class Layer:
        gamma, beta = g, b

        def __call__(self, x, training):
            mean, var = tf.nn.moments(x, [0, 1, 2])
            return (x - mean) / tf.sqrt(var + 1e-5) * g + b

    return Layer()


def _bn(dtype, gamma, sum_dtype="auto", shape=(8, 8), kernels="tf"):
    """A built model.BatchNorm for inputs N x *shape x len(gamma), gamma set, beta 0.25; the
    stock-op step unless `kernels` says otherwise (tests/test_native.py: the native one)."""
    bn = model.BatchNorm(
        momentum=0.9, epsilon=1e-5, dtype=dtype, sum_dtype=sum_dtype, kernels=kernels
    )
    bn.build((None, *shape, len(gamma)))
    bn.gamma.assign(gamma.astype(dtype))
    bn.beta.assign(np.full_like(gamma, 0.25).astype(dtype))
    return bn


def _relative(got, exact):
    return {
        name: float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
        for name, a, b in zip(("y", "dx", "dgamma", "dbeta"), got, exact)
    }


@pytest.mark.parametrize(
    "sum_dtype,kernels,dbeta_bound",
    [("auto", "tf", 5e-8), ("auto", "auto", 5e-8), ("float32", "tf", 2e-7)],
)
@pytest.mark.parametrize("zero_gamma", [True, False])
def test_batchnorm_step_is_the_formula_and_as_accurate_in_float32_as_torch(
    zero_gamma, sum_dtype, kernels, dbeta_bound
):
    """BatchNorm's own gradient is the formula's (float64, to 1e-12), and its float32 step is as
    close to float64 as torch's float32 BatchNorm: conv activations whose mean is 60x their
    spread, 32 x 8 x 8 values per channel. Keras' BN step gave dgamma 6.4e-5 and dbeta 4.8e-7
    from float64 here, the formula by autodiff 1.2e-5 and 4.8e-7; torch's float32 3e-6 and
    4e-8. Ours: 2.2e-6, and dbeta 2.6e-8 with float64 sums ("auto", stock ops or, where
    built, the native kernels: dx 7.0e-8 there, 8.2e-8 with stock ops), 9.7e-8 with float32."""
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 0.05, (32, 8, 8, 16)) + rng.normal(0.0, 1.0, (1, 1, 1, 16))
    dy = rng.normal(0.0, 1.0, x.shape)
    gamma = np.zeros(16) if zero_gamma else rng.uniform(0.5, 1.5, 16)
    exact = _bn_step(_textbook_bn("float64", gamma), x, dy)
    ours64 = _bn_step(_bn("float64", gamma, sum_dtype, kernels=kernels), x, dy)
    for name, a, b in zip(("y", "dx", "dgamma", "dbeta"), ours64, exact):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12, err_msg=name)
    x32, dy32 = x.astype(np.float32), dy.astype(np.float32)
    got = _bn_step(_bn("float32", gamma, sum_dtype, kernels=kernels), x32, dy32)
    err = _relative(got, exact)
    assert got[2].dtype == np.float32 and err["dgamma"] < 4e-6 and err["dbeta"] < dbeta_bound, err
    if not zero_gamma:
        assert err["dx"] < 2e-7 and err["y"] < 3e-6, err
    keras_bn = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5)
    keras_bn.build((None, 8, 8, 16))
    keras_bn.gamma.assign(gamma.astype(np.float32))
    keras_bn.beta.assign(np.full(16, 0.25, np.float32))
    keras_err = _relative(_bn_step(keras_bn, x32, dy32), exact)
    assert keras_err["dgamma"] > 10 * err["dgamma"], (keras_err, err)


def test_batchnorm_at_imagenet_batch_size_keeps_its_digits():
    """256 x 56 x 56 values per channel (ResNet-50's first stage at batch 256), float32 sums:
    dgamma 1.6e-6 from float64, the output 3.5e-7 and dx 1.2e-7, where Keras' own BN step is
    1.0e-3, 1.6e-4 and 1.5e-4 off."""
    rng = np.random.default_rng(1)
    x = rng.normal(1.0, 0.05, (256, 56, 56, 2)) + rng.normal(0.0, 1.0, (1, 1, 1, 2))
    dy = rng.normal(0.0, 1.0, x.shape)
    gamma = rng.uniform(0.5, 1.5, 2)
    exact = _bn_step(_textbook_bn("float64", gamma), x, dy)
    x32, dy32 = x.astype(np.float32), dy.astype(np.float32)
    err = _relative(_bn_step(_bn("float32", gamma, "float32"), x32, dy32), exact)
    assert err["dgamma"] < 2e-6 and err["y"] < 2e-6 and err["dx"] < 2e-7, err
    keras_bn = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5)
    keras_bn.build(x.shape)
    keras_bn.gamma.assign(gamma.astype(np.float32))
    keras_bn.beta.assign(np.full(2, 0.25, np.float32))
    keras_err = _relative(_bn_step(keras_bn, x32, dy32), exact)
    assert keras_err["y"] > 100 * err["y"], (keras_err, err)


def test_batchnorm_fused_is_the_same_step_with_the_fused_kernels_digits():
    """bn_sums="fused" runs TensorFlow's fused kernel (FusedBatchNormV3 and its gradient): the
    same step and the same moving statistics as the two-pass float32 step, to float32 rounding
    on well-centred data; on conv activations whose mean is 60x their spread it keeps fewer
    digits (measured: dgamma 2.9e-5 from float64, against 2.2e-6 for float32 sums and 6.4e-5
    for Keras' BN); 2-D head inputs go through it as N x 1 x 1 x C, and a 3-D input, which it
    does not take, gets the float32 step."""
    rng = np.random.default_rng(2)
    gamma = rng.uniform(0.5, 1.5, 16)
    for shape in ((32, 8, 8, 16), (64, 16)):
        x = rng.normal(0.0, 1.0, shape).astype(np.float32)
        dy = rng.normal(0.0, 1.0, shape).astype(np.float32)
        layers = {}
        for sum_dtype in ("float32", "fused"):
            bn = _bn("float32", gamma, sum_dtype, shape=shape[1:-1])
            layers[sum_dtype] = (bn, _bn_step(bn, x, dy))
        (two_pass, want), (fused, got) = layers["float32"], layers["fused"]
        for name, a, b in zip(("y", "dx", "dgamma", "dbeta"), got, want):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4, err_msg=f"{shape} {name}")
        for a, b in (
            (fused.moving_mean, two_pass.moving_mean),
            (fused.moving_variance, two_pass.moving_variance),
        ):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)
        assert not np.allclose(fused.moving_variance.numpy(), 1.0)  # it was updated
    x = rng.normal(3.0, 0.05, (32, 8, 8, 16)) + rng.normal(0.0, 1.0, (1, 1, 1, 16))
    dy = rng.normal(0.0, 1.0, x.shape)
    exact = _bn_step(_textbook_bn("float64", gamma), x, dy)
    x32, dy32 = x.astype(np.float32), dy.astype(np.float32)
    fused = _relative(_bn_step(_bn("float32", gamma, "fused"), x32, dy32), exact)
    two_pass = _relative(_bn_step(_bn("float32", gamma, "float32"), x32, dy32), exact)
    assert 2.0 * two_pass["dgamma"] < fused["dgamma"] < 1e-4, (fused, two_pass)
    assert fused["dx"] < 2e-6 and fused["y"] < 1e-4, fused
    assert model.BatchNorm(sum_dtype="fused").accumulation_dtype() == tf.float32
    # A 3-D input has no fused kernel: it takes the float32 step, to the bit.
    x3 = rng.normal(2.0, 1.0, (8, 5, 16)).astype(np.float32)
    steps = [
        _bn_step(_bn("float32", gamma, d, shape=(5,)), x3, x3[::-1]) for d in ("float32", "fused")
    ]
    for a, b in zip(*steps):
        np.testing.assert_array_equal(a, b)


def test_batchnorm_sum_dtype_choices():
    """auto: float64 sums for a float32 layer, float32 under mixed precision; a config's
    model.bn_sums reaches every BatchNorm of the built SimSiam; a bad value is named."""
    assert model.BatchNorm().accumulation_dtype() == tf.float64
    assert model.BatchNorm(dtype="mixed_bfloat16").accumulation_dtype() == tf.float32
    assert model.BatchNorm(sum_dtype="float32").accumulation_dtype() == tf.float32
    with pytest.raises(ValueError, match="sum_dtype='float16'"):
        model.BatchNorm(sum_dtype="float16")
    c = tiny_config()
    c.model.bn_sums = "float32"
    net = model.build_simsiam(c.model)
    bns = [x for x in net._flatten_layers() if isinstance(x, model.BatchNorm)]
    assert bns and all(b.sum_dtype == "float32" for b in bns)
    assert model.BatchNorm.from_config(bns[0].get_config()).sum_dtype == "float32"
    c.model.bn_sums = "float16"
    with pytest.raises(config.ConfigError, match="model.bn_sums='float16'"):
        config.validate(c)


def test_batchnorm_sums_one_axis_at_a_time():
    """_batch_sum adds a [256, 56, 56] batch of values near 1 (float32) to within 1e-6 of the
    exact sum; a flat float32 sum over the 800k values is 10x further off."""
    x = np.random.default_rng(1).normal(1.0, 0.5, (256, 56, 56, 2)).astype(np.float32)
    exact = x.astype(np.float64).sum((0, 1, 2))
    ours = model._batch_sum(tf.constant(x), [0, 1, 2]).numpy().reshape(-1)
    np.testing.assert_allclose(ours, exact, rtol=1e-6)
    assert ours.shape == (2,)
