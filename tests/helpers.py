"""Small builders shared by tests."""

import os
import subprocess
import sys

import keras
import numpy as np

from simsiam_tf import model
from simsiam_tf.config import default_config
from tests.conftest import REPO


def tiny_config(**model_overrides):
    c = default_config()
    c.model.backbone = "cnn_small"
    c.model.width = 4
    c.model.proj_dim = 32
    c.model.proj_hidden = 32
    c.model.pred_hidden = 8
    for k, v in model_overrides.items():
        c.model[k] = v
    return c


def bn_free_simsiam(dim=16, seed=0, **kwargs):
    """SimSiam whose parts have no BatchNorm, so its update does not depend on how the batch is
    split over replicas."""
    keras.utils.set_random_seed(seed)
    backbone = keras.Sequential(
        [keras.Input((8, 8, 3)), keras.layers.Flatten(), keras.layers.Dense(24, activation="relu")],
        name="backbone",
    )
    projector = keras.Sequential(
        [keras.Input((24,)), keras.layers.Dense(dim, use_bias=False)], name="projector"
    )
    predictor = keras.Sequential(
        [keras.Input((dim,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(dim)],
        name="predictor",
    )
    return model.SimSiam(backbone, projector, predictor, **kwargs)


def random_views(n=16, size=8, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "view1": rng.uniform(0, 1, (n, size, size, 3)).astype(np.float32),
        "view2": rng.uniform(0, 1, (n, size, size, 3)).astype(np.float32),
    }


# `tools/train.py` flags for a tiny, fast run of the quickstart recipe (tests of the tools).
TINY_TRAIN_FLAGS = [
    "--config=configs/quickstart.py",
    "--config.model.width=8",
    "--config.model.proj_dim=64",
    "--config.model.proj_hidden=64",
    "--config.model.pred_hidden=16",
    "--config.optim.batch_size=32",
    "--config.optim.warmup_epochs=0",
    "--config.train.verbose=2",
]


def run_python(*args, timeout=600):
    """`python ARGS` from the repository root, as a user runs a tool: output captured, TensorFlow's
    start-up logging quiet. Returns the CompletedProcess."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
        timeout=timeout,
    )
