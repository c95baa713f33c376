"""The augmentations keep torchvision's distributions and semantics (the official recipe)."""

import collections
import colorsys
import functools
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from simsiam_tf import augment
from simsiam_tf.config import default_config, validate
from simsiam_tf.errors import ConfigError

SEED = tf.constant([1, 2], tf.int64)


def _aug(**overrides):
    c = default_config().aug
    c.blur_prob = 0.5
    for k, v in overrides.items():
        c[k] = v
    return c


def _photometric(cfg):
    """The recipe's colour layers for the aug config `cfg`."""
    return (
        augment.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue, cfg.jitter_prob),
        augment.RandomGrayscale(cfg.grayscale_prob),
        augment.GaussianBlur(cfg.blur_prob, cfg.blur_sigma),
    )


def _sample_photometric(seed, n, cfg):
    """Every colour parameter of n images, one dict."""
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 3)
    params = {}
    for s, layer in zip(seeds, _photometric(cfg)):
        params.update(layer.sample(s, n))
    return params


def _torchvision_crop_params(rng, height, width, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision.transforms.RandomResizedCrop.get_params, transcribed."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect_ratio = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = rng.integers(0, height - h + 1)
            j = rng.integers(0, width - w + 1)
            return i, j, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@pytest.mark.parametrize("height,width", [(300, 400), (500, 120), (32, 32)])
def test_crop_windows_match_torchvision_distribution(height, width):
    n = 20000
    y, x, h, w = (t.numpy() for t in augment.sample_crop_windows(SEED, height, width, n))
    assert (y >= 0).all() and (x >= 0).all()
    assert (y + h <= height).all() and (x + w <= width).all()
    assert (h > 0).all() and (w > 0).all()
    rng = np.random.default_rng(0)
    ref = np.array([_torchvision_crop_params(rng, height, width) for _ in range(n)])
    ours_area = h * w / (height * width)
    ref_area = ref[:, 2] * ref[:, 3] / (height * width)
    ours_ratio = np.log(w / h)
    ref_ratio = np.log(ref[:, 3] / ref[:, 2])
    # Same distributions: the CDFs agree within sampling noise (areas are discrete on small
    # images, so CDF values, not quantiles, are compared).
    for t in (0.3, 0.45, 0.6, 0.75, 0.9):
        assert np.mean(ours_area <= t) == pytest.approx(np.mean(ref_area <= t), abs=0.02)
    for t in (-0.2, -0.1, 0.0, 0.1, 0.2):
        assert np.mean(ours_ratio <= t) == pytest.approx(np.mean(ref_ratio <= t), abs=0.02)
    centre_y = (y + h / 2) / height
    ref_centre_y = (ref[:, 0] + ref[:, 2] / 2) / height
    assert np.std(centre_y) == pytest.approx(np.std(ref_centre_y), abs=0.01)


def test_crop_fallback_is_centre_crop_with_clamped_ratio():
    # A 10x1000 strip: no window of ratio in [3/4, 4/3] with area >= 20% fits, so all fall back.
    y, x, h, w = (t.numpy() for t in augment.sample_crop_windows(SEED, 10, 1000, 50))
    assert (h == 10).all() and (w == round(10 * 4 / 3)).all()
    assert (x == (1000 - w) // 2).all() and (y == 0).all()


def test_photometric_parameter_distributions():
    cfg = _aug()
    n = 40000
    p = {k: v.numpy() for k, v in _sample_photometric(SEED, n, cfg).items()}
    assert p["jitter"].mean() == pytest.approx(0.8, abs=0.01)
    assert p["grayscale"].mean() == pytest.approx(0.2, abs=0.01)
    assert p["blur"].mean() == pytest.approx(0.5, abs=0.01)
    for key, lo, hi in (
        ("brightness", 0.6, 1.4),
        ("contrast", 0.6, 1.4),
        ("saturation", 0.6, 1.4),
        ("hue", -0.1, 0.1),
        ("sigma", 0.1, 2.0),
    ):
        v = p[key]
        assert v.min() >= lo and v.max() <= hi
        # Uniform: quartiles at 1/4 and 3/4 of the range.
        assert np.quantile(v, 0.25) == pytest.approx(lo + 0.25 * (hi - lo), abs=0.02 * (hi - lo))
        assert np.quantile(v, 0.75) == pytest.approx(lo + 0.75 * (hi - lo), abs=0.02 * (hi - lo))
    # The order is a uniformly random permutation per image.
    order = p["order"]
    assert (np.sort(order, axis=1) == np.arange(4)).all()
    for pos in range(4):
        counts = np.bincount(order[:, pos], minlength=4) / n
        np.testing.assert_allclose(counts, 0.25, atol=0.01)
    # Per image, not per batch: every image gets its own factors.
    assert len(np.unique(p["brightness"][:1000])) == 1000
    assert len(np.unique(p["sigma"][:1000])) == 1000


def _np_gray(img):
    return img @ np.array([0.299, 0.587, 0.114], np.float32)


def _np_jitter(img, order, b, c, s, h):
    """torchvision ColorJitter.forward on a float image in [0, 1], transcribed."""
    for op in order:
        if op == 0:
            img = np.clip(img * b, 0, 1)
        elif op == 1:
            m = _np_gray(img).mean()
            img = np.clip(c * img + (1 - c) * m, 0, 1)
        elif op == 2:
            g = _np_gray(img)[..., None]
            img = np.clip(s * img + (1 - s) * g, 0, 1)
        else:
            flat = img.reshape(-1, 3)
            out = []
            for r, g_, bl in flat:
                hh, ss, vv = colorsys.rgb_to_hsv(r, g_, bl)
                out.append(colorsys.hsv_to_rgb((hh + h) % 1.0, ss, vv))
            img = np.asarray(out, np.float32).reshape(img.shape)
    return img


def test_color_jitter_matches_torchvision_semantics_per_image():
    cfg = _aug()
    n = 12
    rng = np.random.default_rng(3)
    images = rng.uniform(0, 1, (n, 6, 5, 3)).astype(np.float32)
    params = augment.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue).sample(
        tf.constant([5, 6], tf.int64), n
    )
    params["jitter"] = tf.constant([True] * (n - 2) + [False] * 2)
    out = augment.color_jitter(tf.constant(images), params).numpy()
    p = {k: v.numpy() for k, v in params.items()}
    for i in range(n):
        if not p["jitter"][i]:
            np.testing.assert_allclose(out[i], images[i], atol=1e-6)
            continue
        want = _np_jitter(
            images[i],
            p["order"][i],
            p["brightness"][i],
            p["contrast"][i],
            p["saturation"][i],
            p["hue"][i],
        )
        np.testing.assert_allclose(out[i], want, atol=2e-4)


def test_grayscale_uses_itu_601_luma_and_gives_equal_channels():
    images = tf.random.uniform((4, 8, 8, 3), seed=1)
    layer = augment.RandomGrayscale(1.0)
    want = _np_gray(images.numpy())
    # The batched kernel (a batch) and the per-image kernel (one image), through keras-cv's call.
    batched = layer({"images": images, "seed": SEED})["images"].numpy()
    single = np.stack([layer({"images": x, "seed": SEED})["images"].numpy() for x in images])
    for out in (batched, single):
        for ch in range(3):
            np.testing.assert_allclose(out[..., ch], want, atol=1e-6)


def test_gaussian_blur_matches_scipy_and_each_image_gets_its_own_sigma():
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(4)
    images = rng.uniform(0, 1, (3, 20, 17, 3)).astype(np.float32)
    sigma = np.array([0.5, 1.0, 2.0], np.float32)
    out = augment.gaussian_blur(tf.constant(images), tf.constant(sigma), radius=6).numpy()
    for i, s in enumerate(sigma):
        want = np.stack(
            [
                ndimage.gaussian_filter(images[i, ..., c], s, mode="mirror", truncate=6 / s)
                for c in range(3)
            ],
            axis=-1,
        )
        np.testing.assert_allclose(out[i], want, atol=1e-5)


def test_batched_crop_equals_crop_then_resize_and_flip_mirrors():
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (6, 32, 32, 3)).astype(np.uint8)
    windows = augment.sample_crop_windows(SEED, 32, 32, 6)
    flips = tf.constant([False, True] * 3)
    out = augment.batch_crop_resize_flip(tf.constant(images), windows, flips, 32).numpy()
    for i in range(6):
        y, x, h, w = (int(t[i]) for t in windows)
        crop = tf.constant(images[i, y : y + h, x : x + w].astype(np.float32))
        want = tf.image.resize(crop, (32, 32), method="bilinear").numpy()
        if flips[i]:
            want = want[:, ::-1]
        # Both round to uint8: at most one grey level apart.
        assert np.abs(out[i].astype(np.float32) - np.round(np.clip(want, 0, 255))).max() <= 1.0
    assert not np.array_equal(out[0], out[1])


