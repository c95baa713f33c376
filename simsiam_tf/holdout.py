"""The splits that training and every evaluation tool read, and the one held-out split of a
labelled source that has no test split, recorded in the run directory.

A folder of class subfolders with no `test/` subfolder (or a TFDS data set with a train split
only) has no images to score kNN or a linear probe on. A seeded, stratified fraction of every
class (`eval.holdout_fraction`, `eval.holdout_seed`) is then held out as its `test` split, and
`train` is the rest. Pretraining does not see the held-out images either: kNN queries and the
linear probe's test images are then images the network never trained on, as CIFAR's test split is
in the paper's protocol (a network pretrained on its own queries scores them higher than it
would score new photos). The split is drawn from the file listing alone (broken files are
dropped after it), and the held-out files are written to WORKDIR/holdout.json when training
starts; tools/eval_knn.py, eval_linear.py and plot.py read that record instead of drawing again,
so every number of a run is measured on the same images, even after the folder gained files
(new files join the training side).

Every split goes through `load_split`: the held-out cut, a seeded subset (`max_examples`), then
the image check of `simsiam_tf/imagecheck.py` (skip and name broken files, or refuse under
`data.strict`), whose verdicts are cached in the run directory and reused by the tools.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Optional

import numpy as np
from absl import logging

from simsiam_tf import data, imagecheck
from simsiam_tf.errors import ConfigError

RECORD = "holdout.json"
TRAIN, TEST = "train", "test"


def stratified_mask(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of the held-out examples: a seeded `fraction` of every class (at least one
    of a class with two or more examples, none of a class with one).

    O(N log N): one stable sort groups the classes (each group in index order, as a per-class
    scan would give it), then one permutation per class, drawn in class order."""
    if not 0 < fraction < 1:
        raise ValueError(f"fraction={fraction} must be in (0, 1)")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    held = np.zeros(len(labels), bool)
    order = np.argsort(labels, kind="stable")
    classes, starts = np.unique(labels[order], return_index=True)
    for idx in np.split(order, starts[1:]) if len(classes) else ():
        n = max(1, int(round(fraction * len(idx)))) if len(idx) > 1 else 0
        held[rng.permutation(idx)[:n]] = True
    return held


