"""The native kernels (simsiam_tf/native.py): the per-image pipeline kernels and BatchNorm's
training step compute what the stock-op paths do."""

import itertools
import os

import numpy as np
import pytest
import tensorflow as tf

from simsiam_tf import augment, native
from simsiam_tf.config import default_config, validate
from simsiam_tf.errors import ConfigError

SEED = tf.constant([3, 4], tf.int64)


@pytest.fixture(scope="module")
def ops():
    """The built library: `make install` builds it; a machine without g++ skips these tests."""
    if native.library_path() is None and native.compiler() is None:
        pytest.skip(
            "no C++ compiler to build the native kernels (aug.kernels='auto' runs stock ops)"
        )
    native.build()
    return native.ops("native")


def _stock_crop(image, window, size, gain):
    view = augment.resize_crop(image, tuple(tf.constant(v) for v in window), False, size, gain)
    return tf.transpose(view, (1, 0, 2)).numpy()


def test_resize_crop_equals_the_stock_kernel_and_antialiased_resize(ops):
    rng = np.random.default_rng(0)
    image = tf.constant(rng.integers(0, 256, (300, 260, 3)).astype(np.uint8))
    windows = [
        (0, 0, 300, 260),  # shrunk: 1.3x
        (10, 20, 250, 200),
        (5, 7, 30, 40),  # enlarged 7x
        (120, 100, 1, 1),  # one pixel
        (0, 0, 224, 224),  # identity
        (3, 1, 100, 259),  # very wide
        (0, 0, 300, 13),  # very tall
    ]
    for window, size in itertools.product(windows, (224, 33)):
        got = ops.simsiam_resize_crop(image, window, size=size, gain=1 / 255).numpy()
        assert got.shape == (size, size, 3) and got.dtype == np.float32
        np.testing.assert_allclose(got, _stock_crop(image, window, size, 1 / 255), atol=1e-6)
        y, x, h, w = window
        crop = tf.cast(image[y : y + h, x : x + w], tf.float32)
        want = tf.image.resize(crop, (size, size), "bilinear", antialias=True).numpy() / 255
        np.testing.assert_allclose(got, want, atol=1e-4)  # its own tap arithmetic: 0.03 levels


def test_resize_crop_rejects_a_window_outside_the_image(ops):
    image = tf.zeros((40, 30, 3), tf.uint8)
    for window in ((0, 0, 41, 30), (-1, 0, 10, 10), (0, 25, 10, 10), (0, 0, 0, 5)):
        with pytest.raises(tf.errors.InvalidArgumentError, match=r"is not inside the 40x30 image"):
            ops.simsiam_resize_crop(image, window, size=8)
    with pytest.raises(tf.errors.InvalidArgumentError, match="HxWx3"):
        ops.simsiam_resize_crop(tf.zeros((40, 30, 4), tf.uint8), (0, 0, 4, 4), size=8)


def _test_pixels(rng):
    image = rng.uniform(0, 1, (37, 29, 3)).astype(np.float32)
    image[0] = image[0, :, :1]  # grey: hue undefined, must stay grey
    image[1, :, 1] = image[1, :, 0]  # ties between the largest channels
    image[2] = [1.0, 0.0, 0.0]  # pure red: shifts wrap below hue 0
    image[3] = [0.0, 0.0, 1.0]
    image[4] = 1.0  # white, clipped by brightness > 1
    image[5] = 0.0
    return image


