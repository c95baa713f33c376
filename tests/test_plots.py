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


def test_curves_read_well():
    """Whole-epoch ticks, kNN in %, the random-init line labelled with its value, the epochs kNN
    ran named; a note in place of a kNN curve when kNN never ran."""
    rows = _rows(7)  # kNN at epochs 2, 4, 6
    fig = plots.curves_figure(rows, 64, random_init_knn=0.31)
    for ax in fig.axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ax.get_title()
    knn_ax = fig.axes[2]
    assert knn_ax.get_title() == "kNN top-1 (%), measured at epochs 2, 4, 6"
    x, y = knn_ax.lines[0].get_data()
    np.testing.assert_allclose(x, [0, 2, 4, 6])
    np.testing.assert_allclose(y, [31.0, 32.0, 34.0, 36.0])  # %, from the random init at 0
    labels = [t.get_text() for t in knn_ax.get_legend().get_texts()]
    assert labels == ["SimSiam (epoch 6: 36.0%)", "random init (31.0%)"]

    no_knn = [{k: v for k, v in r.items() if k != "knn_top1"} for r in rows]
    fig = plots.curves_figure(no_knn, 64, 0.31, no_knn_note="kNN did not run: no test split")
    knn_ax = fig.axes[2]
    assert "kNN did not run: no test split" in [t.get_text() for t in knn_ax.texts]
    assert knn_ax.get_title() == "kNN top-1 (%), not measured"
    assert len(knn_ax.lines) == 1  # the random-init reference line alone


def test_retrieval_grid_png(tmp_path):
    rng = np.random.default_rng(0)
    q, k = 3, 4
    queries = rng.integers(0, 255, (q, 16, 16, 3), dtype=np.uint8)
    neighbours = rng.integers(0, 255, (q, k, 16, 16, 3), dtype=np.uint8)
    sims = np.round(np.linspace(0.99, 0.5, q * k).reshape(q, k), 2)
    path = plots.retrieval_grid(
        queries,
        neighbours,
        str(tmp_path / "grid.png"),
        [0, 1, 2],
        np.array([[0, 1, 0, 0], [1, 1, 2, 1], [0, 0, 0, 2]]),
        ("a", "b", "c"),
        title="grid",
        similarities=sims,
    )
    w, h = plots.read_png_size(path)
    assert (w, h) == (int(round(100 * (1.1 * (k + 1) + 0.4))), int(round(100 * (1.1 * q + 0.8))))
    _check_png(path, (w, h))
    with pytest.raises(ValueError, match="neighbours"):
        plots.retrieval_grid(queries, neighbours[0], str(tmp_path / "bad.png"))


def test_retrieval_frames_legend_and_similarities():
    rng = np.random.default_rng(0)
    queries = rng.integers(0, 255, (2, 8, 8, 3), dtype=np.uint8)
    neighbours = rng.integers(0, 255, (2, 3, 8, 8, 3), dtype=np.uint8)
    sims = np.array([[0.97, 0.91, 0.5], [0.88, 0.8, 0.75]])
    fig = plots.retrieval_figure(
        queries, neighbours, [0, 1], np.array([[0, 1, 0], [1, 1, 0]]), ("cat", "dog"), "t", sims
    )
    axes = np.asarray(fig.axes).reshape(2, 4)
    frame = lambda ax: ax.spines["top"].get_edgecolor()
    from matplotlib.colors import to_rgba

    assert frame(axes[0, 0]) == to_rgba(plots.QUERY)
    assert [frame(ax) for ax in axes[0, 1:]] == [
        to_rgba(c) for c in (plots.SAME, plots.OTHER, plots.SAME)
    ]
    assert [ax.get_xlabel() for ax in axes[1, 1:]] == ["0.88", "0.80", "0.75"]
    assert axes[1, 0].get_ylabel() == "dog"
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == [
        "query",
        "same class as the query",
        "another class",
        "number: cosine similarity",
    ]
    # Unlabelled: no frames at all, the similarities still shown.
    fig = plots.retrieval_figure(queries, neighbours, similarities=sims)
    assert not any(sp.get_visible() for ax in fig.axes for sp in ax.spines.values())
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["number: cosine similarity"]
    assert fig.axes[1].get_xlabel() == "0.97"


def test_nearest_neighbours_known_answer():
    bank = np.array([[1, 0], [0, 1], [-1, 0], [0.9, 0.1], [0.1, 0.9]], np.float32)
    queries = np.array([[1, 0.05], [0.05, 1]], np.float32)
    idx, sim = plots.nearest_neighbours(bank, queries, 2)
    np.testing.assert_array_equal(idx, [[0, 3], [1, 4]])
    unit = lambda a: a / np.linalg.norm(a)
    assert sim[0, 0] == pytest.approx(float(unit(queries[0]) @ unit(bank[0])), abs=1e-6)
    assert sim[0, 0] > sim[0, 1]
    assert plots.nearest_neighbours(bank, queries, 10)[0].shape == (2, 5)
    # Queries taken from the bank never return themselves.
    idx, _ = plots.nearest_neighbours(bank, bank[[0, 1]], 2, exclude=[0, 1])
    np.testing.assert_array_equal(idx, [[3, 4], [4, 3]])


def test_read_png_size_rejects_other_files(tmp_path):
    p = tmp_path / "x.png"
    p.write_bytes(b"GIF89a" + b"\0" * 30)
    with pytest.raises(ValueError, match="not a PNG"):
        plots.read_png_size(str(p))
