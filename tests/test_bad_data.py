"""An image folder seeded with broken and unusual files: decodable ones train as RGB, broken
ones are skipped with a count and their names, or fail the run up front with data.strict."""

import io
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from simsiam_tf import data, imagecheck
from simsiam_tf.config import default_config
from simsiam_tf.errors import ConfigError
from tests.conftest import REPO

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
