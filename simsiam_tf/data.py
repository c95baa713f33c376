"""Data sources and the tf.data pipelines: two augmented views for pretraining, plain images for
evaluation.

Sources, named by `data.source`:
  builtin:digits   scikit-learn's handwritten digits (ships inside the package; no download)
  folder:PATH      an image folder, class-per-subfolder or flat, JPEG/PNG/GIF/BMP; a `train` or
                   `test` subfolder is used for that split when present
  tfds:NAME        a TensorFlow Datasets builder (cifar10, imagenet2012, ...)
  tfrecord:DIR     sharded TFRecords written by tools/make_tfrecords.py (or a glob of them),
                   read as a stream, sharded by file over workers
  archive:FILE     a .tar, .tar.gz, .tgz or .zip of such an image folder, unpacked once into
                   the cache ($SIMSIAM_TF_CACHE, else ~/.cache/simsiam_tf) and read as a folder

Each image is read once per epoch and both views are cut from it, each with its own random
draw (never one draw per batch). Every random number is keyed by (seed, epoch, batch or
example), so a run is reproducible and a resumed run sees the batches an uninterrupted one
would. In-memory sources and image folders take a fresh full permutation every epoch, as the
official code's sampler does; streamed sources (TFDS datasets too large for memory, TFRecords)
read their shard files in an order drawn per epoch and mix examples through a shuffle buffer
seeded per epoch (`data.shuffle_buffer` examples wide), so each epoch has its own order too.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import tarfile
import zipfile
from typing import Callable, Optional

import numpy as np
import tensorflow as tf
from absl import logging

from simsiam_tf import augment
from simsiam_tf.errors import ConfigError

SOURCE_KINDS = ("builtin", "folder", "tfds", "tfrecord", "archive")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")
BUILTINS = ("digits",)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp")
# Sources whose decoded images take less than this are held in memory as one array.
_IN_MEMORY_BYTES = 2 << 30
AUTOTUNE = tf.data.AUTOTUNE


@dataclasses.dataclass
class Source:
    """One split of a data set: in memory (`images`) or as encoded files/records (`dataset`)."""

    name: str
    num_examples: int
    num_classes: int  # 0 when unlabelled
    labels: np.ndarray  # int64 [num_examples], -1 when unlabelled
    images: Optional[np.ndarray] = None  # uint8 NxHxWx3, all of one size
    files: Optional[list] = None  # paths of encoded images
    tfds_dataset: Optional[tf.data.Dataset] = None  # (encoded bytes, label) in a fixed order
    class_names: tuple = ()
    # Streamed sources: int64 seed -> (encoded bytes, label), shard files in an order drawn
    # from the seed; pretraining calls it once per epoch with a seed folded from the epoch.
    stream: Optional[Callable[[tf.Tensor], tf.data.Dataset]] = None
    root: Optional[str] = None  # image folders: the folder listed, which every path starts with
    # TFRecords: the records that reading skipped (a corrupt or truncated shard), counted
    skipped_records: Optional[object] = None

    @property
    def in_memory(self) -> bool:
        return self.images is not None

    def path_tensor(self) -> tf.Tensor:
        """The file paths as one eager string tensor, made once per Source."""
        if getattr(self, "_paths", None) is None:
            self._paths = tf.constant(self.files)
        return self._paths

    def encoded(self) -> tf.data.Dataset:
        """(encoded image bytes, label) in the source's fixed order (files or TFDS)."""
        if self.files is not None:
            paths = tf.data.Dataset.from_tensor_slices(self.files)
            labels = tf.data.Dataset.from_tensor_slices(self.labels)
            return tf.data.Dataset.zip(paths.map(tf.io.read_file), labels)
        return self.tfds_dataset


def parse_source(spec: str) -> tuple[str, str]:
    kind, sep, arg = spec.partition(":")
    if not sep or kind not in SOURCE_KINDS or not arg:
        raise ConfigError(
            f"data.source={spec!r} is not understood; expected one of "
            f"'builtin:{'|'.join(BUILTINS)}', 'folder:PATH', 'tfds:NAME', 'tfrecord:DIR', "
            "'archive:FILE.tar.gz'"
        )
    if kind == "builtin" and arg not in BUILTINS:
        raise ConfigError(
            f"data.source={spec!r}: unknown built-in data set; choose one of {BUILTINS}"
        )
    if kind in ("folder", "tfrecord", "archive"):
        arg = os.path.expanduser(arg)  # folder:~/photos, as a shell would read it
    if kind == "archive" and not arg.lower().endswith(ARCHIVE_SUFFIXES):
        raise ConfigError(f"data.source={spec!r}: an archive ends in one of {ARCHIVE_SUFFIXES}")
    return kind, arg


def load_source(
    spec: str,
    split: str = "train",
    max_examples: int = 0,
    seed: int = 0,
    tfds_data_dir: Optional[str] = None,
    tfds_download: bool = True,
    shard: tuple = (0, 1),
) -> Optional[Source]:
    """Loads one split of the source named by `spec`; None when the source has no such split.

    Args:
      spec: "builtin:NAME", "folder:PATH" or "tfds:NAME".
      split: "train" or "test" (TFDS accepts any split string, e.g. "train[:10%]").
      max_examples: keep a seeded random subset of this many examples (0: all).
      seed: seed of that subset.
      tfds_data_dir, tfds_download: where TFDS keeps data, and whether it may download.
      shard: (index, count): for TFRecords, read every count-th shard file from index (one
        share per worker).
    """
    kind, arg = parse_source(spec)
    if kind == "builtin":
        source = _load_digits(split)
    elif kind == "folder":
        source = _load_folder(arg, split)
    elif kind == "archive":
        source = _load_folder(unpacked_archive(arg), split)
    elif kind == "tfds":
        source = _load_tfds(arg, split, tfds_data_dir, tfds_download)
    else:
        source = _load_tfrecords(arg, split, seed, shard)
    if source is not None and 0 < max_examples < source.num_examples:
        source = _subset(source, max_examples, seed)
    return source


