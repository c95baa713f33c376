"""Sharded TFRecords for large image sets: written once from an image folder, read as a stream.

Layout of an output directory:

    DIR/manifest.json             splits, shard files, examples per shard, class names
    DIR/train-00000-of-00064.tfrecord
    ...

Each record is a tf.train.Example with the image file's original bytes (`image/encoded`), its
label (`image/label`, -1 when unlabelled) and its path relative to the split's folder
(`image/filename`). Bytes are copied, not re-encoded, so a round trip is lossless.

Writing (`write_folder`) checks every image: each file is decoded once, in parallel, by the
decoder training uses, in the same pass that writes it; a file that cannot be read or decoded
is left out and named in the manifest (or, `strict`, nothing is written). Every split of the
folder is written with its labels. The evaluation split is `test/`, else `val/` or
`validation/` (written under its own name; the manifest aliases `test` to it, so the default
`eval.query_split="test"` reads it), else, for a labelled folder, a seeded stratified held-out
split of the training images (`holdout.stratified_mask`), written as `test` and absent from
`train`.

Reading (`record_dataset`) skips what TensorFlow's reader cannot frame: a record whose CRC
fails or a truncated shard ends that shard (TFRecord framing has no resync marker, so
`TFRecordDataset` moves to the next file after a DataLossError); the records lost are counted
against the manifest's count for the shard, logged with the shard's name, and added to a
`SkippedRecords` counter.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import threading
import time
from typing import Callable, Optional

import numpy as np
import tensorflow as tf
from absl import logging

from simsiam_tf import quiet

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
EVAL_SPLITS = ("test", "val", "validation")  # the first present is the evaluation split
SPLITS = ("train",) + EVAL_SPLITS
HELDOUT_SPLIT = "test"
_SHOWN = 10  # file names listed in a message
_FEATURES = {
    "image/encoded": tf.io.FixedLenFeature([], tf.string),
    "image/label": tf.io.FixedLenFeature([], tf.int64, default_value=-1),
    "image/filename": tf.io.FixedLenFeature([], tf.string, default_value=""),
}
_TALLY = 64  # records counted at a time while reading
# Bytes of TFRecord framing around each record: length (8) + its CRC (4) + the data's CRC (4).
_FRAMING = 16


def _example(encoded: bytes, label: int, filename: str) -> bytes:
    feature = {
        "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[encoded])),
        "image/label": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)])),
        "image/filename": tf.train.Feature(
            bytes_list=tf.train.BytesList(value=[filename.encode("utf-8")])
        ),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def _relative_to(root: str) -> Callable[[str], str]:
    """os.path.relpath(path, root) for paths listed under root, without its cost (a third of
    the time a CIFAR file takes to write)."""
    prefix = os.path.join(root, "")
    return lambda p: p[len(prefix) :] if p.startswith(prefix) else os.path.relpath(p, root)


def listing(names: list) -> str:
    """The first names and how many more: the form every message here names files in."""
    more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more


# ------------------------------------------------------------------------------------------------
# Writing


def _checked_files(paths: list, order: np.ndarray, check: bool) -> tf.data.Dataset:
    """Batches (indices, encoded bytes) of the files in `order`, in that order, read (and,
    `check`, decoded) in parallel; a file that cannot be read or decoded yields nothing."""
    from simsiam_tf.data import decode_rgb

    def load(i, path):
        encoded = tf.io.read_file(path)
        if check:
            # The decoder of training (JPEG, PNG, GIF, BMP, EXIF, alpha): a file it cannot
            # decode raises here, and ignore_errors drops it.
            height = tf.shape(decode_rgb(encoded))[0]
            with tf.control_dependencies([height]):
                encoded = tf.identity(encoded)
        return i, encoded

    ds = tf.data.Dataset.from_tensor_slices((order, [paths[i] for i in order]))
    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    # Batched: one Python iteration per file would cost more than reading a small file.
    return ds.ignore_errors().batch(256).prefetch(tf.data.AUTOTUNE)


def write_split(
    paths: list,
    labels: np.ndarray,
    root: str,
    output_dir: str,
    split: str,
    num_shards: int,
    seed: int = 0,
    progress=None,
    check: bool = True,
) -> dict:
    """Writes one split as `num_shards` shards, examples in a seeded random order (so every
    shard mixes all classes). Returns the split's manifest entry.

    With `check`, every file is decoded as training decodes it, in parallel, in the pass that
    writes it; those that cannot be read or decoded are left out and listed (relative to
    `root`) under "skipped" in the entry. `progress` (a keras Progbar) is advanced per file.
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if not paths:
        raise ValueError(f"split {split!r} has no files to write")
    num_shards = min(num_shards, len(paths))
    label_of = np.asarray(labels, np.int64).tolist()
    relative = _relative_to(root)
    order = np.random.default_rng(seed).permutation(len(paths))
    # Shard s holds the files at positions [bounds[s], bounds[s + 1]) of `order`.
    bounds = np.cumsum([0] + [len(c) for c in np.array_split(order, num_shards)])
    position = np.empty(len(paths), np.int64)
    position[order] = np.arange(len(paths))
    names = [f"{split}-{s:05d}-of-{num_shards:05d}.tfrecord" for s in range(num_shards)]
    counts = [0] * num_shards
    written = np.zeros(len(paths), bool)
    state = {"shard": -1, "writer": None}

    def open_shard(s):
        """Closes the shard being written (renamed: a shard is complete or absent), then opens
        every shard up to s (a shard whose every file was broken is written empty)."""
        while state["shard"] < s:
            if state["writer"] is not None:
                state["writer"].close()
                done = names[state["shard"]]
                os.replace(os.path.join(output_dir, f".{done}.tmp"), os.path.join(output_dir, done))
            state["shard"] += 1
            state["writer"] = None
            if state["shard"] < num_shards:
                tmp = os.path.join(output_dir, f".{names[state['shard']]}.tmp")
                state["writer"] = tf.io.TFRecordWriter(tmp)

    # libjpeg prints a line per broken file; the entry names the broken files instead.
    with quiet.native_stderr_filtered(quiet.LIBJPEG_NOISE):
        for batch, encoded in _checked_files(paths, order, check).as_numpy_iterator():
            shard_of = np.searchsorted(bounds, position[batch], side="right") - 1
            for i, s, image in zip(batch.tolist(), shard_of.tolist(), encoded):
                if s != state["shard"]:
                    open_shard(s)
                state["writer"].write(_example(image, label_of[i], relative(paths[i])))
                counts[s] += 1
            written[batch] = True
            if progress is not None:
                progress.update(int(position[batch[-1]]) + 1)
        open_shard(num_shards)
    if progress is not None:
        progress.update(len(paths), finalize=True)  # once: broken files never arrive
    skipped = [relative(paths[i]) for i in np.flatnonzero(~written)]
    entry = {
        "num_examples": int(sum(counts)),
        "shards": [{"file": n, "num_examples": c} for n, c in zip(names, counts)],
    }
    if skipped:
        entry["skipped"] = skipped
    return entry


