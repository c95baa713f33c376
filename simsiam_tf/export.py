"""SavedModel export of a trained encoder for TF Serving: signatures, input checks, versions.

    DIR/NAME/                 the model's base path (TF Serving's `base_path`)
      1/ 2/ ...               one SavedModel per version; TF Serving loads all-digit names only
        saved_model.pb, variables/
        assets.extra/tf_serving_warmup_requests   one request per signature, replayed at load
        assets.extra/simsiam_export.json          where the weights came from, the preprocessing
        assets.extra/limits.json                  the request limits, for clients
        assets.extra/batching_parameters.txt      TF Serving's batching for those limits
      .tmp-3-XXXXXX/          a version being written: renamed to 3/ once complete and verified

Signatures (tag "serve"); every one applies the evaluation-time preprocessing of the run
(`decode.eval_preprocess`: cut the centre region evaluation keeps, resize it) and then the
backbone with BatchNorm in inference mode; serving_bytes decodes as evaluation decodes files
(`decode.decode_eval`: EXIF orientation, transparency over white, a large JPEG at a DCT scale):

    serving_default   images        uint8   [batch, height, width, 3], any height and width
    serving_float     images        float32 [batch, height, width, 3], values 0-255 (not 0-1)
    serving_bytes     image_bytes   string  [batch], encoded JPEG or PNG (REST: {"b64": ...})

    outputs           embedding             float32 [batch, C]  the backbone's pooled features
                      embedding_normalized  float32 [batch, C]  the same, L2-normalised
                      projection            float32 [batch, D]  projector output z (only in an
                                                                export made with projection=True)

Inputs are declared with unknown rank on purpose: TF Serving feeds a request's tensor to the
graph without checking it against the declared shape, so every check is an op in the graph
(tf.debugging.Assert ops, run before anything that depends on them). A bad request therefore gets
an InvalidArgument error from the graph, the same in TF Serving, `saved_model_cli` and Python,
whose message names the first offending image by its index: an empty batch or one above
`max_batch`, a wrong rank or channel count, non-finite floats, bytes that are not a JPEG or PNG,
an image above `max_pixels` or more elongated than MAX_ASPECT_RATIO, a request above
`max_request_pixels`, a PNG whose compressed data exceeds what its declared rows can need or
`max_png_bytes`, PNGs above `max_request_png_bytes` in all, a corrupt or truncated file; each
message is one printable line. The size of an encoded image is
read from its header (the PNG IHDR chunk; the JPEG frame header) by the bounded walks of
`decode` before anything is decoded, so a small file that declares a huge image allocates
nothing, a huge request costs a few MB before it is refused, and what an accepted one costs is
bounded by the limits, whose defaults follow image_size (docs/SERVING.md, "Memory").
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import shutil
import tempfile
from typing import Optional

import keras
import ml_collections
import numpy as np
import tensorflow as tf
from absl import logging

from simsiam_tf import decode, model, train

SERVING_DEFAULT = "serving_default"
SERVING_FLOAT = "serving_float"
SERVING_BYTES = "serving_bytes"
SIGNATURES = (SERVING_DEFAULT, SERVING_FLOAT, SERVING_BYTES)
IMAGES = "images"  # input of serving_default and serving_float
IMAGE_BYTES = "image_bytes"  # input of serving_bytes
EMBEDDING = "embedding"
EMBEDDING_NORMALIZED = "embedding_normalized"
PROJECTION = "projection"
SIGNATURE_INPUTS = {SERVING_DEFAULT: IMAGES, SERVING_FLOAT: IMAGES, SERVING_BYTES: IMAGE_BYTES}

# Limits of a request, fixed at export time. Their defaults follow the model's input size
# (image_size), measured in docs/SERVING.md ("Memory"): at 224 px, 12.8 MP per image (a
# 12-megapixel phone photo), 4 images per request; at 32 px, 1 MP and 256 images.
PIXELS_PER_OUTPUT_PIXEL = 256  # default max_pixels: this many x image_size^2 ...
MIN_MAX_PIXELS = 1_000_000  # ... and at least one megapixel
REQUEST_PIXELS_PER_IMAGE = 4  # default max_request_pixels: this many x max_pixels
# Compressed image data (the IDAT chunks) of one PNG, and of the PNGs of one request. libpng
# inflates a PNG's whole zlib stream, past the rows its header declares, and no TensorFlow op
# inflates part of a stream, so a PNG's decoding work is bounded by its compressed bytes, not by
# its pixels: a stream of zeros inflates about 1030 times, and libpng inflates what lies past
# the rows into a 1 KB buffer, at about 1.8 s of CPU per MB of such data (docs/SERVING.md,
# "Memory"). The defaults keep the costliest request within 1.5 s of CPU above a legitimate one;
# a PNG photo above about 0.1 megapixel needs more (export with larger values, or send JPEG).
DEFAULT_MAX_PNG_BYTES = 196_608  # 192 KiB per PNG ...
REQUEST_PNG_BYTES_PER_IMAGE = 4  # ... and 4 x that (768 KiB) over the PNGs of a request
# Largest batch (at 32 px and below): every image becomes image_size^2 x 3 floats, and the
# backbone's activations, whatever its own size, so a request of many tiny images (a 1x1 PNG is
# 70 bytes) costs what that many full-size images cost. Larger inputs get proportionally fewer
# images: a power of two at most DEFAULT_MAX_BATCH x (32 / image_size)^2.
DEFAULT_MAX_BATCH = 256
# Longest side / shorter side of an accepted image. A resize allocates output height x input
# width floats, so this bounds it by image_size x sqrt(max_pixels x MAX_ASPECT_RATIO); a phone
# panorama is up to about 10:1.
MAX_ASPECT_RATIO = 16
# Most scans (SOS markers) of an accepted JPEG: libjpeg's progressive modes write about 10, and
# each scan is another pass over the image's coefficients, so a small file of thousands of scans
# would cost seconds of CPU.
MAX_JPEG_SCANS = 100
# serving_bytes decodes this many images of a request at a time: memory in flight is one image.
DECODE_PARALLELISM = 1
JPEG_MAGIC = decode.JPEG_MAGIC  # the first bytes of the only formats serving_bytes accepts
PNG_MAGIC = decode.PNG_MAGIC


def default_max_pixels(image_size: int) -> int:
    """The default largest image (height x width) of an export whose input is image_size."""
    return max(MIN_MAX_PIXELS, PIXELS_PER_OUTPUT_PIXEL * image_size**2)


def default_max_batch(image_size: int) -> int:
    """The default largest batch of an export whose input is image_size."""
    budget = DEFAULT_MAX_BATCH * 32**2 // image_size**2
    return int(min(DEFAULT_MAX_BATCH, 2 ** max(0, budget.bit_length() - 1)))


def resolve_limits(
    image_size: int,
    max_pixels: Optional[int] = None,
    max_batch: Optional[int] = None,
    max_request_pixels: Optional[int] = None,
    max_png_bytes: Optional[int] = None,
    max_request_png_bytes: Optional[int] = None,
) -> dict:
    """The limits of an export: those given, the defaults for image_size for those None."""
    max_pixels = default_max_pixels(image_size) if max_pixels is None else int(max_pixels)
    max_batch = default_max_batch(image_size) if max_batch is None else int(max_batch)
    if max_request_pixels is None:
        max_request_pixels = REQUEST_PIXELS_PER_IMAGE * max_pixels
    max_png_bytes = DEFAULT_MAX_PNG_BYTES if max_png_bytes is None else int(max_png_bytes)
    if max_request_png_bytes is None:
        max_request_png_bytes = REQUEST_PNG_BYTES_PER_IMAGE * max_png_bytes
    limits = dict(
        max_pixels=max_pixels,
        max_batch=max_batch,
        max_request_pixels=int(max_request_pixels),
        max_png_bytes=max_png_bytes,
        max_request_png_bytes=int(max_request_png_bytes),
    )
    units = dict(max_batch="images", max_png_bytes="bytes", max_request_png_bytes="bytes")
    for name, value in limits.items():
        if value < 1:
            raise ExportError(
                f"{name}={value} must be a positive number of {units.get(name, 'pixels')}"
            )
    for request, one, what in (
        ("max_request_pixels", "max_pixels", "image of the largest accepted size"),
        ("max_request_png_bytes", "max_png_bytes", "PNG of the most compressed data accepted"),
    ):
        if limits[request] < limits[one]:
            raise ExportError(
                f"{request}={limits[request]} is below {one}={limits[one]}: a request of one "
                f"{what} would be refused"
            )
    return limits


WARMUP_FILE = "tf_serving_warmup_requests"
METADATA_FILE = "simsiam_export.json"
LIMITS_FILE = "limits.json"  # the limits alone, for clients (tools/serve_client.py --limits)
REQUEST_LIMITS = (  # the limits an export is made with (resolve_limits), in limits.json
    "max_batch",
    "max_pixels",
    "max_request_pixels",
    "max_png_bytes",
    "max_request_png_bytes",
)
BATCHING_FILE = "batching_parameters.txt"  # TF Serving --batching_parameters_file for them
# The scheduling part of the batching parameters, the same for every export.
BATCH_TIMEOUT_MICROS = 5000
NUM_BATCH_THREADS = 4
MAX_ENQUEUED_BATCHES = 100


def limits_record(limits: dict) -> dict:
    """What limits.json holds: the request limits and the fixed bounds of the graph."""
    return dict(
        limits,
        max_aspect_ratio=MAX_ASPECT_RATIO,
        max_jpeg_scans=MAX_JPEG_SCANS,
        max_header_steps=decode.MAX_HEADER_STEPS,
        images_per_execution=images_per_execution(limits),
    )


def images_per_execution(limits: dict) -> int:
    """The most images TF Serving may run as one merged batch without the graph refusing it
    whatever the images: at most max_batch, at most as many images of the largest size
    (max_pixels) as max_request_pixels holds, and at most as many PNGs of the most compressed
    data (max_png_bytes) as max_request_png_bytes holds. The graph's checks see a merged batch
    as one request."""
    return int(
        min(
            limits["max_batch"],
            limits["max_request_pixels"] // limits["max_pixels"],
            limits["max_request_png_bytes"] // limits["max_png_bytes"],
        )
    )


def batching_parameters(limits: dict) -> dict:
    """TF Serving's BatchingParameters for an export of these limits, as {field: value}:
    requests of up to max_batch images, split and merged into batches of at most
    `images_per_execution`, so that no batch the server runs exceeds the limits."""
    return dict(
        max_batch_size=int(limits["max_batch"]),
        enable_large_batch_splitting=True,
        max_execution_batch_size=images_per_execution(limits),
        batch_timeout_micros=BATCH_TIMEOUT_MICROS,
        num_batch_threads=NUM_BATCH_THREADS,
        max_enqueued_batches=MAX_ENQUEUED_BATCHES,
        pad_variable_length_inputs=False,
    )


_BATCHING_COMMENTS = {
    "max_batch_size": "Largest request: at most the export's max_batch (a larger one is refused by the "
    "server).",
    "enable_large_batch_splitting": "Requests are split, and merged, into batches of ...",
    "max_execution_batch_size": "... at most this many images: max_batch, no more images "
    "of the largest size\n# (max_pixels) than max_request_pixels holds, and no more PNGs of the "
    "most compressed data\n# (max_png_bytes) than max_request_png_bytes holds, so that no merged "
    "batch can exceed the limits.",
    "batch_timeout_micros": "Wait at most 5 ms for more requests before running a partial batch.",
    "num_batch_threads": "Batches run in parallel (about the number of cores per model on a CPU "
    "host).",
    "max_enqueued_batches": "Queued batches before new requests are refused with UNAVAILABLE "
    "(back-pressure).",
    "pad_variable_length_inputs": "Never pad images of different sizes to a common one: the "
    "zeros would change the embeddings.\n# Requests to serving_default/serving_float merged "
    "into one batch must share height and width;\n# serving_bytes takes images of any size in "
    "any mix.",
}


def batching_parameters_text(params: dict, header: str) -> str:
    """params as the text format of TF Serving's BatchingParameters (wrapper types for the
    numbers and enable_large_batch_splitting, a plain bool for pad_variable_length_inputs), each
    field under a comment, after the `header` comment lines."""
    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    for name, value in params.items():
        lines.append("")
        lines.append("# " + _BATCHING_COMMENTS[name])
        text = ("true" if value else "false") if isinstance(value, bool) else str(value)
        if name == "pad_variable_length_inputs":
            lines.append(f"{name}: {text}")
        else:
            lines.append(f"{name} {{ value: {text} }}")
    return "\n".join(lines) + "\n"


def shipped_batching_text(recipes: dict) -> str:
    """serving/batching_parameters.txt: the batching parameters that agree with the default
    limits of every recipe in `recipes` ({recipe name: image_size}): each number the smallest
    the recipes' exports would write (`batching_parameters`), so that none of their default
    exports can see a merged batch above its limits."""
    per_recipe = {
        name: batching_parameters(resolve_limits(size)) for name, size in sorted(recipes.items())
    }
    meet = dict(next(iter(per_recipe.values())))
    for params in per_recipe.values():
        for key in ("max_batch_size", "max_execution_batch_size"):
            meet[key] = min(meet[key], params[key])
    listing = "\n".join(
        f"  {name} ({recipes[name]} px): max_batch_size {p['max_batch_size']}, "
        f"max_execution_batch_size {p['max_execution_batch_size']}"
        for name, p in per_recipe.items()
    )
    header = (
        "TF Serving --batching_parameters_file (BatchingParameters, text format), used with\n"
        "--enable_batching. Generated by `python tools/batching_parameters.py --write` from the "
        "default\nlimits of the shipped recipes; each number is the smallest of theirs:\n"
        + listing
        + "\nAn export writes its own in assets.extra/batching_parameters.txt (the same "
        "arithmetic on its\nlimits): serve that one for a model exported with other limits. "
        "docs/SERVING.md explains it."
    )
    return batching_parameters_text(meet, header)


def export_batching_text(limits: dict) -> str:
    """assets.extra/batching_parameters.txt of an export of these limits."""
    header = (
        "TF Serving --batching_parameters_file (BatchingParameters, text format) for this "
        "export,\nused with --enable_batching; written by tools/export.py from the limits "
        f"of {LIMITS_FILE}:\n"
        + ", ".join(f"{k} {limits[k]}" for k in REQUEST_LIMITS)
        + ". docs/SERVING.md explains it."
    )
    return batching_parameters_text(batching_parameters(limits), header)


class ExportError(ValueError):
    """An export that cannot be made as asked; the message says what to change."""


@dataclasses.dataclass
class Encoder:
    """A trained encoder and the evaluation-time preprocessing of its run."""

    backbone: keras.Model
    projector: Optional[keras.Model]
    image_size: int
    crop_fraction: float
    source: str  # the file the weights came from
    config: ml_collections.ConfigDict  # the run's

    def __call__(self, images) -> dict:
        """The in-memory reference: a uint8 (or 0-255 float) NxHxWx3 batch -> the outputs."""
        x = decode.eval_preprocess(images, self.image_size, self.crop_fraction)
        return _outputs(self.backbone, self.projector, x)


def _outputs(backbone, projector, x) -> dict:
    embedding = tf.cast(backbone(x, training=False), tf.float32)  # NxC
    out = {EMBEDDING: embedding, EMBEDDING_NORMALIZED: tf.math.l2_normalize(embedding, axis=-1)}
    if projector is not None:
        out[PROJECTION] = tf.cast(projector(embedding, training=False), tf.float32)  # NxD
    return out


@contextlib.contextmanager
def _float32_policy():
    """Builds layers in float32 whatever the process's global policy (a mixed-precision run
    still stores float32 weights, so they load either way; serving computes in float32)."""
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def load_encoder(workdir: str, projection: bool = False) -> Encoder:
    """The encoder of a finished run.

    Without projection, the backbone alone from WORKDIR/backbone.weights.h5, the file a run
    writes when training ends: no optimizer to rebuild, and the representation that kNN and
    linear evaluation score. With projection, the whole SimSiam restored from the latest
    checkpoint in WORKDIR/checkpoints (the only place the projector is saved), so the export
    also returns z; its backbone is then the checkpoint's, the same weights as
    backbone.weights.h5 at the end of a run.
    """
    config = train.load_config(workdir)
    m = config.model
    with _float32_policy():
        if projection:
            backbone, projector, source = _restore_from_checkpoint(config, workdir)
        else:
            source = os.path.join(workdir, "backbone.weights.h5")
            if not os.path.exists(source):
                raise ExportError(
                    f"{source} not found: a run writes it when training ends; finish the run, "
                    "or export its latest checkpoint with projection=True (--projection)"
                )
            backbone = model.build_backbone(
                m.backbone, m.zero_init_residual, m.sync_bn, width=m.width
            )
            backbone.load_weights(source)
            projector = None
    return Encoder(
        backbone=backbone,
        projector=projector,
        image_size=int(config.data.image_size),
        crop_fraction=float(config.data.eval_crop_fraction),
        source=os.path.abspath(source),
        config=config,
    )


def _restore_from_checkpoint(config: ml_collections.ConfigDict, workdir: str):
    """SimSiam's backbone and projector from the latest training checkpoint.

    Training saves `tf.train.Checkpoint(model=..., optimizer=...)` (callbacks.Checkpointer);
    only the model is restored here, so no optimizer needs rebuilding, and every variable of
    the model must be found in the checkpoint.
    """
    directory = os.path.join(workdir, "checkpoints")
    latest = tf.train.latest_checkpoint(directory)
    if latest is None:
        raise ExportError(f"no checkpoint in {directory}: nothing to export with the projector")
    net = model.build_simsiam(config.model)
    status = tf.train.Checkpoint(model=net).restore(latest)
    status.assert_existing_objects_matched().expect_partial()
    return net.backbone, net.projector, latest


# ------------------------------------------------------------------------------------------------
# The serving graph.


def _refuse(ok: tf.Tensor, message: str) -> tf.Operation:
    """An InvalidArgument assertion whose text is `message` alone, one printable line (the
    tf.debugging.assert_* ops add the condition and the values on further lines)."""
    return tf.debugging.Assert(ok, [tf.constant(message)])


def _refuse_first(bad: tf.Tensor, what: str, message: str, *values) -> tf.Operation:
    """An InvalidArgument assertion that names the first image i with bad[i]: "what[i]: message",
    each {} of message replaced by one of values (indexed by i, or a scalar; numbers or text)."""
    index = tf.argmax(tf.cast(bad, tf.int32), output_type=tf.int64)
    texts = [tf.strings.as_string(index)]
    for v in values:
        v = v if v.shape.rank == 0 else tf.gather(v, index)
        texts.append(v if v.dtype == tf.string else tf.strings.as_string(v))
    parts = (what + "[{}]: " + message).split("{}")
    pieces = [parts[0]]
    for text, part in zip(texts, parts[1:]):
        pieces += [text, part]
    return tf.debugging.Assert(tf.logical_not(tf.reduce_any(bad)), [tf.strings.join(pieces)])


INPUT_SPECS = {
    SERVING_DEFAULT: tf.TensorSpec(None, tf.uint8, name=IMAGES),
    SERVING_FLOAT: tf.TensorSpec(None, tf.float32, name=IMAGES),
    SERVING_BYTES: tf.TensorSpec(None, tf.string, name=IMAGE_BYTES),
}
_JPEG, _PNG = 1, 2  # formats of serving_bytes (0: neither)


class ServingFunctions:
    """The three serving functions of an encoder (plain Python: `build_archive` traces them).

    Args:
      encoder: the trained encoder and its preprocessing.
      max_pixels: largest height x width of one image (default: `default_max_pixels`).
      max_batch: largest number of images in one call (default: `default_max_batch`).
      max_request_pixels: largest sum of height x width over the images of one call (default
        REQUEST_PIXELS_PER_IMAGE x max_pixels).
      max_png_bytes: most compressed image data (IDAT bytes) of one PNG (default
        DEFAULT_MAX_PNG_BYTES); what decoding a PNG costs grows with it.
      max_request_png_bytes: most compressed image data over the PNGs of one call (default
        REQUEST_PNG_BYTES_PER_IMAGE x max_png_bytes).
    """

    def __init__(
        self,
        encoder: Encoder,
        max_pixels: Optional[int] = None,
        max_batch: Optional[int] = None,
        max_request_pixels: Optional[int] = None,
        max_png_bytes: Optional[int] = None,
        max_request_png_bytes: Optional[int] = None,
    ):
        limits = resolve_limits(
            encoder.image_size,
            max_pixels,
            max_batch,
            max_request_pixels,
            max_png_bytes,
            max_request_png_bytes,
        )
        self.backbone = encoder.backbone
        self.projector = encoder.projector
        self.image_size = encoder.image_size
        self.crop_fraction = encoder.crop_fraction
        self.max_pixels = limits["max_pixels"]
        self.max_batch = limits["max_batch"]
        self.max_request_pixels = limits["max_request_pixels"]
        self.max_png_bytes = limits["max_png_bytes"]
        self.max_request_png_bytes = limits["max_request_png_bytes"]
        # Scan data a JPEG header walk reads per image and step: its memory is the batch's.
        self.jpeg_search = max(decode.JPEG_MIN_SEARCH, decode.JPEG_SEARCH_BYTES // self.max_batch)

    def limits(self) -> dict:
        """{REQUEST_LIMITS: value} of this export."""
        return {name: getattr(self, name) for name in REQUEST_LIMITS}

    def _embed(self, preprocessed):
        return _outputs(self.backbone, self.projector, preprocessed)

    def _check_batch_size(self, n, what: str) -> list:
        n = tf.cast(n, tf.int64)
        return [
            _refuse(n > 0, f"{what}: empty batch; send at least one image"),
            _refuse(
                n <= self.max_batch,
                f"{what}: batch larger than the {self.max_batch} images this export accepts; "
                "split the request",
            ),
        ]

    def _check_sizes(self, height, width, what: str) -> list:
        """Checks of the [n] heights and widths (int64) of a request's images, each refusal
        naming the first image it concerns: both at least 1, height x width within max_pixels,
        the aspect ratio within MAX_ASPECT_RATIO, and the running sum of pixels within
        max_request_pixels. Nothing larger than the request's images is computed."""
        pixels = height * width  # int64: no overflow for sizes up to 2^31
        longer, shorter = tf.maximum(height, width), tf.minimum(height, width)
        total = tf.cumsum(pixels)
        return [
            _refuse_first(
                tf.logical_or(height < 1, width < 1),
                what,
                "empty image ({} x {}); height and width must be at least 1",
                height,
                width,
            ),
            _refuse_first(
                pixels > self.max_pixels,
                what,
                "image of {} x {} pixels larger than the "
                f"{self.max_pixels} pixels (height x width) this export accepts",
                height,
                width,
            ),
            _refuse_first(
                longer > MAX_ASPECT_RATIO * shorter,
                what,
                "image of {} x {} pixels more elongated than the "
                f"{MAX_ASPECT_RATIO}:1 aspect ratio this export accepts",
                height,
                width,
            ),
            _refuse_first(
                total > self.max_request_pixels,
                what,
                "the images up to this one hold {} pixels, more than the "
                f"{self.max_request_pixels} this export accepts in one request; split the "
                "request",
                total,
            ),
        ]

    def _checked_batch(self, images, what: str = IMAGES):
        """images with its shape checked at run time: [batch >= 1, height, width, 3] within the
        limits; static shape [None, None, None, 3] from then on."""
        rank = _refuse(
            tf.equal(tf.rank(images), 4), f"{what} must be a batch [batch, height, width, 3]"
        )
        # The runtime may evaluate the shape of a wrong-rank input ahead of the rank assertion
        # (Grappler folds it to a constant): the shape checked below is then a valid stand-in,
        # so that only the rank assertion fails, and no slice of the shape can fail at all.
        with tf.control_dependencies([rank]):
            padded = tf.concat([tf.shape(images, out_type=tf.int64), tf.zeros(4, tf.int64)], 0)
        rank_ok = tf.equal(tf.rank(images), 4)
        shape = tf.where(rank_ok, padded[:4], tf.constant([1, 1, 1, 3], tf.int64))
        checks = [
            _refuse(tf.equal(shape[3], 3), f"{what} must have 3 channels (RGB)"),
            *self._check_batch_size(shape[0], what),
        ]
        with tf.control_dependencies(checks):
            n = tf.maximum(shape[0], 1)  # all images of a dense batch share one size
            height, width = tf.fill([n], shape[1]), tf.fill([n], shape[2])
        with tf.control_dependencies(self._check_sizes(height, width, what)):
            # A reshape (no copy) rather than set_shape: Grappler would read a static shape set
            # on the input's identity back onto the input and fold the checks above away.
            return tf.reshape(images, tf.stack([-1, shape[1], shape[2], 3]))

    def serving_default(self, images):
        images = self._checked_batch(images)
        return self._embed(decode.eval_preprocess(images, self.image_size, self.crop_fraction))

    def serving_float(self, images):
        images = self._checked_batch(images)
        finite = tf.reduce_all(tf.math.is_finite(images), axis=(1, 2, 3))
        check = _refuse_first(
            tf.logical_not(finite), IMAGES, "not finite (NaN or inf); images must be finite"
        )
        with tf.control_dependencies([check]):
            region = decode.eval_region(images, self.crop_fraction)
        # Clipped to the uint8 range and not rounded: integer-valued input gives exactly what
        # the same pixels give as uint8 through serving_default. Only the region is clipped
        # (clipping is per pixel, so the result is that of eval_preprocess on clipped images).
        region = tf.clip_by_value(region, 0.0, 255.0)
        return self._embed(decode.eval_resize(region, self.image_size))

    def serving_bytes(self, image_bytes):
        rank = _refuse(
            tf.equal(tf.rank(image_bytes), 1),
            "image_bytes must be a batch [batch] of encoded images",
        )
        with tf.control_dependencies([rank]):
            count = tf.size(image_bytes, out_type=tf.int64)
        with tf.control_dependencies(self._check_batch_size(count, IMAGE_BYTES)):
            image_bytes = tf.reshape(image_bytes, [-1])
        # Every image's format and size are read from its header first, none decoded.
        h = read_headers(image_bytes, self.jpeg_search)
        fmt, height, width, scans = h["format"], h["height"], h["width"], h["scans"]
        length = tf.strings.length(image_bytes)
        is_jpeg, is_png = tf.equal(fmt, _JPEG), tf.equal(fmt, _PNG)
        png_bound = decode.png_data_bound(h["raw_bytes"])
        png_data = h["idat_bytes"]  # 0 for a JPEG
        png_total = tf.cumsum(png_data)
        checks = [
            _refuse_first(
                tf.equal(fmt, 0),
                IMAGE_BYTES,
                "not a JPEG or PNG image ({} bytes); only JPEG and PNG are accepted",
                length,
            ),
            _refuse_first(
                is_png & ((length < 33) | (height < 0)),
                IMAGE_BYTES,
                "truncated PNG (no IHDR header; {} bytes)",
                length,
            ),
            _refuse_first(
                ~h["walked"],
                IMAGE_BYTES,
                "{} whose headers could not be followed to their end within "
                f"{decode.MAX_HEADER_STEPS} steps (marker segments, chunks of scan data, PNG "
                "chunks); this export does not accept it",
                tf.gather(tf.constant(["", "JPEG", "PNG"]), fmt),
            ),
            _refuse_first(
                is_jpeg & (height < 0),
                IMAGE_BYTES,
                "JPEG without a frame header (SOF) before its first scan ({} bytes)",
                length,
            ),
            _refuse_first(
                scans > MAX_JPEG_SCANS,
                IMAGE_BYTES,
                f"JPEG of {{}} scans, more than the {MAX_JPEG_SCANS} this export accepts",
                scans,
            ),
        ]
        with tf.control_dependencies(checks):
            size_checks = self._check_sizes(height, width, IMAGE_BYTES)
        # Within max_pixels, the bytes of a PNG's rows are far from overflowing int64.
        with tf.control_dependencies(size_checks):
            png_checks = [
                _refuse_first(
                    is_png & (height >= 0) & (h["raw_bytes"] < 0),
                    IMAGE_BYTES,
                    "PNG of a colour type and bit depth that PNG does not define (IHDR)",
                ),
                _refuse_first(
                    is_png & (h["raw_bytes"] >= 0) & (h["idat_bytes"] > png_bound),
                    IMAGE_BYTES,
                    "PNG of {} bytes of compressed image data (IDAT), more than the {} that its "
                    "declared {} x {} pixels can need",
                    h["idat_bytes"],
                    png_bound,
                    height,
                    width,
                ),
                _refuse_first(
                    png_data > self.max_png_bytes,
                    IMAGE_BYTES,
                    "PNG of {} bytes of compressed image data (IDAT), more than the "
                    f"{self.max_png_bytes} this export accepts per PNG (max_png_bytes: decoding "
                    "a PNG costs in proportion to its compressed data); send it as JPEG, or "
                    "export with a larger --max_png_bytes",
                    png_data,
                ),
                _refuse_first(
                    png_total > self.max_request_png_bytes,
                    IMAGE_BYTES,
                    "the PNGs up to this one hold {} bytes of compressed image data (IDAT), "
                    f"more than the {self.max_request_png_bytes} this export accepts in one "
                    "request; split the request",
                    png_total,
                ),
            ]
        with tf.control_dependencies(png_checks):
            index = tf.range(count)
        return self._embed(self._decode_all(index, image_bytes, fmt, height, width))

    def _decode_all(self, index, image_bytes, fmt, height, width):
        """The checked images decoded and preprocessed, DECODE_PARALLELISM at a time; a decoder
        error is reported with the index of its image (tf.data skips the image, and the first
        image missing from the result is named)."""
        size, crop = self.image_size, self.crop_fraction

        def decode_one(i, encoded, f, h, w):
            # libjpeg must read the size the header check read, or nothing is decoded.
            shape = tf.cond(
                tf.equal(f, _JPEG),
                lambda: tf.cast(tf.io.extract_jpeg_shape(encoded)[:2], tf.int64),
                lambda: tf.stack([h, w]),
            )
            same = tf.debugging.assert_equal(shape, tf.stack([h, w]))
            with tf.control_dependencies([same]):
                return i, decode.decode_eval(encoded, size, crop)

        options = tf.data.Options()
        options.autotune.enabled = False
        options.experimental_optimization.apply_default_optimizations = False
        decoded = (
            tf.data.Dataset.from_tensor_slices((index, image_bytes, fmt, height, width))
            .map(decode_one, num_parallel_calls=DECODE_PARALLELISM, deterministic=True)
            .ignore_errors(log_warning=False)
        )
        # One placeholder row after the images, so the batch below is never empty.
        placeholder = tf.data.Dataset.from_tensors(
            (tf.constant(-1, tf.int64), tf.zeros((size, size, 3), tf.float32))
        )
        got, images = (
            decoded.concatenate(placeholder)
            .batch(self.max_batch + 1)
            .with_options(options)
            .get_single_element()
        )
        # got is index's prefix with the failed images left out: the first gap is the first.
        got = got[:-1]
        missing = tf.logical_not(tf.reduce_any(tf.equal(index[:, None], got[None, :]), axis=1))
        names = tf.gather(tf.constant(["", "JPEG", "PNG"]), fmt)
        failed = _refuse_first(
            missing,
            IMAGE_BYTES,
            "corrupt or truncated {} data: the decoder failed (or read another size than "
            "the header check)",
            names,
        )
        with tf.control_dependencies([failed]):
            images = tf.identity(images[:-1])
        images.set_shape((None, size, size, 3))
        return images