@pytest.mark.parametrize("hue", [True, False])
def test_color_jitter_equals_the_stock_kernel_in_every_order(ops, hue):
    rng = np.random.default_rng(1)
    image = _test_pixels(rng)
    planar = tf.transpose(tf.constant(image), (2, 0, 1))
    worst = 0.0
    for order in itertools.permutations(range(4)):
        b, c, s = rng.uniform(0.6, 1.4, 3)
        delta = rng.choice([-0.5, -0.1, 0.0, 0.03, 0.1])
        factors = np.array([b, c, s, delta], np.float32)
        params = dict(zip(("brightness", "contrast", "saturation", "hue"), factors))
        params["order"] = tf.constant(order, tf.int32)
        want = tf.transpose(augment._jitter_planar(planar, params, hue), (1, 2, 0)).numpy()
        got = ops.simsiam_color_jitter(image, order, factors, hue=hue).numpy()
        worst = max(worst, float(np.abs(got - want).max()))
        assert got.min() >= 0.0 and got.max() <= 1.0
    # The same float32 arithmetic op for op; only the mean gray is summed in another order.
    assert worst < 2e-6


def test_color_jitter_rejects_an_order_that_is_not_a_permutation(ops):
    image = tf.zeros((4, 4, 3))
    with pytest.raises(tf.errors.InvalidArgumentError, match="permutation of 0-3"):
        ops.simsiam_color_jitter(image, [0, 1, 1, 3], [1.0, 1.0, 1.0, 0.0])


def test_recipe_views_are_the_same_with_native_and_stock_kernels(ops):
    cfg = default_config().aug
    cfg.blur_prob = 0.5
    image = tf.cast(tf.random.uniform((150, 110, 3), maxval=256, seed=5), tf.uint8)
    views = {}
    for kernels in ("native", "tf"):
        cfg.kernels = kernels
        recipe = augment.TwoViewRecipe(cfg, 64)
        view = lambda i, recipe=recipe: recipe.cpu_stage(image, augment.fold_seed(SEED, i))
        views[kernels] = np.stack(list(tf.data.Dataset.range(16).map(view).as_numpy_iterator()))
    diff = np.abs(views["native"].astype(np.int32) - views["tf"].astype(np.int32))
    assert views["native"].shape == (16, 64, 64, 3)
    # uint8 views from float values that agree to 1e-6: a level apart where a value sits on .5.
    assert diff.max() <= 1 and np.mean(diff == 0) > 0.999
    assert np.std(views["native"].astype(np.float32)) > 10  # real views, not a constant


def test_layers_take_the_native_kernel_through_keras_cv(ops, monkeypatch):
    calls = []
    real = native.ops

    def counting(kernels="auto"):
        lib = real(kernels)
        calls.append(lib is not None)
        return lib

    monkeypatch.setattr(native, "ops", counting)
    image = tf.cast(tf.random.uniform((50, 40, 3), maxval=256, seed=6), tf.uint8)
    crop = augment.RandomResizedCrop(24, rescale=1 / 255, kernels="native")
    jitter = augment.ColorJitter(prob=1.0, kernels="native")
    calls.clear()  # the constructors check that the library is there
    view = jitter({"images": crop({"images": image, "seed": SEED})["images"], "seed": SEED})
    assert view["images"].shape == (24, 24, 3) and calls == [True, True]
    stock = augment.ColorJitter(prob=1.0, kernels="tf")
    calls.clear()
    stock({"images": view["images"], "seed": SEED})
    assert calls == [False]
    config = crop.get_config()
    assert config["kernels"] == "native"
    assert augment.RandomResizedCrop.from_config(config).kernels == "native"