def stratified_subset(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded subset of n examples with every class in its proportion
    (largest remainders get the leftover places); all of them when n >= len(labels)."""
    labels = np.asarray(labels)
    if n >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    order = np.argsort(labels, kind="stable")
    _, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
    quota = counts * n / len(labels)
    take = np.floor(quota).astype(int)
    extra = np.argsort(-(quota - take), kind="stable")[: n - take.sum()]
    take[extra] += 1
    picks = [rng.permutation(idx)[:t] for idx, t in zip(np.split(order, starts[1:]), take) if t]
    return np.sort(np.concatenate(picks)) if picks else np.zeros(0, np.int64)


def example_keys(source: data.Source) -> list:
    """A name for every example that survives a subset or a re-listing: file paths relative to
    the folder for an image folder, the index for an in-memory source."""
    if source.files is not None:
        if source.root is None:
            return list(source.files)
        # Every listed path starts with the folder: slicing gives what os.path.relpath gives,
        # at a fraction of its cost on a million paths.
        prefix = os.path.join(source.root, "")
        cut = len(prefix)
        return [
            f[cut:] if f.startswith(prefix) else os.path.relpath(f, source.root)
            for f in source.files
        ]
    return [f"#{i}" for i in range(source.num_examples)]


def digest(keys) -> str:
    """sha1 of the sorted keys: one string that tells two held-out splits apart."""
    return hashlib.sha1("\n".join(sorted(keys)).encode()).hexdigest()


def _take(source: data.Source, keep: np.ndarray, suffix: str) -> data.Source:
    return dataclasses.replace(
        source,
        name=f"{source.name}[{suffix}]",
        num_examples=len(keep),
        labels=source.labels[keep],
        images=None if source.images is None else source.images[keep],
        files=None if source.files is None else [source.files[i] for i in keep],
    )


def split_source(source: data.Source, held_keys) -> tuple:
    """(train, held-out) Sources: the examples of `source` whose key is in `held_keys`, and the
    rest, each in the source's order."""
    held_keys = held_keys if isinstance(held_keys, (set, frozenset)) else set(held_keys)
    held = np.fromiter((k in held_keys for k in example_keys(source)), bool, source.num_examples)
    return (
        _take(source, np.flatnonzero(~held), TRAIN),
        _take(source, np.flatnonzero(held), "held-out"),
    )


def holdout_split(source: data.Source, fraction: float = 0.2, seed: int = 0) -> tuple:
    """(train, held-out) Sources cut from one labelled split by `stratified_mask`."""
    if source.files is None and source.images is None:
        raise ValueError(f"{source.name}: only in-memory or file sources can be split")
    mask = stratified_mask(source.labels, fraction, seed)
    return split_source(source, np.asarray(example_keys(source), dtype=object)[mask])


def read_record(workdir: Optional[str]) -> Optional[dict]:
    path = os.path.join(workdir, RECORD) if workdir else ""
    if not path or not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _has_test_split(spec: str, d) -> bool:
    kind, arg = data.parse_source(spec)
    if kind in ("folder", "archive"):
        root = arg if kind == "folder" else data.unpacked_archive(arg)
        return data.folder_eval_split(root) is not None
    if kind == "tfds":
        # The split list is known once prepared (a failed download or an unknown name: one line).
        builder = data.prepared_tfds_builder(arg, d.tfds_data_dir or None, d.tfds_download)
        return TEST in builder.info.splits
    if kind == "tfrecord":
        from simsiam_tf import tfrecords

        return tfrecords.find_records(arg, TEST) is not None
    return True  # built-in data sets ship both splits


def _held_keys(full: data.Source, spec: str, config, workdir, record: bool) -> tuple:
    """(held-out keys, the record describing them): the run's record when it is of this very
    source, else a fresh seeded draw (written to the run directory when `record`)."""
    e = config.eval
    saved = read_record(workdir)
    if saved is not None and saved["source"] == spec and saved["split_of"] == full.name:
        if (saved["fraction"], saved["seed"]) != (e.holdout_fraction, e.holdout_seed):
            logging.warning(
                "%s/%s holds out %g of %s with seed %d; the config says %g and %d: the run's "
                "recorded split is used",
                workdir,
                RECORD,
                saved["fraction"],
                spec,
                saved["seed"],
                e.holdout_fraction,
                e.holdout_seed,
            )
        return saved["heldout"], saved
    keys = np.asarray(example_keys(full), dtype=object)
    held = sorted(keys[stratified_mask(full.labels, e.holdout_fraction, e.holdout_seed)])
    info = {
        "source": spec,
        "split_of": full.name,
        "fraction": e.holdout_fraction,
        "seed": e.holdout_seed,
        "num_examples": full.num_examples,
        "num_heldout": len(held),
        "sha1": digest(held),
        "excluded_from_pretraining": bool(record),
        "heldout": held,
    }
    if record and workdir:
        os.makedirs(workdir, exist_ok=True)
        path = os.path.join(workdir, RECORD)
        with open(path + ".tmp", "w") as f:
            json.dump(info, f, indent=1)
        os.replace(path + ".tmp", path)
        logging.info(
            "%s has no %r split: %d of its %d images are held out for evaluation and not "
            "pretrained on (eval.holdout_fraction=%g, eval.holdout_seed=%d; listed in %s)",
            spec,
            TEST,
            len(held),
            full.num_examples,
            e.holdout_fraction,
            e.holdout_seed,
            path,
        )
    elif workdir and spec == config.data.source:
        logging.warning(
            "%s has no %s (a run from before held-out splits were recorded): drawing the split "
            "again from eval.holdout_fraction=%g, eval.holdout_seed=%d; pretraining saw these "
            "images",
            workdir,
            RECORD,
            e.holdout_fraction,
            e.holdout_seed,
        )
    return held, info


def load_split(
    config,
    split: str,
    workdir: Optional[str] = None,
    spec: str = "",
    max_examples: int = 0,
    record: bool = False,
) -> tuple:
    """(Source or None, held-out record or None): one split as training and the tools read it.

    `train` and `test` of a labelled source without a test split are the two sides of its
    held-out split (the run's record when it has one; `record=True`, as training does, writes
    it). Then a seeded subset of `max_examples` (0: all), then the image check, whose verdicts
    are cached in `workdir`. None when the source has no such split (or `test` of a source that
    cannot be split).

    Args:
      config: the run's config (data.*, eval.holdout_*, seed).
      split: a split name ("train", "test", or any TFDS split string).
      workdir: the run directory (the held-out record); None: none.
      spec: the data source (default: config.data.source).
    """
    d, e = config.data, config.eval
    spec = spec or d.source
    kw = dict(
        seed=config.seed, tfds_data_dir=d.tfds_data_dir or None, tfds_download=d.tfds_download
    )
    info = None
    if split in (TRAIN, TEST) and e.holdout_fraction > 0 and not _has_test_split(spec, d):
        full = data.load_source(spec, TRAIN, **kw)
        splittable = full.num_classes >= 2 and (full.files is not None or full.in_memory)
        if splittable:
            held, info = _held_keys(full, spec, config, workdir, record)
            train, test = split_source(full, held)
            if test.num_examples == 0:
                raise ConfigError(
                    f"eval.holdout_fraction={e.holdout_fraction} holds out no image of {spec} "
                    "(each class needs two or more images); add images or give it a test/ folder"
                )
            source = train if split == TRAIN else test
        else:
            source = full if split == TRAIN else None
    else:
        source = data.load_source(spec, split, **kw)
    if source is None:
        return None, info
    kind, arg = data.parse_source(spec)
    if info is None and kind == "tfrecord" and os.path.isdir(arg):
        from simsiam_tf import tfrecords

        info = tfrecords.read_manifest(arg).get("heldout")  # written by make_tfrecords.py
    if 0 < max_examples < source.num_examples:
        source = data._subset(source, max_examples, config.seed)
    if d.check_images:
        source = imagecheck.drop_undecodable(source, d.strict, mode=d.image_check)
    return source, info


def summary(info: Optional[dict]) -> Optional[dict]:
    """The record without its file list, for evaluation JSON."""
    return None if info is None else {k: v for k, v in info.items() if k != "heldout"}