def _subset(source: Source, n: int, seed: int) -> Source:
    keep = np.sort(np.random.default_rng(seed).permutation(source.num_examples)[:n])
    if source.tfds_dataset is not None:
        return dataclasses.replace(
            source,
            num_examples=n,
            tfds_dataset=source.tfds_dataset.take(n),
            labels=source.labels[:n],
            stream=None,  # the subset is the first n in the fixed order, every epoch
        )
    return dataclasses.replace(
        source,
        num_examples=n,
        labels=source.labels[keep],
        images=None if source.images is None else source.images[keep],
        files=None if source.files is None else [source.files[i] for i in keep],
    )


def _load_digits(split: str) -> Optional[Source]:
    """scikit-learn's 1,797 handwritten digits (8x8, 16 grey levels) as uint8 RGB.

    A fixed stratified 75/25 split gives `train` (1,347) and `test` (450).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if split not in ("train", "test"):
        return None
    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # Nx8x8
    images = np.repeat(images[..., None], 3, axis=-1)
    idx_train, idx_test = train_test_split(
        np.arange(len(images)), test_size=0.25, random_state=0, stratify=digits.target
    )
    idx = idx_train if split == "train" else idx_test
    return Source(
        name=f"builtin:digits/{split}",
        num_examples=len(idx),
        num_classes=10,
        labels=digits.target[idx].astype(np.int64),
        images=images[idx],
        class_names=tuple(str(i) for i in range(10)),
    )


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def list_image_folder(root: str) -> tuple[list, np.ndarray, tuple]:
    """Image files under root: (paths, labels, class names), sorted.

    Class-per-subfolder when root's subfolders hold images (any depth below each); otherwise
    flat: every image under root, unlabelled (-1).
    """
    if not os.path.isdir(root):
        raise ConfigError(f"data.source=folder:{root}: no such directory")
    subdirs = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    paths, labels, classes = [], [], []
    for sub in subdirs:
        found = []
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, sub)):
            dirnames.sort()
            found += [os.path.join(dirpath, f) for f in sorted(filenames) if _is_image(f)]
        if found:
            labels += [len(classes)] * len(found)
            classes.append(sub)
            paths += found
    loose = sorted(os.path.join(root, f) for f in os.listdir(root) if _is_image(f))
    if classes and loose:
        logging.warning(
            "folder:%s has class subfolders and %d loose images; the loose ones are ignored",
            root,
            len(loose),
        )
    if not classes:
        paths, labels = loose, [-1] * len(loose)
    if not paths:
        raise ConfigError(
            f"data.source=folder:{root}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)}"
            " files, in class subfolders or at the top level)"
        )
    return paths, np.asarray(labels, np.int64), tuple(classes)


# The subfolders that hold a folder's evaluation split, in the order they are looked for:
# ImageNet's own layout has train/ and val/.
EVAL_SPLIT_DIRS = ("test", "val", "validation")


def folder_eval_split(root: str) -> Optional[str]:
    """The subfolder of `root` that holds its evaluation split (test/, val/ or validation/),
    or None when it has none."""
    return next((s for s in EVAL_SPLIT_DIRS if os.path.isdir(os.path.join(root, s))), None)


def _load_folder(root: str, split: str) -> Optional[Source]:
    if not os.path.isdir(root):
        raise ConfigError(f"data.source=folder:{root}: no such directory")
    if split == "test" and not os.path.isdir(os.path.join(root, split)):
        split = folder_eval_split(root) or split  # the evaluation split: test/, val/ ...
    if os.path.isdir(os.path.join(root, split)):
        root = os.path.join(root, split)
    elif split != "train":
        return None  # the folder itself is the training split; it has no other
    paths, labels, classes = list_image_folder(root)
    return Source(
        name=f"folder:{root}",
        num_examples=len(paths),
        num_classes=len(classes),
        labels=labels,
        files=paths,
        class_names=classes,
        root=root,
    )


def cache_dir() -> str:
    """Where unpacked archives are kept: $SIMSIAM_TF_CACHE, else ~/.cache/simsiam_tf."""
    return os.environ.get("SIMSIAM_TF_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "simsiam_tf"
    )


def unpacked_archive(path: str) -> str:
    """The image folder inside an archive, unpacked once into the cache (atomically: a run
    killed mid-unpack leaves no half folder) and reused while the archive is unchanged."""
    if not os.path.isfile(path):
        raise ConfigError(f"data.source=archive:{path}: no such file")
    stat = os.stat(path)
    name = os.path.basename(path)
    for suffix in ARCHIVE_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    dest = os.path.join(cache_dir(), "archives", f"{name}-{stat.st_size}-{stat.st_mtime_ns}")
    if not os.path.isdir(dest):
        partial = f"{dest}.partial-{os.getpid()}"
        logging.info("Unpacking %s into %s (once)", path, dest)
        try:
            if path.lower().endswith(".zip"):
                with zipfile.ZipFile(path) as archive:
                    archive.extractall(partial)
            else:
                with tarfile.open(path) as archive:
                    archive.extractall(partial, filter="data")  # no links or paths outside
        except (tarfile.TarError, zipfile.BadZipFile, OSError) as err:
            shutil.rmtree(partial, ignore_errors=True)
            raise ConfigError(f"data.source=archive:{path}: cannot unpack it ({err})") from None
        try:
            os.rename(partial, dest)
        except OSError:  # another process unpacked it first
            shutil.rmtree(partial, ignore_errors=True)
    entries = [e for e in os.listdir(dest) if not e.startswith(".")]
    if len(entries) == 1 and os.path.isdir(os.path.join(dest, entries[0])):
        return os.path.join(dest, entries[0])  # the archive wraps the folder in one directory
    return dest


def prepared_tfds_builder(name: str, data_dir: Optional[str], download: bool):
    """The TFDS builder of `name`, downloaded and prepared first where allowed; ConfigError in
    one line (an unknown name with the closest known ones, a data set not prepared, no network,
    a failed download) instead of TFDS's own tracebacks (`tfds_source`)."""
    from simsiam_tf import tfds_source

    try:
        return tfds_source.tfds_builder_or_error(name, data_dir, download)
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - any download failure: say what to do
        raise ConfigError(
            f"data.source=tfds:{name}: the download failed ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); check the network, or use "
            f"{tfds_source.LOCAL_SOURCES} with a local copy"
        ) from err


