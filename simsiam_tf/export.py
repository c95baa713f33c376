"""SavedModel export of a trained encoder for TF Serving: signatures, input checks, versions.

    DIR/NAME/                 the model's base path (TF Serving's `base_path`)
      1/ 2/ ...               one SavedModel per version; TF Serving loads all-digit names only
        saved_model.pb, variables/
        assets.extra/tf_serving_warmup_requests   one request per signature, replayed at load
        assets.extra/simsiam_export.json          where the weights came from, the preprocessing
      .tmp-3-XXXXXX/          a version being written: renamed to 3/ once complete and verified

Signatures (tag "serve"); every one applies the evaluation-time preprocessing of the run
(`data.eval_preprocess`: resize, or resize the shorter side and centre-crop) and then the
backbone with BatchNorm in inference mode:

    serving_default   images        uint8   [batch, height, width, 3], any height and width
    serving_float     images        float32 [batch, height, width, 3], values 0-255
    serving_bytes     image_bytes   string  [batch], encoded JPEG or PNG (REST: {"b64": ...})

    outputs           embedding             float32 [batch, C]  the backbone's pooled features
                      embedding_normalized  float32 [batch, C]  the same, L2-normalised
                      projection            float32 [batch, D]  projector output z (only in an
                                                                export made with projection=True)

Inputs are declared with unknown rank on purpose: TF Serving feeds a request's tensor to the
graph without checking it against the declared shape, so every check is an op in the graph
(tf.debugging asserts, run before anything that depends on them). A bad request therefore gets
an InvalidArgument error from the graph, the same in TF Serving, `saved_model_cli` and Python:
an empty batch or one above `max_batch`, a wrong rank or channel count, non-finite floats, bytes
that are not a JPEG or PNG, a corrupt or truncated file, and an image above `max_pixels`. The
pixel count of an encoded image is read from its header (JPEG: `tf.io.extract_jpeg_shape`;
PNG: the IHDR chunk) before anything is decoded, so a small file that declares a huge image
allocates nothing.
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

from simsiam_tf import data, model, train

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

# Largest image, in pixels (height x width), any signature accepts: 40 megapixels covers phone
# and most camera photos (8K UHD is 33 MP). An image in flight costs about 27 bytes per pixel
# (uint8 + the float32 copies of eval_preprocess), about 1.1 GB at this limit, and
# serving_bytes decodes DECODE_PARALLELISM images of a request at a time.
DEFAULT_MAX_PIXELS = 40_000_000
DECODE_PARALLELISM = 2
# Largest batch any signature accepts. Every image becomes image_size^2 x 3 floats whatever its
# own size, so without it a request of many tiny images (a 1x1 PNG is 70 bytes) would allocate
# far more than it carries.
DEFAULT_MAX_BATCH = 256

WARMUP_FILE = "tf_serving_warmup_requests"
METADATA_FILE = "simsiam_export.json"
JPEG_MAGIC = b"\xff\xd8\xff"  # the first bytes of the only formats serving_bytes accepts
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


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
        x = data.eval_preprocess(images, self.image_size, self.crop_fraction)
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


def _header_size_png(encoded: tf.Tensor) -> tf.Tensor:
    """(height, width) from a PNG's IHDR chunk (big-endian at bytes 16-23), as int64."""
    ok = tf.debugging.Assert(
        tf.logical_and(
            tf.strings.length(encoded) >= 24, tf.strings.substr(encoded, 12, 4) == b"IHDR"
        ),
        ["image_bytes: truncated PNG (no IHDR header)"],
    )
    with tf.control_dependencies([ok]):
        raw = tf.cast(tf.io.decode_raw(tf.strings.substr(encoded, 16, 8), tf.uint8), tf.int64)
    big_endian = lambda b: ((b[0] * 256 + b[1]) * 256 + b[2]) * 256 + b[3]
    return tf.stack([big_endian(raw[4:8]), big_endian(raw[0:4])])


def _header_size_jpeg(encoded: tf.Tensor) -> tf.Tensor:
    """(height, width) from a JPEG's frame header; InvalidArgument when there is none."""
    return tf.cast(tf.io.extract_jpeg_shape(encoded)[:2], tf.int64)


INPUT_SPECS = {
    SERVING_DEFAULT: tf.TensorSpec(None, tf.uint8, name=IMAGES),
    SERVING_FLOAT: tf.TensorSpec(None, tf.float32, name=IMAGES),
    SERVING_BYTES: tf.TensorSpec(None, tf.string, name=IMAGE_BYTES),
}