def write_manifest(output_dir: str, splits: dict, class_names: tuple, **extra) -> str:
    """Writes DIR/manifest.json: the splits' entries, the class names, and `extra` keys
    ("aliases", "eval_split", "heldout")."""
    path = os.path.join(output_dir, MANIFEST)
    manifest = {
        "format_version": FORMAT_VERSION,
        "class_names": list(class_names),
        "splits": splits,
        **extra,
    }
    with open(path + ".tmp", "w") as f:
        json.dump(manifest, f, indent=2)
    os.replace(path + ".tmp", path)
    return path


@dataclasses.dataclass
class FolderPlan:
    """What `write_folder` writes: per split, the files, labels and the folder they are named
    relative to; the class names; the evaluation split; the held-out record, if one is cut."""

    splits: dict  # split -> (paths, labels, root)
    class_names: tuple
    eval_split: Optional[str]
    heldout: Optional[dict] = None


def plan_folder(root: str, holdout_fraction: float = 0.2, holdout_seed: int = 0) -> FolderPlan:
    """Lists an image folder in ImageNet layout for writing (no file is opened).

    Split subfolders (train/, test/, val/, validation/) of class subfolders; a folder without
    split subfolders is the train split. Labels follow the class names of the train split, so
    every split numbers classes alike. Without an evaluation split, a labelled folder's train
    split is cut by `holdout.stratified_mask(labels, holdout_fraction, holdout_seed)` (drawn
    from the listing, as the `folder:` source draws it) into `train` and a held-out `test`;
    `holdout_fraction=0` cuts nothing.
    """
    from simsiam_tf import data, holdout
    from simsiam_tf.errors import ConfigError

    if not os.path.isdir(root):
        raise ConfigError(f"--folder={root}: no such directory")
    if not 0 <= holdout_fraction < 1:
        raise ConfigError(
            f"holdout_fraction={holdout_fraction} must be in [0, 1) (0: hold nothing out)"
        )
    present = [s for s in SPLITS if os.path.isdir(os.path.join(root, s))]
    dirs = {s: os.path.join(root, s) for s in present} or {"train": root}
    listed = {s: data.list_image_folder(d) for s, d in dirs.items()}
    classes = listed.get("train", next(iter(listed.values())))[2]
    splits = {}
    for split, (paths, labels, names) in listed.items():
        if names != classes:
            unknown = sorted(set(names) - set(classes))
            if unknown:
                raise ConfigError(
                    f"{dirs[split]} has classes that {dirs.get('train', root)} lacks: "
                    f"{listing(unknown)}; every split needs the train split's class folders"
                )
            labels = np.asarray([classes.index(names[i]) for i in labels], np.int64)
        splits[split] = (paths, labels, dirs[split])
    eval_split = next((s for s in EVAL_SPLITS if s in splits), None)
    heldout = None
    if eval_split is None and "train" in splits and len(classes) >= 2 and holdout_fraction > 0:
        paths, labels, split_root = splits["train"]
        held = holdout.stratified_mask(labels, holdout_fraction, holdout_seed)
        keys = [os.path.relpath(p, split_root) for p in np.asarray(paths, object)[held]]
        splits["train"] = (
            [p for p, h in zip(paths, held) if not h],
            labels[~held],
            split_root,
        )
        splits[HELDOUT_SPLIT] = ([p for p, h in zip(paths, held) if h], labels[held], split_root)
        eval_split = HELDOUT_SPLIT
        heldout = {
            "from": "train",
            "fraction": holdout_fraction,
            "seed": holdout_seed,
            "num_examples": len(paths),
            "num_heldout": int(held.sum()),
            "sha1": holdout.digest(keys),
        }
    return FolderPlan(splits, classes, eval_split, heldout)


