"""Finding the files of an image folder that cannot be decoded, before training starts, at a
cost that stays small at a million files.

Real folders hold broken files: truncated downloads, HTML saved as .jpg, empty files. Decoding
every file up front reads the whole data set before step 1 (140 GB and over half an hour for
ImageNet on a 2-core machine), so the default check (`mode="header"`) reads 64 bytes of each
file instead, on many threads: its first 32 bytes (the format's signature; a BMP's declared
size) and its last 32 (the end marker a complete JPEG, PNG or GIF ends with). What that cannot
settle (no end marker, an unknown signature: a truncated download, data after the end marker)
is decoded by the very decoder the pipeline uses, and only then dropped; an empty file is
dropped at once. A file that passes the header check and still fails to decode during training
is replaced by its neighbour in the batch, counted and named (`data.pretrain_dataset`), so a
run never stops on one. `mode="decode"` decodes every file up front, in parallel, as the
strictest check.

Undecodable files are dropped with a count and their names in the log, or, with `strict`, stop
the run before it starts. Verdicts are cached per folder in the project's cache directory
(`data.cache_dir()`, where archives are unpacked too), keyed by each file's path, size and
modification time: a second run directory on the same folder, a resume and the evaluation
tools re-check nothing, and a folder that grew checks only its new files.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import time
from typing import Optional

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from simsiam_tf import quiet
from simsiam_tf.errors import ConfigError

MODES = ("header", "decode")
_SHOWN = 10  # file names listed in the log or the error
_PROBE = 32  # bytes read at each end of a file
_CHUNK = 2048  # files per task of the thread pool
_CACHE_VERSION = 1
# Verdicts kept in the cache: what each check established about a file.
BAD, HEADER_OK, DECODED_OK = -1, 1, 2
_SIGNATURES = {"jpeg": b"\xff\xd8\xff", "png": b"\x89PNG\r\n\x1a\n", "gif": (b"GIF87a", b"GIF89a")}


def undecodable(paths: list, progress: bool = True) -> list:
    """Indices of the files in `paths` that cannot be read or decoded as an image, decoded in
    parallel by the pipeline's decoder. The progress bar is drawn on a terminal only (a log
    file gets the count and names from the caller)."""
    from simsiam_tf.data import decode_rgb

    if not paths:
        return []
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


def header_verdict(head: bytes, tail: bytes, size: int) -> tuple[int, str]:
    """(verdict, reason) from a file's first and last bytes: HEADER_OK, BAD (certainly not an
    image the pipeline decodes) or 0 (undecided: decode it to know), with the reason."""
    if size == 0:
        return BAD, "empty file"
    if head.startswith(_SIGNATURES["jpeg"]):
        return (HEADER_OK, "") if b"\xff\xd9" in tail else (0, "JPEG without its end marker")
    if head.startswith(_SIGNATURES["png"]):
        return (HEADER_OK, "") if b"IEND" in tail else (0, "PNG without its IEND chunk")
    if head.startswith(_SIGNATURES["gif"]):
        return (HEADER_OK, "") if b";" in tail else (0, "GIF without its trailer")
    if head.startswith(b"BM") and len(head) >= 6:
        declared = int.from_bytes(head[2:6], "little")
        return (HEADER_OK, "") if size >= declared else (0, "BMP shorter than it declares")
    return 0, f"not a JPEG, PNG, GIF or BMP signature ({head[:8]!r})"


def _stat(paths: list) -> list:
    """(size, mtime_ns) of each path, (-1, -1) for a file that cannot be stat'ed."""
    out = []
    for p in paths:
        try:
            st = os.stat(p)
            out.append((st.st_size, st.st_mtime_ns))
        except OSError:
            out.append((-1, -1))
    return out


def _headers(paths: list, sizes: list) -> list:
    """header_verdict of each file, reading _PROBE bytes at each end."""
    out = []
    for p, size in zip(paths, sizes):
        if size < 0:
            out.append((BAD, "cannot be read"))
            continue
        try:
            fd = os.open(p, os.O_RDONLY)
            try:
                head = os.pread(fd, _PROBE, 0)
                tail = os.pread(fd, _PROBE, max(0, size - _PROBE))
            finally:
                os.close(fd)
        except OSError as err:
            out.append((BAD, f"cannot be read ({err.strerror})"))
            continue
        out.append(header_verdict(head, tail, size))
    return out


def _in_chunks(fn, pool, *columns) -> list:
    """fn over the columns in chunks of _CHUNK on the pool, results concatenated in order."""
    n = len(columns[0])
    parts = pool.map(lambda lo: fn(*(c[lo : lo + _CHUNK] for c in columns)), range(0, n, _CHUNK))
    return [r for part in parts for r in part]


