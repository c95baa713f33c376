"""Pictures of a run: training curves, the paper's Figure 2 for an ablation study, and a
nearest-neighbour retrieval grid.

Figures are drawn on `matplotlib.figure.Figure` objects, rendered by the Agg canvas: no display,
no global pyplot state, safe in tests and on servers.
"""

from __future__ import annotations

import io
import math
import os
from typing import Mapping, Optional, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _series(rows: Sequence[Mapping], key: str, scale: float = 1.0):
    pts = [(r["epoch"], r[key] * scale) for r in rows if key in r and r[key] is not None]
    return ([e for e, _ in pts], [v for _, v in pts]) if pts else ([], [])


def _knn_series(rows, random_init: Optional[float]):
    """kNN top-1 in %, starting at epoch 0 with the random-init score when known."""
    epochs, acc = _series(rows, "knn_top1", 100.0)
    if random_init is not None:
        epochs, acc = [0] + epochs, [100.0 * random_init] + acc
    return epochs, acc


def plot_curves(
    rows: Sequence[Mapping],
    path: str,
    proj_dim: int,
    random_init_knn: Optional[float] = None,
    title: str = "",
) -> str:
    """A 2x2 PNG of one run's history.jsonl rows: loss, output std x sqrt(d), kNN top-1, lr."""
    if not rows:
        raise ValueError("no history rows to plot (history.jsonl is empty)")
    fig = _figure(10, 7)
    axes = fig.subplots(2, 2)
    scale = math.sqrt(proj_dim)

    ax = axes[0, 0]
    ax.plot(*_series(rows, "loss"), "o-", ms=3)
    ax.axhline(-1.0, color="grey", ls=":", lw=1)
    ax.set(title="training loss (minimum -1)", xlabel="epoch", ylabel="loss")

    ax = axes[0, 1]
    for key, label in (("z_std", "z (projector)"), ("p_std", "p (predictor)")):
        x, y = _series(rows, key, scale)
        if x:
            ax.plot(x, y, "o-", ms=3, label=label)
    ax.axhline(1.0, color="grey", ls=":", lw=1)
    ax.set_ylim(bottom=0)
    ax.set(
        title="std of l2-normalised output x sqrt(d)",
        xlabel="epoch",
        ylabel=f"std x sqrt({proj_dim})",
    )
    ax.legend(loc="lower left", fontsize=8)

    ax = axes[1, 0]
    x, y = _knn_series(rows, random_init_knn)
    if x:
        ax.plot(x, y, "o-", ms=3, label="SimSiam")
    if random_init_knn is not None:
        ax.axhline(100 * random_init_knn, color="grey", ls="--", lw=1, label="random init")
        ax.legend(loc="lower right", fontsize=8)
    ax.set(title="kNN top-1 (%)", xlabel="epoch", ylabel="accuracy (%)")

    ax = axes[1, 1]
    ax.plot(*_series(rows, "lr"), "o-", ms=3)
    ax.set(title="learning rate (end of epoch)", xlabel="epoch", ylabel="lr")
    ax.set_ylim(bottom=0)
    if title:
        fig.suptitle(title)
    fig.savefig(path, format="png")
    return path


def plot_ablation(
    arms: Mapping[str, Sequence[Mapping]],
    path: str,
    proj_dim: int,
    random_init_knn=None,
    title: str = "",
) -> str:
    """The paper's Figure 2 for several arms: loss, std x sqrt(d) of z (solid) and p (dashed),
    kNN top-1 per epoch.

    random_init_knn: one kNN top-1 of the initial network, or one per arm ({name: top-1}); each
    arm's curve starts at epoch 0 from its own, and the grey line is their mean.
    """
    if not arms:
        raise ValueError("no arms to plot")
    inits = random_init_knn if isinstance(random_init_knn, Mapping) else None
    fig = _figure(14, 4.2)
    axes = fig.subplots(1, 3)
    scale = math.sqrt(proj_dim)
    for i, (name, rows) in enumerate(arms.items()):
        colour = f"C{i}"
        axes[0].plot(*_series(rows, "loss"), "o-", ms=3, color=colour, label=name)
        axes[1].plot(*_series(rows, "z_std", scale), "o-", ms=3, color=colour, label=f"{name} z")
        x, y = _series(rows, "p_std", scale)
        if x:
            axes[1].plot(x, y, "--", lw=1, color=colour, alpha=0.7, label=f"{name} p")
        init = inits.get(name) if inits is not None else random_init_knn
        x, y = _knn_series(rows, init)
        axes[2].plot(x, y, "o-", ms=3, color=colour, label=name)
    axes[0].axhline(-1.0, color="grey", ls=":", lw=1)
    axes[0].set(title="training loss", xlabel="epoch", ylabel="loss")
    axes[1].axhline(1.0, color="grey", ls=":", lw=1)
    axes[1].set_ylim(bottom=0)
    axes[1].set(
        title="output std (l2-normalised) x sqrt(d): z solid, p dashed",
        xlabel="epoch",
        ylabel=f"std x sqrt({proj_dim})",
    )
    known = [v for v in (inits.values() if inits is not None else [random_init_knn]) if v]
    if known:
        label = "random init" + (" (mean)" if len(known) > 1 else "")
        axes[2].axhline(100 * float(np.mean(known)), color="grey", ls="--", lw=1, label=label)
    axes[2].set(title="kNN top-1 (%)", xlabel="epoch", ylabel="accuracy (%)")
    for ax in axes:
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.savefig(path, format="png")
    return path