def write_folder(
    plan: FolderPlan,
    output_dir: str,
    examples_per_shard: int = 1250,
    shards: Optional[dict] = None,
    seed: int = 0,
    check: bool = True,
    strict: bool = False,
    progress: Optional[Callable[[str, int], object]] = None,
) -> dict:
    """Writes every split of `plan` and the manifest; returns the manifest.

    Args:
      examples_per_shard: target examples per shard; `shards` ({split: count}) overrides it.
      seed: the seed of the example order within each split.
      check: decode every file as training does and leave out those that fail.
      strict: a file that fails is an error (ConfigError naming them); nothing is kept.
      progress: (split, num_files) -> a keras Progbar for that split, or None.
    """
    from simsiam_tf.errors import ConfigError

    if examples_per_shard < 1:
        raise ConfigError(f"examples_per_shard={examples_per_shard} must be >= 1")
    shards = dict(shards or {})
    unknown = sorted(set(shards) - set(plan.splits))
    if unknown:
        raise ConfigError(
            f"shards given for {unknown}, which are not written; the splits are "
            f"{sorted(plan.splits)}"
        )
    os.makedirs(output_dir, exist_ok=True)
    manifest_path = os.path.join(output_dir, MANIFEST)
    if os.path.exists(manifest_path):
        os.remove(manifest_path)  # a directory being rewritten is not read half done
    entries = {}
    for split, (paths, labels, root) in plan.splits.items():
        num_shards = int(shards.get(split, max(1, round(len(paths) / examples_per_shard))))
        start = time.time()
        bar = progress(split, len(paths)) if progress else None
        entries[split] = entry = write_split(
            paths, labels, root, output_dir, split, num_shards, seed, bar, check
        )
        seconds = time.time() - start
        entry["seconds"] = round(seconds, 3)
        skipped = entry.get("skipped", [])
        logging.info(
            "%s: %d images written in %.1f s (%.0f images/s)%s",
            split,
            entry["num_examples"],
            seconds,
            len(paths) / max(seconds, 1e-9),
            f", {len(skipped)} skipped" if skipped else "",
        )
    broken = {s: e["skipped"] for s, e in entries.items() if e.get("skipped")}
    if broken and strict:
        for e in entries.values():
            for shard in e["shards"]:
                os.remove(os.path.join(output_dir, shard["file"]))
        total = sum(len(v) for v in broken.values())
        raise ConfigError(
            f"{total} files cannot be decoded as images (strict): "
            + "; ".join(f"{plan.splits[s][2]}: {listing(v)}" for s, v in broken.items())
            + "; no records were kept. Remove or replace them, or write without strict to skip "
            "them"
        )
    extra = {"eval_split": plan.eval_split}
    if plan.eval_split and plan.eval_split != HELDOUT_SPLIT:
        extra["aliases"] = {HELDOUT_SPLIT: plan.eval_split}
    if plan.heldout:
        extra["heldout"] = plan.heldout
    for split, e in entries.items():
        # Shards of an earlier write with another shard count would join a glob of the files.
        kept = {s["file"] for s in e["shards"]}
        for stale in glob.glob(os.path.join(output_dir, f"{split}-?????-of-?????.tfrecord")):
            if os.path.basename(stale) not in kept:
                logging.info("Removing %s, a shard of an earlier write", stale)
                os.remove(stale)
    write_manifest(output_dir, entries, plan.class_names, **extra)
    with open(manifest_path) as f:
        return json.load(f)


