"""The export served through TensorFlow's C++ loader (serving/cc/serving_check.cc), the loading
path TF Serving's SavedModel servables wrap: built from the installed wheel once per session,
it reads the SignatureDefs, replays the warm-up file, and answers gRPC PredictRequests of photos,
pixels and encoded files exactly as the Python loader does; hostile requests are refused with an
error status, and a base path serves its highest version."""

import os
import re
import shutil

import numpy as np
import pytest
import tensorflow as tf

from simsiam_tf import export
from tests import export_helpers as eh
from tests.helpers import run_python
from tests.test_export import HOSTILE
from tools import serving_cc_check as cc

ATOL = 1e-6  # C++ session vs Python loader, the same graph on the same CPU


@pytest.fixture(scope="session")
def serving_check(tmp_path_factory):
    """The C++ program, built once per test session (about 10 s of g++)."""
    if cc.compiler() is None:
        pytest.skip(
            f"no C++ compiler ({os.environ.get('CXX', 'g++')} not on PATH): the C++ serving "
            "check builds serving/cc/serving_check.cc against the TensorFlow wheel"
        )
    return cc.build(str(tmp_path_factory.mktemp("serving_cc")))


@pytest.fixture(scope="module")
def loaded(saved_model):
    return tf.saved_model.load(saved_model)


@pytest.fixture(scope="module")
def input_specs(loaded):
    """{signature: (input key, numpy dtype)}, from the Python loader's SignatureDefs."""
    return cc.python_signatures(loaded)


def _request(input_specs, signature, value, **kwargs) -> bytes:
    key, _ = input_specs[signature]
    return cc.predict_request(signature, {key: value}, **kwargs)


def _assert_matches_python(got: dict, loaded, signature: str, inputs: dict, keys=None):
    assert got["ok"], got.get("error")
    want = cc.python_outputs(loaded, signature, inputs)
    want = {k: want[k] for k in keys} if keys else want
    assert set(got["outputs"]) == set(want)
    for key, value in want.items():
        np.testing.assert_allclose(got["outputs"][key], value, atol=ATOL, rtol=0, err_msg=key)


# ------------------------------------------------------------------------------------------------
# What TF Serving would be sent: photos and generated images of several sizes, as pixels
# (uint8, float) and as JPEG/PNG files.


def _good_cases() -> dict:
    """{name: (signature, value, output_filter)}."""
    rng = np.random.default_rng(0)
    photos = eh.sample_photos()  # two 427x640 JPEGs the model never saw
    photo_pixels = np.stack([tf.io.decode_jpeg(p).numpy() for p in photos.values()])
    generated = {
        shape: rng.integers(0, 256, shape, dtype=np.uint8)
        for shape in ((3, 20, 28, 3), (2, 5, 7, 3), (1, 1, 1, 3), (1, 37, 23, 3))
    }
    cases = {"photos uint8": ("serving_default", photo_pixels, ())}
    cases["photos float"] = ("serving_float", photo_pixels.astype(np.float32), ())
    for shape, images in generated.items():
        size = "x".join(map(str, shape))
        cases[f"generated {size} uint8"] = ("serving_default", images, ())
        fractional = images.astype(np.float32) + rng.uniform(-0.5, 0.5, shape).astype(np.float32)
        cases[f"generated {size} float"] = ("serving_float", fractional, ())
    wild = generated[(3, 20, 28, 3)].astype(np.float32) * 1.6 - 80.0  # outside 0-255: clipped
    cases["float out of range"] = ("serving_float", wild, ())
    jpegs = list(photos.values())
    pngs = [eh.encode(im, "PNG") for im in generated[(3, 20, 28, 3)]]
    gray = eh.encode(generated[(1, 37, 23, 3)][0, ..., 0], "PNG")
    rgba = eh.encode(
        np.dstack([generated[(1, 37, 23, 3)][0], np.full((37, 23), 200, np.uint8)]), "PNG"
    )
    cases["photos JPEG"] = ("serving_bytes", np.array(jpegs, object), ())
    cases["generated PNG"] = ("serving_bytes", np.array(pngs, object), ())
    cases["JPEG, PNG, grey, RGBA mixed"] = (
        "serving_bytes",
        np.array([jpegs[1], pngs[0], gray, rgba, eh.encode(photo_pixels[0], "JPEG")], object),
        (),
    )
    cases["output filter"] = ("serving_default", generated[(2, 5, 7, 3)], ("embedding",))
    return cases


