"""The train tool end to end, in a subprocess as a user runs it: train, then resume."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.helpers import TINY_TRAIN_FLAGS

TINY = TINY_TRAIN_FLAGS + [
    "--config.train.steps_per_epoch=3",
    "--config.eval.knn_every_epochs=1",
    "--config.eval.max_bank=300",
    "--config.eval.max_queries=100",
]


def _train(workdir, *extra):
    cmd = [sys.executable, "tools/train.py", f"--workdir={workdir}", *TINY, *extra]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _history(workdir):
    with open(os.path.join(workdir, "history.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_train_then_resume(tmp_path):
    workdir = str(tmp_path / "run")
    out = _train(workdir, "--config.optim.epochs=2")
    for name in ("config.json", "summary.json", "random_init.json", "backbone.weights.h5"):
        assert os.path.exists(os.path.join(workdir, name)), name
    assert os.listdir(os.path.join(workdir, "tb", "train"))  # TensorBoard events
    assert "Epoch 2/2" in out
    with open(os.path.join(workdir, "summary.json")) as f:
        summary = json.load(f)
    assert summary["epochs"] == 2
    for key in ("knn_top1", "random_init_knn_top1"):
        assert 0.0 <= summary[key] <= 1.0
    assert summary["z_std_ratio"] == pytest.approx(summary["z_std"] * 8.0)  # sqrt(64)
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["optim"]["epochs"] == 2

    # The same command with a longer schedule resumes at epoch 3, not from scratch.
    out = _train(workdir, "--config.optim.epochs=3")
    assert "Resumed from" in out and "Epoch 3/3" in out and "Epoch 1/3" not in out
    rows = _history(workdir)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert all("knn_top1" in r and "lr" in r and "z_std" in r for r in rows)

    # Rerunning a finished run trains nothing and keeps its results.
    out = _train(workdir, "--config.optim.epochs=3")
    assert "already holds all 3 epochs" in out
    assert len(_history(workdir)) == 3


def test_train_on_an_image_folder(cifar10_folder, tmp_path):
    workdir = str(tmp_path / "folder_run")
    out = _train(
        workdir,
        f"--config.data.source=folder:{cifar10_folder}",
        "--config.optim.epochs=1",
    )
    with open(os.path.join(workdir, "summary.json")) as f:
        summary = json.load(f)
    assert summary["epochs"] == 1 and 0.0 <= summary["knn_top1"] <= 1.0
    assert "folder:" in out


def test_bad_config_fails_before_reading_data(tmp_path):
    cmd = [
        sys.executable,
        "tools/train.py",
        f"--workdir={tmp_path}/x",
        *TINY,
        "--config.data.source=folder:/definitely/missing",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "error: config.data.source" in proc.stderr and "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr
