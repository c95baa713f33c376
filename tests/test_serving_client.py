"""tools/serve_client.py: the REST and gRPC payloads it builds, decoded as TF Serving decodes
them and run through the exported signatures, match the in-memory encoder; the client talks to
stand-in servers on the loopback interface that answer the way TF Serving does."""

import base64
import io
import json
import os
import re
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import tensorflow as tf

from simsiam_tf import export
from tests import export_helpers as eh
from tests.conftest import REPO
from tests.helpers import run_python
from tools import serve_client

ATOL = 1e-5


@pytest.fixture(scope="module")
def photos():
    """Photos the model never saw: scikit-learn's two JPEGs, and one of them as a PNG."""
    found = eh.sample_photos()
    china = tf.io.decode_jpeg(found["china.jpg"]).numpy()
    found["china_crop.png"] = eh.encode(china[100:300, 50:450], "PNG")
    return found


def _assert_close(got, want):
    assert set(got) == set(want)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], atol=ATOL, rtol=0)


def test_rest_and_grpc_payloads(photos):
    encoded = list(photos.values())
    [value] = serve_client.signature_inputs(export.SERVING_BYTES, encoded)
    body = serve_client.rest_body(export.SERVING_BYTES, value)
    assert body["signature_name"] == "serving_bytes"
    assert [base64.b64decode(i["b64"]) for i in body["instances"]] == encoded
    assert json.loads(json.dumps(body)) == body  # plain JSON

    request = serve_client.grpc_request("simsiam", export.SERVING_BYTES, value, version=3)
    assert request.model_spec.name == "simsiam" and request.model_spec.version.value == 3
    assert request.model_spec.signature_name == "serving_bytes"
    proto = request.inputs["image_bytes"]
    assert proto.dtype == tf.string.as_datatype_enum
    assert [d.size for d in proto.tensor_shape.dim] == [len(encoded)]
    assert list(tf.make_ndarray(proto)) == encoded

    pixels = serve_client.signature_inputs(export.SERVING_DEFAULT, encoded)
    assert [p.shape for p in pixels] == [(1, 427, 640, 3), (1, 427, 640, 3), (1, 200, 400, 3)]
    assert pixels[0].dtype == np.uint8
    assert serve_client.signature_inputs(export.SERVING_FLOAT, encoded[:1])[0].dtype == np.float32
    assert (
        serve_client.rest_url("localhost:8501", "simsiam")
        == "http://localhost:8501/v1/models/simsiam:predict"
    )
    assert (
        serve_client.rest_url("https://h:1/", "m", 2)
        == "https://h:1/v1/models/m/versions/2:predict"
    )


