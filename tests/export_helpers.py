"""Shared by the export, serving-client and embed tests: a tiny trained run and its export
(made once per session), what TF Serving does with a request, and hand-made hostile images.

Run as a script it is the "fresh process" of the tests: it loads an export with TensorFlow
alone (no simsiam_tf import) and answers the request files it is given:

    python -m tests.export_helpers SAVED_MODEL OUT.npz NAME=KIND:SIGNATURE:FILE ...

KIND is npy (a .npy input for SIGNATURE), rest (a JSON body) or grpc (a serialized
PredictRequest); OUT.npz gets NAME/OUTPUT arrays, and NAME/error with the message when the
model refused the request. With --measure it answers one .npy request and prints what it cost:

    python -m tests.export_helpers --measure SAVED_MODEL SIGNATURE FILE.npy [SIGNATURE FILE.npy]
    # [{"extra_mb": ..., "seconds": ..., "error": null or the message, "error_type": ...}]

extra_mb is the peak resident memory during the request (VmHWM, reset before it) less the
resident memory before it, after the export is loaded and has answered a warm-up request of
each signature asked, as TF Serving's warm-up leaves it.
"""

from __future__ import annotations

import base64
import io
import json
import os
import resource
import struct
import sys
import time
import zlib

import numpy as np
import tensorflow as tf

_CACHE = {}


# ------------------------------------------------------------------------------------------------
# A tiny run and its exports, once per test session.


def tiny_run(tmp_path_factory) -> str:
    """A run directory as tools/train.py leaves it (config.json, checkpoints/,
    backbone.weights.h5), from a few real training steps of a tiny cnn_small on the digits."""
    if "run" not in _CACHE:
        from simsiam_tf import train
        from tests.helpers import tiny_config

        c = tiny_config()
        c.data.image_size = 16
        c.optim.batch_size = 32
        c.optim.epochs = 1
        c.train.steps_per_epoch = 3
        c.train.verbose = 0
        c.eval.max_bank = 100
        c.eval.max_queries = 50
        c.eval.random_init_knn = False
        workdir = str(tmp_path_factory.mktemp("tiny_run"))
        train.train(c, workdir)
        _CACHE["run"] = workdir
    return _CACHE["run"]


def exported(tmp_path_factory, projection: bool = False) -> str:
    """Version 1 of an export of the tiny run (with the projector when asked)."""
    key = ("export", projection)
    if key not in _CACHE:
        from simsiam_tf import export

        base = tmp_path_factory.mktemp("exports") / "simsiam"
        run = tiny_run(tmp_path_factory)
        _CACHE[key] = export.export(run, str(base), projection=projection)
    return _CACHE[key]


def encoder(tmp_path_factory, projection: bool = False):
    """The in-memory encoder of the tiny run."""
    key = ("encoder", projection)
    if key not in _CACHE:
        from simsiam_tf import export

        _CACHE[key] = export.load_encoder(tiny_run(tmp_path_factory), projection)
    return _CACHE[key]


def reference_from_bytes(enc, encoded) -> dict:
    """The in-memory encoder on encoded images as evaluation embeds them (data.decode_eval)."""
    from simsiam_tf import data, export

    rows = [
        export._outputs(
            enc.backbone,
            enc.projector,
            data.decode_eval(e, enc.image_size, enc.crop_fraction)[None],
        )
        for e in encoded
    ]
    return {k: np.concatenate([r[k].numpy() for r in rows]) for k in rows[0]}


def reference_from_pixels(enc, encoded) -> dict:
    """The in-memory encoder on the pixels of encoded images (data.decode_rgb, full size), as a
    client sends them to serving_default: a JPEG that serving_bytes decodes at a DCT scale
    embeds slightly differently this way."""
    from simsiam_tf import data

    rows = [enc(data.decode_rgb(e)[None]) for e in encoded]
    return {k: np.concatenate([r[k].numpy() for r in rows]) for k in rows[0]}


# ------------------------------------------------------------------------------------------------
# Real photos and hostile images.


def sample_photos() -> dict:
    """scikit-learn's two bundled JPEG photos (china.jpg, flower.jpg; 427x640), as file bytes."""
    import sklearn

    folder = os.path.join(os.path.dirname(sklearn.__file__), "datasets", "images")
    out = {}
    for name in ("china.jpg", "flower.jpg"):
        with open(os.path.join(folder, name), "rb") as f:
            out[name] = f.read()
    return out


