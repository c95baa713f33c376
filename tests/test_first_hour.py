"""First-hour mistakes through the command line: each is one line naming the fix, no traceback."""

import fcntl
import json
import textwrap

import pytest
import tensorflow as tf

from simsiam_tf import linear
from simsiam_tf.cli import embed
from simsiam_tf.config import default_config
from tests.conftest import write_images
from tests.helpers import TINY_TRAIN_FLAGS, run_python


def _last_line(proc) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stderr.strip().splitlines()[-1]


def test_read_only_workdir_is_one_line(tmp_path):
    """The file system refuses the write (EROFS, as a read-only mount does): simulated by making
    os.makedirs fail under one folder, since tests cannot mount anything."""
    ro = str(tmp_path / "readonly")
    code = textwrap.dedent(f"""
        import errno, os, runpy, sys
        real = os.makedirs
        def refuse(path, *args, **kwargs):
            if str(path).startswith({ro!r}):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
            return real(path, *args, **kwargs)
        os.makedirs = refuse
        sys.path.insert(0, "tools")
        sys.argv = ["tools/train.py", "--config=configs/quickstart.py", "--workdir={ro}/run"]
        runpy.run_path("tools/train.py", run_name="__main__")
        """)
    proc = run_python("-c", code)
    assert proc.returncode == 2
    assert _last_line(proc) == (
        f"error: {ro}/run: Read-only file system; give a path this user can write to, on a "
        "writable file system with free space"
    )


@pytest.mark.slow  # 25 s: two tool runs (make test-slow)
def test_failed_first_attempt_does_not_bind_the_corrected_rerun(tmp_path):
    folder = tmp_path / "photos"
    write_images(str(folder), 6, size=(16, 16))
    run = tmp_path / "run"
    args = [
        "tools/train.py",
        *TINY_TRAIN_FLAGS,
        f"--workdir={run}",
        f"--config.data.source=folder:{folder}",
    ]
    first = run_python(*args)  # batch 32 > 6 images
    assert first.returncode == 2
    assert _last_line(first) == (
        f"error: config.optim.batch_size=32 is larger than folder:{folder} (6 examples)"
    )
    assert not (run / "config.json").exists()
    fixed = ["--config.optim.batch_size=3", "--config.optim.epochs=1", "--config.data.image_size=8"]
    second = run_python(*args, *fixed)
    assert second.returncode == 0, second.stderr[-3000:]
    with open(run / "config.json") as f:
        assert json.load(f)["optim"]["batch_size"] == 3


def test_export_refuses_a_run_that_is_still_training(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with open(run / ".lock", "a+") as lock:  # what train.lock_workdir holds during a run
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.write("pid 4242 on host since 2026-01-01 00:00:00 (tools/train.py)")
        lock.flush()
        proc = run_python("tools/export.py", f"--workdir={run}", f"--export_dir={tmp_path / 'e'}")
    assert proc.returncode == 1
    assert _last_line(proc) == (
        f"error: {run} is still training (pid 4242 on host since 2026-01-01 00:00:00 "
        "(tools/train.py)): its backbone.weights.h5 is not written yet; wait for the run to "
        "end, or pass --projection to export its latest checkpoint"
    )
    assert not (tmp_path / "e").exists()


def test_one_class_folder_is_named_as_such(tmp_path):
    write_images(str(tmp_path / "photos" / "cats"), 4)
    config = default_config()
    config.data.source = f"folder:{tmp_path / 'photos'}"
    config.data.check_images = False
    with pytest.raises(ValueError, match=r"has one class \(cats\): evaluation needs at least 2"):
        linear.eval_sources(config, str(tmp_path / "run"))


def test_embed_names_the_reason_not_the_graph_node():
    with pytest.raises(tf.errors.OpError) as caught:
        embed.as_accepted_bytes(b"not an image at all")
    message = caught.value.message
    assert "{{node" in message or "{{function_node" in message  # what used to be printed
    assert embed.skip_reason(message) == (
        "Unknown image file format. One of JPEG, JPEG XL, PNG, GIF, BMP, WebP required."
    )
    refused = (
        "assertion failed: [image_bytes[0]: truncated PNG data]\n"
        "\t [[{{function_node __inference_serving_bytes_1}}{{node Assert_8/Assert}}]]"
    )
    assert embed.skip_reason(refused) == "image_bytes[0]: truncated PNG data"
