"""TFDS data sets by name, with the mistakes of a first hour answered in one line: a name TFDS
does not know (naming the closest ones), a data set that is not prepared while downloading is
off, and no network to download it (found in seconds, instead of retrying for minutes)."""

from __future__ import annotations

import difflib
import socket
from typing import Optional

from simsiam_tf.errors import ConfigError

LOCAL_SOURCES = "folder:PATH, archive:FILE.tar.gz, tfrecord:DIR or builtin:digits"
# TFDS fetches prepared data sets from this bucket first (tfds' GCS mirror).
TFDS_HOST = "storage.googleapis.com"


def closest_names(name: str, known: list, n: int = 3) -> list:
    """Up to n known data set names nearest to `name` (a `name/config` is compared by name)."""
    base = name.split("/", 1)[0].split(":", 1)[0]
    return difflib.get_close_matches(base, known, n=n, cutoff=0.5)


def network_reachable(host: Optional[str] = None, timeout: float = 3.0) -> bool:
    """Whether `host` (default TFDS_HOST) resolves and accepts a TCP connection on 443 within
    `timeout` seconds."""
    try:
        with socket.create_connection((host or TFDS_HOST, 443), timeout=timeout):
            return True
    except OSError:
        return False


def tfds_builder_or_error(name: str, data_dir: Optional[str] = None, download: bool = True):
    """The TFDS builder of `name`, prepared (already, or downloaded and prepared now).

    Raises ConfigError in one line: an unknown name (with the closest known ones), a data set
    that is not prepared in `data_dir` while `download` is False, or no network to download it
    (naming the sources that need none).
    """
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir or None)
    except tfds.core.registered.DatasetNotFoundError:
        hints = closest_names(name, tfds.list_builders(with_community_datasets=False))
        raise ConfigError(
            f"data.source=tfds:{name}: TFDS has no such data set"
            + (f"; did you mean {', '.join('tfds:' + h for h in hints)}?" if hints else "")
        ) from None
    if builder.is_prepared():
        return builder
    where = data_dir or "TFDS' default data_dir (~/tensorflow_datasets)"
    if not download:
        raise ConfigError(
            f"data.source=tfds:{name} is not prepared in {where} and data.tfds_download=False; "
            f"allow the download, point data.tfds_data_dir at a prepared copy, or use "
            f"{LOCAL_SOURCES}"
        )
    if not network_reachable():
        raise ConfigError(
            f"data.source=tfds:{name} is not prepared in {where} and {TFDS_HOST} cannot be "
            f"reached to download it; offline, use {LOCAL_SOURCES}, or a prepared copy "
            "(data.tfds_data_dir)"
        )
    builder.download_and_prepare()
    return builder