def read_headers(image_bytes: tf.Tensor, search: int) -> dict:
    """What a batch [n] of encoded images declares, read by the bounded walks of
    `decode.jpeg_walk` (every scan, `search` bytes of scan data a step) and `decode.png_header`
    (every chunk), all images at once: int64 [n] "format" (0 neither, 1 JPEG, 2 PNG), "height"
    and "width" (-1 without a header), "scans" (a JPEG's SOS markers), "raw_bytes",
    "idat_bytes" (a PNG's; see png_header), bool [n] "walked"."""
    is_jpeg = tf.equal(tf.strings.substr(image_bytes, 0, len(JPEG_MAGIC)), JPEG_MAGIC)
    is_png = tf.equal(tf.strings.substr(image_bytes, 0, len(PNG_MAGIC)), PNG_MAGIC) & ~is_jpeg
    fmt = tf.where(is_jpeg, _JPEG, tf.where(is_png, _PNG, 0))
    jpeg = decode.jpeg_walk(image_bytes, "end", search=search, active=is_jpeg)
    png = decode.png_header(image_bytes, active=is_png)
    height = tf.where(is_png, png["height"], jpeg["height"])
    width = tf.where(is_png, png["width"], jpeg["width"])
    zero = tf.zeros_like(height)
    return dict(
        format=tf.cast(fmt, tf.int64),
        height=tf.where(is_png | is_jpeg, height, zero),
        width=tf.where(is_png | is_jpeg, width, zero),
        scans=tf.where(is_jpeg, jpeg["scans"], zero),
        raw_bytes=tf.where(is_png, png["raw_bytes"], zero),
        idat_bytes=tf.where(is_png, png["idat_bytes"], zero),
        walked=tf.where(is_jpeg, jpeg["walked"], tf.where(is_png, png["walked"], True)),
    )


