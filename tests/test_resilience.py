"""A run survives SIGKILL, SIGTERM and a non-finite loss without losing work."""

import os
import re
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import REPO
from tests.helpers import TINY_TRAIN_FLAGS

BASE = TINY_TRAIN_FLAGS + [
    "--config.optim.epochs=2",
    "--config.train.steps_per_epoch=8",
    "--config.train.backup_every_steps=2",
    "--config.train.deterministic=True",
    "--config.eval.random_init_knn=False",
    "--config.eval.knn_every_epochs=0",
    "--config.eval.max_bank=100",
    "--config.eval.max_queries=50",
]


def _cmd(workdir, *extra):
    return [sys.executable, "tools/train.py", f"--workdir={workdir}", *BASE, *extra]


def _run(workdir, *extra, check=True):
    proc = subprocess.run(
        _cmd(workdir, *extra), cwd=REPO, capture_output=True, text=True, timeout=600
    )
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _weights(workdir):
    out = {}
    with h5py.File(os.path.join(workdir, "backbone.weights.h5"), "r") as f:
        f.visititems(
            lambda name, obj: out.__setitem__(name, obj[()]) if hasattr(obj, "shape") else None
        )
    return out


def _checkpoint_steps(workdir):
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(
        int(name.split("-")[1].split(".")[0])
        for name in os.listdir(ckpt_dir)
        if name.startswith("ckpt-") and name.endswith(".index")
    )


def _start_and_stop_at(workdir, min_step, sig):
    proc = subprocess.Popen(
        _cmd(workdir), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        steps = _checkpoint_steps(workdir)
        if steps and steps[-1] >= min_step:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    _run(workdir)
    return _weights(workdir)


def test_sigkill_mid_epoch_then_rerun_gives_the_uninterrupted_weights(tmp_path, reference_run):
    workdir = str(tmp_path / "killed")
    code, _ = _start_and_stop_at(workdir, 4, signal.SIGKILL)  # epoch 1 has 8 steps
    assert code == -signal.SIGKILL
    killed_at = _checkpoint_steps(workdir)[-1]
    assert 4 <= killed_at < 16
    out = _run(workdir)
    assert "Resumed from" in out.stderr
    got = _weights(workdir)
    assert got.keys() == reference_run.keys()
    # Op determinism on: the resumed run is bit-identical to the uninterrupted one.
    for name, ref in reference_run.items():
        np.testing.assert_array_equal(got[name], ref, err_msg=name)


@pytest.mark.slow  # 31 s, two training processes: make test-slow (SIGKILL stays)
def test_sigterm_saves_and_stops_cleanly_then_resumes(tmp_path, reference_run):
    workdir = str(tmp_path / "preempted")
    code, err = _start_and_stop_at(workdir, 2, signal.SIGTERM)
    assert code == 143, err[-2000:]
    assert "stopped for preemption" in err
    _run(workdir)
    got = _weights(workdir)
    for name, ref in reference_run.items():
        np.testing.assert_array_equal(got[name], ref, err_msg=name)


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    workdir = str(tmp_path / "nan")
    proc = _run(
        workdir, "--config.optim.base_lr=1e12", "--config.train.backup_every_steps=1", check=False
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    # Either the loss (at step k) or, caught at the save of step k, the weights broke first.
    match = re.search(
        r"error: (the loss became (nan|inf)|\S+ became non-finite by) step (\d+)",
        proc.stderr.replace(" at step ", " step "),
    )
    assert match, proc.stderr[-2000:]
    bad_step = int(match.group(3))
    saved = _checkpoint_steps(workdir)
    assert saved and saved[-1] < bad_step
    reader = tf.train.load_checkpoint(os.path.join(workdir, "checkpoints", f"ckpt-{saved[-1]}"))
    for name in reader.get_variable_to_shape_map():
        value = reader.get_tensor(name)
        if np.issubdtype(np.asarray(value).dtype, np.floating):
            assert np.isfinite(value).all(), name


@pytest.mark.slow  # 48 s: two training processes (make test-slow)
def test_after_a_non_finite_loss_a_fixed_rerun_resumes_from_the_last_good_checkpoint(tmp_path):
    workdir = str(tmp_path / "diverged")
    _run(workdir, "--config.optim.epochs=1")  # a sane first epoch: ckpt-8
    bad = _run(
        workdir,
        "--config.optim.base_lr=1e12",  # the second epoch diverges
        "--config.train.backup_every_steps=0",
        "--allow_config_change",  # a new lr changes the run: refused without it
        check=False,
    )
    assert bad.returncode != 0
    assert "non-finite" in bad.stderr or "loss became" in bad.stderr
    assert _checkpoint_steps(workdir)[-1] == 8
    # The cause fixed (the lr back to the saved run's first value): resumes and completes.
    out = _run(workdir, "--allow_config_change")
    assert "ckpt-8" in out.stderr and "Resumed from" in out.stderr
    assert np.isfinite(np.concatenate([w.ravel() for w in _weights(workdir).values()])).all()
