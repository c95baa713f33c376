"""tools/embed.py: an image folder embedded with an exported SavedModel, the index files, and
nearest-neighbour queries."""

import csv
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from tests import export_helpers as eh
from tests.conftest import write_images
from tests.helpers import run_python
from tools import embed

ATOL = 1e-5


@pytest.fixture
def folder(tmp_path):
    """Photos, generated PNG and JPEG images, a GIF and a BMP in a subfolder, a corrupt file."""
    root = tmp_path / "images"
    root.mkdir()
    for name, data in eh.sample_photos().items():
        (root / name).write_bytes(data)
    write_images(str(root / "blobs"), 3, size=(24, 20), ext=".png", seed=1)
    write_images(str(root / "blobs"), 2, size=(33, 17), ext=".jpg", seed=2)
    other = root / "other"
    other.mkdir()
    photo = Image.open(root / "flower.jpg")
    photo.resize((64, 40)).save(other / "flower.gif")
    photo.resize((50, 30)).save(other / "flower.bmp")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    (root / "signature.png").write_bytes(b"\x89PNG\r\n\x1a\n\0")  # 9 bytes
    Image.new("RGB", (2000, 1)).save(root / "thin.png")  # 1 x 2000: beyond the aspect bound
    (root / "readme.txt").write_text("not an image")
    return root


def _reference(enc, paths):
    return eh.reference_from_bytes(enc, [open(p, "rb").read() for p in paths])["embedding"]


def test_embed_folder_then_query(saved_model, enc, folder, tmp_path):
    prefix = str(tmp_path / "index" / "photos")
    proc = run_python(
        "tools/embed.py",
        f"--saved_model={os.path.dirname(saved_model)}",
        f"--image_dir={folder}",
        f"--index={prefix}",
        "--batch_size=4",
        f"--query={folder / 'china.jpg'}",
        "--k=3",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("broken.png", "signature.png", "thin.png"):
        assert f"Skipped {folder / name}" in proc.stderr
    assert "image_bytes[0]: truncated PNG" in proc.stderr
    assert "more elongated than the 16:1 aspect ratio" in proc.stderr

    with open(prefix + ".csv", newline="") as f:
        rows = list(csv.DictReader(f))
    names = [r["file"] for r in rows]
    assert [int(r["index"]) for r in rows] == list(range(len(rows)))
    assert names == [  # walk order: a folder's files, then its subfolders, each sorted
        "china.jpg",
        "flower.jpg",
        "blobs/img000.jpg",
        "blobs/img000.png",
        "blobs/img001.jpg",
        "blobs/img001.png",
        "blobs/img002.png",
        "other/flower.bmp",
        "other/flower.gif",
    ]
    embeddings = np.load(prefix + ".npy")
    assert embeddings.shape == (9, 32) and embeddings.dtype == np.float32
    np.testing.assert_allclose(
        embeddings, _reference(enc, [folder / n for n in names]), atol=ATOL, rtol=0
    )
    assert "9 of 12 images embedded" in proc.stdout

    lines = proc.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("3 nearest to"))
    neighbours = [line.split("\t") for line in lines[start + 1 : start + 4]]
    assert [n[0] for n in neighbours] == ["1", "2", "3"]
    assert neighbours[0][2] == "china.jpg" and float(neighbours[0][1]) == pytest.approx(
        1.0, abs=1e-4
    )
    sims = [float(n[1]) for n in neighbours]
    assert sims == sorted(sims, reverse=True)


def test_query_an_existing_index_and_errors(saved_model, folder, tmp_path, capsys):
    prefix = str(tmp_path / "idx")
    embed.run(saved_model, prefix, image_dir=str(folder), batch_size=16)
    out = embed.run(saved_model, prefix, query=str(folder / "other" / "flower.gif"), k=100)
    assert len(out) == 9  # k larger than the index: every entry, best first
    assert out[0][0] == "other/flower.gif" and out[0][1] == pytest.approx(1.0, abs=1e-4)
    assert [s for _, s in out] == sorted((s for _, s in out), reverse=True)
    assert "nearest to" in capsys.readouterr().out

    with pytest.raises(ValueError, match="nothing to do"):
        embed.run(saved_model, prefix)
    with pytest.raises(ValueError, match="refused"):
        embed.run(saved_model, prefix, query=str(folder / "broken.png"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no image files"):
        embed.run(saved_model, prefix, image_dir=str(empty))
    with pytest.raises(FileNotFoundError, match="neither a SavedModel nor a base path"):
        embed.run(str(tmp_path), prefix, image_dir=str(folder))


def test_nearest_is_cosine():
    index = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0], [-1.0, 0.0]], np.float32)
    got = embed.nearest(index, np.array([2.0, 0.1], np.float32), 3)
    assert [i for i, _ in got] == [0, 2, 1]
    assert got[0][1] == pytest.approx(2.0 / np.hypot(2.0, 0.1))
    assert got[1][1] == pytest.approx((6.0 + 0.3) / (np.hypot(3, 3) * np.hypot(2.0, 0.1)))


def test_embed_cifar_photos(saved_model, enc, cifar10_folder, tmp_path):
    images = tmp_path / "cifar"
    shutil.copytree(os.path.join(cifar10_folder, "test"), images)
    prefix = str(tmp_path / "cifar_index")
    embed.run(saved_model, prefix, image_dir=str(images), batch_size=32)
    embeddings, names = embed.read_index(prefix)
    assert len(names) == 100 and embeddings.shape == (100, 32)
    np.testing.assert_allclose(
        embeddings[:40], _reference(enc, [images / n for n in names[:40]]), atol=ATOL, rtol=0
    )
    neighbours = embed.run(saved_model, prefix, query=str(images / names[17]), k=5)
    assert neighbours[0][0] == names[17]
