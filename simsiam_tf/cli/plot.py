"""Pictures of a pretraining run: training curves and a nearest-neighbour retrieval grid.

  python tools/plot.py --workdir=runs/c10 [--data=folder:/other/images] [--queries=8 --k=8]

Writes WORKDIR/curves.png (loss, output std x sqrt(d) of z and p, kNN top-1 in % against the
random initialisation, lr; from WORKDIR/history.jsonl) and WORKDIR/retrieval.png (query images
from the query split beside their k nearest bank images by cosine similarity of the backbone
embedding, the similarity under each; for labelled data a green frame marks the query's class,
red another; an unlabelled run draws queries from the bank itself, without frames). Titles name
the epoch of the checkpoint drawn. The splits and the image check are those of training and the
evaluation tools (simsiam_tf/holdout.py): broken files are skipped and named.
"""

import dataclasses
import json
import os
import sys

import numpy as np
from absl import flags, logging

from simsiam_tf import callbacks, cli, data, holdout, knn, linear, plots
from simsiam_tf.errors import ConfigError

_WORKDIR = flags.DEFINE_string("workdir", None, "Pretraining run directory.")
_OUT_DIR = flags.DEFINE_string("out_dir", "", "Where the PNGs go (default: the run directory).")
_DATA = flags.DEFINE_string("data", "", "Data for the retrieval grid (default: the run's).")
_QUERIES = flags.DEFINE_integer("queries", 8, "Query images (rows) in the retrieval grid.")
_K = flags.DEFINE_integer("k", 8, "Neighbours shown per query.")
_MAX_BANK = flags.DEFINE_integer("max_bank", None, "Seeded bank subset (default: eval.max_bank).")
_RETRIEVAL = flags.DEFINE_bool("retrieval", True, "Draw the retrieval grid (needs the weights).")
flags.mark_flags_as_required(["workdir"])


def _images(source: data.Source, indices, size: int, crop_fraction: float = 1.0) -> np.ndarray:
    """uint8 images of `source` at `indices`, preprocessed as for evaluation."""
    indices = [int(i) for i in indices]
    sub = dataclasses.replace(
        source,
        num_examples=len(indices),
        labels=source.labels[indices],
        images=None if source.images is None else source.images[indices],
        files=None if source.files is None else [source.files[i] for i in indices],
    )
    out = [x.numpy() for x, _ in data.eval_dataset(sub, size, 256, crop_fraction)]
    return np.round(np.concatenate(out) * 255).clip(0, 255).astype(np.uint8)


def pick_queries(source: data.Source, n: int, seed: int) -> np.ndarray:
    """n seeded query indices, one class after another when labelled (a varied grid)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(source.num_examples)
    if source.num_classes < 2:
        return order[:n]
    labels = source.labels[order]
    per_class = [order[labels == c] for c in range(source.num_classes)]
    picks = [idx[r] for r in range(n) for idx in per_class if r < len(idx)]
    return np.asarray(picks[:n])


def draw_retrieval(workdir, out_path, spec, num_queries, k, max_bank):
    backbone, config, origin = linear.load_run_backbone(workdir)
    epoch = linear.weights_info(workdir)["epoch"]
    d, e = config.data, config.eval
    max_bank = e.max_bank if max_bank is None else max_bank
    bank, _ = holdout.load_split(config, e.bank_split, workdir, spec, max_bank)
    if bank is None:
        raise ValueError(f"{spec or d.source} has no {e.bank_split!r} split")
    if bank.files is None and bank.images is None:
        raise ValueError(f"{bank.name}: the retrieval grid needs an in-memory or file source")
    queries = None
    if bank.num_classes >= 2:
        queries, _ = holdout.load_split(config, e.query_split, workdir, spec, 0)
    # Without a labelled query split the queries are bank images, never their own neighbour.
    from_bank = queries is None
    queries = bank if from_bank else queries
    pick = pick_queries(queries, num_queries, config.seed)
    size, crop = d.image_size, d.eval_crop_fraction
    bank_f, bank_y = knn.extract_features(backbone, data.eval_dataset(bank, size, 256, crop))
    query_img = _images(queries, pick, size, crop)
    query_f = np.asarray(backbone.predict_on_batch(query_img.astype(np.float32) / 255.0))
    nn, sim = plots.nearest_neighbours(bank_f, query_f, k, exclude=pick if from_bank else None)
    neighbours = _images(bank, nn.reshape(-1), size, crop).reshape(nn.shape + query_img.shape[1:])
    names = bank.class_names or queries.class_names
    labelled = bank.num_classes >= 2 and queries.num_classes >= 2
    run = os.path.basename(os.path.normpath(workdir))
    return plots.retrieval_grid(
        query_img,
        neighbours,
        out_path,
        queries.labels[pick] if labelled else None,
        bank_y[nn] if labelled else None,
        names,
        title=f"{run}, epoch {epoch}: nearest neighbours of "
        + (
            f"{len(pick)} of its images (itself excluded) among the {bank.num_examples} of "
            if from_bank
            else f"{len(pick)} {'held-out' if 'held-out' in queries.name else 'test'} images "
            f"among the {bank.num_examples} of "
        )
        + bank.name,
        similarities=sim,
    )


def main(argv):
    del argv
    workdir = _WORKDIR.value
    out_dir = _OUT_DIR.value or workdir
    os.makedirs(out_dir, exist_ok=True)
    try:
        from simsiam_tf import train

        config = train.load_config(workdir)
    except FileNotFoundError as err:
        sys.exit(f"error: {err}")
    rows = callbacks.read_history(os.path.join(workdir, "history.jsonl"))
    init = os.path.join(workdir, "random_init.json")
    random_init = json.load(open(init))["knn_top1"] if os.path.exists(init) else None
    if rows:
        path = plots.plot_curves(
            rows,
            os.path.join(out_dir, "curves.png"),
            config.model.proj_dim,
            random_init,
            title=f"{os.path.basename(os.path.normpath(workdir))}: {config.model.backbone}, "
            f"{config.data.source}, batch {config.optim.batch_size}, epoch {rows[-1]['epoch']}",
            no_knn_note="kNN did not run: the data has no labelled test split or\nheld-out "
            "images (a folder needs class subfolders;\neval.holdout_fraction > 0)",
        )
        print(f"curves -> {path}")
    else:
        logging.warning("%s/history.jsonl is empty: no curves", workdir)
    if _RETRIEVAL.value:
        try:
            path = draw_retrieval(
                workdir,
                os.path.join(out_dir, "retrieval.png"),
                _DATA.value,
                _QUERIES.value,
                _K.value,
                _MAX_BANK.value,
            )
        except (ConfigError, ValueError, FileNotFoundError) as err:
            sys.exit(f"error: {err}")
        print(f"retrieval grid -> {path}")


def run_command() -> None:
    """The `simsiam-plot` command (tools/plot.py)."""
    cli.run(main)


if __name__ == "__main__":
    run_command()