GOOD = _good_cases()

# Refused by TF Serving's request handling before the graph runs, or by the session.
PROTOCOL = {
    "unknown signature": ("FAILED_PRECONDITION", 'signature key "serving_nope" not found'),
    "saved_model_init_op is no signature": ("INVALID_ARGUMENT", "has method"),
    "unknown input key": ("INVALID_ARGUMENT", "input tensor alias not found in signature: pixels"),
    "no inputs": ("INVALID_ARGUMENT", "input size does not match signature: 0!=1"),
    "unknown output": ("INVALID_ARGUMENT", "output tensor alias not found in signature: logits"),
    "float sent to the uint8 signature": ("INVALID_ARGUMENT", "uint8"),
    "tensor content shorter than its shape": ("INVALID_ARGUMENT", "tensor parsing error: images"),
    "not a PredictRequest": ("INVALID_ARGUMENT", "malformed PredictRequest"),
    # TF Serving's ServerCore and manager, in its words, before any signature is looked at.
    "unknown model name": ("NOT_FOUND", "Servable not found for request: Latest(resnet)"),
    "unknown version": ("NOT_FOUND", "Servable not found for request: Specific(simsiam, 7)"),
    "version 1 by number": (None, None),
    "unknown version label": ("INVALID_ARGUMENT", "Unrecognized servable version label: stable"),
    "no model name": ("INVALID_ARGUMENT", "ModelSpec has no name specified."),
}


def _protocol_requests(input_specs) -> dict:
    images = np.zeros((1, 8, 8, 3), np.uint8)
    short = tf.make_tensor_proto(images)
    short.tensor_content = short.tensor_content[:5]
    from tensorflow_serving.apis import predict_pb2

    bad_content = predict_pb2.PredictRequest()
    bad_content.model_spec.name = "simsiam"
    bad_content.model_spec.signature_name = "serving_default"
    bad_content.inputs["images"].CopyFrom(short)

    def spec(**fields):
        request = predict_pb2.PredictRequest.FromString(
            cc.predict_request("serving_default", {"images": images})
        )
        for name, value in fields.items():
            if name == "version":
                request.model_spec.version.value = value
            else:
                setattr(request.model_spec, name, value)
        return request.SerializeToString()

    return {
        "unknown model name": spec(name="resnet"),
        "unknown version": spec(version=7),
        "version 1 by number": spec(version=1),
        "unknown version label": spec(version_label="stable"),
        "no model name": spec(name=""),
        "unknown signature": cc.predict_request("serving_nope", {"images": images}),
        "saved_model_init_op is no signature": cc.predict_request(
            "__saved_model_init_op", {"images": images}
        ),
        "unknown input key": cc.predict_request("serving_default", {"pixels": images}),
        "no inputs": cc.predict_request("serving_default", {}),
        "unknown output": _request(
            input_specs, "serving_default", images, output_filter=["logits"]
        ),
        "float sent to the uint8 signature": _request(
            input_specs, "serving_default", images.astype(np.float32)
        ),
        "tensor content shorter than its shape": bad_content.SerializeToString(),
        "not a PredictRequest": b"\xff\xff\xff\xff",
    }


def _warmup_requests(saved_model) -> list:
    """The PredictRequests of the export's warm-up file, decoded with tensorflow_serving."""
    from tensorflow_serving.apis import prediction_log_pb2

    path = os.path.join(saved_model, "assets.extra", export.WARMUP_FILE)
    return [
        prediction_log_pb2.PredictionLog.FromString(r.numpy()).predict_log.request
        for r in tf.data.TFRecordDataset(path)
    ]


@pytest.fixture(scope="module")
def served(serving_check, saved_model, input_specs):
    """One run of the C++ program on the export: warm-up, every good request, the warm-up
    requests, every hostile request, then the good requests again."""
    requests = {}
    for name, (signature, value, output_filter) in GOOD.items():
        requests[name] = _request(input_specs, signature, value, output_filter=output_filter)
    default = GOOD["generated 3x20x28x3 uint8"][1]
    key, _ = input_specs["serving_default"]
    requests["no signature name"] = cc.predict_request("", {key: default})
    for i, request in enumerate(_warmup_requests(saved_model)):
        # TF Serving replays warm-up records on the servable itself, whatever their model name;
        # sent as a request, a record needs the served model's name like any other request.
        request.model_spec.name = request.model_spec.name or "simsiam"
        requests[f"warm-up request {i}"] = request.SerializeToString()
    for name, (signature, value, _) in HOSTILE.items():
        requests[f"hostile/{name}"] = _request(input_specs, signature, value)
    for name, request in _protocol_requests(input_specs).items():
        requests[f"protocol/{name}"] = request
    for name in GOOD:
        requests[f"again/{name}"] = requests[name]
    return cc.run(serving_check, saved_model, requests, warmup=True)