@dataclasses.dataclass
class _Cache:
    """The verdicts of one folder: relative path -> (size, mtime_ns, verdict, reason)."""

    path: Optional[str]
    entries: dict

    @classmethod
    def load(cls, path: Optional[str]) -> "_Cache":
        entries = {}
        if path and os.path.exists(path):
            try:
                with np.load(path) as z:
                    if int(z["version"]) == _CACHE_VERSION:
                        names = bytes(z["names"]).decode("utf-8").split("\n")
                        reasons = json.loads(str(z["reasons"]))
                        for name, size, mtime, verdict in zip(
                            names, z["size"].tolist(), z["mtime"].tolist(), z["verdict"].tolist()
                        ):
                            entries[name] = (size, mtime, verdict, reasons.get(name, ""))
            except (OSError, ValueError, KeyError) as err:  # a damaged cache: check again
                logging.warning("Ignoring the image-check cache %s (%s)", path, err)
                entries = {}
        return cls(path, entries)

    def save(self) -> None:
        if not self.path:
            return
        names = list(self.entries)
        rows = [self.entries[n] for n in names]
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        tmp = f"{self.path}.tmp-{os.getpid()}.npz"
        np.savez(
            tmp,
            version=np.int64(_CACHE_VERSION),
            names=np.frombuffer("\n".join(names).encode("utf-8"), np.uint8),
            size=np.asarray([r[0] for r in rows], np.int64),
            mtime=np.asarray([r[1] for r in rows], np.int64),
            verdict=np.asarray([r[2] for r in rows], np.int8),
            reasons=np.asarray(json.dumps({n: r[3] for n, r in zip(names, rows) if r[3]})),
        )
        os.replace(tmp, self.path)  # atomic: a killed run leaves the previous cache


def cache_file(root: str, cache_dir: Optional[str] = None) -> str:
    """The cache of the verdicts on the files under `root`."""
    from simsiam_tf import data

    key = hashlib.sha1(os.path.realpath(root).encode()).hexdigest()[:16]
    directory = cache_dir or os.path.join(data.cache_dir(), "image_checks")
    return os.path.join(directory, f"image_check-{key}.npz")


def check_files(
    paths: list,
    root: str,
    mode: str = "header",
    cache_dir: Optional[str] = None,
    progress: bool = True,
    threads: int = 0,
) -> dict:
    """{index: reason} of the files in `paths` (all under `root`) that are not usable images.

    Cached verdicts whose file has the same size and modification time are reused; the rest
    are checked (see the module docstring) and the cache is updated. `cache_dir=""` disables
    the cache.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: choose one of {MODES}")
    start = time.time()
    prefix = os.path.join(root, "")
    keys = [p[len(prefix) :] if p.startswith(prefix) else p for p in paths]
    cache = _Cache.load(None if cache_dir == "" else cache_file(root, cache_dir))
    threads = threads or min(32, 4 * (os.cpu_count() or 1))
    needed = DECODED_OK if mode == "decode" else HEADER_OK
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        stats = _in_chunks(_stat, pool, paths)
        verdicts, reasons, todo = [0] * len(paths), [""] * len(paths), []
        for i, (key, stat) in enumerate(zip(keys, stats)):
            saved = cache.entries.get(key)
            if saved is not None and saved[:2] == stat and (saved[2] == BAD or saved[2] >= needed):
                verdicts[i], reasons[i] = saved[2], saved[3]
            else:
                todo.append(i)
        if todo:
            logging.info(
                "Checking %d of the %d files under %s (%s; %d verdicts cached)",
                len(todo),
                len(paths),
                root,
                "headers" if mode == "header" else "full decode",
                len(paths) - len(todo),
            )
        undecided = []
        if mode == "header" and todo:
            found = _in_chunks(
                _headers, pool, [paths[i] for i in todo], [stats[i][0] for i in todo]
            )
            for i, (verdict, reason) in zip(todo, found):
                verdicts[i], reasons[i] = verdict, reason
                if verdict == 0:
                    undecided.append(i)
        else:
            undecided = todo
    if undecided:
        failed = set(undecodable([paths[i] for i in undecided], progress=progress))
        for j, i in enumerate(undecided):
            if j in failed:
                verdicts[i] = BAD
                reasons[i] = reasons[i] or "cannot be decoded"
                if "decode" not in reasons[i]:
                    reasons[i] += ", and it does not decode"
            else:
                verdicts[i], reasons[i] = DECODED_OK, ""
    if todo:
        for i in todo:
            cache.entries[keys[i]] = (*stats[i], verdicts[i], reasons[i])
        cache.save()
        logging.info(
            "Checked %d files under %s in %.1f s (%d decoded)",
            len(todo),
            root,
            time.time() - start,
            len(undecided),
        )
    return {i: reasons[i] for i, v in enumerate(verdicts) if v == BAD}


def drop_undecodable(
    source, strict: bool = False, cache_dir: Optional[str] = None, mode: str = "header"
):
    """`source` without its undecodable files (a file-backed source; others are returned as
    they are). Raises ConfigError naming them when `strict`. `cache_dir`: where the verdicts
    are cached (default: the project's cache directory; "" for none)."""
    if source.files is None:
        return source
    root = source.root or os.path.commonpath(source.files)
    bad = check_files(source.files, root, mode, cache_dir)
    if not bad:
        return source
    names = [f"{source.files[i]} ({reason})" for i, reason in sorted(bad.items())]
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
    keep = np.setdiff1d(np.arange(source.num_examples), sorted(bad))
    return dataclasses.replace(
        source,
        num_examples=len(keep),
        files=[source.files[i] for i in keep],
        labels=source.labels[keep],
    )