def _load_tfds(name: str, split: str, data_dir: Optional[str], download: bool) -> Optional[Source]:
    import tensorflow_datasets as tfds

    builder = prepared_tfds_builder(name, data_dir, download)
    info = builder.info
    if split not in info.splits and split.split("[")[0] not in info.splits:
        return None
    image_key = next(k for k, f in info.features.items() if isinstance(f, tfds.features.Image))
    label_key = next(
        (k for k, f in info.features.items() if isinstance(f, tfds.features.ClassLabel)), None
    )
    num_classes = info.features[label_key].num_classes if label_key else 0
    num_examples = info.splits[split].num_examples
    shape = info.features[image_key].shape
    fixed = None not in shape
    if fixed and num_examples * int(np.prod(shape)) < _IN_MEMORY_BYTES:
        # Small data sets of one image size (CIFAR, ...) are decoded once into memory.
        ds = builder.as_dataset(split=split, shuffle_files=False)
        images, labels = [], []
        for batch in ds.batch(4096).as_numpy_iterator():
            images.append(batch[image_key])
            labels.append(batch[label_key] if label_key else np.full(len(batch[image_key]), -1))
        images = np.concatenate(images)
        if images.shape[-1] == 1:
            images = np.repeat(images, 3, axis=-1)
        return Source(
            name=f"tfds:{name}/{split}",
            num_examples=len(images),
            num_classes=num_classes,
            labels=np.concatenate(labels).astype(np.int64),
            images=images,
        )
    decoders = {image_key: tfds.decode.SkipDecoding()}

    def pairs(ds):
        if label_key:
            return ds.map(lambda ex: (ex[image_key], tf.cast(ex[label_key], tf.int64)))
        return ds.map(lambda ex: (ex[image_key], tf.constant(-1, tf.int64)))

    def stream(seed):
        # A seeded file order is read deterministically (TFDS interleaves files in order when
        # the shuffle has a seed); no reshuffle: each epoch builds its stream afresh.
        read_config = tfds.ReadConfig(shuffle_seed=seed, shuffle_reshuffle_each_iteration=False)
        return pairs(
            builder.as_dataset(
                split=split, shuffle_files=True, read_config=read_config, decoders=decoders
            )
        )

    # Labels of a streamed source are not gathered up front; evaluation reads them from the data.
    return Source(
        name=f"tfds:{name}/{split}",
        num_examples=num_examples,
        num_classes=num_classes,
        labels=np.full(num_examples, -1, np.int64),
        tfds_dataset=pairs(builder.as_dataset(split=split, shuffle_files=False, decoders=decoders)),
        stream=stream,
    )


def _load_tfrecords(arg: str, split: str, seed: int, shard: tuple) -> Optional[Source]:
    from simsiam_tf import tfrecords

    records = tfrecords.find_records(arg, split, *shard)
    if records is None:
        return None
    return Source(
        name=f"tfrecord:{arg}/{records.split}",  # ".../val" when test is its alias
        num_examples=records.num_examples,
        num_classes=records.num_classes,
        labels=np.full(records.num_examples, -1, np.int64),
        tfds_dataset=records.dataset(seed),
        class_names=records.class_names,
        stream=records.dataset,
        skipped_records=records.skipped,
    )


# ------------------------------------------------------------------------------------------------
# Decoding: what a viewer shows, in training, evaluation and serving alike.

JPEG_MAGIC = b"\xff\xd8\xff"  # the first bytes of a JPEG file
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Transparent pixels (RGBA, grey+alpha and palette PNGs with transparency) are composited onto
# white, as a page or an image viewer on a light background shows them.
ALPHA_BACKGROUND = 255
# Evaluation decodes a JPEG at the smallest DCT scale (libjpeg's 1/2, 1/4, 1/8) that keeps the
# centre region it embeds at least this many times the output size on its shorter side, so a
# 12-megapixel photo served at 224 px is decoded at 1/4 scale (0.75 megapixels).
DCT_SCALE_MARGIN = 2
_DCT_RATIOS = (1, 2, 4, 8)
_JPEG_SEGMENTS = 64  # marker segments read before the first scan, for Exif and the frame
_EXIF_ENTRIES = 64  # IFD0 entries searched for the orientation tag


def _bytes_at(encoded: tf.Tensor, pos: tf.Tensor, n: int) -> tf.Tensor:
    """n bytes of `encoded` from `pos` as int64 [n], zeros past its end (never out of range)."""
    length = tf.cast(tf.strings.length(encoded), tf.int64)
    pos = tf.clip_by_value(tf.cast(pos, tf.int64), 0, length)
    raw = tf.io.decode_raw(tf.strings.substr(encoded, pos, n), tf.uint8, fixed_length=n)
    return tf.cast(raw, tf.int64)


def png_size(encoded: tf.Tensor, missing: int = 0) -> tf.Tensor:
    """(height, width) int64 from a PNG's IHDR chunk (big-endian at bytes 16-23); (missing,
    missing) when there is no IHDR chunk there (never an error, whatever the bytes)."""
    head = _bytes_at(encoded, 12, 12)
    ihdr = tf.reduce_all(tf.equal(head[:4], tf.constant(list(b"IHDR"), tf.int64)))
    big_endian = lambda b: ((b[0] * 256 + b[1]) * 256 + b[2]) * 256 + b[3]
    size = tf.stack([big_endian(head[8:12]), big_endian(head[4:8])])
    return tf.where(ihdr, size, tf.fill([2], tf.constant(missing, tf.int64)))