def test_same_seed_same_views_eagerly_and_inside_tf_data():
    recipe = augment.TwoViewRecipe(_aug(), 24)
    images = tf.cast(tf.random.uniform((8, 40, 36, 3), maxval=256, seed=6), tf.uint8)

    def pipeline(batch):
        views = recipe.cpu_stage(batch, SEED)
        return tf.cast(views, tf.float32) / 255.0

    eager = pipeline(images).numpy()
    graph = next(iter(tf.data.Dataset.from_tensors(images).map(pipeline))).numpy()
    assert eager.shape == graph.shape == (8, 24, 24, 3)
    assert eager.dtype == graph.dtype == np.float32
    assert 0.0 <= eager.min() and eager.max() <= 1.0
    # Graph rewrites may reorder float ops; the HSV round trip of near-grey pixels magnifies
    # that, so a handful of pixels may differ slightly. Everything else is identical.
    diff = np.abs(eager - graph)
    assert np.mean(diff < 1e-5) > 0.995 and diff.max() < 0.02


def test_keras_cv_layer_draws_its_own_parameters():
    layer = augment.ColorJitter(seed=7, prob=1.0)
    images = tf.random.uniform((4, 16, 16, 3), seed=8)
    out = layer(images)
    assert out.shape == images.shape
    assert not np.allclose(out.numpy(), images.numpy())
    assert 0.0 <= float(tf.reduce_min(out)) and float(tf.reduce_max(out)) <= 1.0