def test_not_built_native_is_a_config_error_and_auto_falls_back(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_places", lambda: [str(tmp_path)])
    assert native.library_path() is None
    with pytest.raises(ConfigError, match=r"aug.kernels='native'.*python -m simsiam_tf.native"):
        augment.ColorJitter(kernels="native")
    c = default_config()
    c.aug.kernels = "native"
    with pytest.raises(ConfigError, match="not built"):
        validate(c)
    assert native.ops("auto") is None and native.ops("tf") is None
    c.aug.kernels = "fast"
    with pytest.raises(ConfigError, match=r"aug.kernels='fast'.*auto"):
        validate(c)


def test_a_library_older_than_its_source_is_not_loaded(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_places", lambda: [str(tmp_path)])
    stale = tmp_path / native._library_name()
    stale.write_bytes(b"")
    old = os.path.getmtime(native.SOURCE) - 60
    os.utime(stale, (old, old))
    assert native.library_path() is None
    os.utime(stale, None)
    assert native.library_path() == str(stale)
    assert tf.__version__ in native._library_name()  # an upgrade of TensorFlow asks for a build


def _bn_step(kernels, x, dy, gamma, affine=True):
    """One training step of a model.BatchNorm of x's dtype: (y, dx, dgamma, dbeta) and the
    moving (mean, variance)."""
    from simsiam_tf import model

    bn = model.BatchNorm(
        momentum=0.9,
        epsilon=1e-5,
        kernels=kernels,
        center=affine,
        scale=affine,
        dtype=x.dtype.name,
    )
    bn.build(x.shape)
    if affine:
        bn.gamma.assign(gamma.astype(x.dtype))
        bn.beta.assign(np.full(gamma.shape, 0.25, x.dtype))
    x, dy = tf.constant(x), tf.constant(dy)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = bn(x, training=True)
        loss = tf.reduce_sum(y * dy)
    params = [bn.gamma, bn.beta] if affine else []
    grads = tape.gradient(loss, [x, *params])
    out = [y.numpy(), *(g.numpy() for g in grads)]
    return out, (bn.moving_mean.numpy(), bn.moving_variance.numpy())


@pytest.mark.parametrize(
    "shape", [(32, 8, 8, 16), (4, 3, 5, 7, 6), (64, 2048), (3, 5), (1, 1, 1, 3)]
)
def test_batchnorm_native_step_is_the_stock_step(ops, shape):
    """The native BN step (kernels/batchnorm_ops.cc) against the stock-op step, both with
    float64 sums: output, dx, dgamma, dbeta and the moving statistics agree to float32
    rounding, for conv, 3-D, head and tiny batches; the mean is 60x the spread here."""
    rng = np.random.default_rng(sum(shape))
    channels = shape[-1]
    x = (rng.normal(3.0, 0.05, shape) + rng.normal(0.0, 1.0, channels)).astype(np.float32)
    dy = rng.normal(0.0, 1.0, shape).astype(np.float32)
    gamma = rng.uniform(0.5, 1.5, channels).astype(np.float32)
    (got, got_moving), (want, want_moving) = (_bn_step(k, x, dy, gamma) for k in ("native", "tf"))
    for name, a, b in zip(("y", "dx", "dgamma", "dbeta"), got, want):
        scale = np.abs(b).max()
        np.testing.assert_allclose(a, b, rtol=0, atol=4e-6 * scale + 1e-30, err_msg=name)
    for a, b in zip(got_moving, want_moving):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    if shape[0] > 1:
        assert not np.allclose(got_moving[1], 1.0)  # the unbiased variance went in


def test_batchnorm_native_is_what_runs_and_is_closer_to_float64(ops, monkeypatch):
    """kernels="native"/"auto" run the native op (the stock path is not called) and keep at
    least the stock path's digits against the float64 formula; affine=False has no parameters."""
    from simsiam_tf import model

    rng = np.random.default_rng(5)
    x64 = rng.normal(3.0, 0.05, (32, 8, 8, 16)) + rng.normal(0.0, 1.0, 16)
    dy64 = rng.normal(0.0, 1.0, x64.shape)
    gamma = rng.uniform(0.5, 1.5, 16)
    exact, _ = _bn_step("tf", x64, dy64, gamma)  # float64 layer: the formula to 1e-12
    x, dy = x64.astype(np.float32), dy64.astype(np.float32)
    stock, _ = _bn_step("tf", x, dy, gamma)

    def refuse(*args, **kwargs):
        raise AssertionError("the stock-op step ran")

    monkeypatch.setattr(model, "_normalize", refuse)
    # "auto" takes the native kernels where no GPU is visible (there, the stock ops)
    for kernels in ("native",) + (() if tf.config.list_logical_devices("GPU") else ("auto",)):
        got, _ = _bn_step(kernels, x, dy, gamma)
        for name, a, s, e in zip(("y", "dx", "dgamma", "dbeta"), got, stock, exact):
            err, stock_err = (np.linalg.norm(v - e) / np.linalg.norm(e) for v in (a, s))
            assert err <= 1.05 * stock_err + 1e-9, (name, err, stock_err)
    (y, dx), _ = _bn_step("native", x, dy, None, affine=False)
    mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
    np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-5), atol=2e-4)
    assert dx.shape == x.shape