# ------------------------------------------------------------------------------------------------
# Reading


def parse(record: tf.Tensor):
    """A serialized example -> (encoded image bytes, label int64)."""
    ex = tf.io.parse_single_example(record, _FEATURES)
    return ex["image/encoded"], ex["image/label"]


def parse_with_filename(record: tf.Tensor):
    ex = tf.io.parse_single_example(record, _FEATURES)
    return ex["image/encoded"], ex["image/label"], ex["image/filename"]


class SkippedRecords:
    """Records that reading skipped: those after a corrupt record or a truncation in a shard
    (counted against the shard's size in the manifest), and the shards they were in.

    Thread-safe; tf.data's reader threads add to it. Read `count` between epochs."""

    def __init__(self):
        self._lock = threading.Lock()
        self.count = 0
        self.shards = []

    def add(self, shard: str, read: int, expected: int) -> int:
        lost = expected - read
        with self._lock:
            self.count += lost
            self.shards.append(shard)
            total = self.count
        logging.warning(
            "%s: a corrupt or truncated record after %d of its %d records; the other %d are "
            "skipped (%d records skipped so far). Rewrite the shard with "
            "tools/make_tfrecords.py, or check its copy",
            shard,
            read,
            expected,
            lost,
            total,
        )
        return total


@dataclasses.dataclass
class RecordSet:
    """The shard files of one split (this worker's share of them) and their example count.

    `split` is the split written (the one `test` is an alias of, if so); `sizes` the records
    of each file as written; `skipped` counts records that reading this set skipped."""

    files: list
    num_examples: int
    num_classes: int
    class_names: tuple
    split: str = "train"
    sizes: Optional[list] = None
    skipped: SkippedRecords = dataclasses.field(default_factory=SkippedRecords)

    def dataset(self, seed: int) -> tf.data.Dataset:
        """`record_dataset` of these files, counting skipped records into `skipped`."""
        return record_dataset(self.files, seed, self.sizes, self.skipped)


def read_manifest(arg: str) -> dict:
    """DIR/manifest.json; a ConfigError says how to make one where there is none."""
    from simsiam_tf.errors import ConfigError

    path = os.path.join(arg, MANIFEST)
    if not os.path.exists(path):
        raise ConfigError(
            f"data.source=tfrecord:{arg}: no {MANIFEST} there; write the directory with "
            "tools/make_tfrecords.py or give a glob of .tfrecord files"
        )
    with open(path) as f:
        manifest = json.load(f)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ConfigError(
            f"{path}: format_version {manifest.get('format_version')!r}, expected {FORMAT_VERSION}"
        )
    return manifest


def _intact_sizes(files: list) -> list:
    """Records of each file up to its first unreadable one. A file whose records and framing
    do not add up to its size holds a corrupt record or a truncation: warned, with what
    remains readable."""
    sizes = []
    for path in files:
        n, nbytes = (
            tf.data.TFRecordDataset(path)
            .ignore_errors()
            .reduce(
                (np.int64(0), np.int64(0)),
                lambda acc, r: (
                    acc[0] + 1,
                    acc[1] + tf.cast(tf.strings.length(r), tf.int64) + _FRAMING,
                ),
            )
        )
        if int(nbytes) != os.path.getsize(path):
            logging.warning(
                "%s: %d bytes of %d readable (%d records), then a corrupt or truncated record; "
                "the rest of the file is skipped",
                path,
                int(nbytes),
                os.path.getsize(path),
                int(n),
            )
        sizes.append(int(n))
    return sizes


