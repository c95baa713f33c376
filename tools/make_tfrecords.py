"""Turns an image folder into sharded TFRecords with a manifest, for the `tfrecord:` source.

  python tools/make_tfrecords.py --folder=data/imagenet --output_dir=data/imagenet-tfrecords \
      [--shards_per_split=train=1024,val=64] [--examples_per_shard=1250] \
      [--holdout_fraction=0.2 --holdout_seed=0] [--strict]

The folder is in ImageNet layout: split subfolders (train/, val/, test/, validation/) holding
class subfolders; a folder without split subfolders is written as the train split. Labels
follow the class names of the train split, so every split numbers classes alike. Then train with
--config.data.source=tfrecord:data/imagenet-tfrecords.

Every image is decoded once as training decodes it, in parallel, in the pass that writes it:
files that cannot be read or decoded (empty, truncated, HTML saved as .jpg) are left out, counted
and named here and in the manifest; --strict refuses instead and keeps no records.

The evaluation split is written with its labels: test/, else val/ or validation/ under its own
name, which the manifest makes the `test` split too (so training's kNN monitor, with the default
eval.query_split="test", and tools/eval_knn.py, eval_linear.py read it). A labelled folder with
neither gets a seeded stratified held-out split (--holdout_fraction of every class, as
eval.holdout_fraction draws it for a folder), written as `test` and left out of `train`; the
manifest records the fraction, seed and the sha1 of the held-out names. --holdout_fraction=0
writes every image to `train` (then no evaluation).
"""

import os

import cli  # noqa: F401  (first: a quiet TensorFlow start-up)

import keras
from absl import flags, logging

from simsiam_tf import tfrecords
from simsiam_tf.errors import ConfigError
from simsiam_tf.quiet import progress_verbosity

_FOLDER = flags.DEFINE_string("folder", None, "Image folder (ImageNet layout).")
_OUTPUT = flags.DEFINE_string("output_dir", None, "Where shards and manifest.json go.")
_PER_SHARD = flags.DEFINE_integer("examples_per_shard", 1250, "Target examples per shard.")
_SHARDS = flags.DEFINE_string("shards_per_split", "", "Override: e.g. train=1024,val=64.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the example order within a split.")
_FRACTION = flags.DEFINE_float(
    "holdout_fraction",
    0.2,
    "A labelled folder without test/, val/ or validation/: this fraction of every class is "
    "written as the `test` split and not as `train` (0: none).",
)
_HOLDOUT_SEED = flags.DEFINE_integer("holdout_seed", 0, "Seed of the held-out split.")
_CHECK = flags.DEFINE_bool("check", True, "Decode every image and leave out those that fail.")
_STRICT = flags.DEFINE_bool("strict", False, "Refuse (keep no records) if any image fails.")
flags.mark_flags_as_required(["folder", "output_dir"])


def parse_shards(value: str) -> dict:
    """ "train=1024,val=64" -> {"train": 1024, "val": 64}; a ConfigError names a bad item."""
    shards = {}
    for item in filter(None, value.split(",")):
        split, sep, count = item.partition("=")
        if not sep or split not in tfrecords.SPLITS or not count.isdigit() or int(count) < 1:
            raise ConfigError(
                f"--shards_per_split: {item!r} is not SPLIT=COUNT with SPLIT one of "
                f"{', '.join(tfrecords.SPLITS)} and COUNT a positive integer (e.g. train=1024)"
            )
        shards[split] = int(count)
    return shards


def main(argv):
    del argv
    shards = parse_shards(_SHARDS.value)
    if _STRICT.value and not _CHECK.value:
        raise ConfigError("--strict needs the check; drop --nocheck")
    if os.path.isfile(_OUTPUT.value):
        raise ConfigError(f"--output_dir={_OUTPUT.value} is a file; give a directory")
    plan = tfrecords.plan_folder(_FOLDER.value, _FRACTION.value, _HOLDOUT_SEED.value)
    counts = ", ".join(f"{len(p)} {s}" for s, (p, _, _) in plan.splits.items())
    if plan.heldout:
        logging.info(
            "%s has no test/, val/ or validation/: %d of its %d labelled images are held out "
            "as the test split (--holdout_fraction=%g, --holdout_seed=%d)",
            _FOLDER.value,
            plan.heldout["num_heldout"],
            plan.heldout["num_examples"],
            plan.heldout["fraction"],
            plan.heldout["seed"],
        )
    elif plan.eval_split is None:
        logging.warning(
            "%s: no evaluation split written (no test/, val/ or validation/%s): training from "
            "these records runs no kNN monitor",
            _FOLDER.value,
            ", and --holdout_fraction=0" if _FRACTION.value == 0 else ", and no class folders",
        )
    logging.info("Writing %s images%s", counts, "" if _CHECK.value else " (not checked)")

    def progress(split, n):
        logging.info("%s: %d images", split, n)
        return keras.utils.Progbar(n, unit_name="image", verbose=progress_verbosity())

    manifest = tfrecords.write_folder(
        plan,
        _OUTPUT.value,
        _PER_SHARD.value,
        shards,
        _SEED.value,
        check=_CHECK.value,
        strict=_STRICT.value,
        progress=progress,
    )
    splits = manifest["splits"]
    for split, entry in splits.items():
        skipped = entry.get("skipped", [])
        if skipped:
            print(
                f"{split}: skipped {len(skipped)} of {len(plan.splits[split][0])} files that "
                f"cannot be decoded as images: {tfrecords.listing(skipped)}"
            )
    seconds = sum(e["seconds"] for e in splits.values())
    total = sum(len(p) for p, _, _ in plan.splits.values())
    alias = manifest.get("aliases", {}).get("test")
    print(
        f"manifest={os.path.join(_OUTPUT.value, tfrecords.MANIFEST)} "
        + " ".join(f"{s}={e['num_examples']}" for s, e in splits.items())
        + (f" (test={alias})" if alias else "")
        + f" skipped={sum(len(e.get('skipped', [])) for e in splits.values())}"
        + f" images_per_second={total / max(seconds, 1e-9):.0f}"
    )


if __name__ == "__main__":
    cli.run(main)
