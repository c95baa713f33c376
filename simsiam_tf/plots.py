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
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator


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
    no_knn_note: str = "",
) -> str:
    """A 2x2 PNG of one run's history.jsonl rows (`curves_figure`)."""
    curves_figure(rows, proj_dim, random_init_knn, title, no_knn_note).savefig(path, format="png")
    return path


def curves_figure(
    rows: Sequence[Mapping],
    proj_dim: int,
    random_init_knn: Optional[float] = None,
    title: str = "",
    no_knn_note: str = "",
) -> Figure:
    """Loss, output std x sqrt(d), kNN top-1 (%), lr of history.jsonl rows, against whole
    epochs. `no_knn_note` is written in the kNN panel when no row has kNN."""
    if not rows:
        raise ValueError("no history rows to plot (history.jsonl is empty)")
    fig = _figure(10, 7)
    axes = fig.subplots(2, 2)
    scale = math.sqrt(proj_dim)
    last_epoch = max(r["epoch"] for r in rows)

    ax = axes[0, 0]
    ax.plot(*_series(rows, "loss"), "o-", ms=3)
    ax.axhline(-1.0, color="grey", ls=":", lw=1)
    ax.set(title="training loss (minimum -1)", xlabel="epoch", ylabel="loss")

    ax = axes[0, 1]
    for key, label in (("z_std", "z (projector)"), ("p_std", "p (predictor)")):
        x, y = _series(rows, key, scale)
        if x:
            ax.plot(x, y, "o-", ms=3, label=label)
    ax.axhline(1.0, color="grey", ls=":", lw=1, label="healthy (1)")
    ax.set_ylim(bottom=0)
    ax.set(
        title="std of l2-normalised output x sqrt(d) (0: collapse)",
        xlabel="epoch",
        ylabel=f"std x sqrt({proj_dim})",
    )
    ax.legend(loc="lower left", fontsize=8)

    ax = axes[1, 0]
    measured = _series(rows, "knn_top1")[0]
    x, y = _knn_series(rows, random_init_knn)
    if measured:
        ax.plot(x, y, "o-", ms=3, label=f"SimSiam (epoch {measured[-1]}: {y[-1]:.1f}%)")
    if random_init_knn is not None:
        ax.axhline(
            100 * random_init_knn,
            color="grey",
            ls="--",
            lw=1,
            label=f"random init ({100 * random_init_knn:.1f}%)",
        )
    if measured or random_init_knn is not None:
        ax.legend(loc="best", fontsize=8)
    if not measured:
        ax.text(
            0.5,
            0.5,
            no_knn_note or "kNN did not run in this run",
            transform=ax.transAxes,
            ha="center",
            va="center",
            wrap=True,
            fontsize=9,
            color="dimgrey",
        )
        ax.set_xlim(0, max(last_epoch, 1))
        ax.set_ylim(0, 100)
    kind = f"measured at epochs {_epoch_list(measured)}" if measured else "not measured"
    ax.set(title=f"kNN top-1 (%), {kind}", xlabel="epoch", ylabel="accuracy (%)")

    ax = axes[1, 1]
    ax.plot(*_series(rows, "lr"), "o-", ms=3)
    ax.set(title="learning rate (end of epoch)", xlabel="epoch", ylabel="lr")
    ax.set_ylim(bottom=0)
    for ax in axes.flat:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if title:
        fig.suptitle(title)
    return fig


def _epoch_list(epochs: Sequence[int]) -> str:
    """ "1, 2, 3" for a few epochs; "10, 20, ..., 100" for many."""
    epochs = [int(e) for e in epochs]
    if len(epochs) <= 4:
        return ", ".join(map(str, epochs))
    return f"{epochs[0]}, {epochs[1]}, ..., {epochs[-1]}"


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
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if title:
        fig.suptitle(title)
    fig.savefig(path, format="png")
    return path


