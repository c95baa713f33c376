"""Exports a trained run's encoder as a new version of a TF Serving model.

  python tools/export.py --workdir=runs/cifar10 --export_dir=exports/simsiam [--version=N]
      [--projection] [--max_pixels=N] [--max_batch=N] [--max_request_pixels=N]

Writes exports/simsiam/<N>/ (N: one past the highest existing version unless given; an existing
version is never overwritten) through a temporary directory that is renamed once the SavedModel
is complete and checked, so a TF Serving watching exports/simsiam never loads half a version.
Signatures and their inputs and outputs: docs/SERVING.md.
"""

import sys

import cli  # noqa: F401  (first: a quiet TensorFlow start-up)

from absl import flags, logging

from simsiam_tf import export

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory of a (finished) pretraining run.")
_EXPORT_DIR = flags.DEFINE_string(
    "export_dir", None, "The model's base path, DIR/NAME; versions are written below it."
)
_VERSION = flags.DEFINE_integer("version", None, "Version number; default: the next free one.")
_PROJECTION = flags.DEFINE_boolean(
    "projection",
    False,
    "Also output the projector's z as `projection` (restores the latest checkpoint).",
)
_MAX_PIXELS = flags.DEFINE_integer(
    "max_pixels",
    None,
    "Largest image (height x width) a request may hold; default: "
    f"{export.PIXELS_PER_OUTPUT_PIXEL} x image_size^2, at least {export.MIN_MAX_PIXELS}.",
)
_MAX_BATCH = flags.DEFINE_integer(
    "max_batch",
    None,
    "Largest number of images in one request; default: "
    f"{export.DEFAULT_MAX_BATCH} at 32 px, fewer for larger inputs (docs/SERVING.md).",
)
_MAX_REQUEST_PIXELS = flags.DEFINE_integer(
    "max_request_pixels",
    None,
    "Largest sum of height x width over the images of one request; default: "
    f"{export.REQUEST_PIXELS_PER_IMAGE} x max_pixels.",
)
flags.mark_flags_as_required(["workdir", "export_dir"])


def main(argv):
    del argv
    try:
        path = export.export(
            _WORKDIR.value,
            _EXPORT_DIR.value,
            version=_VERSION.value,
            projection=_PROJECTION.value,
            max_pixels=_MAX_PIXELS.value,
            max_batch=_MAX_BATCH.value,
            max_request_pixels=_MAX_REQUEST_PIXELS.value,
        )
    except (export.ExportError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
    logging.info("SavedModel written to %s", path)
    print(path)


if __name__ == "__main__":
    cli.run(main)