def encode(array: np.ndarray, fmt: str, **kwargs) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt, **kwargs)
    return buf.getvalue()


def jpeg_with_size(jpeg: bytes, height: int, width: int) -> bytes:
    """A real JPEG whose frame header (SOF0 baseline or SOF2 progressive) is patched to declare
    height x width: libjpeg decodes the missing rows as flat grey."""
    sof = jpeg.find(b"\xff\xc0")
    sof = jpeg.index(b"\xff\xc2") if sof < 0 else sof
    # marker (2), length (2), precision (1), height (2), width (2)
    return jpeg[: sof + 5] + struct.pack(">HH", height, width) + jpeg[sof + 9 :]


def flat_jpeg(progressive: bool = False) -> bytes:
    """A 16 x 16 grey JPEG, 4:2:0, a few hundred bytes: the body of jpeg_with_size's lies."""
    return encode(np.full((16, 16, 3), 128, np.uint8), "JPEG", progressive=progressive)


def flat_png(height: int, width: int, mode: str = "RGB") -> bytes:
    """A real PNG of height x width zeros (RGB, or RGBA: fully transparent), which zlib packs
    into about 1 KB per megapixel."""
    from PIL import Image

    channels = {"RGB": 3, "RGBA": 4}[mode]
    buf = io.BytesIO()
    image = Image.fromarray(np.zeros((height, width, channels), np.uint8), mode)
    image.save(buf, "PNG", compress_level=9)
    return buf.getvalue()


def with_exif_orientation(jpeg: bytes, orientation: int, big_endian: bool = False) -> bytes:
    """The JPEG with an APP1 Exif segment (IFD0: Orientation) inserted after its SOI, in the
    TIFF byte order asked, behind an XMP APP1 segment as cameras write them."""
    e = ">" if big_endian else "<"
    tiff = (b"MM\x00*" if big_endian else b"II*\x00") + struct.pack(e + "I", 8)
    entries = [(0x010F, 2, 4, b"cam\x00"), (0x0112, 3, 1, struct.pack(e + "HH", orientation, 0))]
    tiff += struct.pack(e + "H", len(entries))
    for tag, kind, count, value in entries:
        tiff += struct.pack(e + "HHI", tag, kind, count) + value
    tiff += struct.pack(e + "I", 0)
    exif = b"Exif\x00\x00" + tiff
    xmp = b"http://ns.adobe.com/xap/1.0/\x00<x:xmpmeta/>"
    segment = lambda body: b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body
    return jpeg[:2] + segment(xmp) + segment(exif) + jpeg[2:]


def png_with_size(png: bytes, height: int, width: int) -> bytes:
    """A real PNG whose IHDR declares height x width, with a correct chunk CRC."""
    assert png[12:16] == b"IHDR"
    ihdr = b"IHDR" + struct.pack(">II", width, height) + png[24:29]
    return png[:12] + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + png[33:]


# ------------------------------------------------------------------------------------------------
# What TF Serving does with a request.


def rest_inputs(body: str, input_name: str, dtype: tf.DType) -> dict:
    """TF Serving's decoding of a REST predict body (row format, one input): the instances
    stacked into one tensor of the signature's dtype, {"b64": ...} objects decoded to bytes."""
    request = json.loads(body)
    instances = request["instances"]
    if instances and isinstance(instances[0], dict) and "b64" not in instances[0]:
        instances = [i[input_name] for i in instances]  # named form: [{"name": value}, ...]
    if instances and isinstance(instances[0], dict):
        return {input_name: np.array([base64.b64decode(i["b64"]) for i in instances], object)}
    return {input_name: np.array(instances, dtype=dtype.as_numpy_dtype)}


def grpc_inputs(serialized: bytes) -> tuple[str, dict]:
    """A serialized PredictRequest -> (signature name, {input name: array})."""
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest.FromString(serialized)
    inputs = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
    return request.model_spec.signature_name or "serving_default", inputs