def nearest_neighbours(
    bank: np.ndarray, queries: np.ndarray, k: int, exclude: Optional[Sequence[int]] = None
) -> tuple:
    """(indices, similarities), Q x k each: every query's k nearest bank rows by cosine
    similarity, nearest first. exclude[i]: a bank row query i may not return (the query itself
    when the queries come from the bank)."""
    unit = lambda a: a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    sim = unit(np.asarray(queries, np.float32)) @ unit(np.asarray(bank, np.float32)).T
    if exclude is not None:
        sim[np.arange(len(sim)), np.asarray(exclude)] = -np.inf
    k = min(k, sim.shape[1] - (exclude is not None))
    top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(sim, top, axis=1), axis=1)
    top = np.take_along_axis(top, order, axis=1)
    return top, np.take_along_axis(sim, top, axis=1)


SAME, OTHER, QUERY = "limegreen", "red", "royalblue"


def retrieval_grid(
    queries: np.ndarray,
    neighbours: np.ndarray,
    path: str,
    query_labels: Optional[Sequence[int]] = None,
    neighbour_labels: Optional[np.ndarray] = None,
    class_names: Sequence[str] = (),
    title: str = "",
    similarities: Optional[np.ndarray] = None,
) -> str:
    """`retrieval_figure` as a PNG."""
    fig = retrieval_figure(
        queries, neighbours, query_labels, neighbour_labels, class_names, title, similarities
    )
    fig.savefig(path, format="png")
    return path


def retrieval_figure(
    queries: np.ndarray,
    neighbours: np.ndarray,
    query_labels: Optional[Sequence[int]] = None,
    neighbour_labels: Optional[np.ndarray] = None,
    class_names: Sequence[str] = (),
    title: str = "",
    similarities: Optional[np.ndarray] = None,
) -> Figure:
    """A grid: one row per query, the query image then its neighbours, nearest first.

    queries: Q x H x W x 3 uint8; neighbours: Q x K x H x W x 3 uint8. With labels, the query
    is framed blue and each neighbour green when its class is the query's, red otherwise (a
    legend says so); without labels there are no frames. similarities (Q x K): the cosine
    similarity written under each neighbour.
    """
    queries, neighbours = np.asarray(queries), np.asarray(neighbours)
    if queries.ndim != 4 or neighbours.ndim != 5 or len(queries) != len(neighbours):
        raise ValueError(
            f"need Q x H x W x 3 queries and Q x K x H x W x 3 neighbours, got "
            f"{queries.shape} and {neighbours.shape}"
        )
    q, k = neighbours.shape[:2]
    labelled = query_labels is not None and neighbour_labels is not None
    cell = 1.1
    fig = _figure(cell * (k + 1) + 0.4, cell * q + (0.5 if title else 0.2) + 0.3)
    axes = np.asarray(fig.subplots(q, k + 1, squeeze=False))
    name = lambda c: class_names[c] if 0 <= c < len(class_names) else str(c)
    for i in range(q):
        cols = [queries[i]] + list(neighbours[i])
        for j, image in enumerate(cols):
            ax = axes[i, j]
            ax.imshow(image, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            colour, width = None, 0
            if j == 0:
                if labelled:
                    colour, width = QUERY, 3
                if query_labels is not None:
                    ax.set_ylabel(name(int(query_labels[i])), fontsize=7)
            else:
                if labelled:
                    same = int(neighbour_labels[i][j - 1]) == int(query_labels[i])
                    colour, width = (SAME if same else OTHER), 3
                if similarities is not None:
                    ax.set_xlabel(f"{similarities[i][j - 1]:.2f}", fontsize=7, labelpad=1)
            for spine in ax.spines.values():
                spine.set_visible(width > 0)
                if width:
                    spine.set_edgecolor(colour)
                    spine.set_linewidth(width)
            if i == 0:
                ax.set_title("query" if j == 0 else f"#{j}", fontsize=8)
    handles = []
    if labelled:
        handles = [
            Patch(facecolor="none", edgecolor=QUERY, lw=2, label="query"),
            Patch(facecolor="none", edgecolor=SAME, lw=2, label="same class as the query"),
            Patch(facecolor="none", edgecolor=OTHER, lw=2, label="another class"),
        ]
    if similarities is not None:
        handles.append(Patch(facecolor="none", edgecolor="none", label="number: cosine similarity"))
    if handles:
        fig.legend(
            handles=handles,
            loc="outside lower center",
            ncol=len(handles),
            fontsize=7,
            frameon=False,
        )
    if title:
        fig.suptitle(title, fontsize=9, wrap=True)
    return fig


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
