"""Finding the files of an image folder that cannot be decoded, before training starts.

Real folders hold broken files: truncated downloads, HTML saved as .jpg, empty files. Each is
decoded once, in parallel, by the very decoder the pipeline uses (grayscale, RGBA, palette, CMYK
and 16-bit images decode to RGB and are kept). Undecodable files are dropped with a count and
their names in the log, or, with `strict`, stop the run before it starts. The verdict is cached
in the run directory, keyed by the files' paths, sizes and modification times, so a resumed run
does not decode everything again, and the evaluation tools, which check the very same splits
(simsiam_tf/holdout.py), reuse the verdicts of training.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Optional

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from simsiam_tf import quiet
from simsiam_tf.errors import ConfigError

_SHOWN = 10  # file names listed in the log or the error


def undecodable(paths: list, progress: bool = True) -> list:
    """Indices of the files in `paths` that cannot be read or decoded as an image. The progress
    bar is drawn on a terminal only (a log file gets the count and names from the caller)."""
    from simsiam_tf.data import decode_rgb

    ds = tf.data.Dataset.from_tensor_slices(paths).enumerate()
    ds = ds.map(
        lambda i, path: (i, tf.shape(decode_rgb(tf.io.read_file(path)))[0]),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=False,
    ).ignore_errors()  # a file whose decode fails yields nothing
    bar = None
    if progress:
        bar = keras.utils.Progbar(len(paths), unit_name="file", verbose=quiet.progress_verbosity())
    good = np.zeros(len(paths), bool)
    done = 0
    # libjpeg prints a line per broken file; the caller names the broken files instead.
    with quiet.native_stderr_filtered(quiet.LIBJPEG_NOISE):
        for i, _ in ds.batch(256).as_numpy_iterator():
            good[i] = True
            done += len(i)
            if bar is not None and done < len(paths):
                bar.update(done)
    if bar is not None:
        bar.update(len(paths), finalize=True)  # once: broken files never arrive
    return [int(i) for i in np.flatnonzero(~good)]


def _fingerprint(paths: list) -> str:
    h = hashlib.sha1()
    for p in paths:
        st = os.stat(p)
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def drop_undecodable(source, strict: bool = False, cache_dir: Optional[str] = None):
    """`source` without its undecodable files (a file-backed source; others are returned as
    they are). Raises ConfigError naming them when `strict`."""
    if source.files is None:
        return source
    key = _fingerprint(source.files)
    cache = None
    if cache_dir:
        # One cache file per set of files: training and the evaluation tools check the same
        # splits and subsets, and find each other's verdicts.
        cache = os.path.join(cache_dir, f"image_check-{key[:12]}.json")
    bad = None
    if cache and os.path.exists(cache):
        with open(cache) as f:
            saved = json.load(f)
        if saved.get("fingerprint") == key:
            bad = saved["bad"]
    if bad is None:
        logging.info("Checking that the %d files of %s decode", len(source.files), source.name)
        bad = undecodable(source.files)
        if cache:
            os.makedirs(cache_dir, exist_ok=True)
            with open(cache + ".tmp", "w") as f:
                json.dump({"fingerprint": key, "source": source.name, "bad": bad}, f)
            os.replace(cache + ".tmp", cache)
    if not bad:
        return source
    names = [source.files[i] for i in bad]
    listing = ", ".join(names[:_SHOWN]) + (
        f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    )
    if strict:
        raise ConfigError(
            f"{source.name}: {len(bad)} of {source.num_examples} files cannot be decoded as "
            f"images (data.strict=True): {listing}"
        )
    logging.warning(
        "%s: skipping %d of %d files that cannot be decoded as images: %s",
        source.name,
        len(bad),
        source.num_examples,
        listing,
    )
    keep = np.setdiff1d(np.arange(source.num_examples), bad)
    return dataclasses.replace(
        source,
        num_examples=len(keep),
        files=[source.files[i] for i in keep],
        labels=source.labels[keep],
    )
