"""Sends image files to a TF Serving model and prints their embeddings, one JSON line each.

  python tools/serve_client.py --server=localhost:8501 photo1.jpg photo2.png        # REST
  python tools/serve_client.py --server=localhost:8500 --protocol=grpc photo1.jpg   # gRPC

  python tools/serve_client.py --server=localhost:8501 --limits=exports/simsiam photos/*.jpg

With --limits (the export's assets.extra/limits.json, its version directory or its base path)
the files are sent in requests that stay within the export's limits (max_batch images,
max_request_pixels pixels and max_request_png_bytes of PNG data, read from each file's
header); without, --batch_size files a
request. A refused request is sent again one file at a time, so that one bad file costs only
itself: each refused file is named on stderr with the server's one-line reason, the others are
printed, and the exit status is 1.

By default the encoded files travel as they are to the `serving_bytes` signature (REST:
`{"signature_name": "serving_bytes", "instances": [{"b64": ...}, ...]}`; gRPC: a
PredictRequest whose `image_bytes` input is a DT_STRING tensor [batch]) and the server decodes
them. With --signature=serving_default (or serving_float) the client decodes each file itself
and sends its pixels, one image per request, since images of different sizes cannot share a
batch tensor. The request builders and response parsers below are what the tests feed to the
exported SavedModel without a server.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import sys
import urllib.error
import urllib.request
from typing import Optional, Sequence

import cli  # noqa: F401  (first: a quiet TensorFlow start-up)

import numpy as np
from absl import flags

from simsiam_tf import export

PROTOCOLS = ("rest", "grpc")
# A request may carry large photos: raise gRPC's 4 MB default message limit.
GRPC_MAX_MESSAGE_BYTES = 256 << 20


# Files a request without --limits: the largest batch of every shipped recipe's default export.
DEFAULT_BATCH_SIZE = 4


class ServingError(RuntimeError):
    """The server refused a request or failed; the message is the server's, `refused` when the
    request itself was refused (HTTP 400, gRPC INVALID_ARGUMENT), not the transport."""

    def __init__(self, message: str, refused: bool = False):
        super().__init__(message)
        self.refused = refused


def refusal_line(message: str) -> str:
    """The one line of a server's error that says why: the text of the graph's assertion,
    without the runtime's node and function names (`[[{{function_node ...}}]]`)."""
    found = re.search(r"assertion failed: \[(.*?)\](?:\s*\[\[|\s*$)", message, re.S)
    text = found.group(1) if found else message
    text = re.sub(r"\s*\[\[\{\{.*", "", text, flags=re.S)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " ".join(lines) if lines else message.strip()


def read_limits(path: str) -> dict:
    """An export's limits: its assets.extra/limits.json, given as that file, the version
    directory, or the model's base path (its highest version)."""
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "saved_model.pb")):
        found = export.versions(path)
        if not found:
            raise FileNotFoundError(f"--limits={path}: neither a SavedModel nor a base path")
        path = os.path.join(path, str(found[-1]))
    if os.path.isdir(path):
        path = os.path.join(path, "assets.extra", export.LIMITS_FILE)
    with open(path) as f:
        return json.load(f)