# ------------------------------------------------------------------------------------------------
# Writing a version.


def probe_images(size: int, n: int = 2) -> np.ndarray:
    """A small deterministic uint8 batch (smooth colour ramps), for warm-up and self-checks."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    image = np.stack([x, y, (x + y) / 2], axis=-1) * 255.0
    return np.stack([np.roll(image, 7 * i, axis=1) for i in range(n)]).round().astype(np.uint8)


def _probe_requests(size: int) -> dict:
    """One small valid input per signature: {signature: (input name, numpy value)}."""
    images = probe_images(size)
    encoded = [tf.io.encode_png(im).numpy() for im in images]
    return {
        SERVING_DEFAULT: (IMAGES, images),
        SERVING_FLOAT: (IMAGES, images.astype(np.float32)),
        SERVING_BYTES: (IMAGE_BYTES, np.array(encoded, dtype=object)),
    }


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, body: bytes) -> bytes:
    """A length-delimited protobuf field (wire type 2): a string or an embedded message."""
    return _varint(number << 3 | 2) + _varint(len(body)) + body


def warmup_record(signature: str, name: str, value: np.ndarray) -> bytes:
    """A serialized tensorflow.serving.PredictionLog holding the PredictRequest of `value` as
    input `name` of `signature`, the bytes the tensorflow-serving-api protos write, built here
    from the wire format so that exporting needs only TensorFlow:

      PredictionLog { predict_log (6): PredictLog { request (1): PredictRequest {
        model_spec (1): ModelSpec { signature_name (3) }, inputs (2): {key (1), value (2)} } } }
    """
    tensor = tf.make_tensor_proto(value).SerializeToString()
    spec = _field(3, signature.encode())
    request = _field(1, spec) + _field(2, _field(1, name.encode()) + _field(2, tensor))
    return _field(6, _field(1, request))


def _write_warmup(path: str, requests: dict) -> None:
    """assets.extra/tf_serving_warmup_requests: TF Serving replays these before it serves the
    version, so the first real request does not pay for graph initialisation."""
    with tf.io.TFRecordWriter(path) as writer:
        for signature, (name, value) in requests.items():
            writer.write(warmup_record(signature, name, value))


def build_archive(functions: ServingFunctions) -> keras.export.ExportArchive:
    """The SavedModel to be: the encoder's variables and the traced serving functions.

    Keras's ExportArchive tracks the variables themselves rather than the Keras objects, which
    the TF1-style loader of TF Serving and saved_model_cli needs to restore them.
    """
    archive = keras.export.ExportArchive()
    archive.track(functions.backbone)
    if functions.projector is not None:
        archive.track(functions.projector)
    for name in SIGNATURES:
        archive.add_endpoint(name, getattr(functions, name), [INPUT_SPECS[name]])
    return archive


def save(functions: ServingFunctions, path: str, metadata: Optional[dict] = None) -> None:
    """Writes the SavedModel, its warm-up requests and metadata to `path` (not versioned)."""
    build_archive(functions).write_out(path, verbose=False)
    extra = os.path.join(path, "assets.extra")
    os.makedirs(extra, exist_ok=True)
    _write_warmup(os.path.join(extra, WARMUP_FILE), _probe_requests(functions.image_size))
    with open(os.path.join(extra, METADATA_FILE), "w") as f:
        json.dump(metadata or {}, f, indent=2, sort_keys=True)
    limits = functions.limits()
    with open(os.path.join(extra, LIMITS_FILE), "w") as f:
        json.dump(limits_record(limits), f, indent=2, sort_keys=True)
    with open(os.path.join(extra, BATCHING_FILE), "w") as f:
        f.write(export_batching_text(limits))


def verify(path: str, encoder: Encoder, atol: float = 1e-5) -> None:
    """Loads the SavedModel at `path` and checks every signature against the in-memory encoder
    on the probe images (largest difference <= atol x max(1, largest output)); raises
    ExportError on a mismatch."""
    loaded = tf.saved_model.load(path)
    missing = set(SIGNATURES) - set(loaded.signatures)
    if missing:
        raise ExportError(f"{path} lacks the signatures {sorted(missing)}")
    images = probe_images(encoder.image_size)
    want = {k: v.numpy() for k, v in encoder(images).items()}
    for signature, (name, value) in _probe_requests(encoder.image_size).items():
        got = loaded.signatures[signature](**{name: tf.constant(value)})
        if set(got) != set(want):
            raise ExportError(f"{signature} returns {sorted(got)}, expected {sorted(want)}")
        for key, expected in want.items():
            # Relative to the outputs' scale: a trained network's embeddings can be far above
            # 1, where float32 rounding alone (graph vs eager kernels) exceeds an absolute 1e-5.
            scale = max(1.0, float(np.max(np.abs(expected))))
            err = float(np.max(np.abs(got[key].numpy() - expected)))
            if err > atol * scale:
                raise ExportError(
                    f"{signature}/{key} differs from the in-memory encoder by {err:.3g} "
                    f"(tolerance {atol} x the largest output, {scale:.3g})"
                )


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def versions(base: str) -> list:
    """The versions under a model's base path: its all-digit subdirectory names, sorted."""
    if not os.path.isdir(base):
        return []
    found = [e.name for e in os.scandir(base) if e.is_dir() and e.name.isdigit()]
    return sorted(int(name) for name in found)