def nearest_neighbours(bank: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Indices (Q x k) of each query's k nearest bank rows by cosine similarity, nearest first."""
    unit = lambda a: a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    sim = unit(np.asarray(queries, np.float32)) @ unit(np.asarray(bank, np.float32)).T
    k = min(k, sim.shape[1])
    top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(sim, top, axis=1), axis=1)
    return np.take_along_axis(top, order, axis=1)


def retrieval_grid(
    queries: np.ndarray,
    neighbours: np.ndarray,
    path: str,
    query_labels: Optional[Sequence[int]] = None,
    neighbour_labels: Optional[np.ndarray] = None,
    class_names: Sequence[str] = (),
    title: str = "",
) -> str:
    """A PNG grid: one row per query, the query image then its neighbours, nearest first.

    queries: Q x H x W x 3 uint8; neighbours: Q x K x H x W x 3 uint8. With labels, each
    neighbour is framed green when its class is the query's and red otherwise.
    """
    queries, neighbours = np.asarray(queries), np.asarray(neighbours)
    if queries.ndim != 4 or neighbours.ndim != 5 or len(queries) != len(neighbours):
        raise ValueError(
            f"need Q x H x W x 3 queries and Q x K x H x W x 3 neighbours, got "
            f"{queries.shape} and {neighbours.shape}"
        )
    q, k = neighbours.shape[:2]
    cell = 1.1
    fig = _figure(cell * (k + 1) + 0.4, cell * q + (0.5 if title else 0.2))
    axes = np.asarray(fig.subplots(q, k + 1, squeeze=False))
    name = lambda c: class_names[c] if 0 <= c < len(class_names) else str(c)
    for i in range(q):
        cols = [queries[i]] + list(neighbours[i])
        for j, image in enumerate(cols):
            ax = axes[i, j]
            ax.imshow(image, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            colour, width = "black", 0.5
            if j == 0:
                colour, width = "royalblue", 3
                if query_labels is not None:
                    ax.set_ylabel(name(int(query_labels[i])), fontsize=7)
            elif query_labels is not None and neighbour_labels is not None:
                same = int(neighbour_labels[i][j - 1]) == int(query_labels[i])
                colour, width = ("limegreen" if same else "red"), 3
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(width)
            if i == 0:
                ax.set_title("query" if j == 0 else f"#{j}", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.savefig(path, format="png")
    return path


def views_grid(images, view1, view2, title: str = "", path: Optional[str] = None) -> bytes:
    """A PNG of augmented view pairs: one row per image, the image then its two views.

    images, view1, view2: N x H x W x 3 uint8. Returns the PNG bytes; also writes `path`.
    """
    images, view1, view2 = (np.asarray(a) for a in (images, view1, view2))
    n = len(images)
    cell = 1.6
    fig = _figure(3 * cell + 0.2, n * cell + (0.2 + 0.17 * title.count("\n") if title else 0.2))
    axes = np.asarray(fig.subplots(n, 3, squeeze=False))
    for i in range(n):
        for j, (image, name) in enumerate(
            ((images[i], "image"), (view1[i], "view 1"), (view2[i], "view 2"))
        ):
            ax = axes[i, j]
            ax.imshow(image, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=6)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    png = buffer.getvalue()
    if path:
        with open(path, "wb") as f:
            f.write(png)
    return png


def views_title(recipe_description: str, source_name: str, width: int = 110) -> str:
    """The recipe, wrapped at its ";" separators, under the source's name."""
    lines, line = [], ""
    for part in recipe_description.split("; "):
        if line and len(line) + len(part) + 2 > width:
            lines.append(line + ";")
            line = part
        else:
            line = f"{line}; {part}" if line else part
    return "\n".join([f"views of {source_name}"] + lines + [line])


def log_views(logdir: str, source, config, n: int = 8) -> None:
    """The view-pair grid of `source` under `config` as a TensorBoard image (logdir/views)."""
    import tensorflow as tf

    from simsiam_tf import augment, data

    views = data.preview_views(source, config, n)
    recipe = augment.TwoViewRecipe(config.aug, config.data.image_size, config.data.photometric)
    title = views_title(recipe.description, f"{source.name} ({config.data.photometric} mode)")
    png = views_grid(views["image"], views["view1"], views["view2"], title)
    with tf.summary.create_file_writer(os.path.join(logdir, "views")).as_default():
        tf.summary.image("augmented_views", tf.image.decode_png(png)[None], step=0)
        tf.summary.text("augmentation_recipe", recipe.description, step=0)


def read_png_size(path: str) -> tuple:
    """(width, height) from a PNG's header; raises ValueError when the file is not a PNG."""
    with open(path, "rb") as f:
        head = f.read(24)
    if head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        raise ValueError(f"{path} is not a PNG file")
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