# Start-of-frame markers (the frame header holds the image size): C0-CF but DHT, JPG and DAC.
_SOF_MARKERS = (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF)


def _jpeg_segments(encoded: tf.Tensor, leading_only: bool = False):
    """(position of the TIFF header of the first APP1 Exif segment, position of the first frame
    header), -1 where absent: the marker segments from the SOI are followed by their lengths,
    as libjpeg reads them, up to the first scan (SOS), the end, or bytes that are no segment.

    `leading_only`: stop at the first segment that is not an application segment (APPn) or a
    comment, where the Exif and JFIF specifications place the Exif segment; the walk then takes
    2 or 3 steps instead of one per table, which matters when it runs for every training image.
    """

    def walk(i, pos, exif, sof):
        seg = _bytes_at(encoded, pos, 10)  # FF, marker, length (2), "Exif\0\0"
        marker = seg[1]
        is_segment = tf.logical_and(tf.equal(seg[0], 0xFF), seg[2] * 256 + seg[3] >= 2)
        is_exif = tf.logical_and(
            tf.equal(marker, 0xE1),
            tf.reduce_all(tf.equal(seg[4:10], tf.constant(list(b"Exif\0\0"), tf.int64))),
        )
        is_sof = tf.reduce_any(tf.equal(marker, _SOF_MARKERS))
        exif = tf.where(tf.logical_and(is_segment, is_exif) & (exif < 0), pos + 10, exif)
        sof = tf.where(tf.logical_and(is_segment, is_sof) & (sof < 0), pos, sof)
        go_on = tf.logical_and(is_segment, tf.logical_and(marker != 0xDA, marker != 0xD9))
        if leading_only:
            leading = tf.logical_or(tf.logical_and(marker >= 0xE0, marker <= 0xEF), marker == 0xFE)
            go_on = tf.logical_and(go_on, leading)
        pos = tf.where(go_on, pos + 2 + seg[2] * 256 + seg[3], tf.constant(-1, tf.int64))
        return i + 1, pos, exif, sof

    minus_one = tf.constant(-1, tf.int64)
    _, _, exif, sof = tf.while_loop(
        lambda i, pos, exif, sof: tf.logical_and(i < _JPEG_SEGMENTS, pos >= 0),
        walk,
        (tf.constant(0), tf.constant(2, tf.int64), minus_one, minus_one),
    )
    return exif, sof


def jpeg_size(encoded: tf.Tensor, missing: int = 0) -> tf.Tensor:
    """(height, width) int64 from a JPEG's frame header; (missing, missing) when none is found
    (never an error, whatever the bytes)."""
    _, sof = _jpeg_segments(encoded)
    head = _bytes_at(encoded, sof, 9)  # FF, marker, length (2), precision, height (2), width (2)
    size = tf.stack([head[5] * 256 + head[6], head[7] * 256 + head[8]])
    return tf.where(sof >= 0, size, tf.fill([2], tf.constant(missing, tf.int64)))


def jpeg_orientation(encoded: tf.Tensor) -> tf.Tensor:
    """The EXIF orientation (1-8, int32) of a JPEG; 1 when it has none or it cannot be read.

    Reads tag 0x0112 of the first IFD of the APP1 "Exif" segment, in either TIFF byte order.
    Every read is bounds-safe, so any bytes give an answer.
    """
    tiff, _ = _jpeg_segments(encoded, leading_only=True)
    # Most images carry no Exif segment: then nothing more is read.
    return tf.cond(tiff >= 0, lambda: _exif_orientation(encoded, tiff), lambda: tf.constant(1))


def _exif_orientation(encoded: tf.Tensor, tiff: tf.Tensor) -> tf.Tensor:
    """Tag 0x0112 of IFD0 of the TIFF header at `tiff`; 1 when absent or unreadable."""
    u16 = lambda b, le: tf.where(le, b[0] + 256 * b[1], 256 * b[0] + b[1])
    header = _bytes_at(encoded, tiff, 8)  # "II*\0" or "MM\0*", offset of IFD0 (4 bytes)
    little = tf.logical_and(tf.equal(header[0], 0x49), tf.equal(header[1], 0x49))
    big = tf.logical_and(tf.equal(header[0], 0x4D), tf.equal(header[1], 0x4D))
    offset = tf.where(
        little,
        header[4] + 256 * (header[5] + 256 * (header[6] + 256 * header[7])),
        ((header[4] * 256 + header[5]) * 256 + header[6]) * 256 + header[7],
    )
    ifd = tiff + offset
    count = u16(_bytes_at(encoded, ifd, 2), little)
    entries = tf.reshape(_bytes_at(encoded, ifd + 2, 12 * _EXIF_ENTRIES), (_EXIF_ENTRIES, 12))
    tags = u16(tf.transpose(entries[:, :2]), little)
    values = u16(tf.transpose(entries[:, 8:10]), little)  # a SHORT sits first in its field
    hit = tf.logical_and(tf.equal(tags, 0x0112), tf.range(_EXIF_ENTRIES, dtype=tf.int64) < count)
    value = tf.gather(values, tf.argmax(tf.cast(hit, tf.int32)))  # the first hit
    ok = tf.logical_and(
        tf.logical_and(tiff >= 0, tf.logical_or(little, big)),
        tf.logical_and(tf.reduce_any(hit), tf.logical_and(value >= 1, value <= 8)),
    )
    return tf.cast(tf.where(ok, value, 1), tf.int32)


