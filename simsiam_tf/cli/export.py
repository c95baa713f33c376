"""Exports a trained run's encoder as a new version of a TF Serving model.

  python tools/export.py --workdir=runs/cifar10 --export_dir=exports/simsiam [--version=N]
      [--projection] [--max_pixels=N] [--max_batch=N] [--max_request_pixels=N]
      [--max_png_bytes=N] [--max_request_png_bytes=N]

Writes exports/simsiam/<N>/ (N: one past the highest existing version unless given; an existing
version is never overwritten) through a temporary directory that is renamed once the SavedModel
is complete and checked, so a TF Serving watching exports/simsiam never loads half a version.
Signatures and their inputs and outputs: docs/SERVING.md.

A run still training (its WORKDIR/.lock held) is refused: its backbone.weights.h5 is written
when training ends, so it is absent or an earlier end's. With --projection the latest checkpoint
is exported instead, and the tool names it.
"""

import fcntl
import os
import sys

from absl import flags, logging

from simsiam_tf import cli, export

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
_MAX_PNG_BYTES = flags.DEFINE_integer(
    "max_png_bytes",
    None,
    "Most compressed image data (IDAT bytes) of one PNG: decoding a PNG costs in proportion to "
    f"it, not only to its pixels; default {export.DEFAULT_MAX_PNG_BYTES} (docs/SERVING.md).",
)
_MAX_REQUEST_PNG_BYTES = flags.DEFINE_integer(
    "max_request_png_bytes",
    None,
    "Most compressed image data over the PNGs of one request; default: "
    f"{export.REQUEST_PNG_BYTES_PER_IMAGE} x max_png_bytes.",
)
flags.mark_flags_as_required(["workdir", "export_dir"])


def training_holder(workdir: str) -> str | None:
    """Who trains into `workdir` right now (the text of its .lock), or None when no one does."""
    path = os.path.join(workdir, ".lock")
    if not os.path.exists(path):
        return None
    with open(path) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return handle.read().strip() or "another process"
        fcntl.flock(handle, fcntl.LOCK_UN)
    return None


def main(argv):
    del argv
    workdir = _WORKDIR.value
    holder = training_holder(workdir)
    if holder:
        if not _PROJECTION.value:
            final = os.path.join(workdir, "backbone.weights.h5")
            stale = "is an earlier end's" if os.path.exists(final) else "is not written yet"
            cli.fail(
                f"{workdir} is still training ({holder}): its backbone.weights.h5 {stale}; "
                "wait for the run to end, or pass --projection to export its latest checkpoint",
                code=1,
            )
        from simsiam_tf import linear

        info = linear.weights_info(workdir)
        logging.warning(
            "%s is still training: exporting its latest checkpoint, %s",
            workdir,
            linear.describe(info),
        )
    try:
        path = export.export(
            _WORKDIR.value,
            _EXPORT_DIR.value,
            version=_VERSION.value,
            projection=_PROJECTION.value,
            max_pixels=_MAX_PIXELS.value,
            max_batch=_MAX_BATCH.value,
            max_request_pixels=_MAX_REQUEST_PIXELS.value,
            max_png_bytes=_MAX_PNG_BYTES.value,
            max_request_png_bytes=_MAX_REQUEST_PNG_BYTES.value,
        )
    except (export.ExportError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
    logging.info("SavedModel written to %s", path)
    print(path)


def run_command() -> None:
    """The `simsiam-export` command (tools/export.py)."""
    cli.run(main)


if __name__ == "__main__":
    run_command()
