"""The train tool end to end, in a subprocess as a user runs it: train, then resume."""

import json
import os
import re
import signal
import subprocess
import sys
import time

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
    proc = _tool(*TINY, f"--workdir={workdir}", *extra, timeout=600)
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


@pytest.mark.slow  # 24 s: a training run through the tool on a folder (make test-slow)
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
    proc = _tool(
        f"--workdir={tmp_path}/x", *TINY, "--config.data.source=folder:/definitely/missing"
    )
    assert proc.returncode != 0
    assert "error: config.data.source" in proc.stderr and "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr


def _tool(*args, env=None, timeout=300):
    """tools/train.py as a user runs it: no TF_CPP_MIN_LOG_LEVEL of ours, output piped."""
    env = {k: v for k, v in (env or os.environ).items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    return subprocess.run(
        [sys.executable, "tools/train.py", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    "mistake,expected",
    [
        (
            ["--config.optim.epoch=2"],
            "error: unknown config key optim.epoch; did you mean optim.epochs?",
        ),
        (
            ["--config.optimm.epochs=2"],
            "error: unknown config key optimm.epochs; did you mean optim.epochs?",
        ),
        (
            ["--config=configs/quickstat.py"],
            "error: config file configs/quickstat.py does not exist; did you mean configs/quickstart.py?",
        ),
        (
            ["--config.optim.epochs=3", "--config.optim.warmup_epochs=3"],
            "error: config.optim.warmup_epochs=3.0 is invalid: the warm-up must be shorter than the run (optim.epochs=3); set --config.optim.warmup_epochs below 3 or raise --config.optim.epochs",
        ),
        (
            ["--config.optim.epochs=many"],
            "error: flag --config.optim.epochs=many: invalid literal for int()",
        ),
        (
            ["--config.data.source=folder:~/no_photos_here"],
            "error: config.data.source='folder:~/no_photos_here' is invalid: folder {home}/no_photos_here does not exist",
        ),
        (
            ["--workdir={file}"],
            "error: --workdir={file} is a file; give a directory (created if missing)",
        ),
    ],
)
def test_a_config_mistake_is_one_line_naming_the_fix(tmp_path, mistake, expected):
    afile = tmp_path / "a_file"
    afile.write_text("not a directory")
    home = tmp_path / "home"
    home.mkdir()
    # Each mistake replaces the flag of the same name in place (--config must come first).
    flags = {f.split("=")[0]: f for f in [*TINY, f"--workdir={tmp_path / 'run'}"]}
    flags.update({a.split("=")[0]: a.format(file=afile) for a in mistake})
    proc = _tool(*flags.values(), env=dict(os.environ, HOME=str(home)))
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(expected.format(home=home, file=afile)), lines[0]
    assert not (tmp_path / "run").exists()  # refused before any work


@pytest.mark.slow  # 28 s: a 2-replica training run through the tool (make test-slow)
def test_cpu_devices_from_the_command_line_and_a_clean_redirected_log(tmp_path):
    workdir = tmp_path / "two_cpus"
    proc = _tool(
        *TINY,
        f"--workdir={workdir}",
        "--config.train.cpu_devices=2",
        "--config.optim.epochs=2",
        "--config.train.verbose=1",  # a bar on a terminal; redirected, one line per epoch
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "2 replica(s)" in out
    # Redirected output: no progress-bar redraws, no start-up or checkpoint noise.
    assert "\b" not in out and "\r" not in out
    for noise in (
        "absl::InitializeLog",
        "oneDNN custom operations",
        "cpu_feature_guard",
        "Sharding callback duration",
        "UserWarning",
        "triggered tf.function retracing",  # kNN evaluations reuse one trace
    ):
        assert noise not in out, noise
    epoch_lines = [line for line in proc.stdout.splitlines() if line.startswith("3/3 - ")]
    assert len(epoch_lines) == 2, proc.stdout


@pytest.mark.slow  # 33 s: three tool runs (make test-slow)
def test_a_rerun_that_changes_the_run_is_refused_naming_each_key(tmp_path):
    workdir = tmp_path / "run"
    first = _tool(*TINY, f"--workdir={workdir}", "--config.optim.epochs=1")
    assert first.returncode == 0, first.stderr[-3000:]
    saved = (workdir / "config.json").read_text()
    history = (workdir / "history.jsonl").read_text()

    changed = _tool(
        *TINY,
        f"--workdir={workdir}",
        "--config.optim.epochs=1",
        "--config.optim.batch_size=16",
        "--config.data.image_size=24",
        "--config.train.verbose=0",  # cosmetic: not named
    )
    assert changed.returncode == 2, changed.stderr[-3000:]
    line = changed.stderr.strip().splitlines()
    assert len(line) == 1, changed.stderr
    assert "data.image_size: 32 -> 24" in line[0] and "optim.batch_size: 32 -> 16" in line[0]
    assert "train.verbose" not in line[0] and "--allow_config_change" in line[0]
    assert (workdir / "config.json").read_text() == saved
    assert (workdir / "history.jsonl").read_text() == history

    allowed = _tool(
        *TINY,
        f"--workdir={workdir}",
        "--config.optim.epochs=1",
        "--config.optim.batch_size=16",
        "--allow_config_change",
    )
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert json.loads((workdir / "config.json").read_text())["optim"]["batch_size"] == 16


def _wait_for(predicate, proc, what, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        assert proc.poll() is None, f"the run ended before {what}: {proc.stderr.read()[-3000:]}"
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow  # 78 s, Ctrl-C then the rerun: make test-slow
def test_one_run_per_workdir_and_ctrl_c_saves_then_the_rerun_resumes(tmp_path):
    workdir = tmp_path / "run"
    flags = [
        *TINY,
        f"--workdir={workdir}",
        "--config.train.steps_per_epoch=0",  # 168 steps of 8 digits per epoch
        "--config.optim.batch_size=8",
        "--config.optim.epochs=8",  # long enough to be running when the second run starts
        "--config.train.backup_every_steps=10",
        "--config.eval.random_init_knn=False",
    ]
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    first = subprocess.Popen(
        [sys.executable, "tools/train.py", *flags],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        ckpts = workdir / "checkpoints"
        _wait_for(lambda: ckpts.is_dir() and any(ckpts.glob("ckpt-*.index")), first, "a backup")

        second = _tool(*flags)
        assert second.returncode == 1, second.stderr[-3000:]
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and f"is in use by pid {first.pid} " in lines[0], lines

        first.send_signal(signal.SIGINT)
        _, err = first.communicate(timeout=240)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    last = err.strip().splitlines()[-1]
    match = re.match(r"stopped by Ctrl-C at step (\d+) .*rerunning the same command resumes", last)
    assert match, err[-3000:]
    step = int(match.group(1))
    assert 0 < step < 8 * 168
    assert (ckpts / f"ckpt-{step}.index").exists()  # saved at the step it stopped

    rerun = _tool(*flags)  # the lock died with its holder
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"Resumed from {ckpts}/ckpt-{step} (step {step}" in rerun.stderr
    assert [row["epoch"] for row in _history(str(workdir))] == list(range(1, 9))


def test_a_second_ctrl_c_exits_at_once(monkeypatch, tmp_path):
    import keras

    from simsiam_tf import callbacks

    net = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    opt = keras.optimizers.SGD()
    opt.build(net.trainable_variables)
    ckpt = callbacks.Checkpointer(str(tmp_path), net, opt, steps_per_epoch=10)
    exits = []
    monkeypatch.setattr(callbacks.os, "_exit", exits.append)
    ckpt._on_stop_signal(signal.SIGINT, None)
    assert ckpt.stopped_by == signal.SIGINT and exits == []  # the first waits for the step
    ckpt._on_stop_signal(signal.SIGINT, None)
    assert exits == [130]
