"""The collapse monitor: loud on a collapsed encoder, quiet on a healthy one."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from simsiam_tf import collapse, model
from tests.helpers import random_views, tiny_config

D = 64
HEALTHY = 0.9 / math.sqrt(D)  # std x sqrt(d) = 0.9


def _monitor(**kwargs):
    messages = []
    kwargs.setdefault("patience", 3)
    return collapse.CollapseMonitor(D, log=messages.append, **kwargs), messages


def _feed(monitor, stds):
    logs_seen = []
    for epoch, (z, p) in enumerate(stds):
        logs = {"loss": -0.5, "z_std": z, "p_std": p}
        monitor.on_epoch_end(epoch, logs)
        logs_seen.append(logs)
    return logs_seen


def test_quiet_on_a_healthy_run():
    monitor, messages = _monitor()
    logs = _feed(monitor, [(HEALTHY, HEALTHY)] * 10)
    assert messages == [] and monitor.collapsed_at is None
    assert logs[-1]["z_std_ratio"] == pytest.approx(0.9)
    assert logs[-1]["p_std_ratio"] == pytest.approx(0.9)


def test_a_dip_shorter_than_the_patience_is_not_a_collapse():
    monitor, messages = _monitor(patience=3)
    _feed(monitor, [(HEALTHY, HEALTHY), (1e-4, 1e-4), (1e-4, 1e-4), (HEALTHY, HEALTHY)] * 3)
    assert messages == []


def test_fires_after_patience_epochs_below_the_threshold():
    monitor, messages = _monitor(patience=3, threshold=0.5)
    _feed(monitor, [(HEALTHY, HEALTHY), (0.2 / 8, 0.9 / 8), (0.1 / 8, 0.9 / 8)])
    assert messages == []
    _feed(monitor, [(0.01 / 8, 0.9 / 8)])  # third low epoch in a row (epoch index 0 again)
    assert monitor.collapsed_at == 1 and len(messages) == 1
    text = messages[0]
    assert "COLLAPSE" in text and "z_std x sqrt(d) = 0.010" in text
    for cause in (
        "stop-gradient",
        "learning rate too high",
        "augmentations too weak",
        "predictor's learning rate",
    ):
        assert cause in text


def test_nan_counts_as_collapsed():
    monitor, messages = _monitor(patience=1)
    _feed(monitor, [(float("nan"), float("nan"))])
    assert len(messages) == 1


def test_stop_option_ends_the_fit_of_a_constant_encoder():
    """A constant encoder (every image -> the same features) in a real fit: z and p have zero
    spread, the monitor fires after `patience` epochs and stops training there."""
    keras.utils.set_random_seed(0)
    backbone = keras.Sequential(
        [keras.Input((8, 8, 3)), keras.layers.Lambda(lambda x: tf.ones_like(x[:, 0, 0, :]))],
        name="backbone",
    )
    projector = model.build_projector(3, dim=D, hidden=16, num_layers=2)
    predictor = model.build_predictor(D, 8)
    net = model.SimSiam(backbone, projector, predictor)
    net.compile(optimizer=keras.optimizers.SGD(0.01))
    messages = []
    causes = collapse.likely_causes(tiny_config(stop_gradient=False))
    monitor = collapse.CollapseMonitor(D, patience=2, stop=True, causes=causes, log=messages.append)
    views = random_views(n=16, size=8)
    ds = tf.data.Dataset.from_tensors(views).repeat()
    history = net.fit(ds, epochs=6, steps_per_epoch=2, callbacks=[monitor], verbose=0)
    assert len(history.history["loss"]) == 2  # stopped after the 2nd epoch, not 6
    assert history.history["z_std_ratio"][-1] < 0.01
    assert monitor.collapsed_at == 2 and "Stopping the run" in messages[0]
    assert messages[0].index("stop_gradient=False") < messages[0].index("learning rate")


def test_quiet_on_a_healthy_network():
    """Distinct inputs through a randomly initialised SimSiam: spread, no warning."""
    keras.utils.set_random_seed(0)
    net = model.build_simsiam(tiny_config().model)
    x = random_views(n=64, size=16)
    _, z, p = net.compute_simsiam_loss(x, training=True)  # as in the train step
    from simsiam_tf import losses

    monitor, messages = _monitor(patience=1)
    monitor.dim = int(net.proj_dim)
    # At initialisation the output BN's moving statistics are still (0, 1), so z is the raw
    # projection; its spread is smaller than a trained net's but far from a collapse's 0.
    logs = {"z_std": float(losses.channel_std(z)), "p_std": float(losses.channel_std(p))}
    monitor.threshold = 0.1
    monitor.on_epoch_end(0, logs)
    assert messages == [], logs


def test_likely_causes_name_the_runs_own_switches_first():
    causes = collapse.likely_causes(tiny_config(stop_gradient=False, predictor="identity"))
    assert "stop_gradient=False" in causes[0] and "predictor='identity'" in causes[1]
    assert not any(c.startswith("no stop-gradient") for c in causes)
    assert len(collapse.likely_causes()) == len(collapse.GENERIC_CAUSES)


def test_bad_arguments():
    with pytest.raises(ValueError, match="threshold"):
        collapse.CollapseMonitor(D, threshold=0)
    with pytest.raises(ValueError, match="patience"):
        collapse.CollapseMonitor(D, patience=0)
    with pytest.raises(ValueError, match="dim"):
        collapse.CollapseMonitor(0)


def test_config_keys_are_validated():
    from simsiam_tf import config as config_lib
    from simsiam_tf.errors import ConfigError

    c = config_lib.default_config()
    assert (c.eval.collapse_threshold, c.eval.collapse_patience, c.eval.collapse_stop) == (
        0.5,
        3,
        False,
    )
    c.eval.collapse_patience = 0
    with pytest.raises(ConfigError, match="eval.collapse_patience"):
        config_lib.validate(c)
    c = config_lib.default_config()
    c.eval.collapse_threshold = 0.0
    with pytest.raises(ConfigError, match="eval.collapse_threshold"):
        config_lib.validate(c)


def test_ratio_of_uniform_unit_vectors_is_about_one():
    """The reference point: random directions in d dimensions have std x sqrt(d) ~ 1."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4096, D))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    assert np.mean(np.std(x, axis=0)) * math.sqrt(D) == pytest.approx(1.0, abs=0.02)