def test_client_payloads_in_a_fresh_process(saved_model, enc, photos, tmp_path):
    """The issue's check: the export, loaded in a fresh process, fed photos it never saw through
    the very JSON and proto payloads the client builds, and hostile ones through the same."""
    encoded = list(photos.values())
    [value] = serve_client.signature_inputs(export.SERVING_BYTES, encoded)
    (tmp_path / "bytes.json").write_text(
        json.dumps(serve_client.rest_body(export.SERVING_BYTES, value))
    )
    request = serve_client.grpc_request("simsiam", export.SERVING_BYTES, value)
    (tmp_path / "bytes.pb").write_bytes(request.SerializeToString())
    pixels = serve_client.signature_inputs(export.SERVING_DEFAULT, encoded[2:])[0]
    (tmp_path / "pixels.json").write_text(
        json.dumps(serve_client.rest_body(export.SERVING_DEFAULT, pixels))
    )
    request = serve_client.grpc_request("simsiam", export.SERVING_FLOAT, pixels.astype(np.float32))
    (tmp_path / "floats.pb").write_bytes(request.SerializeToString())

    jpeg = photos["china.jpg"]
    huge = eh.jpeg_with_size(jpeg, 30000, 30000)
    hostile = {
        "huge_rest": serve_client.rest_body(export.SERVING_BYTES, np.array([huge], object)),
        "truncated_rest": serve_client.rest_body(
            export.SERVING_BYTES, np.array([jpeg[: len(jpeg) // 3]], object)
        ),
        "text_rest": serve_client.rest_body(export.SERVING_BYTES, np.array([b"hello"], object)),
        "empty_rest": {"signature_name": "serving_bytes", "instances": []},
    }
    specs = [
        f"bytes_rest=rest:-:{tmp_path / 'bytes.json'}",
        f"bytes_grpc=grpc:-:{tmp_path / 'bytes.pb'}",
        f"pixels_rest=rest:-:{tmp_path / 'pixels.json'}",
        f"floats_grpc=grpc:-:{tmp_path / 'floats.pb'}",
    ]
    for name, body in hostile.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(body))
        specs.append(f"{name}=rest:-:{tmp_path / name}.json")
    png = photos["china_crop.png"]
    bad = serve_client.grpc_request(
        "simsiam", export.SERVING_BYTES, np.array([eh.png_with_size(png, 30000, 30000)], object)
    )
    (tmp_path / "huge_grpc.pb").write_bytes(bad.SerializeToString())
    specs.append(f"huge_grpc=grpc:-:{tmp_path / 'huge_grpc.pb'}")

    out = tmp_path / "out.npz"
    proc = run_python("-m", "tests.export_helpers", saved_model, str(out), *specs)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.load(out)
    want = eh.reference_from_bytes(enc, encoded)
    for name in ("bytes_rest", "bytes_grpc"):
        _assert_close({k: got[f"{name}/{k}"] for k in want}, want)
    want_crop = eh.reference_from_pixels(enc, encoded[2:])
    for name in ("pixels_rest", "floats_grpc"):
        _assert_close({k: got[f"{name}/{k}"] for k in want}, want_crop)
    assert "larger than the 1000000 pixels" in str(got["huge_rest/error"])
    assert "larger than the 1000000 pixels" in str(got["huge_grpc/error"])
    assert "JPEG" in str(got["truncated_rest/error"])
    assert "not a JPEG or PNG" in str(got["text_rest/error"])
    assert "empty batch" in str(got["empty_rest/error"])


def test_cifar_photos_through_client_payloads(saved_model, enc, cifar10_folder):
    test_dir = os.path.join(cifar10_folder, "test")
    paths = sorted(
        os.path.join(d, f) for d, _, files in os.walk(test_dir) for f in files if f.endswith(".jpg")
    )[::5]
    encoded = serve_client.read_files(paths)
    [value] = serve_client.signature_inputs(export.SERVING_BYTES, encoded)
    serve = tf.saved_model.load(saved_model).signatures["serving_bytes"]
    body = json.dumps(serve_client.rest_body(export.SERVING_BYTES, value))
    inputs = eh.rest_inputs(body, "image_bytes", tf.string)
    from_json = serve(**{k: tf.constant(v) for k, v in inputs.items()})
    serialized = serve_client.grpc_request("simsiam", "serving_bytes", value).SerializeToString()
    _, inputs = eh.grpc_inputs(serialized)
    from_proto = serve(**{k: tf.constant(v) for k, v in inputs.items()})
    want = eh.reference_from_bytes(enc, encoded)
    _assert_close({k: v.numpy() for k, v in from_json.items()}, want)
    _assert_close({k: v.numpy() for k, v in from_proto.items()}, want)


# ------------------------------------------------------------------------------------------------
# Stand-in servers: TF Serving's request handling over a TF1 session of the export.


class _RestHandler(BaseHTTPRequestHandler):
    model = None  # set on a subclass

    def do_POST(self):  # noqa: N802 (http.server's name)
        match = re.fullmatch(r"/v1/models/([^/:]+)(?:/versions/(\d+))?:predict", self.path)
        body = self.rfile.read(int(self.headers["Content-Length"])).decode("utf-8")
        if match is None:
            return self._reply(404, {"error": f"Malformed request: POST {self.path}"})
        name, version = match.groups()
        if name != "simsiam" or version not in (None, "1"):  # TF Serving's wording
            request = f"Specific({name}, {version})" if version else f"Latest({name})"
            return self._reply(404, {"error": f"Servable not found for request: {request}"})
        signature = json.loads(body).get("signature_name", "serving_default")
        try:
            out = self.model.predict(
                signature, eh.rest_inputs(body, *self.model.input_spec(signature))
            )
        except tf.errors.InvalidArgumentError as err:
            return self._reply(400, {"error": err.message})
        n = len(next(iter(out.values())))
        self._reply(
            200, {"predictions": [{k: v[i].tolist() for k, v in out.items()} for i in range(n)]}
        )

    def _reply(self, status, payload):
        data = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def servers(saved_model):
    import grpc
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    model = eh.SessionModel(saved_model)
    handler = type("Handler", (_RestHandler,), {"model": model})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()

    class Predictor(prediction_service_pb2_grpc.PredictionServiceServicer):
        def Predict(self, request, context):  # noqa: N802 (the gRPC method's name)
            spec = request.model_spec
            if spec.name != "simsiam" or spec.HasField("version") and spec.version.value != 1:
                version = f", {spec.version.value})" if spec.HasField("version") else ")"
                kind = "Specific(" if spec.HasField("version") else "Latest("
                context.abort(
                    grpc.StatusCode.NOT_FOUND,
                    f"Servable not found for request: {kind}{spec.name}{version}",
                )
            signature = request.model_spec.signature_name or "serving_default"
            inputs = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
            try:
                out = model.predict(signature, inputs)
            except tf.errors.InvalidArgumentError as err:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, err.message)
            response = predict_pb2.PredictResponse()
            response.model_spec.CopyFrom(request.model_spec)
            for k, v in out.items():
                response.outputs[k].CopyFrom(tf.make_tensor_proto(v))
            return response

    limit = serve_client.GRPC_MAX_MESSAGE_BYTES
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=2),
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
        ],
    )
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(Predictor(), server)
    grpc_port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield {"rest": f"127.0.0.1:{httpd.server_address[1]}", "grpc": f"127.0.0.1:{grpc_port}"}
    server.stop(0)
    httpd.shutdown()
    httpd.server_close()
    model.close()