def test_batchnorm_native_rejects_bad_shapes_and_names_the_setting(ops, monkeypatch, tmp_path):
    from simsiam_tf import model

    with pytest.raises(tf.errors.InvalidArgumentError, match="gamma and beta must have 4"):
        ops.simsiam_batch_norm_train(tf.ones((2, 4)), tf.ones(3), tf.ones(4), epsilon=1e-5)
    with pytest.raises(tf.errors.InvalidArgumentError, match="empty batch"):
        ops.simsiam_batch_norm_train(tf.ones((0, 4)), tf.ones(4), tf.ones(4), epsilon=1e-5)
    with pytest.raises(ValueError, match="kernels='fast'"):
        model.BatchNorm(kernels="fast")
    layer = model.BatchNorm(kernels="native")
    assert model.BatchNorm.from_config(layer.get_config()).kernels == "native"
    c = default_config()
    c.model.bn_kernels = "fast"
    with pytest.raises(ConfigError, match=r"model.bn_kernels='fast'.*auto"):
        validate(c)
    monkeypatch.setattr(native, "_places", lambda: [str(tmp_path)])
    c.model.bn_kernels = "native"
    with pytest.raises(ConfigError, match=r"model.bn_kernels='native'.*not built"):
        validate(c)
    c.model.bn_kernels = "tf"
    net = model.build_simsiam(c.model)
    bns = [b for b in net._flatten_layers() if isinstance(b, model.BatchNorm)]
    assert bns and all(b.kernels == "tf" for b in bns)


def test_batchnorm_native_at_imagenet_batch_size_keeps_its_digits(ops):
    """256 x 56 x 56 values per channel (ResNet-50's first stage at batch 256): the native step
    is as close to float64 as the stock float64-sum step (measured: y 3.35e-7, dx 4.5e-8,
    dgamma 1.24e-6 native; 3.38e-7, 5.9e-8, 1.27e-6 with stock ops)."""
    rng = np.random.default_rng(1)
    x64 = rng.normal(1.0, 0.05, (256, 56, 56, 2)) + rng.normal(0.0, 1.0, 2)
    dy64 = rng.normal(0.0, 1.0, x64.shape)
    gamma = rng.uniform(0.5, 1.5, 2)
    exact, _ = _bn_step("tf", x64, dy64, gamma)
    got, _ = _bn_step("native", x64.astype(np.float32), dy64.astype(np.float32), gamma)
    err = {
        name: np.linalg.norm(a - e) / np.linalg.norm(e)
        for name, a, e in zip(("y", "dx", "dgamma", "dbeta"), got, exact)
    }
    assert err["dgamma"] < 2e-6 and err["y"] < 1e-6 and err["dx"] < 2e-7, err


def test_batchnorm_under_xla_takes_the_stock_step(ops):
    """XLA compiles no custom op: a jit-compiled step of a kernels="native" layer runs the
    stock ops, and gives what they give eagerly."""
    from simsiam_tf import model

    x = tf.constant(np.random.default_rng(3).normal(2.0, 1.0, (8, 4, 4, 6)).astype(np.float32))
    outputs = {}
    for kernels, jit in (("native", True), ("tf", False)):
        bn = model.BatchNorm(kernels=kernels)
        bn.build(x.shape)
        outputs[kernels] = tf.function(lambda t, bn=bn: bn(t, training=True), jit_compile=jit)(x)
    np.testing.assert_allclose(outputs["native"], outputs["tf"], rtol=1e-5, atol=1e-5)
