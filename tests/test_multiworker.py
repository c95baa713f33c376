"""MultiWorkerMirroredStrategy: 2 worker processes on 127.0.0.1 train in lockstep and end where
one process training on the same global batches ends."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO
from tests.helpers import TINY_TRAIN_FLAGS

SCRIPT = os.path.join(REPO, "tests", "multiworker_step.py")


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _env(tf_config=None):
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    if tf_config:
        env["TF_CONFIG"] = json.dumps(tf_config)
    return env


def _weights(path):
    with np.load(path) as f:
        return float(f["loss"]), [
            f[k] for k in sorted(f.files, key=lambda k: (len(k), k)) if k != "loss"
        ]


def _run_workers(tmp_path, extra):
    """(worker 0's, worker 1's, one process's) (loss, weights, stdout) of multiworker_step.py."""
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs = []
    for i in range(2):
        cfg = {"cluster": cluster, "task": {"type": "worker", "index": i}}
        out = str(tmp_path / f"worker{i}.npz")
        procs.append(
            subprocess.Popen(
                [sys.executable, SCRIPT, out, REPO, *extra],
                cwd=REPO,
                env=_env(cfg),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (_, stderr) in zip(procs, outputs):
        assert p.returncode == 0, stderr[-3000:]
    single = subprocess.run(
        [sys.executable, SCRIPT, str(tmp_path / "single.npz"), REPO, *extra],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    names = ("worker0", "worker1", "single")
    stdouts = (outputs[0][0], outputs[1][0], single.stdout)
    return [(*_weights(tmp_path / f"{n}.npz"), out) for n, out in zip(names, stdouts)]


def _assert_lockstep_and_equal_to_one_process(results):
    (loss0, w0, out0), (_, w1, out1), (loss_s, ws, _) = results
    assert "workers 2 chief True" in out0 and "workers 2 chief False" in out1
    for a, b in zip(w0, w1):
        np.testing.assert_array_equal(a, b)  # lockstep: identical on both workers
    for a, b in zip(w0, ws):
        np.testing.assert_allclose(a, b, atol=1e-5)  # = one process on the global batch
    assert abs(loss0 - loss_s) < 1e-5


def _decoded(stdout):
    return int(next(line for line in stdout.splitlines() if line.startswith("decoded")).split()[1])


@pytest.mark.slow  # the folder test below covers per-worker input and lockstep by default
def test_two_workers_match_each_other_and_a_single_process(tmp_path):
    _assert_lockstep_and_equal_to_one_process(_run_workers(tmp_path, []))


@pytest.mark.slow  # 29 s: two worker processes (make test-slow)
def test_two_workers_on_a_folder_each_decode_half_of_every_batch(tmp_path):
    """An image folder: each worker reads and decodes only its 16 rows of every global batch of
    32 (3 steps: 48 images, against 96 for one process), and the run still equals one process's
    on the same global batches, the per-image random draws included."""
    from tests.conftest import write_images

    for c in ("a", "b"):
        write_images(str(tmp_path / "photos" / c), 60, seed=len(c))
    results = _run_workers(tmp_path, [str(tmp_path / "photos")])
    _assert_lockstep_and_equal_to_one_process(results)
    assert [_decoded(out) for _, _, out in results] == [48, 48, 96]


@pytest.mark.slow
def test_train_tool_on_two_workers_writes_one_run_directory(tmp_path):
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    workdir = str(tmp_path / "run")
    args = ["tools/train.py", f"--workdir={workdir}", *TINY_TRAIN_FLAGS]
    args += ["--config.optim.epochs=2", "--config.train.steps_per_epoch=3"]
    procs = [
        subprocess.Popen(
            [sys.executable, *args],
            cwd=REPO,
            text=True,
            env=_env({"cluster": cluster, "task": {"type": "worker", "index": i}}),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=900) for p in procs]
    assert procs[0].returncode == 0, outs[0][1][-3000:]
    losses = [line for out in outs for line in out[0].splitlines() if line.startswith("epochs=")]
    assert len(losses) >= 1
    with open(os.path.join(workdir, "summary.json")) as f:
        assert json.load(f)["epochs"] == 2
    assert os.path.isdir(os.path.join(workdir, ".workers", "1"))  # worker 1 wrote aside