def orient(image: tf.Tensor, orientation: tf.Tensor) -> tf.Tensor:
    """HxWxC as stored -> as shown, for an EXIF orientation 1-8 (2-8 mirror or rotate it)."""
    image = tf.cond(orientation >= 5, lambda: tf.transpose(image, (1, 0, 2)), lambda: image)
    mirror = tf.reduce_any(tf.equal(orientation, (2, 3, 6, 7)))
    image = tf.cond(mirror, lambda: tf.reverse(image, [1]), lambda: image)
    upside_down = tf.reduce_any(tf.equal(orientation, (3, 4, 7, 8)))
    return tf.cond(upside_down, lambda: tf.reverse(image, [0]), lambda: image)


def _shown_region(image, orientation, window_fn):
    """The region window_fn(shown height, shown width) -> (top, left, height, width) of the image
    as shown, cut from the image as stored (so only the region is ever reoriented or copied)."""
    if window_fn is None:
        return orient(image, orientation)
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    transposed = orientation >= 5
    shown_h, shown_w = tf.where(transposed, w, h), tf.where(transposed, h, w)
    top, left, rh, rw = window_fn(shown_h, shown_w)
    top = tf.where(tf.reduce_any(tf.equal(orientation, (3, 4, 7, 8))), shown_h - top - rh, top)
    left = tf.where(tf.reduce_any(tf.equal(orientation, (2, 3, 6, 7))), shown_w - left - rw, left)
    top, left, rh, rw = (
        tf.where(transposed, left, top),
        tf.where(transposed, top, left),
        tf.where(transposed, rw, rh),
        tf.where(transposed, rh, rw),
    )
    return orient(image[top : top + rh, left : left + rw], orientation)


