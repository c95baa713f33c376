"""The native per-image kernels (simsiam_tf/native.py) compute what the stock-op kernels do."""

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