# ------------------------------------------------------------------------------------------------
# The per-image fast path (tf.data on the CPU) computes what the batched reference path computes.


def _windows(height, width):
    """Crop windows that shrink, enlarge, shrink one axis only, and take the whole image."""
    return [
        (10, 20, 200, 180),
        (0, 0, height, width),
        (5, 7, 100, 60),
        (3, 0, 150, width),
        (0, 40, height - 1, 37),
    ]


def _banded_view(image, window, flip, size):
    view = tf.transpose(augment.resize_crop(image, window, tf.constant(flip), size), (1, 0, 2))
    return tf.cast(tf.round(view), tf.uint8).numpy()


@pytest.mark.parametrize("flip", [False, True])
def test_banded_resize_equals_antialiased_crop_resize(flip):
    rng = np.random.default_rng(7)
    image = tf.constant(rng.integers(0, 256, (300, 260, 3)).astype(np.uint8))
    for window in _windows(300, 260):
        window = tuple(tf.constant(v) for v in window)
        want = augment.crop_resize_flip(image, window, tf.constant(flip), 224).numpy()
        got = _banded_view(image, window, flip, 224)
        assert got.shape == (224, 224, 3) and got.dtype == np.uint8
        # Both round the same antialiased bilinear values to uint8: at most one level apart.
        assert np.abs(got.astype(np.int32) - want.astype(np.int32)).max() <= 1
    # Output sizes that are not a multiple of the block size.
    window = tuple(tf.constant(v) for v in (10, 20, 200, 180))
    for size in (24, 33):
        want = augment.crop_resize_flip(image, window, tf.constant(flip), size).numpy()
        got = _banded_view(image, window, flip, size)
        assert np.abs(got.astype(np.int32) - want.astype(np.int32)).max() <= 1