@pytest.mark.parametrize("protocol", ["rest", "grpc"])
@pytest.mark.parametrize("signature", [export.SERVING_BYTES, export.SERVING_DEFAULT])
def test_client_against_a_server(servers, enc, photos, protocol, signature):
    encoded = list(photos.values())
    got = serve_client.predict(
        servers[protocol], encoded, protocol=protocol, signature=signature, batch_size=2
    )
    if signature == export.SERVING_BYTES:
        _assert_close(got, eh.reference_from_bytes(enc, encoded))
    else:  # the client sends the pixels of a full-size decode
        _assert_close(got, eh.reference_from_pixels(enc, encoded))


@pytest.mark.parametrize("protocol", ["rest", "grpc"])
def test_client_reports_a_refused_request(servers, photos, protocol):
    jpeg = photos["china.jpg"]
    with pytest.raises(serve_client.ServingError, match="not a JPEG or PNG"):
        serve_client.predict(servers[protocol], [jpeg, b"<html>"], protocol=protocol)
    with pytest.raises(serve_client.ServingError, match="larger than the 1000000 pixels"):
        serve_client.predict(
            servers[protocol], [eh.jpeg_with_size(jpeg, 30000, 30000)], protocol=protocol
        )
    with pytest.raises(
        serve_client.ServingError, match=r"image 0: image_bytes\[0\]: JPEG without a frame"
    ) as err:
        serve_client.predict(servers[protocol], [jpeg[:1000]], protocol=protocol)
    assert err.value.refused and "\n" not in str(err.value) and "{{" not in str(err.value)
    # Not a refusal: the transport's error, as it is.
    with pytest.raises(
        serve_client.ServingError,
        match=r"(HTTP 404|gRPC NOT_FOUND): Servable not found for request: Latest\(other\)",
    ):
        serve_client.predict(servers[protocol], [jpeg], protocol=protocol, model_name="other")
    # The server is still up and answering.
    assert serve_client.predict(servers[protocol], [jpeg], protocol=protocol)[
        "embedding"
    ].shape == (
        1,
        32,
    )


