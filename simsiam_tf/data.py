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
import os
import shutil
import tarfile
import zipfile
from typing import Callable, Optional

import numpy as np
import tensorflow as tf
from absl import logging

from simsiam_tf import augment
from simsiam_tf.decode import (  # noqa: F401  (the decoding names data's callers use)
    ALPHA_BACKGROUND,
    DCT_SCALE_MARGIN,
    JPEG_MAGIC,
    PNG_MAGIC,
    centre_window,
    composite,
    decode_eval,
    decode_rgb,
    eval_jpeg_ratio,
    eval_preprocess,
    eval_region,
    eval_resize,
    jpeg_orientation,
    jpeg_size,
    orient,
    png_size,
)
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