def composite(rgba: tf.Tensor, window=None) -> tf.Tensor:
    """uint8 HxWx4 -> HxWx3 over ALPHA_BACKGROUND, round(rgb x a + background x (1 - a))
    exactly; opaque pixels keep their values. With window (top, left, height, width), only that
    region, which is then never copied whole in 4 channels.

    In uint16, 64 rows at a time, so that the 16-bit copies stay small whatever the image:
    (rgb - background) x a wraps modulo 2^16, but rgb x a + background x (255 - a) + 127 is
    below 2^16, so the modular sum is that exact value.
    """
    rows = 64
    if window is None:
        top, left, height, width = 0, 0, tf.shape(rgba)[0], tf.shape(rgba)[1]
    else:
        top, left, height, width = window

    def blend(block):
        rgb = tf.cast(block[..., :3], tf.uint16)
        alpha = tf.cast(block[..., 3:], tf.uint16)
        out = (rgb - ALPHA_BACKGROUND) * alpha + (ALPHA_BACKGROUND * 255 + 127)
        return tf.cast(out // 255, tf.uint8)

    def blend_all():
        def step(i, parts):
            start = top + i * rows
            stop = top + tf.minimum((i + 1) * rows, height)
            return i + 1, parts.write(i, blend(rgba[start:stop, left : left + width]))

        blocks = (height + rows - 1) // rows
        parts = tf.TensorArray(tf.uint8, size=blocks, infer_shape=False)
        _, parts = tf.while_loop(lambda i, parts: i < blocks, step, (tf.constant(0), parts))
        return tf.reshape(parts.concat(), tf.stack([height, width, 3]))

    opaque = tf.reduce_all(tf.equal(rgba[top : top + height, left : left + width, 3], 255))
    return tf.cond(opaque, lambda: rgba[top : top + height, left : left + width, :3], blend_all)


def _decode_jpeg(encoded, ratio):
    """A JPEG decoded by libjpeg at 1/ratio scale (ratio a Python int or a scalar tensor)."""
    if isinstance(ratio, int):
        return tf.io.decode_jpeg(encoded, channels=3, ratio=ratio)
    branches = [lambda r=r: tf.io.decode_jpeg(encoded, channels=3, ratio=r) for r in _DCT_RATIOS]
    index = tf.cast(tf.math.log(tf.cast(ratio, tf.float32)) / tf.math.log(2.0) + 0.5, tf.int32)
    return tf.switch_case(index, branches)


def _decode(encoded, ratio_fn, window_fn) -> tf.Tensor:
    """The one decoder: JPEG (at 1/ratio_fn(height, width) scale, turned upright), PNG
    (transparency composited), else whatever tf.io.decode_image reads (GIF first frame, BMP);
    uint8 RGB, cut to window_fn's region of the image as shown."""
    is_jpeg = tf.equal(tf.strings.substr(encoded, 0, len(JPEG_MAGIC)), JPEG_MAGIC)
    is_png = tf.equal(tf.strings.substr(encoded, 0, len(PNG_MAGIC)), PNG_MAGIC)

    def jpeg():
        if ratio_fn is None:
            image = _decode_jpeg(encoded, 1)
        else:
            shape = tf.io.extract_jpeg_shape(encoded)
            image = _decode_jpeg(encoded, ratio_fn(shape[0], shape[1]))
        return _shown_region(image, jpeg_orientation(encoded), window_fn)

    def png():
        rgba = tf.io.decode_png(encoded, channels=4)
        if window_fn is None:
            return composite(rgba)
        return composite(rgba, window_fn(tf.shape(rgba)[0], tf.shape(rgba)[1]))

    def other():
        image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
        return _shown_region(image, tf.constant(1), window_fn)

    image = tf.cond(is_jpeg, jpeg, lambda: tf.cond(is_png, png, other))
    image.set_shape((None, None, 3))
    return image


_EXIF_ID = b"Exif\0\0"


@functools.lru_cache(maxsize=None)
def _decode_any(ratio: int):
    """`_decode` of one image at a fixed ratio as a function that the graph calls, not inlines
    (`_noinline`): a `tf.cond` branch of inlined ops costs every one of its ops on each call,
    taken or not (the executor passes them dead tensors), and this one is ~200 ops."""

    def decode(encoded):
        return _decode(encoded, None if ratio == 1 else (lambda h, w: ratio), None)

    return tf.function(
        decode,
        input_signature=[tf.TensorSpec([], tf.string)],
        experimental_attributes={"_noinline": True},
    )


def decode_rgb(encoded: tf.Tensor, ratio: int = 1) -> tf.Tensor:
    """Encoded JPEG/PNG/GIF/BMP bytes -> uint8 HxWx3 as a viewer shows the image: a JPEG turned
    by its EXIF orientation, transparency composited onto ALPHA_BACKGROUND, grayscale, palette
    and 16-bit images made 8-bit RGB. A JPEG is decoded at 1/ratio scale (1, 2, 4 or 8).

    A JPEG whose bytes hold no Exif identifier anywhere has no orientation to apply: it takes
    libjpeg's decoder alone (the same pixels, ~0.2 ms less per training image); every other
    image takes the general decoder."""
    if ratio not in _DCT_RATIOS:
        raise ValueError(f"ratio={ratio}: libjpeg scales by one of {_DCT_RATIOS}")
    encoded = tf.convert_to_tensor(encoded, tf.string)
    plain_jpeg = tf.logical_and(
        tf.equal(tf.strings.substr(encoded, 0, len(JPEG_MAGIC)), JPEG_MAGIC),
        tf.equal(tf.size(tf.strings.split(encoded, sep=_EXIF_ID)), 1),
    )
    image = tf.cond(
        plain_jpeg,
        lambda: _decode_jpeg(encoded, ratio),
        lambda: _decode_any(ratio)(encoded),
    )
    image.set_shape((None, None, 3))
    return image


# ------------------------------------------------------------------------------------------------
# Pretraining: batches of two views.


def _options(threads: int) -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True
    if threads:
        options.threading.private_threadpool_size = threads
    return options


def pretrain_dataset(
    source: Source,
    data_config,
    aug_config,
    global_batch: int,
    seed: int,
    start_epoch: int = 0,
    num_epochs: Optional[int] = None,
    steps_per_epoch: int = 0,
    start_batch: int = 0,
    with_images: bool = False,
    shard: tuple = (0, 1),
) -> tf.data.Dataset:
    """Global batches {"view1", "view2"} of uint8 views, epoch after epoch, from `start_epoch`.

    Each epoch is a fresh seeded order cut into `num_examples // global_batch` full batches
    (the remainder is dropped), or `steps_per_epoch` of them when that is smaller. Batch b of
    epoch e is a pure function of (seed, e, b): `start_batch` skips the first batches of
    `start_epoch` without computing them, which is how a run resumes mid-epoch. Streamed
    sources are not permuted but read in a per-epoch file order through a per-epoch seeded
    shuffle buffer; the skipped batches are read and dropped (not augmented), so a resume
    costs one read of the epoch's first `start_batch` batches. With
    `data_config.photometric == "device"` the views are only cropped and flipped here and the
    batches also carry "params1"/"params2", the per-image photometric parameters that the train
    step applies on the accelerator (`augment.TwoViewRecipe`). `with_images` adds "image", each
    source image fitted into image_size x image_size, to show beside its views
    (tools/show_views.py).

    `shard=(index, count)` (image folders only): this worker's rows of every global batch,
    [index * B/count, (index + 1) * B/count), as per-worker batches of B/count. Only those
    files are read and decoded, and each image keeps the random draws it has in the global
    batch, so `count` workers together train on exactly the batches one process would.

    A file that passed the image check but fails to decode (`imagecheck`) takes the views of
    the image before it in the epoch's order (the one after, at the very start), is counted in
    `replaced_images()` and named in the log: the batch keeps its size and every other image
    its place, so resuming stays exact.
    """
    index, count = shard
    if count > 1 and source.files is None:
        raise ValueError(f"{source.name}: only image folders are read per worker (shard={shard})")
    if global_batch % count:
        raise ValueError(f"global_batch={global_batch} does not divide over {count} workers")
    steps = source.num_examples // global_batch
    if steps == 0:
        raise ConfigError(
            f"{source.name} has {source.num_examples} examples, fewer than one global batch "
            f"of {global_batch}"
        )
    if steps_per_epoch:
        steps = min(steps, steps_per_epoch)
    size = data_config.image_size
    on_device = data_config.photometric == "device"
    base_seed = tf.constant([seed, 0x5157], tf.int64)
    recipe = augment.TwoViewRecipe(aug_config, size, data_config.photometric)

    def two_views(images, seed_, n):
        """Both views of an image (n=1: one decoded image) or of a batch of n images, each view
        keyed by (seed_, view): the finished uint8 views, or (device mode) the CPU stage's views
        and the per-image parameters of the device stage."""
        out = {}
        for v in (1, 2):
            view_seed = augment.fold_seed(seed_, v)
            out[f"view{v}"] = recipe.cpu_stage(images, view_seed)
            if on_device:
                params = recipe.device_params(view_seed, n)
                first = lambda t: t[0]  # one image: scalars, which tf.data batches
                out[f"params{v}"] = tf.nest.map_structure(first, params) if n == 1 else params
        if with_images:
            out["image"] = _thumbnail(images, size)
        return out

    def skip_in(epoch):
        """Batches to skip at the start of `epoch`: start_batch in the first, else none."""
        return tf.where(tf.equal(epoch, start_epoch), tf.cast(start_batch, tf.int64), 0)

    if source.in_memory:
        images = tf.constant(source.images)

        def epoch_dataset(epoch):
            order = tf.random.experimental.stateless_shuffle(
                tf.range(source.num_examples), augment.fold_seed(base_seed, epoch)
            )
            batches = tf.reshape(order[: steps * global_batch], (steps, global_batch))

            def make(step, idx):
                seed_ = augment.fold_seed(base_seed, epoch, step)
                return two_views(tf.gather(images, idx), seed_, global_batch)

            return (
                tf.data.Dataset.from_tensor_slices(batches)
                .enumerate()
                .skip(skip_in(epoch))
                .map(make, num_parallel_calls=AUTOTUNE)
            )

    else:
        encoded = source.tfds_dataset  # streamed sources; files are read by index below
        # The paths as one eager tensor, made once: the epoch function captures it by reference
        # (never as a graph constant, which costs seconds and gigabytes at a million paths).
        files = None if source.files is None else source.path_tensor()
        batch = global_batch // count

        def epoch_dataset(epoch):
            skip = skip_in(epoch)
            if files is not None:
                order = tf.random.experimental.stateless_shuffle(
                    tf.range(source.num_examples, dtype=tf.int64),
                    augment.fold_seed(base_seed, epoch),
                )
                # Positions in the epoch of this worker's rows of batches skip .. steps - 1.
                rows = tf.range(skip, steps, dtype=tf.int64)[:, None] * global_batch
                cols = tf.range(index * batch, (index + 1) * batch, dtype=tf.int64)
                positions = tf.reshape(rows + cols, [-1])
                ds = tf.data.Dataset.from_tensor_slices(positions).map(
                    lambda i: (i, tf.io.read_file(tf.gather(files, tf.gather(order, i)))),
                    num_parallel_calls=AUTOTUNE,
                )
                names_of = lambda n: tf.gather(files, tf.gather(order, tf.gather(positions, n)))
            else:
                # A streamed source: shard files in an order drawn for this epoch, then a
                # shuffle buffer seeded for this epoch. Both seeds are folded from the epoch, so
                # every epoch has its own order and a resumed epoch repeats the original one.
                files_seed, buffer_seed = (
                    tf.math.floormod(augment.fold_seed(base_seed, epoch, key)[0], 2**31 - 1)
                    for key in (13, 17)
                )
                # Dataset.shuffle pairs its seed with the graph-level seed, which the caller may
                # have set to anything (and a global seed of 0 with a tensor seed fails to
                # trace). Here, while this function is traced, set_seed fixes the seed of this
                # function's graph only, so the order depends on (seed, epoch) alone.
                tf.random.set_seed(0x5157)
                ds = encoded if source.stream is None else source.stream(files_seed)
                ds = ds.shuffle(
                    min(source.num_examples, data_config.shuffle_buffer), seed=buffer_seed
                )
                # Records lost to a damaged shard would end the epoch short: its own start
                # fills it (take() stops before the second pass on intact data).
                ds = ds.repeat(2)
                ds = ds.enumerate().skip(skip * global_batch).take((steps - skip) * batch)
                ds = ds.map(lambda i, ex: (i, ex[0]))
                names_of = lambda n: tf.strings.join(
                    ["example ", tf.strings.as_string(n + skip * global_batch), " of the epoch"]
                )
            # Each example is finished on its own (decode, both views, photometric on the CPU):
            # its working set stays in cache and tf.data spreads examples over the threads.
            ds = ds.enumerate().map(
                lambda n, i_encoded: (
                    n,
                    two_views(
                        decode_rgb(i_encoded[1]),
                        augment.fold_seed(base_seed, epoch, i_encoded[0]),
                        1,
                    ),
                ),
                num_parallel_calls=AUTOTUNE,
            )
            ds = _replace_undecodable(ds, (steps - skip) * batch, names_of, source.name)
            return ds.batch(batch, drop_remainder=True)

    epochs = tf.data.Dataset.range(start_epoch, start_epoch + num_epochs if num_epochs else 2**62)
    ds = epochs.flat_map(epoch_dataset)
    return ds.prefetch(AUTOTUNE).with_options(_options(data_config.threads))


_REPLACED = []  # names of the images replaced in training since the process started


def replaced_images() -> list:
    """Names of the images that failed to decode in a pretraining pipeline and were replaced
    by a neighbour's views, in the order met (`pretrain_dataset`)."""
    return list(_REPLACED)


def _note_replaced(names, source_name) -> None:
    for name in names.numpy():
        _REPLACED.append(name.decode("utf-8", "replace"))
        logging.warning(
            "%s: %s cannot be decoded; the image before it takes its place in the batch (%d "
            "replaced so far)",
            source_name.numpy().decode(),
            _REPLACED[-1],
            len(_REPLACED),
        )


def _replace_undecodable(ds, total, names_of, source_name: str) -> tf.data.Dataset:
    """`ds` of (n, views), n = 0, 1, ..., total - 1, where an element whose decode failed is an
    error: the same stream of views, each failed element replaced by the views before it (after
    it, at the start); `names_of(ns)` names the failed ones in the log.

    Failed elements are dropped (`ignore_errors`) and the gaps they leave found by their n, so
    while every file decodes the cost is one comparison per image; a sentinel n = total fills a
    gap at the very end.
    """
    spec = ds.element_spec[1]
    zeros = lambda: tf.nest.map_structure(lambda s: tf.zeros(s.shape, s.dtype), spec)
    end = tf.cast(total, tf.int64)
    ds = ds.ignore_errors().concatenate(tf.data.Dataset.from_tensors((end, zeros())))

    def fill(state, element):
        expected, have_prev, prev = state
        i, views = element
        gap = i - expected
        last = tf.cast(tf.not_equal(i, end), tf.int64)  # 0 for the sentinel: not emitted

        def as_is():
            return tf.nest.map_structure(lambda v: v[None], views)

        def with_copies():
            tf.py_function(
                _note_replaced, [names_of(tf.range(expected, i)), tf.constant(source_name)], []
            )
            return tf.nest.map_structure(
                lambda p, v: tf.concat(
                    [
                        tf.repeat(tf.where(have_prev, p, v)[None], gap, 0),
                        tf.repeat(v[None], last, 0),
                    ],
                    0,
                ),
                prev,
                views,
            )

        out = tf.cond(tf.logical_and(tf.equal(gap, 0), tf.equal(last, 1)), as_is, with_copies)
        return (i + 1, tf.constant(True), views), out

    state = (tf.constant(0, tf.int64), tf.constant(False), zeros())
    return ds.scan(state, fill).unbatch()


def preview_views(source: Source, config, n: int) -> dict:
    """The first n images of the first training batch and their two views, as training makes
    them (the same pipeline; in device mode the train step's stage is applied too): uint8 numpy
    arrays "image" (fitted into image_size), "view1", "view2"."""
    d = config.data
    batch_size = min(config.optim.batch_size, source.num_examples)
    batches = pretrain_dataset(
        source, d, config.aug, batch_size, config.seed, 0, 1, 1, with_images=True
    )
    batch = next(iter(batches))
    stage = augment.TwoViewRecipe(config.aug, d.image_size, d.photometric).device_stage()
    out = {"image": batch["image"][:n].numpy()}
    for v in ("view1", "view2"):
        views = batch[v][:n]
        if stage is not None:
            params = tf.nest.map_structure(lambda t: t[:n], batch[v.replace("view", "params")])
            views = augment.to_uint8(stage(tf.cast(views, tf.float32) / 255.0, params=params))
        out[v] = views.numpy()
    return out


def _thumbnail(images, size: int):
    """uint8 image(s) fitted into size x size, aspect kept, padded with black."""
    fitted = tf.image.resize_with_pad(tf.cast(images, tf.float32), size, size, antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(fitted), 0.0, 255.0), tf.uint8)


