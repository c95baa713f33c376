"""Points of docs/FIDELITY.md that no module test covers: initialisation, input normalisation,
BN constants, the linear protocols, and the measured departures (tools/measure_departures.py)."""

import functools
import importlib.util
import math
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from simsiam_tf import linear, model
from simsiam_tf.config import default_config
from tests.conftest import REPO


@functools.lru_cache(maxsize=None)
def _measure():
    """tools/measure_departures.py as a module (loaded once: it defines absl flags)."""
    path = os.path.join(REPO, "tools", "measure_departures.py")
    spec = importlib.util.spec_from_file_location("measure_departures", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _simsiam(backbone="resnet18_cifar"):
    c = default_config().model
    c.backbone = backbone
    keras.utils.set_random_seed(0)
    return model.build_simsiam(c)


def test_input_normalisation_is_torchvision_imagenet():
    """ToTensor then Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])."""
    backbone = model.build_backbone("resnet18_cifar")
    norm = backbone.get_layer("normalize")
    x = np.random.default_rng(0).random((2, 4, 4, 3)).astype(np.float32)
    want = (x - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(norm(x).numpy(), want, rtol=1e-5, atol=1e-6)


def test_batchnorm_has_torch_momentum_and_eps():
    """torch BatchNorm momentum 0.1 (Keras 0.9) and eps 1e-5 everywhere; the projector's output
    BN has no affine, as BatchNorm1d(dim, affine=False)."""
    net = _simsiam()
    bns = [
        layer
        for part in (net.backbone, net.projector, net.predictor)
        for layer in part.layers
        if isinstance(layer, keras.layers.BatchNormalization)
    ]
    assert len(bns) > 20
    assert all(bn.momentum == 0.9 and bn.epsilon == 1e-5 for bn in bns)
    last = net.projector.layers[-1]
    assert not last.center and not last.scale


def test_initialisation_distributions_are_torchs():
    """Convolutions: kaiming_normal_(fan_out, relu), std sqrt(2 / (k * k * out)); Linear layers:
    torch's default U(+-1/sqrt(fan_in)) for weights and the predictor's output bias."""
    net = _simsiam()
    conv = net.backbone.get_layer("stage4_block2_conv1").kernel.numpy()  # 3x3x512x512
    std = math.sqrt(2.0 / (3 * 3 * 512))
    assert abs(conv.std() / std - 1) < 0.01 and abs(conv.mean()) < 0.01 * std
    # Normal, not truncated: about 0.27% of the weights lie beyond 3 std.
    assert 0.002 < np.mean(np.abs(conv) > 3 * std) < 0.0035
    fc = net.projector.get_layer("fc1").kernel.numpy()  # 512 -> 2048
    bound = 1.0 / math.sqrt(fc.shape[0])
    assert np.abs(fc).max() <= bound and np.abs(fc).max() > 0.999 * bound
    assert abs(fc.std() / (bound / math.sqrt(3)) - 1) < 0.01
    out = net.predictor.get_layer("fc2")  # 512 -> 2048, with a bias
    bound = 1.0 / math.sqrt(512)
    for w in (out.kernel.numpy(), out.bias.numpy()):
        assert np.abs(w).max() <= bound and np.abs(w).max() > 0.99 * bound


def test_linear_head_is_initialised_as_main_lincls():
    """fc.weight.data.normal_(mean=0.0, std=0.01); fc.bias.data.zero_()."""
    keras.utils.set_random_seed(0)
    fc = linear.build_head(2048, 1000).get_layer("fc")
    w = fc.kernel.numpy()
    assert abs(w.std() / 0.01 - 1) < 0.01 and abs(w.mean()) < 1e-4
    assert not fc.bias.numpy().any()


def test_linear_protocols_are_main_lincls():
    """ImageNet: --lars defaults; CIFAR: main_lincls.py's optimiser without --lars at batch 256."""
    imagenet = linear.get_protocol("imagenet")
    assert (imagenet.optimizer, imagenet.lars_rule, imagenet.momentum) == ("lars", "larc", 0.9)
    assert (imagenet.batch_size, imagenet.base_lr, imagenet.weight_decay) == (4096, 0.1, 0.0)
    assert imagenet.crop_scale == (0.08, 1.0) and imagenet.eval_crop_fraction == 0.875
    cifar = linear.get_protocol("cifar")
    assert (cifar.optimizer, cifar.batch_size, cifar.base_lr, cifar.momentum) == (
        "sgd",
        256,
        0.1,
        0.9,
    )
    assert (cifar.weight_decay, cifar.epochs, cifar.augment) == (0.0, 100, False)


def test_schedule_gap_against_the_closed_form():
    """The per-epoch cosine sums to S (E + 1) / 2 peaks, the per-step one to (E S + 1) / 2."""
    m = _measure()
    gap = m.schedule_gap(1.0, epochs=100, steps=10)
    assert gap["sum_ratio_minus_1"] == pytest.approx(1001 / 1010 - 1, rel=1e-4)
    # The largest gap is at the last step of an epoch near mid-run, (S - 1) / S of an epoch
    # ahead of the official value: about pi / (2 E) x (S - 1) / S of the peak.
    assert gap["max_gap_of_peak"] == pytest.approx(math.pi / 200 * 0.9, rel=0.01)


def _smooth_photos(n=6, size=24):
    rng = np.random.default_rng(0)
    photos = []
    for _ in range(n):
        base = rng.integers(0, 256, (4, 4, 3)).astype(np.float32)
        photos.append(
            tf.cast(tf.image.resize(base[None], (size, size), "bilinear")[0], tf.uint8).numpy()
        )
    return photos


def test_colour_ops_depart_from_torchvision_pil_as_stated():
    """Brightness, contrast, saturation alone: within 1 grey level of PIL; the full draw within
    a few levels on average (docs/FIDELITY.md: 1.07-1.09 on real photos)."""
    rows = {r["case"]: r for r in _measure().measure_colour(_smooth_photos(), seed=0)}
    for case in ("brightness", "contrast", "saturation", "grayscale"):
        assert rows[case]["max"] <= 1, rows[case]
    assert rows["full recipe draw"]["mean"] < 3.0 and rows["hue"]["max"] <= 20


def test_blur_and_resize_depart_from_pil_as_stated():
    m = _measure()
    photos = _smooth_photos()
    for row in m.measure_blur(photos, sigmas=(0.5, 2.0)):
        assert row["interior_max"] <= 5 and row["batched_vs_planar_max"] <= 1, row
    for row in m.measure_resize(photos, 24, seed=0):
        assert row["max"] <= 1, row


def _recipe(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def test_recipe_length_and_schedule_are_main_simsiam():
    """100 epochs for ImageNet (Table 4's 100-epoch entry), 800 for CIFAR (appendix D); the lr
    set once per epoch without warm-up, as adjust_learning_rate."""
    for name, epochs in (("imagenet_resnet50", 100), ("cifar10_resnet18", 800)):
        c = _recipe(name)
        assert (c.optim.epochs, c.optim.warmup_epochs, c.optim.lr_schedule) == (
            epochs,
            0.0,
            "per_epoch",
        ), name


def test_every_epoch_is_a_new_full_permutation():
    """In-memory sources: each epoch's batches hold every example once (the remainder dropped),
    in an order of its own: main_simsiam.py's DistributedSampler with set_epoch."""
    from simsiam_tf import data

    n, batch = 96, 16  # image i is filled with the grey level i: its thumbnail names it
    images = np.repeat(np.arange(n, dtype=np.uint8), 8 * 8 * 3).reshape(n, 8, 8, 3)
    src = data.Source("ids", n, 0, np.full(n, -1), images=images)
    c = default_config()
    c.data.image_size = 8
    ds = data.pretrain_dataset(src, c.data, c.aug, batch, seed=3, num_epochs=3, with_images=True)
    ids = np.concatenate([b["image"].numpy()[:, 4, 4, 0] for b in ds]).reshape(3, n)
    for order in ids:
        np.testing.assert_array_equal(np.sort(order), np.arange(n))  # full: each image once
    assert not np.array_equal(ids[0], np.arange(n))  # shuffled
    assert not np.array_equal(ids[0], ids[1]) and not np.array_equal(ids[1], ids[2])
    # The remainder is dropped: 100 images in batches of 16 give 6 batches of distinct images.
    src = data.Source("ids", 100, 0, np.full(100, -1), images=np.concatenate([images, images[:4]]))
    batches = list(data.pretrain_dataset(src, c.data, c.aug, batch, seed=3, num_epochs=1))
    assert len(batches) == 6


def test_knn_monitor_is_k200_t01_and_leaves_training_untouched(monkeypatch):
    """The monitor scores with k=200 and T=0.1 (the recipe's eval.knn_k, eval.knn_t), and a run
    with it makes the same updates, BN statistics included, as a run without: the backbone is
    read in inference mode and nothing of the step changes."""
    from simsiam_tf import callbacks, data, knn, optim
    from tests.helpers import tiny_config

    seen = []
    original = knn.knn_accuracy

    def recording(*args):
        seen.append(args[5:7])  # (k, t)
        return original(*args)

    monkeypatch.setattr(knn, "knn_accuracy", recording)
    rng = np.random.default_rng(0)

    def source(name, n):
        images = rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)
        return data.Source(name, n, 4, np.arange(n) % 4, images=images)

    c = tiny_config()
    views = {k: rng.uniform(0, 1, (16, 16, 16, 3)).astype(np.float32) for k in ("view1", "view2")}
    ds = tf.data.Dataset.from_tensor_slices(views).batch(8)
    evaluator = callbacks.KnnEvaluator(source("bank", 40), source("queries", 12), 16, c.eval)
    states = []
    for monitor in (False, True):
        keras.utils.set_random_seed(0)
        net = model.build_simsiam(c.model)
        net.compile(optimizer=optim.build_optimizer(c.optim, 8, 2, net.predictor.variables))
        cbs = [callbacks.KnnMonitor(evaluator, every=1, epochs=2)] if monitor else []
        hist = net.fit(ds, epochs=2, verbose=0, callbacks=cbs, shuffle=False)
        states.append([v.numpy() for v in net.variables])
    assert seen == [(200, 0.1), (200, 0.1)] and len(hist.history["knn_top1"]) == 2
    assert len(states[0]) == len(states[1]) > 0
    for a, b in zip(*states):
        np.testing.assert_array_equal(a, b)