@pytest.mark.slow  # 16 s, a tool process: make test-slow
def test_client_tool_prints_embeddings(servers, enc, photos, tmp_path):
    paths = []
    for name, data in photos.items():
        paths.append(str(tmp_path / name))
        with open(paths[-1], "wb") as f:
            f.write(data)
    proc = run_python(
        "tools/serve_client.py",
        f"--server={servers['grpc']}",
        "--protocol=grpc",
        f"--save={tmp_path / 'emb.npy'}",
        *paths,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [line["file"] for line in lines] == paths
    want = eh.reference_from_bytes(enc, list(photos.values()))["embedding"]
    np.testing.assert_allclose([line["embedding"] for line in lines], want, atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.load(tmp_path / "emb.npy"), want, atol=ATOL, rtol=0)

    (tmp_path / "notes.txt").write_text("not an image")
    proc = run_python(
        "tools/serve_client.py",
        f"--server={servers['rest']}",
        paths[0],
        str(tmp_path / "notes.txt"),
        timeout=300,
    )
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[-1] == (
        f"error: {tmp_path / 'notes.txt'}: image_bytes[0]: not a JPEG or PNG image (12 bytes); "
        "only JPEG and PNG are accepted"
    )
    [line] = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert line["file"] == paths[0]
    assert "Traceback" not in proc.stderr


def test_serving_config_files_parse_and_agree_with_the_export():
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    with open(os.path.join(REPO, "serving", "models.config")) as f:
        config = text_format.Parse(f.read(), model_server_config_pb2.ModelServerConfig())
    [model] = config.model_config_list.config
    assert (model.name, model.base_path, model.model_platform) == (
        "simsiam",
        "/models/simsiam",
        "tensorflow",
    )
    assert model.model_version_policy.latest.num_versions == 1

    with open(os.path.join(REPO, "serving", "batching_parameters.txt")) as f:
        text = f.read()
    values = dict(re.findall(r"^(\w+) \{ value: (\w+) \}$", text, re.M))
    # At most the 224 px recipe's 4 images a request (tests/test_batching.py: every recipe).
    assert int(values["max_batch_size"]) == export.default_max_batch(224) == 4
    assert int(values["max_execution_batch_size"]) == 4
    assert values["enable_large_batch_splitting"] == "true"
    assert re.search(r"^pad_variable_length_inputs: false$", text, re.M)

    with open(os.path.join(REPO, "BUILD.md")) as f:
        build = f.read()
    for flag in (
        "-p 8501:8501",
        "-p 8500:8500",
        "--model_config_file=/serving/models.config",
        "--enable_batching=true",
        "--batching_parameters_file=/serving/batching_parameters.txt",
        f'"$PWD/exports/simsiam:{model.base_path}:ro"',
    ):
        assert flag in build, flag


def test_requests_are_planned_within_the_limits(photos):
    jpeg = photos["china.jpg"]  # 427 x 640
    pixels = 427 * 640
    limits = {"max_batch": 3, "max_request_pixels": 2 * pixels + 1, "max_pixels": pixels}
    assert serve_client.declared_pixels(jpeg) == pixels
    assert serve_client.declared_pixels(b"<html>") == 0
    files = [jpeg] * 5
    assert serve_client.plan_requests(files, 32, None) == [(0, 5)]
    assert serve_client.plan_requests(files, 2, None) == [(0, 2), (2, 4), (4, 5)]
    assert serve_client.plan_requests(files, 32, limits) == [(0, 2), (2, 4), (4, 5)]
    limits["max_request_pixels"] = 10 * pixels
    assert serve_client.plan_requests(files, 32, limits) == [(0, 3), (3, 5)]
    assert serve_client.plan_requests([b"x"] * 7, 32, limits) == [(0, 3), (3, 6), (6, 7)]
    # PNG data: each PNG's IDAT bytes count against max_request_png_bytes, a JPEG's do not.
    rng = np.random.default_rng(0)
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (20, 20, 3), np.uint8)).save(buf, "PNG")
    png = buf.getvalue()
    idat = serve_client.png_data_bytes(png)
    assert 1200 < idat < len(png) and serve_client.png_data_bytes(jpeg) == 0
    limits["max_request_png_bytes"] = 2 * idat
    assert serve_client.plan_requests([png, jpeg, png, png, jpeg], 32, limits) == [
        (0, 3),
        (3, 5),
    ]


def test_refusal_line_keeps_the_reason_only():
    message = (
        "assertion failed: [image_bytes[3]: not a JPEG or PNG image (4 bytes); only JPEG and "
        "PNG are accepted]\n\t [[{{function_node __inference_serving_bytes_3334}}"
        "{{node Assert_3/Assert}}]]"
    )
    assert serve_client.refusal_line("HTTP 400: " + message) == (
        "image_bytes[3]: not a JPEG or PNG image (4 bytes); only JPEG and PNG are accepted"
    )
    assert serve_client.refusal_line("gRPC UNAVAILABLE: failed to connect") == (
        "gRPC UNAVAILABLE: failed to connect"
    )


@pytest.mark.parametrize("protocol", ["rest", "grpc"])
def test_more_files_than_a_request_holds_and_a_refused_one(
    servers, enc, saved_model, photos, protocol
):
    """9 files to an export of max_batch 4 (its limits.json, made smaller here): 3 requests;
    a refused file is retried alone, named, and the other 8 are embedded."""
    with open(os.path.join(saved_model, "assets.extra", export.LIMITS_FILE)) as f:
        limits = dict(json.load(f), max_batch=4)
    good = list(photos.values())
    files = [good[i % 2] for i in range(9)]
    files[5] = b"<html>"
    outputs, accepted, refused = serve_client.embed(
        servers[protocol], files, protocol=protocol, limits=limits, batch_size=32
    )
    assert accepted == [0, 1, 2, 3, 4, 6, 7, 8]
    assert list(refused) == [5]
    assert refused[5] == (
        "image_bytes[0]: not a JPEG or PNG image (6 bytes); only JPEG and PNG are accepted"
    )
    want = eh.reference_from_bytes(enc, [files[i] for i in accepted])
    _assert_close(outputs, want)
    with pytest.raises(serve_client.ServingError, match=r"image 5: image_bytes\[0\]: not a JPEG"):
        serve_client.predict(servers[protocol], files, protocol=protocol, limits=limits)