def test_banded_blur_equals_batched_blur_and_scipy():
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(8)
    images = rng.uniform(0, 1, (3, 37, 20, 3)).astype(np.float32)
    sigma = np.array([0.1, 1.0, 2.0], np.float32)
    batched = augment.gaussian_blur(tf.constant(images), tf.constant(sigma), radius=6).numpy()
    for i, s in enumerate(sigma):
        got = augment.blur_image(tf.constant(images[i]), tf.constant(s), 6).numpy()
        np.testing.assert_allclose(got, batched[i], atol=1e-6)
        want = np.stack(
            [
                ndimage.gaussian_filter(images[i, ..., c], s, mode="mirror", truncate=6 / s)
                for c in range(3)
            ],
            axis=-1,
        )
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_hue_shift_matches_colorsys_including_grey_and_wraparound():
    rng = np.random.default_rng(9)
    pixels = rng.uniform(0, 1, (6, 50, 3)).astype(np.float32)
    pixels[0, :10] = pixels[0, :10, :1]  # grey pixels: hue undefined, must come out unchanged
    pixels[1, :10, 1] = pixels[1, :10, 0]  # ties between max channels
    pixels[2, :10] = [1.0, 0.0, 0.0]  # pure red: hue 0, shifts wrap below 0
    for delta in (-0.1, -0.03, 0.0, 0.05, 0.1, 0.5):
        got = augment._hue_planar(tf.transpose(tf.constant(pixels), (2, 0, 1)), delta)
        got = tf.transpose(got, (1, 2, 0)).numpy()
        want = _np_jitter(pixels, [3], 1.0, 1.0, 1.0, delta)
        np.testing.assert_allclose(got, want, atol=2e-5)


def test_per_image_kernels_equal_batched_kernels():
    for overrides in ({}, {"hue": 0.0}, {"jitter_prob": 1.0, "grayscale_prob": 0.5}):
        cfg = _aug(**overrides)
        n = 24
        rng = np.random.default_rng(10)
        images = tf.constant(rng.uniform(0, 1, (n, 19, 23, 3)).astype(np.float32))
        for layer in _photometric(cfg):
            params = layer.sample(tf.constant([11, 12], tf.int64), n)
            call = lambda x, p, layer=layer: layer({"images": x, "params": p})["images"].numpy()
            want = call(images, params)  # a batch: the batched kernel
            for i in range(n):  # a batch of one: the per-image kernel
                row = {k: v[i : i + 1] for k, v in params.items()}
                np.testing.assert_allclose(call(images[i : i + 1], row)[0], want[i], atol=1e-5)
    # The crop: per image antialiased, batched plain bilinear; equal for enlarged crops.
    crop = augment.RandomResizedCrop(32, rescale=1 / 255)
    small = tf.cast(tf.random.uniform((6, 20, 20, 3), maxval=256, seed=3), tf.uint8)
    params = crop.sample(SEED, 6, small)
    want = crop({"images": small, "params": params})["images"].numpy()
    for i in range(6):
        row = {k: v[i : i + 1] for k, v in params.items()}
        got = crop({"images": small[i : i + 1], "params": row})["images"].numpy()[0]
        np.testing.assert_allclose(got, want[i], atol=1e-5)


def test_per_image_view_same_eagerly_and_inside_tf_data():
    recipe = augment.TwoViewRecipe(_aug(), 48)
    image = tf.cast(tf.random.uniform((120, 90, 3), maxval=256, seed=13), tf.uint8)

    def view(i):
        return recipe.cpu_stage(image, augment.fold_seed(SEED, i))

    eager = np.stack([view(tf.constant(i, tf.int64)).numpy() for i in range(6)])
    graph = np.stack(list(tf.data.Dataset.range(6).map(view).as_numpy_iterator()))
    assert eager.shape == graph.shape == (6, 48, 48, 3) and eager.dtype == np.uint8
    diff = np.abs(eager.astype(np.int32) - graph.astype(np.int32))
    # As above: float reordering may move a few near-grey pixels by a level after the hue shift.
    assert np.mean(diff == 0) > 0.995 and diff.max() <= 3


