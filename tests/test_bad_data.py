"""An image folder seeded with broken and unusual files: decodable ones train as RGB, broken
ones are skipped with a count and their names, or fail the run up front with data.strict."""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from simsiam_tf import data, imagecheck, plots
from simsiam_tf.config import default_config
from simsiam_tf.errors import ConfigError
from tests.conftest import REPO, write_images

BROKEN = ("truncated.jpg", "garbage.jpg", "empty.png", "notes.png")


def _save(path, image, fmt, **kw):
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


@pytest.fixture(scope="module")
def messy_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("messy")
    rng = np.random.default_rng(0)
    for cls in ("cats", "dogs"):
        d = root / cls
        d.mkdir()
        for i in range(12):
            arr = np.kron(rng.integers(0, 255, (6, 6, 3)), np.ones((6, 6, 1))).astype(np.uint8)
            _save(d / f"ok{i}.jpg", Image.fromarray(arr), "JPEG")
    d = root / "cats"
    rgb = Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8))
    _save(d / "gray.png", rgb.convert("L"), "PNG")
    _save(d / "rgba.png", rgb.convert("RGBA"), "PNG")
    _save(d / "palette.png", rgb.convert("P"), "PNG")
    _save(d / "cmyk.jpg", rgb.convert("CMYK"), "JPEG")
    _save(
        d / "deep.png", Image.fromarray(rng.integers(0, 65535, (30, 40)).astype(np.uint16)), "PNG"
    )
    jpg = _save(d / "tmp.jpg", rgb, "JPEG")
    os.remove(d / "tmp.jpg")
    (d / "truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    (d / "garbage.jpg").write_bytes(b"<html>not found</html>")
    (d / "empty.png").write_bytes(b"")
    (d / "notes.png").write_text("just text")
    return str(root)


def test_finds_exactly_the_undecodable_files(messy_folder):
    src = data.load_source(f"folder:{messy_folder}")
    bad = imagecheck.undecodable(src.files, progress=False)
    assert sorted(os.path.basename(src.files[i]) for i in bad) == sorted(BROKEN)


def test_skips_broken_files_and_keeps_unusual_ones_as_rgb(messy_folder, tmp_path, caplog):
    src = data.load_source(f"folder:{messy_folder}")
    clean = imagecheck.drop_undecodable(src, strict=False, cache_dir=str(tmp_path))
    assert clean.num_examples == src.num_examples - 4 == len(clean.files) == len(clean.labels)
    names = {os.path.basename(f) for f in clean.files}
    assert {"gray.png", "rgba.png", "palette.png", "cmyk.jpg", "deep.png"} <= names
    assert not names & set(BROKEN)
    assert any("skipping 4 of" in r.getMessage() for r in caplog.records)
    # A whole epoch runs: every decodable oddity comes out as 3-channel uint8.
    c = default_config()
    c.data.image_size = 16
    batches = list(data.pretrain_dataset(clean, c.data, c.aug, 8, seed=0, num_epochs=1))
    assert len(batches) == clean.num_examples // 8
    assert all(b["view1"].shape == (8, 16, 16, 3) for b in batches)
    # The verdict is cached for the same files.
    cached = [f for f in os.listdir(tmp_path) if f.startswith("image_check-")]
    assert len(cached) == 1


def test_strict_fails_naming_the_files(messy_folder):
    src = data.load_source(f"folder:{messy_folder}")
    with pytest.raises(ConfigError, match=r"4 of \d+ files cannot be decoded.*truncated.jpg"):
        imagecheck.drop_undecodable(src, strict=True)


def _run(*args, ok=True):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, env=env, timeout=600
    )
    if ok:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _scalars(logdir):
    """{tag: [(step, value)]} of the TensorBoard event files in logdir."""
    import tensorflow as tf

    out = {}
    for name in sorted(os.listdir(logdir)):
        for event in tf.compat.v1.train.summary_iterator(os.path.join(logdir, name)):
            for v in event.summary.value:
                value = float(tf.make_ndarray(v.tensor))
                out.setdefault(v.tag, []).append((event.step, value))
    return out


