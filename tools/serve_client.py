"""Sends image files to a TF Serving model and prints their embeddings, one JSON line each.

  python tools/serve_client.py --server=localhost:8501 photo1.jpg photo2.png        # REST
  python tools/serve_client.py --server=localhost:8500 --protocol=grpc photo1.jpg   # gRPC

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
import json
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


class ServingError(RuntimeError):
    """The server refused a request; the message is the server's."""


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
        raise ServingError(f"HTTP {err.code}: {message}") from None


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
            raise ServingError(f"gRPC {err.code().name}: {err.details()}") from None


def predict(
    server: str,
    encoded: Sequence[bytes],
    protocol: str = "rest",
    model_name: str = "simsiam",
    signature: str = export.SERVING_BYTES,
    version: Optional[int] = None,
    batch_size: int = 32,
    timeout: float = 60.0,
) -> dict:
    """Sends encoded images to the server; {output name: array [len(encoded), ...]}."""
    if not encoded:
        raise ValueError("no images to send")
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol={protocol!r}: choose one of {PROTOCOLS}")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    chunks = [encoded[i : i + batch_size] for i in range(0, len(encoded), batch_size)]
    results = []
    for chunk in chunks:
        for value in signature_inputs(signature, chunk):
            if protocol == "rest":
                url = rest_url(server, model_name, version)
                results.append(send_rest(url, rest_body(signature, value), timeout))
            else:
                request = grpc_request(model_name, signature, value, version)
                results.append(send_grpc(server, request, timeout))
    return {k: np.concatenate([r[k] for r in results]) for k in results[0]}


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
    flags.DEFINE_integer("batch_size", 32, "Images per serving_bytes request.")
    flags.DEFINE_float("timeout", 60.0, "Seconds to wait for each response.")
    flags.DEFINE_string("save", None, "Also save the printed outputs to this .npy file.")
    flags.mark_flag_as_required("server")


def main(argv):
    f = flags.FLAGS
    paths = argv[1:]
    if not paths:
        sys.exit("error: give one or more image files after the flags")
    try:
        outputs = predict(
            f.server,
            read_files(paths),
            protocol=f.protocol,
            model_name=f.model_name,
            signature=f.signature,
            version=f.model_version,
            batch_size=f.batch_size,
            timeout=f.timeout,
        )
    except (ServingError, OSError) as err:
        sys.exit(f"error: {err}")
    if f.output_key not in outputs:
        sys.exit(f"error: --output_key={f.output_key} was not returned; got {sorted(outputs)}")
    values = outputs[f.output_key]
    for path, row in zip(paths, values):
        print(json.dumps({"file": path, f.output_key: [float(v) for v in row]}))
    if f.save:
        np.save(f.save, values)


if __name__ == "__main__":
    define_flags()
    cli.run(main)