def test_file_pipeline_device_mode_matches_cpu_mode(tmp_path):
    from simsiam_tf import data
    from tests.conftest import write_images

    write_images(tmp_path, 16, size=(64, 48), ext=".jpg")
    source = data.load_source(f"folder:{tmp_path}")
    c = default_config()
    c.data.image_size = 32
    c.aug.blur_prob = 0.5
    batches = {}
    for mode in ("cpu", "device"):
        c.data.photometric = mode
        batches[mode] = next(iter(data.pretrain_dataset(source, c.data, c.aug, 16, seed=3)))
    dev, cpu = batches["device"], batches["cpu"]
    assert set(dev) == {"view1", "view2", "params1", "params2"} and set(cpu) == {"view1", "view2"}
    assert dev["params1"]["layer3"]["sigma"].shape == (16,)
    assert dev["params1"]["layer1"]["order"].shape == (16, 4)
    stage = augment.TwoViewRecipe(c.aug, 32, "device").device_stage()
    for v in ("1", "2"):
        views = tf.cast(dev["view" + v], tf.float32) / 255.0
        applied = stage(views, params=dev["params" + v])
        diff = np.abs(np.round(applied.numpy() * 255) - cpu["view" + v].numpy())
        # Same draws; device mode rounds the cropped view to uint8 before the colour ops, which
        # their factors (up to 1.4 each) may amplify by a level or two.
        assert diff.mean() < 0.5 and np.mean(diff <= 2) > 0.99


def test_device_mode_cpu_stage_is_crop_then_flip_rounded_once():
    """Device mode's CPU stage resamples to 0-255 and rounds before the flip: the same views as
    the recipe's own layers (crop to [0, 1], flip, x255, round), to within float rounding."""
    recipe = augment.TwoViewRecipe(_aug(), 32, "device")
    crop, flip = recipe.layers[0], recipe.layers[-1]
    assert crop.rescale == 1 / 255 and isinstance(flip, augment.HorizontalFlip)
    rng = np.random.default_rng(5)
    for i in range(8):
        image = tf.constant(rng.integers(0, 256, (int(rng.integers(20, 90)), 57, 3)), tf.uint8)
        seed = augment.fold_seed(tf.constant([1, 2], tf.int64), i)
        got = recipe.cpu_stage(image, seed)
        assert got.dtype == tf.uint8 and got.shape == (32, 32, 3)
        view = augment._call(crop, image, augment.fold_seed(seed, 0))
        view = augment._call(flip, view, augment.fold_seed(seed, len(recipe.layers) - 1))
        want = augment.to_uint8(view).numpy().astype(int)
        diff = np.abs(got.numpy().astype(int) - want)
        assert diff.max() <= 1 and diff.mean() < 0.01
    # The flip keeps a uint8 view uint8 (keras-cv would make it float32).
    flipped = augment._call(flip, tf.zeros((4, 5, 3), tf.uint8), tf.constant([0, 1], tf.int64))
    assert flipped.dtype == tf.uint8


def test_per_example_parameters_keep_the_recipe_distributions():
    recipe = augment.TwoViewRecipe(_aug(), 32, "device")
    base = tf.constant([0, 0x5157], tf.int64)

    def draw(i):
        views = []
        for v in (1, 2):  # as data.pretrain_dataset keys them: (seed, epoch, example), view
            params = recipe.device_params(augment.fold_seed(augment.fold_seed(base, 0, i), v), 1)
            views.append({k: t for layer in params.values() for k, t in layer.items()})
        return {k: tf.concat([views[0][k], views[1][k]], 0) for k in views[0]}

    p = next(iter(tf.data.Dataset.range(5000).map(draw).batch(5000)))
    p = {k: v.numpy().reshape((10000,) + v.shape[2:]) for k, v in p.items()}
    assert p["jitter"].mean() == pytest.approx(0.8, abs=0.015)
    assert p["grayscale"].mean() == pytest.approx(0.2, abs=0.015)
    assert p["blur"].mean() == pytest.approx(0.5, abs=0.015)
    for key, lo, hi in (("brightness", 0.6, 1.4), ("hue", -0.1, 0.1), ("sigma", 0.1, 2.0)):
        assert p[key].min() >= lo and p[key].max() <= hi
        assert np.median(p[key]) == pytest.approx((lo + hi) / 2, abs=0.03 * (hi - lo))
    # The two views of one image draw independently.
    assert 0.0 < np.mean(p["jitter"][0::2] != p["jitter"][1::2]) < 0.5
    assert abs(np.corrcoef(p["sigma"][0::2], p["sigma"][1::2])[0, 1]) < 0.05


# ------------------------------------------------------------------------------------------------
# The recipe is keras-cv layers; users name more in the config.