TRAIN_FLAGS = [
    "tools/train.py",
    "--config=configs/quickstart.py",
    "--config.model.width=8",
    "--config.model.proj_dim=64",
    "--config.model.proj_hidden=64",
    "--config.model.pred_hidden=16",
    "--config.optim.batch_size=4",
    "--config.optim.epochs=2",
    "--config.optim.warmup_epochs=0",
    "--config.eval.knn_every_epochs=1",
    "--config.eval.knn_k=5",
    "--config.train.log_every_steps=2",
    "--config.train.verbose=2",
]


@pytest.mark.slow  # 70 s: train, then both evaluation tools (make test-slow)
def test_train_and_eval_tools_on_the_messy_folder(messy_folder, tmp_path):
    """A labelled folder without test/, with broken files: training holds out a recorded split
    and scores kNN on it; eval_knn, eval_linear and plot use that very split, skip and name the
    broken files from the run's cached verdicts, and report the checkpoint's epoch."""
    run = str(tmp_path / "run")
    out = _run(*TRAIN_FLAGS, f"--config.data.source=folder:{messy_folder}", f"--workdir={run}")
    assert "skipping" in out.stderr and "truncated.jpg" in out.stderr
    record = json.load(open(os.path.join(run, "holdout.json")))
    listing = data.load_source(f"folder:{messy_folder}").files
    held = set(record["heldout"])
    assert record["num_examples"] == len(listing) == 33 and len(held) == 4 + 2  # 21 cats, 12 dogs
    broken_in_train = [b for b in BROKEN if os.path.join("cats", b) not in held]
    pretrained = len(listing) - len(held) - len(broken_in_train)
    assert f"labelled[train]: {pretrained} examples" in out.stderr.replace(messy_folder, "labelled")
    history = [json.loads(line) for line in open(os.path.join(run, "history.jsonl"))]
    steps_per_epoch = pretrained // 4
    assert [(r["epoch"], r["step"]) for r in history] == [
        (1, steps_per_epoch),
        (2, 2 * steps_per_epoch),
    ]
    assert all("knn_top1" in r for r in history)  # kNN ran, on the held-out images
    random_init = json.load(open(os.path.join(run, "random_init.json")))["knn_top1"]

    # TensorBoard: epoch scalars at the epochs of history.jsonl, step scalars every 2 steps,
    # the random-init kNN as a flat reference line, the learning rate once.
    tb = _scalars(os.path.join(run, "tb", "train"))
    last = 2 * steps_per_epoch
    assert [s for s, _ in tb["step/loss"]] == list(range(2, last + 1, 2))
    assert [s for s, _ in tb["epoch/loss"]] == [1, 2]
    for row, (_, value) in zip(history, tb["epoch/loss"]):
        assert value == pytest.approx(row["loss"], rel=1e-5)
    assert tb["epoch/knn_top1"][0] == (0, pytest.approx(random_init))
    assert [v for _, v in tb["epoch/knn_top1"][1:]] == pytest.approx(
        [r["knn_top1"] for r in history]
    )
    assert not [t for t in tb if "learning_rate" in t]
    assert {t for t in tb if t.endswith("lr")} == {"step/lr", "epoch/lr"}
    # Each step point is the mean loss since the previous point of its epoch: an epoch ending
    # on a point is the interval-weighted mean of its points.
    for row in history:
        begin, end = row["step"] - steps_per_epoch, row["step"]
        points = [(s, v) for s, v in tb["step/loss"] if begin < s <= end]
        if points[-1][0] == end:
            starts = [begin] + [s for s, _ in points[:-1]]
            mean = sum((s - s0) * v for (s, v), s0 in zip(points, starts)) / steps_per_epoch
            assert mean == pytest.approx(row["loss"], rel=1e-4, abs=1e-6)
    ref = _scalars(os.path.join(run, "tb", "random_init"))["epoch/knn_top1"]
    assert ref == [(e, pytest.approx(random_init)) for e in (0, 1, 2)]

    # eval_knn: the same bank and queries as training, hence the same numbers; the verdicts of
    # training reused (nothing decoded again), every broken file named.
    knn = _run("tools/eval_knn.py", f"--workdir={run}")
    result = json.load(open(os.path.join(run, "knn_eval.json")))
    assert result["knn_top1"] == pytest.approx(history[-1]["knn_top1"])
    assert result["random_init_knn_top1"] == pytest.approx(random_init)
    assert (result["epoch"], result["step"]) == (2, last) and "epoch 2" in result["backbone"]
    assert result["num_queries"] == len(held) - (len(BROKEN) - len(broken_in_train))
    assert result["holdout"]["sha1"] == record["sha1"]
    assert "Checking that the" not in knn.stderr
    assert all(name in knn.stderr for name in BROKEN)

    linear_out = _run(
        "tools/eval_linear.py", f"--workdir={run}", "--epochs=2", "--batch_size=8"
    ).stdout
    result = json.load(open(os.path.join(run, "linear_cifar.json")))
    assert (result["epoch"], result["step"]) == (2, last) and "top5" not in result  # 2 classes
    assert result["num_train"] == pretrained and result["holdout"]["sha1"] == record["sha1"]
    assert linear_out.startswith("epoch 2: top1=") and "Epoch 1/2" not in linear_out  # quiet

    _run("tools/plot.py", f"--workdir={run}", "--queries=3", "--k=4")
    for name in ("curves.png", "retrieval.png"):
        assert plots.read_png_size(os.path.join(run, name))[0] > 0
    # Unlabelled images: a grid of bank queries without frames, not an error.
    write_images(str(tmp_path / "flat"), 12)
    _run(
        "tools/plot.py",
        f"--workdir={run}",
        f"--data=folder:{tmp_path / 'flat'}",
        f"--out_dir={tmp_path / 'flat_plots'}",
        "--queries=2",
        "--k=3",
    )
    assert plots.read_png_size(str(tmp_path / "flat_plots" / "retrieval.png"))[0] > 0

    # Under data.strict the tools refuse, naming the files, with one line and no traceback.
    config_path = os.path.join(run, "config.json")
    config = json.load(open(config_path))
    config["data"]["strict"] = True
    json.dump(config, open(config_path, "w"))
    for tool in ("tools/eval_knn.py", "tools/eval_linear.py"):
        refused = _run(tool, f"--workdir={run}", ok=False)
        assert refused.returncode == 1 and "Traceback" not in refused.stderr
        assert "error:" in refused.stderr and "cannot be decoded" in refused.stderr


@pytest.mark.slow  # two training processes; the eval-tools test above trains on the same folder
def test_train_tool_on_the_messy_folder(messy_folder, tmp_path):
    common = [
        sys.executable,
        "tools/train.py",
        "--config=configs/quickstart.py",
        f"--config.data.source=folder:{messy_folder}",
        "--config.model.width=8",
        "--config.model.proj_dim=64",
        "--config.model.proj_hidden=64",
        "--config.model.pred_hidden=16",
        "--config.optim.batch_size=8",
        "--config.optim.epochs=1",
        "--config.optim.warmup_epochs=0",
        "--config.train.verbose=2",
    ]
    ok = subprocess.run(
        common + [f"--workdir={tmp_path}/run"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "skipping 4 of" in ok.stderr and "truncated.jpg" in ok.stderr
    strict = subprocess.run(
        common + [f"--workdir={tmp_path}/strict", "--config.data.strict=True"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert strict.returncode != 0 and "error:" in strict.stderr and "garbage.jpg" in strict.stderr
    assert not os.path.exists(f"{tmp_path}/strict/history.jsonl")  # failed before training
