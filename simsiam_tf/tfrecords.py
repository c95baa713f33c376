"""Sharded TFRecords for large image sets: written once from an image folder, read as a stream.

Layout of an output directory:

    DIR/manifest.json             splits, shard files, examples per shard, class names
    DIR/train-00000-of-00064.tfrecord
    ...

Each record is a tf.train.Example with the image file's original bytes (`image/encoded`), its
label (`image/label`, -1 when unlabelled) and its path relative to the folder
(`image/filename`). Bytes are copied, not re-encoded, so a round trip is lossless.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Optional

import numpy as np
import tensorflow as tf
from absl import logging

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_FEATURES = {
    "image/encoded": tf.io.FixedLenFeature([], tf.string),
    "image/label": tf.io.FixedLenFeature([], tf.int64, default_value=-1),
    "image/filename": tf.io.FixedLenFeature([], tf.string, default_value=""),
}


def _example(encoded: bytes, label: int, filename: str) -> bytes:
    feature = {
        "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[encoded])),
        "image/label": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)])),
        "image/filename": tf.train.Feature(
            bytes_list=tf.train.BytesList(value=[filename.encode("utf-8")])
        ),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def write_split(
    paths: list,
    labels: np.ndarray,
    root: str,
    output_dir: str,
    split: str,
    num_shards: int,
    seed: int = 0,
    progress=None,
) -> dict:
    """Writes one split as `num_shards` shards, examples in a seeded random order (so every
    shard mixes all classes). Returns the split's manifest entry."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    num_shards = min(num_shards, len(paths))
    order = np.random.default_rng(seed).permutation(len(paths))
    shards = []
    for s, chunk in enumerate(np.array_split(order, num_shards)):
        name = f"{split}-{s:05d}-of-{num_shards:05d}.tfrecord"
        tmp = os.path.join(output_dir, f".{name}.tmp")
        with tf.io.TFRecordWriter(tmp) as writer:
            for i in chunk:
                with open(paths[i], "rb") as f:
                    encoded = f.read()
                writer.write(_example(encoded, labels[i], os.path.relpath(paths[i], root)))
                if progress is not None:
                    progress.add(1)
        os.replace(tmp, os.path.join(output_dir, name))  # a shard is complete or absent
        shards.append({"file": name, "num_examples": int(len(chunk))})
    return {"num_examples": int(len(paths)), "shards": shards}


def write_manifest(output_dir: str, splits: dict, class_names: tuple) -> str:
    path = os.path.join(output_dir, MANIFEST)
    manifest = {
        "format_version": FORMAT_VERSION,
        "class_names": list(class_names),
        "splits": splits,
    }
    with open(path + ".tmp", "w") as f:
        json.dump(manifest, f, indent=2)
    os.replace(path + ".tmp", path)
    return path


def parse(record: tf.Tensor):
    """A serialized example -> (encoded image bytes, label int64)."""
    ex = tf.io.parse_single_example(record, _FEATURES)
    return ex["image/encoded"], ex["image/label"]


def parse_with_filename(record: tf.Tensor):
    ex = tf.io.parse_single_example(record, _FEATURES)
    return ex["image/encoded"], ex["image/label"], ex["image/filename"]


@dataclasses.dataclass
class RecordSet:
    """The shard files of one split (this worker's share of them) and their example count."""

    files: list
    num_examples: int
    num_classes: int
    class_names: tuple


def find_records(
    arg: str, split: str, shard_index: int = 0, num_shards: int = 1
) -> Optional[RecordSet]:
    """The shards of `split` under `arg` (a directory with manifest.json, or a glob of
    .tfrecord files, the train split alone), keeping every num_shards-th file from shard_index:
    per-worker sharding by file.
    """
    from simsiam_tf.errors import ConfigError

    manifest_path = os.path.join(arg, MANIFEST)
    if os.path.isdir(arg):
        if not os.path.exists(manifest_path):
            raise ConfigError(
                f"data.source=tfrecord:{arg}: no {MANIFEST} there; write the directory with "
                "tools/make_tfrecords.py or give a glob of .tfrecord files"
            )
        with open(manifest_path) as f:
            manifest = json.load(f)
        if manifest.get("format_version") != FORMAT_VERSION:
            raise ConfigError(
                f"{manifest_path}: format_version {manifest.get('format_version')!r}, "
                f"expected {FORMAT_VERSION}"
            )
        entry = manifest["splits"].get(split)
        if entry is None:
            return None
        shards = entry["shards"][shard_index::num_shards]
        files = [os.path.join(arg, s["file"]) for s in shards]
        missing = [f for f in files if not os.path.exists(f)]
        if missing:
            raise ConfigError(f"data.source=tfrecord:{arg}: shard files missing: {missing[:3]}")
        classes = tuple(manifest["class_names"])
        return RecordSet(files, sum(s["num_examples"] for s in shards), len(classes), classes)
    if split != "train":
        return None
    files = sorted(glob.glob(arg))[shard_index::num_shards]
    if not files:
        raise ConfigError(f"data.source=tfrecord:{arg}: no files match")
    logging.info("Counting the records of %d files (no manifest)", len(files))
    count = int(tf.data.TFRecordDataset(files).reduce(np.int64(0), lambda n, _: n + 1))
    return RecordSet(files, count, 0, ())


def record_dataset(files: list, seed: int) -> tf.data.Dataset:
    """(encoded bytes, label) from the shards, files interleaved deterministically."""
    ds = tf.data.Dataset.from_tensor_slices(files)
    ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    ds = ds.interleave(
        tf.data.TFRecordDataset,
        cycle_length=min(16, len(files)),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    return ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE)