class ServingFunctions:
    """The three serving functions of an encoder (plain Python: `build_archive` traces them).

    Args:
      encoder: the trained encoder and its preprocessing.
      max_pixels: largest height x width of one image.
      max_batch: largest number of images in one call.
    """

    def __init__(
        self,
        encoder: Encoder,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_batch: int = DEFAULT_MAX_BATCH,
    ):
        if max_pixels < 1:
            raise ExportError(f"max_pixels={max_pixels} must be a positive number of pixels")
        if max_batch < 1:
            raise ExportError(f"max_batch={max_batch} must be a positive number of images")
        self.backbone = encoder.backbone
        self.projector = encoder.projector
        self.image_size = encoder.image_size
        self.crop_fraction = encoder.crop_fraction
        self.max_pixels = int(max_pixels)
        self.max_batch = int(max_batch)

    def _embed(self, preprocessed):
        return _outputs(self.backbone, self.projector, preprocessed)

    def _check_batch_size(self, n, what: str) -> list:
        n = tf.cast(n, tf.int64)
        return [
            tf.debugging.assert_positive(
                n, message=f"{what}: empty batch; send at least one image"
            ),
            tf.debugging.assert_less_equal(
                n,
                tf.constant(self.max_batch, tf.int64),
                message=f"{what}: batch larger than the {self.max_batch} images this export "
                "accepts; split the request",
            ),
        ]

    def _check_pixels(self, height, width, what: str) -> list:
        return [
            tf.debugging.assert_positive(height, message=f"{what}: height must be at least 1"),
            tf.debugging.assert_positive(width, message=f"{what}: width must be at least 1"),
            tf.debugging.assert_less_equal(
                height * width,
                tf.constant(self.max_pixels, tf.int64),
                message=f"{what}: image larger than the {self.max_pixels} pixels (height x width) "
                "this export accepts",
            ),
        ]

    def _checked_batch(self, images):
        """images with its shape checked at run time: [batch >= 1, height, width, 3] within
        max_pixels; static shape [None, None, None, 3] from then on."""
        rank = tf.debugging.assert_rank(
            images, 4, message="images must be a batch [batch, height, width, 3]"
        )
        with tf.control_dependencies([rank]):
            shape = tf.shape(images, out_type=tf.int64)
        checks = [
            tf.debugging.assert_equal(
                shape[3], tf.constant(3, tf.int64), message="images must have 3 channels (RGB)"
            ),
            *self._check_batch_size(shape[0], "images"),
            *self._check_pixels(shape[1], shape[2], "images"),
        ]
        with tf.control_dependencies(checks):
            images = tf.identity(images)
        images.set_shape((None, None, None, 3))
        return images

    def serving_default(self, images):
        images = self._checked_batch(images)
        return self._embed(data.eval_preprocess(images, self.image_size, self.crop_fraction))

    def serving_float(self, images):
        images = self._checked_batch(images)
        finite = tf.debugging.assert_all_finite(images, "images must be finite (no NaN or inf)")
        # Clipped to the uint8 range and not rounded: integer-valued input gives exactly what
        # the same pixels give as uint8 through serving_default.
        images = tf.clip_by_value(finite, 0.0, 255.0)
        return self._embed(data.eval_preprocess(images, self.image_size, self.crop_fraction))

    def serving_bytes(self, image_bytes):
        rank = tf.debugging.assert_rank(
            image_bytes, 1, message="image_bytes must be a batch [batch] of encoded images"
        )
        with tf.control_dependencies([rank]):
            count = tf.size(image_bytes)
        with tf.control_dependencies(self._check_batch_size(count, "image_bytes")):
            image_bytes = tf.reshape(image_bytes, [-1])
        size = self.image_size
        images = tf.map_fn(
            self._decode_one,
            image_bytes,
            fn_output_signature=tf.TensorSpec((size, size, 3), tf.float32),
            parallel_iterations=DECODE_PARALLELISM,
        )
        return self._embed(images)

    def _decode_one(self, encoded):
        """One encoded image -> preprocessed float size x size x 3, its header checked first."""
        is_jpeg = tf.strings.substr(encoded, 0, len(JPEG_MAGIC)) == JPEG_MAGIC
        is_png = tf.strings.substr(encoded, 0, len(PNG_MAGIC)) == PNG_MAGIC
        # decode_image also reads GIF, BMP, WebP and JPEG XL: refused here, so no format whose
        # size is not checked first reaches a decoder.
        known = tf.debugging.Assert(
            tf.logical_or(is_jpeg, is_png),
            [
                "image_bytes: not a JPEG or PNG image (",
                tf.strings.length(encoded),
                "bytes); only JPEG and PNG are accepted",
            ],
        )
        with tf.control_dependencies([known]):
            hw = tf.cond(
                is_jpeg, lambda: _header_size_jpeg(encoded), lambda: _header_size_png(encoded)
            )
        with tf.control_dependencies(self._check_pixels(hw[0], hw[1], "image_bytes")):
            image = data.decode_rgb(encoded)
        return data.eval_preprocess(image, self.image_size, self.crop_fraction)


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


def _write_warmup(path: str, requests: dict) -> None:
    """assets.extra/tf_serving_warmup_requests: TF Serving replays these before it serves the
    version, so the first real request does not pay for graph initialisation."""
    try:
        from tensorflow_serving.apis import predict_pb2, prediction_log_pb2
    except ImportError:
        logging.warning("tensorflow-serving-api is not installed: no warm-up requests written")
        return
    with tf.io.TFRecordWriter(path) as writer:
        for signature, (name, value) in requests.items():
            request = predict_pb2.PredictRequest()
            request.model_spec.signature_name = signature
            request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request)
            )
            writer.write(log.SerializeToString())


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
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_batch: int = DEFAULT_MAX_BATCH,
    check: bool = True,
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
    functions = ServingFunctions(encoder, max_pixels, max_batch)
    metadata = {
        "workdir": os.path.abspath(workdir),
        "weights": encoder.source,
        "version": version,
        "image_size": encoder.image_size,
        "eval_crop_fraction": encoder.crop_fraction,
        "max_pixels": functions.max_pixels,
        "max_batch": functions.max_batch,
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