def test_signature_defs_read_by_the_cc_loader(served, saved_model):
    from tensorflow.core.framework import types_pb2

    assert served.returncode == 0, served.stderr[-3000:]
    assert served.model["model"] == saved_model and served.model["version"] == 1
    described = served.model["signatures"]
    assert set(described) == set(export.SIGNATURES)
    session = eh.SessionModel(saved_model)  # the TF1 loader's view of the same SignatureDefs
    try:
        for name, sig in described.items():
            want = session.signatures[name]
            assert sig["method_name"] == want.method_name == "tensorflow/serving/predict"
            for side in ("inputs", "outputs"):
                expected = getattr(want, side)
                assert set(sig[side]) == set(expected), (name, side)
                for key, info in sig[side].items():
                    shape = expected[key].tensor_shape
                    assert info["name"] == expected[key].name
                    assert info["dtype"] == types_pb2.DataType.Name(expected[key].dtype)
                    assert info["shape"] == (
                        None if shape.unknown_rank else [d.size for d in shape.dim]
                    )
    finally:
        session.close()
    assert {n: list(s["inputs"]) for n, s in described.items()} == {
        n: [k] for n, k in export.SIGNATURE_INPUTS.items()
    }
    assert described["serving_default"]["inputs"]["images"]["dtype"] == "DT_UINT8"
    assert described["serving_float"]["inputs"]["images"]["dtype"] == "DT_FLOAT"
    assert described["serving_bytes"]["inputs"]["image_bytes"]["dtype"] == "DT_STRING"
    for sig in described.values():  # declared with unknown rank: every check is in the graph
        assert all(info["shape"] is None for info in sig["inputs"].values())
        assert sig["outputs"]["embedding"]["shape"] == [-1, 32]


def test_warmup_file_replays_through_the_cc_session(served, saved_model):
    records = [line for line in served.warmup if "record" in line]
    [summary] = [line for line in served.warmup if "records" in line]
    want = [r.model_spec.signature_name for r in _warmup_requests(saved_model)]
    assert summary["ok"] and summary["records"] == len(want) == len(export.SIGNATURES)
    assert [r["signature"] for r in records] == want
    assert all(r["ok"] and r["outputs"]["embedding"] == [2, 32] for r in records)


@pytest.mark.parametrize("case", list(GOOD) + ["no signature name"])
def test_cc_outputs_equal_the_python_loader(case, served, loaded, input_specs):
    if case == "no signature name":  # TF Serving's default: serving_default
        signature, value, keys = "serving_default", GOOD["generated 3x20x28x3 uint8"][1], ()
    else:
        signature, value, keys = GOOD[case]
    inputs = {input_specs[signature][0]: value}
    got = served.responses[case]
    _assert_matches_python(got, loaded, signature, inputs, keys)
    assert got["signature"] == signature and got["model_spec"]["version"] == 1
    assert got["outputs"]["embedding"].shape == (len(value), 32)
    if "embedding_normalized" in got["outputs"]:
        norms = np.linalg.norm(got["outputs"]["embedding_normalized"], axis=1)
        np.testing.assert_allclose(norms, 1.0, atol=1e-5)


def test_warmup_requests_equal_the_python_loader(served, loaded, saved_model):
    for i, request in enumerate(_warmup_requests(saved_model)):
        inputs = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
        got = served.responses[f"warm-up request {i}"]
        _assert_matches_python(got, loaded, request.model_spec.signature_name, inputs)


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_input_is_an_error_status(case, served):
    got = served.responses[f"hostile/{case}"]
    assert not got["ok"], f"{case} was answered"
    assert got["code"] == "INVALID_ARGUMENT"
    assert re.search(HOSTILE[case][2], got["error"]), got["error"]
    # Refused before anything is allocated for it: a 30000 x 30000 header would cost 2.7 GB.
    names = list(served.responses)
    before = served.responses[names[names.index(f"hostile/{case}") - 1]]
    assert got["max_rss_mb"] - before["max_rss_mb"] < 300