def find_records(
    arg: str, split: str, shard_index: int = 0, num_shards: int = 1
) -> Optional[RecordSet]:
    """The shards of `split` under `arg` (a directory with manifest.json, or a glob of
    .tfrecord files, the train split alone), keeping every num_shards-th file from shard_index:
    per-worker sharding by file. `test` of a directory whose evaluation split is `val` or
    `validation` is that split (the manifest's "aliases"). None when there is no such split.
    """
    from simsiam_tf.errors import ConfigError

    if os.path.isdir(arg):
        manifest = read_manifest(arg)
        written = split
        if split not in manifest["splits"]:
            written = manifest.get("aliases", {}).get(split, split)
        entry = manifest["splits"].get(written)
        if entry is None:
            return None
        shards = entry["shards"][shard_index::num_shards]
        files = [os.path.join(arg, s["file"]) for s in shards]
        missing = [f for f in files if not os.path.exists(f)]
        if missing:
            raise ConfigError(
                f"data.source=tfrecord:{arg}: shard files missing: {listing(missing)}; "
                "write the directory again with tools/make_tfrecords.py"
            )
        sizes = [s["num_examples"] for s in shards]
        classes = tuple(manifest["class_names"])
        return RecordSet(files, sum(sizes), len(classes), classes, written, sizes)
    if split != "train":
        return None
    files = sorted(glob.glob(arg))[shard_index::num_shards]
    if not files:
        raise ConfigError(f"data.source=tfrecord:{arg}: no files match")
    logging.info("Counting the records of %d files (no manifest)", len(files))
    sizes = _intact_sizes(files)
    return RecordSet(files, sum(sizes), 0, (), split, sizes)


def _manifest_sizes(files: list) -> Optional[list]:
    """Records per file from the manifest beside the files, or None where there is none."""
    sizes = {}
    for folder in sorted({os.path.dirname(f) for f in files}):
        path = os.path.join(folder, MANIFEST)
        if not os.path.exists(path):
            return None
        with open(path) as f:
            for entry in json.load(f)["splits"].values():
                for s in entry["shards"]:
                    sizes[os.path.join(folder, s["file"])] = s["num_examples"]
    found = [sizes.get(f) for f in files]
    return None if None in found else found


def _shard_records(path, expected, skipped: SkippedRecords) -> tf.data.Dataset:
    """The records of one shard up to a corrupt or truncated one (TFRecordDataset moves to
    the next file after a DataLossError, so `ignore_errors` ends the shard there), then a
    count of those read against `expected`: short, `skipped.add` logs and counts the rest.

    Records are tallied in blocks of _TALLY (an empty block marks the shard's end): a function
    call per record would halve the reading rate."""
    records = tf.data.TFRecordDataset(path).ignore_errors().batch(_TALLY)
    end = tf.data.Dataset.from_tensors(tf.constant([], tf.string))

    def tally(n, block):
        n = n + tf.size(block, tf.int64)
        return n, (block, n)

    def keep(block, n):
        def report():
            add = lambda p, r, e: skipped.add(p.numpy().decode(), int(r), int(e))
            return tf.greater_equal(tf.py_function(add, [path, n, expected], tf.int64), 0)

        last = tf.equal(tf.size(block), 0)
        reported = tf.cond(tf.logical_and(last, n < expected), report, lambda: tf.constant(True))
        with tf.control_dependencies([reported]):
            return tf.logical_not(last)

    ds = records.concatenate(end).scan(tf.constant(0, tf.int64), tally)
    return ds.filter(keep).map(lambda block, n: block).unbatch()


# Called while pretraining traces an epoch's dataset: plain Python (it reads the manifest), not
# for AutoGraph to convert.
@tf.autograph.experimental.do_not_convert
def record_dataset(
    files: list,
    seed: int,
    sizes: Optional[list] = None,
    skipped: Optional[SkippedRecords] = None,
) -> tf.data.Dataset:
    """(encoded bytes, label) from the shards, files in a seeded order (the same on every
    iteration) and interleaved deterministically.

    A corrupt or truncated record ends its shard, not the run: the records lost are counted
    against `sizes` (records per file; default: the manifest beside the files) into `skipped`
    and logged with the shard's name.
    """
    if sizes is None:
        sizes = _manifest_sizes(files)
    if sizes is not None and len(sizes) != len(files):
        raise ValueError(f"{len(sizes)} sizes for {len(files)} files")
    skipped = skipped if skipped is not None else SkippedRecords()
    if sizes is None:
        ds = tf.data.Dataset.from_tensor_slices((files, np.full(len(files), -1, np.int64)))
    else:
        ds = tf.data.Dataset.from_tensor_slices((files, np.asarray(sizes, np.int64)))
    ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=False)

    def read(path, expected):
        if sizes is None:
            return tf.data.TFRecordDataset(path).ignore_errors()
        return _shard_records(path, expected, skipped)

    ds = ds.interleave(
        read,
        cycle_length=min(16, len(files)),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    return ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE)