def declared_pixels(encoded: bytes) -> int:
    """height x width from an image's header (PIL reads no pixels); 0 when unreadable (the
    server will say why)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(encoded)) as image:
            width, height = image.size
    except Exception:  # noqa: BLE001 - any unreadable header: the server refuses it by name
        return 0
    return int(width) * int(height)


def png_data_bytes(encoded: bytes) -> int:
    """The compressed image data of a PNG (the sum of its IDAT chunks' lengths, what the
    export's max_png_bytes limits), 0 for any other file."""
    if not encoded.startswith(export.PNG_MAGIC):
        return 0
    total, pos = 0, len(export.PNG_MAGIC)
    while pos + 8 <= len(encoded):
        size, kind = int.from_bytes(encoded[pos : pos + 4], "big"), encoded[pos + 4 : pos + 8]
        if kind == b"IDAT":
            total += size
        if kind == b"IEND":
            break
        pos += 12 + size
    return total


def plan_requests(encoded: Sequence[bytes], batch_size: int, limits: Optional[dict]) -> list:
    """Consecutive index ranges [(start, stop)], each one request: at most batch_size files and,
    with limits, at most max_batch files of at most max_request_pixels pixels and (if the
    export has the limit) max_request_png_bytes of PNG data in all."""
    most = batch_size if limits is None else min(batch_size, int(limits["max_batch"]))
    budgets = []  # (what a file costs, the request's budget of it)
    if limits is not None:
        budgets.append((declared_pixels, int(limits["max_request_pixels"])))
        if "max_request_png_bytes" in limits:
            budgets.append((png_data_bytes, int(limits["max_request_png_bytes"])))
    out, start = [], 0
    spent = [0] * len(budgets)
    for i, e in enumerate(encoded):
        cost = [measure(e) for measure, _ in budgets]
        over = any(s + c > b for s, c, (_, b) in zip(spent, cost, budgets))
        if i > start and (i - start >= most or over):
            out.append((start, i))
            start, spent = i, [0] * len(budgets)
        spent = [s + c for s, c in zip(spent, cost)]
    if encoded:
        out.append((start, len(encoded)))
    return out


def read_files(paths: Sequence[str]) -> list:
    """The encoded bytes of each file."""
    out = []
    for path in paths:
        with open(path, "rb") as f:
            out.append(f.read())
    return out


def decode_pixels(encoded: bytes) -> np.ndarray:
    """An encoded image -> uint8 HxWx3 at full size, as a viewer shows it (EXIF orientation
    applied, transparency over white), the decoding serving_bytes does too; serving_bytes then
    decodes a JPEG much larger than the model's input at a reduced DCT scale, so the pixels of
    such a photo embed slightly differently (docs/SERVING.md)."""
    from simsiam_tf import decode

    return decode.decode_rgb(encoded).numpy()


def signature_inputs(signature: str, encoded: Sequence[bytes]) -> list:
    """The input value of each request for these encoded images: for serving_bytes one
    object array of the encoded strings; otherwise one [1, H, W, 3] pixel batch per image."""
    if signature == export.SERVING_BYTES:
        return [np.array(list(encoded), dtype=object)]
    dtype = np.float32 if signature == export.SERVING_FLOAT else np.uint8
    return [decode_pixels(e)[None].astype(dtype) for e in encoded]


def rest_body(signature: str, value: np.ndarray) -> dict:
    """TF Serving's REST predict body (row format) for one input value of `signature`."""
    if signature == export.SERVING_BYTES:
        instances = [{"b64": base64.b64encode(bytes(b)).decode("ascii")} for b in value]
    else:
        instances = np.asarray(value).tolist()
    return {"signature_name": signature, "instances": instances}


def rest_url(server: str, model_name: str, version: Optional[int] = None) -> str:
    base = server if server.startswith(("http://", "https://")) else f"http://{server}"
    path = f"/v1/models/{model_name}" + (f"/versions/{version}" if version is not None else "")
    return base.rstrip("/") + path + ":predict"


def parse_rest_response(body: dict) -> dict:
    """{output name: array} from a REST predict response (row or columnar format)."""
    if "error" in body:
        raise ServingError(body["error"])
    if "outputs" in body:  # columnar
        outputs = body["outputs"]
        if not isinstance(outputs, dict):
            return {"output": np.asarray(outputs, np.float32)}
        return {k: np.asarray(v, np.float32) for k, v in outputs.items()}
    predictions = body["predictions"]
    if predictions and isinstance(predictions[0], dict):
        return {k: np.asarray([p[k] for p in predictions], np.float32) for k in predictions[0]}
    return {"output": np.asarray(predictions, np.float32)}  # a single unnamed output


def grpc_request(model_name: str, signature: str, value: np.ndarray, version: Optional[int] = None):
    """A tensorflow_serving PredictRequest for one input value of `signature`."""
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = version
    if signature == export.SERVING_BYTES:
        proto = tf.make_tensor_proto(list(value), dtype=tf.string, shape=[len(value)])
    else:
        proto = tf.make_tensor_proto(value)
    request.inputs[export.SIGNATURE_INPUTS[signature]].CopyFrom(proto)
    return request


def parse_grpc_response(response) -> dict:
    """{output name: array} from a PredictResponse."""
    import tensorflow as tf

    return {k: tf.make_ndarray(v) for k, v in response.outputs.items()}


def send_rest(url: str, body: dict, timeout: float) -> dict:
    data = json.dumps(body).encode("utf-8")
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return parse_rest_response(json.loads(response.read()))
    except urllib.error.HTTPError as err:
        text = err.read().decode("utf-8", "replace")
        try:
            message = json.loads(text)["error"]
        except (ValueError, KeyError, TypeError):
            message = text
        raise ServingError(f"HTTP {err.code}: {message}", refused=err.code == 400) from None


def send_grpc(server: str, request, timeout: float) -> dict:
    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    options = [
        ("grpc.max_send_message_length", GRPC_MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", GRPC_MAX_MESSAGE_BYTES),
    ]
    with grpc.insecure_channel(server, options=options) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        try:
            return parse_grpc_response(stub.Predict(request, timeout=timeout))
        except grpc.RpcError as err:
            refused = err.code() == grpc.StatusCode.INVALID_ARGUMENT
            raise ServingError(f"gRPC {err.code().name}: {err.details()}", refused) from None


def _send(server, protocol, model_name, signature, version, values, timeout) -> dict:
    results = []
    for value in values:
        if protocol == "rest":
            url = rest_url(server, model_name, version)
            results.append(send_rest(url, rest_body(signature, value), timeout))
        else:
            request = grpc_request(model_name, signature, value, version)
            results.append(send_grpc(server, request, timeout))
    return {k: np.concatenate([r[k] for r in results]) for k in results[0]}


def embed(
    server: str,
    encoded: Sequence[bytes],
    protocol: str = "rest",
    model_name: str = "simsiam",
    signature: str = export.SERVING_BYTES,
    version: Optional[int] = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    limits: Optional[dict] = None,
    timeout: float = 60.0,
) -> tuple[dict, list, dict]:
    """Sends encoded images in requests within `limits` (`plan_requests`); a refused request
    is sent again one image at a time. Returns ({output name: array [accepted, ...]}, the
    indices of the accepted images, {index of a refused image: the server's reason})."""
    if not encoded:
        raise ValueError("no images to send")
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol={protocol!r}: choose one of {PROTOCOLS}")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    send = lambda chunk: _send(
        server,
        protocol,
        model_name,
        signature,
        version,
        signature_inputs(signature, chunk),
        timeout,
    )
    parts, accepted, refused = [], [], {}
    for start, stop in plan_requests(encoded, batch_size, limits):
        try:
            parts.append(send(encoded[start:stop]))
            accepted += range(start, stop)
            continue
        except ServingError as err:
            if not err.refused:
                raise
            if stop - start == 1:
                refused[start] = refusal_line(str(err))
                continue
        for i in range(start, stop):  # one bad image fails its request: find it, keep the rest
            try:
                parts.append(send(encoded[i : i + 1]))
                accepted.append(i)
            except ServingError as err:
                if not err.refused:
                    raise
                refused[i] = refusal_line(str(err))
    outputs = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else {}
    return outputs, accepted, refused


def predict(server: str, encoded: Sequence[bytes], **kwargs) -> dict:
    """Sends encoded images to the server (`embed`'s arguments); {output name: array
    [len(encoded), ...]}, or ServingError naming the first image refused and why."""
    outputs, _, refused = embed(server, encoded, **kwargs)
    if refused:
        first = min(refused)
        raise ServingError(f"image {first}: {refused[first]}", refused=True)
    return outputs


def define_flags() -> None:
    """The command line (defined only when run as a script, so tests can import this file)."""
    flags.DEFINE_string(
        "server", None, "host:port of TF Serving (REST 8501, gRPC 8500), or an http(s):// URL."
    )
    flags.DEFINE_enum("protocol", "rest", PROTOCOLS, "REST (JSON) or gRPC.")
    flags.DEFINE_string("model_name", "simsiam", "Model name in models.config.")
    flags.DEFINE_integer("model_version", None, "Version to call; default: the latest.")
    flags.DEFINE_enum(
        "signature", export.SERVING_BYTES, export.SIGNATURES, "Serving signature to call."
    )
    flags.DEFINE_string("output_key", export.EMBEDDING, "Output to print.")
    flags.DEFINE_string(
        "limits",
        None,
        "The export's limits.json, version directory or base path: requests stay within them.",
    )
    flags.DEFINE_integer(
        "batch_size",
        DEFAULT_BATCH_SIZE,
        "Most images per serving_bytes request (with --limits, also at most its max_batch).",
    )
    flags.DEFINE_float("timeout", 60.0, "Seconds to wait for each response.")
    flags.DEFINE_string("save", None, "Also save the printed outputs to this .npy file.")
    flags.mark_flag_as_required("server")


def main(argv):
    f = flags.FLAGS
    paths = argv[1:]
    if not paths:
        sys.exit("error: give one or more image files after the flags")
    try:
        limits = read_limits(f.limits) if f.limits else None
        outputs, accepted, refused = embed(
            f.server,
            read_files(paths),
            protocol=f.protocol,
            model_name=f.model_name,
            signature=f.signature,
            version=f.model_version,
            batch_size=f.batch_size,
            limits=limits,
            timeout=f.timeout,
        )
    except (ServingError, OSError, ValueError) as err:
        sys.exit(f"error: {refusal_line(str(err))}")
    for i, reason in sorted(refused.items()):
        print(f"error: {paths[i]}: {reason}", file=sys.stderr)
    if accepted:
        if f.output_key not in outputs:
            sys.exit(f"error: --output_key={f.output_key} was not returned; got {sorted(outputs)}")
        values = outputs[f.output_key]
        for i, row in zip(accepted, values):
            print(json.dumps({"file": paths[i], f.output_key: [float(v) for v in row]}))
        if f.save:
            np.save(f.save, values)
    if refused:
        sys.exit(1)


if __name__ == "__main__":
    define_flags()
    cli.run(main)