def export(
    workdir: str,
    export_dir: str,
    version: Optional[int] = None,
    projection: bool = False,
    max_pixels: Optional[int] = None,
    max_batch: Optional[int] = None,
    max_request_pixels: Optional[int] = None,
    check: bool = True,
    max_png_bytes: Optional[int] = None,
    max_request_png_bytes: Optional[int] = None,
) -> str:
    """Exports a run as version `version` (default: one past the highest) of the model whose
    base path is `export_dir`; returns the version's directory.

    The SavedModel is written to a hidden temporary directory inside export_dir (TF Serving
    ignores names that are not all digits), loaded back and compared with the in-memory
    encoder (`check`), and only then renamed to export_dir/<version>: a server watching
    export_dir sees a complete version or none. An existing version is never overwritten.
    """
    if version is not None and version < 0:
        raise ExportError(f"version={version}: TF Serving versions are non-negative integers")
    base = os.path.abspath(export_dir)
    existing = versions(base)
    if version is None:
        version = existing[-1] + 1 if existing else 1
    final = os.path.join(base, str(version))
    if os.path.exists(final):
        raise ExportError(
            f"{final} already exists: versions are never overwritten; omit --version to take "
            f"the next free one ({(existing[-1] + 1) if existing else 1})"
        )
    encoder = load_encoder(workdir, projection)
    functions = ServingFunctions(
        encoder, max_pixels, max_batch, max_request_pixels, max_png_bytes, max_request_png_bytes
    )
    metadata = {
        "workdir": os.path.abspath(workdir),
        "weights": encoder.source,
        "version": version,
        "image_size": encoder.image_size,
        "eval_crop_fraction": encoder.crop_fraction,
        **functions.limits(),
        "max_aspect_ratio": MAX_ASPECT_RATIO,
        "embedding_dim": int(encoder.backbone.output.shape[-1]),
        "outputs": [EMBEDDING, EMBEDDING_NORMALIZED] + ([PROJECTION] if projection else []),
        "signatures": {s: SIGNATURE_INPUTS[s] for s in SIGNATURES},
        "tensorflow": tf.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": json.loads(encoder.config.to_json_best_effort()),
    }
    os.makedirs(base, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=base)
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would hide it from a server's user
        save(functions, tmp, metadata)
        if check:
            verify(tmp, encoder)
        if os.path.exists(final):  # another export took this version meanwhile
            raise ExportError(f"{final} appeared while exporting; nothing was overwritten")
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logging.info("Exported %s (weights %s) to %s", workdir, encoder.source, final)
    return final