class SessionModel:
    """A SavedModel loaded as TF Serving loads it: the TF1 loader into a Session, called by
    feeding and fetching the tensor names of a SignatureDef."""

    def __init__(self, path: str):
        self.graph = tf.Graph()
        self.session = tf.compat.v1.Session(graph=self.graph)
        with self.graph.as_default():
            meta = tf.compat.v1.saved_model.loader.load(self.session, ["serve"], path)
        self.signatures = dict(meta.signature_def)

    def input_spec(self, signature: str) -> tuple[str, tf.DType]:
        """(name, dtype) of the signature's one input."""
        [(name, info)] = self.signatures[signature].inputs.items()
        return name, tf.as_dtype(info.dtype)

    def predict(self, signature: str, inputs: dict) -> dict:
        sig = self.signatures[signature]
        feeds = {sig.inputs[k].name: v for k, v in inputs.items()}
        fetches = {k: v.name for k, v in sig.outputs.items()}
        return self.session.run(fetches, feeds)

    def close(self):
        self.session.close()


# ------------------------------------------------------------------------------------------------
# The fresh process.


def _input_spec(loaded, signature: str) -> tf.TensorSpec:
    [spec] = loaded.signatures[signature].structured_input_signature[1].values()
    return spec


def _main(argv) -> None:
    saved_model, out = argv[1], argv[2]
    loaded = tf.saved_model.load(saved_model)
    results = {}
    for spec in argv[3:]:
        name, _, rest = spec.partition("=")
        kind, signature, path = rest.split(":", 2)
        if kind == "npy":
            inputs = {_input_spec(loaded, signature).name: np.load(path, allow_pickle=True)}
        elif kind == "rest":
            with open(path) as f:
                body = f.read()
            signature = json.loads(body).get("signature_name", "serving_default")
            spec = _input_spec(loaded, signature)
            inputs = rest_inputs(body, spec.name, spec.dtype)
        else:
            with open(path, "rb") as f:
                signature, inputs = grpc_inputs(f.read())
        try:
            outputs = loaded.signatures[signature](**{k: tf.constant(v) for k, v in inputs.items()})
            results.update({f"{name}/{k}": v.numpy() for k, v in outputs.items()})
        except tf.errors.InvalidArgumentError as err:
            results[f"{name}/error"] = np.array(err.message)
    np.savez(out, **results)


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def _reset_peak() -> float:
    """Resets the process's peak resident memory to its current value (Linux: clear_refs 5);
    returns the current value in MB. Without it the peak would still hold TensorFlow's load,
    which can exceed what a request adds, and hide it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_mb("VmRSS")
    except OSError:  # not Linux: the rise of the lifetime peak, a lower bound
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _peak_mb() -> float:
    try:
        return _status_mb("VmHWM")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _measure(saved_model: str, requests: list) -> None:
    loaded = tf.saved_model.load(saved_model)
    for signature in sorted({s for s, _ in requests}):  # as TF Serving's warm-up leaves it
        spec = _input_spec(loaded, signature)
        warmup = np.zeros((1, 8, 8, 3), np.uint8)
        if signature == "serving_bytes":
            warmup = np.array([tf.io.encode_png(warmup[0]).numpy()], object)
        loaded.signatures[signature](**{spec.name: tf.constant(warmup, spec.dtype)})
    results = []
    for signature, path in requests:
        spec = _input_spec(loaded, signature)
        value = tf.constant(np.load(path, allow_pickle=True), spec.dtype)
        before, start = _reset_peak(), time.perf_counter()
        result = {"error": None, "error_type": None}
        try:
            loaded.signatures[signature](**{spec.name: value})
        except Exception as err:  # noqa: BLE001 - the type is part of the answer
            result["error_type"] = type(err).__name__
            result["error"] = getattr(err, "message", str(err))
        result.update(seconds=time.perf_counter() - start, extra_mb=_peak_mb() - before)
        results.append(result)
        del value
    print(json.dumps(results))


def measure(saved_model: str, requests: list, tmp_path, timeout: float = 300) -> list:
    """Requests [(signature, value)] answered one after the other in one fresh process:
    [{extra_mb, seconds, error, error_type}]. The peak is reset before each request, but memory
    a request leaves to the allocator can serve the next: give a costly request a process of
    its own."""
    import subprocess
    import tempfile

    args = []
    for signature, value in requests:
        fd, path = tempfile.mkstemp(suffix=".npy", dir=str(tmp_path))
        os.close(fd)
        np.save(path, value, allow_pickle=True)
        args += [signature, path]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-m", "tests.export_helpers", "--measure", saved_model, *args],
        cwd=repo,
        capture_output=True,
        text=True,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    if sys.argv[1] == "--measure":
        _measure(sys.argv[2], list(zip(sys.argv[3::2], sys.argv[4::2])))
    else:
        _main(sys.argv)