def test_recipe_layers_are_keras_cv_layers_that_serialize():
    recipe = augment.TwoViewRecipe(_aug(), 224)
    names = [type(layer).__name__ for layer in recipe.layers]
    assert names == [
        "RandomResizedCrop",
        "ColorJitter",
        "RandomGrayscale",
        "GaussianBlur",
        "HorizontalFlip",
    ]
    for layer in recipe.layers:
        assert isinstance(layer, augment.keras_cv.layers.VectorizedBaseImageAugmentationLayer)
        config = layer.get_config()
        assert type(layer).from_config(config).get_config() == config
    assert "ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, p=0.8)" in (
        recipe.description
    )
    # Probability 0 leaves an op out (the CIFAR recipe has no blur).
    assert "GaussianBlur" not in augment.TwoViewRecipe(_aug(blur_prob=0.0), 32).description


def test_extra_and_replacement_layers_are_parsed_never_evaluated():
    layers = augment.parse_layers(
        "RandomSharpness(factor=0.5, value_range=(0, 1)); keras.RandomContrast(0.2);"
        " HorizontalFlip(prob=1.0)",
        "aug.extra",
    )
    assert [type(layer).__name__ for _, layer in layers] == [
        "RandomSharpness",
        "RandomContrast",
        "HorizontalFlip",
    ]
    assert isinstance(layers[0][1], augment.keras_cv.layers.RandomSharpness)
    assert isinstance(layers[1][1], augment.keras.layers.RandomContrast)
    for spec, message in (
        ("NoSuchLayer(1)", "no layer 'NoSuchLayer'"),
        ("RandomSharpness(factor=open('/etc/passwd'), value_range=(0, 1))", "literals"),
        ("RandomSharpness(factor=0.5, value_range=(0, 1), colour=3)", "Unrecognized keyword"),
        ("RandomResizedCrop(size=0)", "ValueError: size=0"),
        ("RandomSharpness(", "is not a layer call"),
        ("__import__('os').system('true')", "is not a layer call"),
        ("ColorJitter(**{'hue': 0.1})", "literals"),
        ("ColorJitter(hue='a' * 3)", "arithmetic of non-numbers"),
    ):
        with pytest.raises(ConfigError, match=re.escape(message)) as error:
            augment.parse_layers(spec, "aug.extra")
        assert "config.aug.extra" in str(error.value) and "\n" not in str(error.value)


def test_config_rejects_a_bad_layer_before_reading_data():
    c = default_config()
    c.aug.extra = "RandomSharpnes(factor=0.5)"
    with pytest.raises(ConfigError, match="config.aug.extra: no layer 'RandomSharpnes'"):
        validate(c)
    c = default_config()
    c.data.photometric = "device"
    c.aug.recipe = "RandomSharpness(factor=0.5, value_range=(0, 1)); RandomResizedCrop(32)"
    with pytest.raises(ConfigError, match="needs a recipe that starts with RandomResizedCrop"):
        validate(c)
    c.aug.recipe = "RandomResizedCrop(32); RandomSharpness(factor=0.5, value_range=(0, 1));"
    c.aug.recipe += " HorizontalFlip()"
    with pytest.raises(ConfigError, match="put stock layers after the flip"):
        validate(c)
    c.aug.recipe = "RandomResizedCrop(32, rescale=scale)"
    with pytest.raises(ConfigError, match="literals"):
        validate(c)
    c.aug.recipe = "RandomResizedCrop(32, rescale=1/255); ColorJitter(); HorizontalFlip()"
    validate(c)
    assert augment.parse_layers(c.aug.recipe, "aug.recipe")[0][1].rescale == 1 / 255


def test_replaced_recipe_runs_in_the_pipeline():
    from simsiam_tf import data

    c = default_config()
    c.data.image_size = 16
    c.aug.recipe = (
        "RandomResizedCrop(16, scale=(0.5, 1.0), rescale=1/255);"
        " RandomColorDegeneration(0.5); HorizontalFlip()"
    )
    source = data.load_source("builtin:digits")
    batch = next(iter(data.pretrain_dataset(source, c.data, c.aug, 32, seed=0)))
    assert batch["view1"].shape == (32, 16, 16, 3) and batch["view1"].dtype == tf.uint8
    assert not np.array_equal(batch["view1"].numpy(), batch["view2"].numpy())