@pytest.mark.parametrize("case", sorted(PROTOCOL))
def test_malformed_requests_are_an_error_status(case, served):
    got = served.responses[f"protocol/{case}"]
    code, message = PROTOCOL[case]
    if code is None:  # the version served, asked by its number
        assert got["ok"] and got["model_spec"]["version"] == 1, got
        return
    assert not got["ok"] and got["code"] == code
    assert message in got["error"], got["error"]


def test_good_requests_still_answered_after_hostile_ones(served):
    for name in GOOD:
        again = served.responses[f"again/{name}"]
        assert again["ok"], again.get("error")
        for key, value in served.responses[name]["outputs"].items():
            np.testing.assert_allclose(again["outputs"][key], value, atol=ATOL, rtol=0)


def test_cifar10_photos(serving_check, saved_model, loaded, input_specs, cifar10_folder, tmp_path):
    test_dir = os.path.join(cifar10_folder, "test")
    paths = sorted(
        os.path.join(d, f) for d, _, files in os.walk(test_dir) for f in files if f.endswith(".jpg")
    )[::10]
    photo = str(tmp_path / "flower.jpg")  # a 427x640 photo among the 32x32 ones
    with open(photo, "wb") as f:
        f.write(eh.sample_photos()["flower.jpg"])
    requests, cases = cc.photo_requests(paths + [photo], input_specs)
    pixels = np.stack([tf.io.decode_jpeg(open(p, "rb").read()).numpy() for p in paths])
    assert pixels.shape == (len(paths), 32, 32, 3)
    cases["batch uint8"] = ("serving_default", {input_specs["serving_default"][0]: pixels})
    cases["batch float"] = (
        "serving_float",
        {input_specs["serving_float"][0]: pixels.astype(np.float32)},
    )
    for name in ("batch uint8", "batch float"):
        requests[name] = cc.predict_request(*cases[name])
    result = cc.run(serving_check, saved_model, requests)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(cases) == len(paths) * 2 + 1 + 2 + 2
    for name, (signature, inputs) in cases.items():
        _assert_matches_python(result.responses[name], loaded, signature, inputs)


# ------------------------------------------------------------------------------------------------
# Warm-up files that must fail the check.


def _prediction_log(signature: str, inputs: dict) -> bytes:
    from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

    request = predict_pb2.PredictRequest.FromString(cc.predict_request(signature, inputs))
    log = prediction_log_pb2.PredictionLog(
        predict_log=prediction_log_pb2.PredictLog(request=request)
    )
    return log.SerializeToString()