# ------------------------------------------------------------------------------------------------
# Evaluation: plain images and labels.


def centre_window(height, width, crop_fraction: float):
    """(top, left, height, width) of the region evaluation embeds: the whole image (crop_fraction
    1), or the centre square of side crop_fraction x the shorter side (what resizing the shorter
    side to size / crop_fraction and cropping size x size at the centre keeps)."""
    if crop_fraction >= 1.0:
        return tf.zeros_like(height), tf.zeros_like(width), height, width
    shorter = tf.cast(tf.minimum(height, width), tf.float32)
    side = tf.maximum(tf.cast(tf.round(crop_fraction * shorter), height.dtype), 1)
    return (height - side) // 2, (width - side) // 2, side, side


def eval_jpeg_ratio(height, width, size: int, crop_fraction: float) -> tf.Tensor:
    """The DCT scale (1, 2, 4 or 8) evaluation decodes a height x width JPEG at: the largest
    that keeps the shorter side of the embedded region at least DCT_SCALE_MARGIN x size."""
    side = tf.cast(tf.minimum(height, width), tf.float32) * min(crop_fraction, 1.0)
    ratio = tf.constant(1, tf.int32)
    for r in _DCT_RATIOS[1:]:
        ratio = tf.where(side >= r * DCT_SCALE_MARGIN * size, r, ratio)
    return ratio