# ------------------------------------------------------------------------------------------------
# keras-cv's call path runs during training: its base classes' calls are counted.


@pytest.fixture
def keras_cv_calls(monkeypatch):
    """Counts calls of keras-cv's image-augmentation base classes' `call`, by layer class."""
    counts = collections.Counter()
    layers = augment.keras_cv.layers
    for base in (layers.VectorizedBaseImageAugmentationLayer, layers.BaseImageAugmentationLayer):

        def wrap(original):
            @functools.wraps(original)
            def call(self, *args, **kwargs):
                counts[type(self).__name__] += 1
                return original(self, *args, **kwargs)

            return call

        monkeypatch.setattr(base, "call", wrap(base.call))
    return counts


def _tiny_run_config(source, photometric="cpu", extra=""):
    from tests.helpers import tiny_config

    c = tiny_config()
    c.data.source = source
    c.data.image_size = 16
    c.data.photometric = photometric
    c.aug.extra = extra
    c.optim.batch_size = 32
    c.optim.epochs = 1
    c.train.steps_per_epoch = 2
    c.train.verbose = 0
    c.eval.random_init_knn = False
    c.eval.max_bank = 64
    c.eval.max_queries = 32
    return c


RECIPE_CALLED = {"RandomResizedCrop", "ColorJitter", "RandomGrayscale", "HorizontalFlip"}


@pytest.mark.parametrize(
    "kind,photometric,extra",
    [
        ("folder", "cpu", ""),
        ("builtin", "cpu", "RandomSharpness(factor=0.5, value_range=(0, 1))"),
        ("builtin", "device", "RandomSharpness(factor=0.5, value_range=(0, 1))"),
    ],
)
def test_training_runs_the_recipe_through_keras_cv(
    tmp_path, keras_cv_calls, kind, photometric, extra
):
    from simsiam_tf import train
    from tests.conftest import write_images

    source = "builtin:digits"
    if kind == "folder":
        write_images(tmp_path / "images", 64, size=(40, 30), ext=".jpg")
        source = f"folder:{tmp_path / 'images'}"
    summary = train.train(_tiny_run_config(source, photometric, extra), str(tmp_path / "run"))
    assert np.isfinite(summary["loss_last"])
    assert RECIPE_CALLED <= set(keras_cv_calls), keras_cv_calls
    if extra:
        assert keras_cv_calls["RandomSharpness"] > 0
    # The view grid went to TensorBoard at the start.
    assert os.listdir(tmp_path / "run" / "tb" / "views")


def test_show_views_writes_the_picture(tmp_path):
    from simsiam_tf import plots
    from tests.conftest import REPO

    out = tmp_path / "views.png"
    cmd = [
        sys.executable,
        "tools/show_views.py",
        "--config=configs/quickstart.py",
        f"--out={out}",
        "--n=3",
        "--config.aug.extra=RandomSharpness(factor=0.5, value_range=(0, 1))",
    ]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    width, height = plots.read_png_size(str(out))
    assert height > width > 200  # 3 rows of (image, view 1, view 2)
    bad = cmd[:3] + [f"--out={out}", "--config.aug.extra=Sharpness(0.5)"]
    proc = subprocess.run(bad, cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode != 0 and "config.aug.extra: no layer 'Sharpness'" in proc.stderr


def test_device_stage_with_a_stock_layer_trains_on_two_replicas(two_replicas, keras_cv_calls):
    from simsiam_tf import data, train

    extra = "RandomSharpness(factor=0.5, value_range=(0, 1))"
    c = _tiny_run_config("builtin:digits", "device", extra)
    net, _ = train.build_model_and_optimizer(c, 2, two_replicas)
    source = data.load_source("builtin:digits")
    batches = data.pretrain_dataset(source, c.data, c.aug, 32, seed=0, num_epochs=1)
    history = net.fit(batches, epochs=1, steps_per_epoch=2, verbose=0)
    assert np.isfinite(history.history["loss"][-1])
    assert keras_cv_calls["ColorJitter"] > 0 and keras_cv_calls["RandomSharpness"] > 0