def test_malformed_warmup_fails_the_check(serving_check, saved_model, tmp_path):
    from tensorflow_serving.apis import prediction_log_pb2

    good = os.path.join(saved_model, "assets.extra", export.WARMUP_FILE)
    records = [r.numpy() for r in tf.data.TFRecordDataset(good)]
    with open(good, "rb") as f:
        raw = f.read()
    probe = export.probe_images(16)
    classify = prediction_log_pb2.PredictionLog()
    classify.classify_log.request.model_spec.signature_name = "serving_default"
    flipped = bytearray(raw)
    flipped[len(raw) // 2] ^= 0xFF  # inside a record's payload: its CRC no longer matches

    def write(name, recs):
        path = str(tmp_path / name)
        with tf.io.TFRecordWriter(path) as writer:
            for r in recs:
                writer.write(r)
        return path

    files = {  # name: (path, records replayed before the failure, message)
        "garbage record": (
            write("garbage", [records[0], b"\xff\xff\xff\xff"]),
            1,
            "Failed to parse warmup record",
        ),
        "unknown signature": (
            write("signature", [_prediction_log("serving_nope", {"images": probe})]),
            0,
            '"serving_nope" not found',
        ),
        "wrong input key": (
            write("key", [_prediction_log("serving_default", {"pixels": probe})]),
            0,
            "input tensor alias not found",
        ),
        "refused input": (
            write("empty", records + [_prediction_log("serving_default", {"images": probe[:0]})]),
            3,
            "empty batch",
        ),
        "not a predict log": (
            write("classify", [classify.SerializeToString()]),
            0,
            "Unsupported log_type",
        ),
        "corrupted record": (str(tmp_path / "flipped"), None, "corrupted record"),
        "truncated file": (str(tmp_path / "truncated"), None, "truncated record"),
        "missing file": (str(tmp_path / "missing"), 0, "No such file"),
    }
    (tmp_path / "flipped").write_bytes(bytes(flipped))
    (tmp_path / "truncated").write_bytes(raw[:-10])
    paths = [good] + [path for path, _, _ in files.values()]
    result = cc.run(serving_check, saved_model, warmup_files=paths)
    assert result.returncode == 1, result.stderr[-3000:]
    summaries = {line["warmup_file"]: line for line in result.warmup if "records" in line}
    assert summaries[good]["ok"] and summaries[good]["records"] == 3
    for name, (path, replayed, message) in files.items():
        summary = summaries[path]
        assert not summary["ok"], name
        assert message in summary["error"], (name, summary["error"])
        if replayed is not None:
            assert summary["records"] == replayed, name

    # The check of an export whose own warm-up file is malformed fails.
    broken = tmp_path / "broken" / "1"
    shutil.copytree(saved_model, broken)
    shutil.copy(files["garbage record"][0], broken / "assets.extra" / export.WARMUP_FILE)
    result = cc.run(serving_check, str(broken.parent), warmup=True)
    assert result.returncode == 1 and not result.warmup[-1]["ok"]


# ------------------------------------------------------------------------------------------------
# Versions on disk: the latest by default, version 1 by path.


def test_base_path_serves_the_latest_version_and_version_1_by_path(
    serving_check, saved_model, tmp_path, tmp_path_factory
):
    base = tmp_path / "simsiam"
    shutil.copytree(saved_model, base / "1")
    shutil.copytree(eh.exported(tmp_path_factory, projection=True), base / "2")  # + projection
    shutil.copytree(saved_model, base / ".tmp-3-k2j9x1")  # a version being written
    (base / "12x").mkdir()
    (base / "30").write_text("a file, not a version")
    assert export.versions(str(base)) == [1, 2]
    photos = list(eh.sample_photos().values())
    images = np.random.default_rng(7).integers(0, 256, (2, 24, 18, 3), dtype=np.uint8)
    cases = {
        "bytes": ("serving_bytes", {"image_bytes": np.array(photos, object)}),
        "uint8": ("serving_default", {"images": images}),
    }
    requests = {name: cc.predict_request(sig, inputs) for name, (sig, inputs) in cases.items()}
    for path, version, outputs in (
        (base, 2, {"embedding", "embedding_normalized", "projection"}),
        (base / "1", 1, {"embedding", "embedding_normalized"}),
    ):
        result = cc.run(serving_check, str(path), requests, warmup=True)
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.model["model"] == str(base / str(version))
        assert result.model["version"] == version
        assert set(result.model["signatures"]["serving_bytes"]["outputs"]) == outputs
        assert result.warmup[-1]["ok"] and result.warmup[-1]["records"] == 3
        python = tf.saved_model.load(str(base / str(version)))
        for name, (signature, inputs) in cases.items():
            got = result.responses[name]
            assert got["model_spec"]["version"] == version
            _assert_matches_python(got, python, signature, inputs)

    nothing = tmp_path / "nothing"
    (nothing / ".tmp-1-abc").mkdir(parents=True)
    result = cc.run(serving_check, str(nothing))
    assert result.returncode == 2 and "neither a SavedModel" in result.model["error"]


@pytest.mark.slow  # 18 s, a tool process: make test-slow
def test_the_check_tool(serving_check, saved_model, tmp_path):
    photo = tmp_path / "china.jpg"
    photo.write_bytes(eh.sample_photos()["china.jpg"])
    png = tmp_path / "generated.png"
    png.write_bytes(eh.encode(GOOD["generated 1x37x23x3 uint8"][1][0], "PNG"))
    proc = run_python(
        "tools/serving_cc_check.py",
        f"--saved_model={os.path.dirname(saved_model)}",
        f"--build_dir={os.path.dirname(serving_check)}",
        str(photo),
        str(png),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0] == f"loaded {saved_model} (version 1)"
    assert lines[1] == "warm-up: 3 records replayed"
    assert re.fullmatch(r"5 requests: max \|C\+\+ - Python\| = \S+ \(atol 1e-06\)", lines[2])
    assert lines[3] == "OK"

    broken = tmp_path / "broken" / "1"
    shutil.copytree(saved_model, broken)
    with tf.io.TFRecordWriter(str(broken / "assets.extra" / export.WARMUP_FILE)) as writer:
        writer.write(b"\x08")  # a varint tag with no value
    with pytest.raises(cc.CheckError, match="warm-up failed.*Failed to parse warmup record"):
        cc.check(serving_check, str(broken.parent), [str(photo)], ATOL)