def eval_resize(region: tf.Tensor, size: int) -> tf.Tensor:
    """uint8 (or 0-255 float) [N]xHxWx3 -> float [N] x size x size x 3 in [0, 1]: bilinear,
    antialiased, resized in the 0-255 range and scaled after, so uint8 and integer-valued float
    input give the same bits and no float copy of the region is made before the resize."""
    return tf.image.resize(region, (size, size), method="bilinear", antialias=True) / 255.0


def eval_region(image: tf.Tensor, crop_fraction: float) -> tf.Tensor:
    """The `centre_window` region of [N]xHxWx3 images, cut in their own pixels (all of them
    for crop_fraction 1.0)."""
    if crop_fraction >= 1.0:
        return image
    shape = tf.shape(image)
    top, left, h, w = centre_window(shape[-3], shape[-2], crop_fraction)
    return image[..., top : top + h, left : left + w, :]


def eval_preprocess(image: tf.Tensor, size: int, crop_fraction: float) -> tf.Tensor:
    """uint8 (or 0-255 float) [N]xHxWx3 -> float [N] x size x size x 3 in [0, 1], as at
    evaluation time: `eval_resize(eval_region(image, crop_fraction), size)`.

    The centre region of `centre_window` is cut first, in the image's own pixels, and then
    resized to size x size: crop_fraction 1.0 resizes the whole image (small images such as
    CIFAR); 0.875 keeps the centre 87.5% of the shorter side (ImageNet's resize to 256, crop
    224). Memory follows the region and the output, never the product of the input's longer
    side and the output size.
    """
    return eval_resize(eval_region(image, crop_fraction), size)


def decode_eval(encoded: tf.Tensor, size: int, crop_fraction: float) -> tf.Tensor:
    """Encoded image -> float size x size x 3, as evaluation and serving_bytes embed it.

    Exactly `eval_preprocess(decode, size, crop_fraction)` of the image decoded as
    `decode_rgb` does, except that a JPEG is decoded at the DCT scale of `eval_jpeg_ratio`,
    and only the region that is embedded is reoriented and composited.
    """
    window = lambda h, w: centre_window(h, w, crop_fraction)
    ratio = lambda h, w: eval_jpeg_ratio(h, w, size, crop_fraction)
    return eval_resize(_decode(encoded, ratio, window), size)


def eval_dataset(
    source: Source, size: int, batch: int, crop_fraction: float = 1.0, threads: int = 0
):
    """Batches (images float [0, 1], labels) in the source's order, the last batch partial."""
    if source.in_memory:
        ds = tf.data.Dataset.from_tensor_slices((source.images, source.labels)).batch(batch)
        ds = ds.map(
            lambda x, y: (eval_preprocess(x, size, crop_fraction), y),
            num_parallel_calls=AUTOTUNE,
        )
    else:
        ds = source.encoded().map(
            lambda x, y: (decode_eval(x, size, crop_fraction), y),
            num_parallel_calls=AUTOTUNE,
        )
        ds = ds.batch(batch)
    return ds.prefetch(AUTOTUNE).with_options(_options(threads))
