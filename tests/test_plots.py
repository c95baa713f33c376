"""Pictures: written, valid PNGs of the expected size, readable back."""

import numpy as np
import pytest
from PIL import Image

from simsiam_tf import plots

PNG = b"\x89PNG\r\n\x1a\n"


def _rows(n=6, collapse=False):
    rows = []
    for e in range(1, n + 1):
        std = (0.9 if not collapse else 0.9 / e) / 8.0
        rows.append(
            dict(
                epoch=e,
                loss=-0.5 - 0.05 * e,
                z_std=std,
                p_std=std * 0.9,
                lr=0.05 / e,
                **({"knn_top1": 0.3 + 0.01 * e} if e % 2 == 0 else {}),
            )
        )
    return rows


def _check_png(path, size):
    with open(path, "rb") as f:
        assert f.read(8) == PNG
    assert plots.read_png_size(path) == size
    with Image.open(path) as img:
        img.load()
        assert img.size == size
    import matplotlib.image

    assert matplotlib.image.imread(path).shape[:2] == (size[1], size[0])


def test_training_curves_png(tmp_path):
    path = plots.plot_curves(
        _rows(), str(tmp_path / "curves.png"), 64, random_init_knn=0.31, title="test"
    )
    _check_png(path, (1000, 700))


def test_curves_without_knn_or_p_std(tmp_path):
    rows = [dict(epoch=e, loss=-0.1 * e, z_std=0.1, lr=0.1) for e in range(1, 4)]
    _check_png(plots.plot_curves(rows, str(tmp_path / "c.png"), 64), (1000, 700))
    with pytest.raises(ValueError, match="history"):
        plots.plot_curves([], str(tmp_path / "x.png"), 64)


def test_ablation_png(tmp_path):
    arms = {"simsiam": _rows(), "no_stopgrad": _rows(collapse=True)}
    path = plots.plot_ablation(arms, str(tmp_path / "ablation.png"), 64, 0.3, title="t")
    _check_png(path, (1400, 420))
    inits = {"simsiam": 0.31, "no_stopgrad": 0.33}  # one initial network per arm
    _check_png(plots.plot_ablation(arms, str(tmp_path / "a2.png"), 64, inits), (1400, 420))


def test_retrieval_grid_png(tmp_path):
    rng = np.random.default_rng(0)
    q, k = 3, 4
    queries = rng.integers(0, 255, (q, 16, 16, 3), dtype=np.uint8)
    neighbours = rng.integers(0, 255, (q, k, 16, 16, 3), dtype=np.uint8)
    path = plots.retrieval_grid(
        queries,
        neighbours,
        str(tmp_path / "grid.png"),
        [0, 1, 2],
        np.array([[0, 1, 0, 0], [1, 1, 2, 1], [0, 0, 0, 2]]),
        ("a", "b", "c"),
        title="grid",
    )
    w, h = plots.read_png_size(path)
    assert (w, h) == (int(round(100 * (1.1 * (k + 1) + 0.4))), int(round(100 * (1.1 * q + 0.5))))
    _check_png(path, (w, h))
    with pytest.raises(ValueError, match="neighbours"):
        plots.retrieval_grid(queries, neighbours[0], str(tmp_path / "bad.png"))


def test_nearest_neighbours_known_answer():
    bank = np.array([[1, 0], [0, 1], [-1, 0], [0.9, 0.1], [0.1, 0.9]], np.float32)
    queries = np.array([[1, 0.05], [0.05, 1]], np.float32)
    np.testing.assert_array_equal(plots.nearest_neighbours(bank, queries, 2), [[0, 3], [1, 4]])
    assert plots.nearest_neighbours(bank, queries, 10).shape == (2, 5)


def test_read_png_size_rejects_other_files(tmp_path):
    p = tmp_path / "x.png"
    p.write_bytes(b"GIF89a" + b"\0" * 30)
    with pytest.raises(ValueError, match="not a PNG"):
        plots.read_png_size(str(p))
