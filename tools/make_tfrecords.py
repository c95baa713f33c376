"""Turns an image folder into sharded TFRecords with a manifest, for the `tfrecord:` source.

  python tools/make_tfrecords.py --folder=data/imagenet --output_dir=data/imagenet-tfrecords \
      [--shards_per_split=train=1024,val=64] [--examples_per_shard=1250]

The folder is in ImageNet layout: split subfolders (train/, val/, test/, validation/) holding
class subfolders; a folder without split subfolders is written as the train split. Labels
follow the class names of the train split, so every split numbers classes alike. Then train with
--config.data.source=tfrecord:data/imagenet-tfrecords.
"""

import os

import cli  # noqa: F401  (first: a quiet TensorFlow start-up)

import keras
import numpy as np
from absl import app, flags, logging

from simsiam_tf import data, tfrecords
from simsiam_tf.quiet import progress_verbosity

SPLITS = ("train", "val", "validation", "test")
_FOLDER = flags.DEFINE_string("folder", None, "Image folder (ImageNet layout).")
_OUTPUT = flags.DEFINE_string("output_dir", None, "Where shards and manifest.json go.")
_PER_SHARD = flags.DEFINE_integer("examples_per_shard", 1250, "Target examples per shard.")
_SHARDS = flags.DEFINE_string("shards_per_split", "", "Override: e.g. train=1024,val=64.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the example order within a split.")
flags.mark_flags_as_required(["folder", "output_dir"])


def main(argv):
    del argv
    root = _FOLDER.value
    if not os.path.isdir(root):
        raise app.UsageError(f"--folder={root}: no such directory")
    splits = [s for s in SPLITS if os.path.isdir(os.path.join(root, s))] or ["train"]
    split_dirs = {
        s: (
            os.path.join(root, s)
            if s != "train" or len(splits) > 1 or os.path.isdir(os.path.join(root, "train"))
            else root
        )
        for s in splits
    }
    overrides = dict(kv.split("=") for kv in _SHARDS.value.split(",") if kv)
    os.makedirs(_OUTPUT.value, exist_ok=True)
    listed = {s: data.list_image_folder(d) for s, d in split_dirs.items()}
    classes = listed.get("train", next(iter(listed.values())))[2]
    entries = {}
    for split, (paths, labels, names) in listed.items():
        if names and names != classes:
            unknown = sorted(set(names) - set(classes))
            if unknown:
                raise app.UsageError(f"split {split} has classes not in train: {unknown[:5]}")
            labels = np.asarray([classes.index(names[i]) for i in labels], np.int64)
        shards = int(overrides.get(split, max(1, round(len(paths) / _PER_SHARD.value))))
        logging.info("%s: %d images -> %d shards", split, len(paths), shards)
        bar = keras.utils.Progbar(len(paths), unit_name="image", verbose=progress_verbosity())
        entries[split] = tfrecords.write_split(
            paths, labels, split_dirs[split], _OUTPUT.value, split, shards, _SEED.value, bar
        )
    path = tfrecords.write_manifest(_OUTPUT.value, entries, classes)
    print(f"manifest={path} " + " ".join(f"{s}={e['num_examples']}" for s, e in entries.items()))


if __name__ == "__main__":
    cli.run(main)
