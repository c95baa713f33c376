"""SavedModel export: versioned atomic layout, signatures that match the in-memory encoder in a
fresh process and through saved_model_cli, and hostile input refused with InvalidArgument."""

import hashlib
import io
import json
import os
import re
import resource
import shutil
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import tensorflow as tf

from simsiam_tf import data, export, train
from tests import export_helpers as eh
from tests.conftest import REPO

ATOL = 1e-5
SAVED_MODEL_CLI = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")


@pytest.fixture(scope="module")
def loaded(saved_model):
    return tf.saved_model.load(saved_model)


@pytest.fixture(scope="module")
def session_model(saved_model):
    model = eh.SessionModel(saved_model)
    yield model
    model.close()


def _snapshot(folder):
    out = {}
    for dirpath, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _assert_close(got: dict, want: dict, atol=ATOL):
    assert set(got) == set(want)
    for key in want:
        np.testing.assert_allclose(np.asarray(got[key]), np.asarray(want[key]), atol=atol, rtol=0)


def _env():
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")


# ------------------------------------------------------------------------------------------------
# Layout.


def test_versions_are_written_aside_then_renamed_and_never_overwritten(run, tmp_path, monkeypatch):
    base = tmp_path / "models" / "simsiam"
    first = export.export(run, str(base))
    assert first == str(base / "1")
    before = _snapshot(first)
    assert "saved_model.pb" in before and "assets.extra/tf_serving_warmup_requests" in before
    (base / ".tmp-9-crashed").mkdir()  # left by a killed export: TF Serving and we ignore it
    (base / "notes").mkdir()

    written = []
    real_save = export.save

    def watching_save(functions, path, metadata=None):
        # While a version is written, only the finished versions carry all-digit names.
        assert os.path.dirname(path) == str(base) and not os.path.basename(path).isdigit()
        assert export.versions(str(base)) == [1]
        real_save(functions, path, metadata)
        written.append(path)

    monkeypatch.setattr(export, "save", watching_save)
    second = export.export(run, str(base))
    assert second == str(base / "2") and not os.path.exists(written[0])
    assert _snapshot(first) == before  # the first version is untouched
    _assert_close(
        tf.saved_model.load(second).signatures["serving_default"](
            images=tf.constant(export.probe_images(16))
        ),
        tf.saved_model.load(first).signatures["serving_default"](
            images=tf.constant(export.probe_images(16))
        ),
        atol=0,
    )

    with pytest.raises(export.ExportError, match="already exists.*never overwritten"):
        export.export(run, str(base), version=1)
    assert _snapshot(first) == before
    assert sorted(os.listdir(base)) == [".tmp-9-crashed", "1", "2", "notes"]

    # A failure half way leaves neither a version nor a temporary directory.
    def failing_save(functions, path, metadata=None):
        with open(os.path.join(path, "saved_model.pb"), "wb") as f:
            f.write(b"half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(export, "save", failing_save)
    with pytest.raises(RuntimeError, match="disk full"):
        export.export(run, str(base))
    assert sorted(os.listdir(base)) == [".tmp-9-crashed", "1", "2", "notes"]


def test_next_version_is_one_past_the_highest(tmp_path):
    assert export.versions(str(tmp_path / "missing")) == []
    for name in ("1", "2", "7", "0012x", ".tmp-13-abc", "latest"):
        (tmp_path / name).mkdir()
    (tmp_path / "30").write_text("a file, not a version")
    assert export.versions(str(tmp_path)) == [1, 2, 7]


@pytest.mark.slow  # 18 s, tool processes: make test-slow
def test_export_tool_versions_and_refusal(run, tmp_path):
    base = str(tmp_path / "simsiam")
    cmd = [sys.executable, "tools/export.py", f"--workdir={run}", f"--export_dir={base}"]
    proc = subprocess.run(
        cmd + ["--version=3"], cwd=REPO, capture_output=True, text=True, env=_env(), timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == os.path.join(base, "3")
    proc = subprocess.run(
        cmd + ["--version=3"], cwd=REPO, capture_output=True, text=True, env=_env(), timeout=600
    )
    assert proc.returncode != 0
    assert "error:" in proc.stderr and "already exists" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(os.listdir(base)) == ["3"]


def test_metadata_and_missing_weights(run, saved_model, tmp_path):
    with open(os.path.join(saved_model, "assets.extra", export.METADATA_FILE)) as f:
        meta = json.load(f)
    assert meta["version"] == 1 and meta["image_size"] == 16
    assert meta["weights"].endswith("backbone.weights.h5")
    assert meta["outputs"] == [export.EMBEDDING, export.EMBEDDING_NORMALIZED]
    # The defaults of a 16 px model: 1 MP per image, 256 images, 4 MP per request.
    assert meta["max_pixels"] == export.default_max_pixels(16) == 1_000_000
    assert meta["max_batch"] == export.default_max_batch(16) == 256
    assert meta["max_request_pixels"] == 4_000_000 and meta["max_aspect_ratio"] == 16
    assert meta["config"]["model"]["backbone"] == "cnn_small"

    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(os.path.join(run, "config.json"), unfinished)
    with pytest.raises(export.ExportError, match="backbone.weights.h5 not found.*--projection"):
        export.load_encoder(str(unfinished))
    with pytest.raises(export.ExportError, match="no checkpoint"):
        export.load_encoder(str(unfinished), projection=True)
    assert not os.path.exists(tmp_path / "out")


# ------------------------------------------------------------------------------------------------
# Signatures: same numbers as the in-memory encoder, in a fresh process and through the CLI.


def test_fresh_process_matches_the_in_memory_encoder(saved_model, enc, tmp_path):
    rng = np.random.default_rng(0)
    wide = rng.integers(0, 256, (3, 20, 28, 3), dtype=np.uint8)  # not the training size
    small = rng.integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)  # smaller than it
    np.save(tmp_path / "wide.npy", wide)
    np.save(tmp_path / "small.npy", small)
    np.save(tmp_path / "wide_float.npy", wide.astype(np.float32))
    specs = [
        f"wide=npy:serving_default:{tmp_path / 'wide.npy'}",
        f"small=npy:serving_default:{tmp_path / 'small.npy'}",
        f"float=npy:serving_float:{tmp_path / 'wide_float.npy'}",
    ]
    out = tmp_path / "out.npz"
    proc = subprocess.run(
        [sys.executable, "-m", "tests.export_helpers", saved_model, str(out), *specs],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=_env(),
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.load(out)
    for name, images in (("wide", wide), ("small", small), ("float", wide)):
        want = {k: v.numpy() for k, v in enc(images).items()}
        _assert_close({k: got[f"{name}/{k}"] for k in want}, want)
    norms = np.linalg.norm(got["wide/embedding_normalized"], axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)


def test_saved_model_cli_shows_signatures_and_runs_a_npy(saved_model, enc, tmp_path):
    cli = (
        [SAVED_MODEL_CLI]
        if os.path.exists(SAVED_MODEL_CLI)
        else [
            sys.executable,
            "-m",
            "tensorflow.python.tools.saved_model_cli",
        ]
    )
    proc = subprocess.run(
        cli + ["show", "--dir", saved_model, "--all"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in export.SIGNATURES:
        assert f"signature_def['{name}']" in proc.stdout
    for text in ("inputs['images']", "inputs['image_bytes']", "DT_UINT8", "DT_STRING"):
        assert text in proc.stdout
    assert "outputs['embedding']" in proc.stdout
    assert "outputs['embedding_normalized']" in proc.stdout

    images = np.random.default_rng(1).integers(0, 256, (2, 24, 18, 3), dtype=np.uint8)
    np.save(tmp_path / "x.npy", images)
    outdir = tmp_path / "cli_out"
    proc = subprocess.run(
        cli
        + ["run", "--dir", saved_model, "--tag_set", "serve", "--signature_def"]
        + ["serving_default", "--inputs", f"images={tmp_path / 'x.npy'}", "--outdir", str(outdir)],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    want = enc(images)
    for key in (export.EMBEDDING, export.EMBEDDING_NORMALIZED):
        np.testing.assert_allclose(np.load(outdir / f"{key}.npy"), want[key], atol=ATOL, rtol=0)


def test_float_input_is_clipped_like_uint8(loaded):
    images = np.random.default_rng(2).integers(0, 256, (2, 11, 13, 3), dtype=np.uint8)
    as_uint8 = loaded.signatures["serving_default"](images=tf.constant(images))
    as_float = loaded.signatures["serving_float"](images=tf.constant(images.astype(np.float32)))
    _assert_close(as_float, as_uint8, atol=0)
    # Out-of-range floats are clipped to [0, 255], exactly as those pixels at 0 and 255.
    wild = images.astype(np.float32)
    wild[..., 0] = np.where(images[..., 0] > 127, 300.0, -40.0)
    clipped = images.copy()
    clipped[..., 0] = np.where(images[..., 0] > 127, 255, 0)
    _assert_close(
        loaded.signatures["serving_float"](images=tf.constant(wild)),
        loaded.signatures["serving_default"](images=tf.constant(clipped)),
        atol=0,
    )


def _centre_crop_run(run, tmp_path):
    """A copy of the tiny run whose config evaluates with eval_crop_fraction 0.875."""
    crop_run = tmp_path / "crop_run"
    shutil.copytree(run, crop_run)
    with open(crop_run / "config.json") as f:
        config = json.load(f)
    config["data"]["eval_crop_fraction"] = 0.875
    with open(crop_run / "config.json", "w") as f:
        json.dump(config, f)
    return crop_run


def test_centre_crop_preprocessing_any_size(run, tmp_path):
    """A run evaluated with eval_crop_fraction 0.875 (resize the shorter side, centre-crop):
    the export reproduces that path for images of any shape."""
    crop_run = _centre_crop_run(run, tmp_path)
    path = export.export(str(crop_run), str(tmp_path / "m"))  # checks itself before the rename
    enc = export.load_encoder(str(crop_run))
    assert enc.crop_fraction == 0.875
    serve = tf.saved_model.load(path).signatures
    rng = np.random.default_rng(3)
    for shape in ((1, 37, 23, 3), (2, 16, 16, 3), (1, 5, 80, 3), (1, 1, 1, 3)):
        images = rng.integers(0, 256, shape, dtype=np.uint8)
        _assert_close(serve["serving_default"](images=tf.constant(images)), enc(images))
        encoded = [eh.encode(im, "PNG") for im in images]
        _assert_close(
            serve["serving_bytes"](image_bytes=tf.constant(encoded)),
            eh.reference_from_bytes(enc, encoded),
        )


def test_projection_export_matches_the_training_checkpoint(tmp_path_factory, run, loaded):
    path = eh.exported(tmp_path_factory, projection=True)
    serve = tf.saved_model.load(path).signatures
    config = train.load_config(run)
    net, opt = train.build_model_and_optimizer(config, steps_per_epoch=1)
    latest = tf.train.latest_checkpoint(os.path.join(run, "checkpoints"))
    tf.train.Checkpoint(model=net, optimizer=opt).restore(latest).assert_existing_objects_matched()
    images = np.random.default_rng(4).integers(0, 256, (3, 19, 17, 3), dtype=np.uint8)
    x = data.eval_preprocess(images, config.data.image_size, config.data.eval_crop_fraction)
    embedding = net.backbone(x, training=False)
    got = serve["serving_default"](images=tf.constant(images))
    assert set(got) == {export.EMBEDDING, export.EMBEDDING_NORMALIZED, export.PROJECTION}
    np.testing.assert_allclose(got[export.EMBEDDING], embedding, atol=ATOL, rtol=0)
    np.testing.assert_allclose(
        got[export.PROJECTION], net.projector(embedding, training=False), atol=ATOL, rtol=0
    )
    # The checkpoint's backbone is the one backbone.weights.h5 holds at the end of the run.
    plain = loaded.signatures["serving_default"](images=tf.constant(images))
    np.testing.assert_allclose(got[export.EMBEDDING], plain[export.EMBEDDING], atol=ATOL, rtol=0)


def test_warmup_requests_replay_in_a_tf_serving_style_session(saved_model, session_model):
    from tensorflow_serving.apis import prediction_log_pb2

    warmup = os.path.join(saved_model, "assets.extra", export.WARMUP_FILE)
    signatures = []
    for record in tf.data.TFRecordDataset(warmup):
        log = prediction_log_pb2.PredictionLog.FromString(record.numpy())
        request = log.predict_log.request
        inputs = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
        out = session_model.predict(request.model_spec.signature_name, inputs)
        assert out[export.EMBEDDING].shape == (2, 32)
        signatures.append(request.model_spec.signature_name)
    assert sorted(signatures) == sorted(export.SIGNATURES)


def test_warmup_records_are_the_serving_protos_bytes_without_the_package(tmp_path):
    """The records are built from the wire format, so exporting needs only TensorFlow (the
    tensorflow-serving-api wheel requires the `tensorflow` package): byte for byte what the
    package's protos serialize, and written with the package unimportable."""
    from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

    for signature, (name, value) in export._probe_requests(16).items():
        request = predict_pb2.PredictRequest()
        request.model_spec.signature_name = signature
        request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
        log = prediction_log_pb2.PredictionLog(
            predict_log=prediction_log_pb2.PredictLog(request=request)
        )
        assert export.warmup_record(signature, name, value) == log.SerializeToString(
            deterministic=True
        )
    path = str(tmp_path / export.WARMUP_FILE)
    code = (
        "import sys; sys.modules['tensorflow_serving'] = None\n"
        "from simsiam_tf import export\n"
        f"export._write_warmup({path!r}, export._probe_requests(16))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = {}
    for record in tf.data.TFRecordDataset(path):
        request = prediction_log_pb2.PredictionLog.FromString(record.numpy()).predict_log.request
        got[request.model_spec.signature_name] = {
            k: tf.make_ndarray(v) for k, v in request.inputs.items()
        }
    for signature, (name, value) in export._probe_requests(16).items():
        np.testing.assert_array_equal(got[signature][name], value)


def test_verify_catches_a_mismatch(saved_model, run):
    other = export.load_encoder(run)
    other.backbone.get_layer("conv1").kernel.assign_add(
        tf.ones_like(other.backbone.get_layer("conv1").kernel)
    )
    with pytest.raises(export.ExportError, match="differs from the in-memory encoder"):
        export.verify(saved_model, other)


# ------------------------------------------------------------------------------------------------
# Hostile input: InvalidArgument from the graph, in Python and as TF Serving runs it.


def _photo_jpeg():
    return eh.sample_photos()["china.jpg"]


def _small_png():
    image = np.random.default_rng(5).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    return eh.encode(image, "PNG")


def _hostile_cases():
    jpeg = _photo_jpeg()
    png = _small_png()
    tiny_png = eh.encode(np.zeros((1, 1, 3), np.uint8), "PNG")
    zeros = lambda *shape: np.zeros(shape, np.uint8)
    return {
        # serving_bytes
        "empty bytes batch": ("serving_bytes", np.array([], object), "empty batch"),
        "scalar bytes": ("serving_bytes", np.array(jpeg, object), "must be a batch"),
        "bytes rank 2": ("serving_bytes", np.array([[jpeg]], object), "must be a batch"),
        "non-image bytes": (
            "serving_bytes",
            np.array([b"GET / HTTP/1.1\r\n"], object),
            "not a JPEG or PNG",
        ),
        "empty string": ("serving_bytes", np.array([b""], object), "not a JPEG or PNG"),
        "GIF refused": (
            "serving_bytes",
            np.array([eh.encode(zeros(4, 4, 3), "GIF")], object),
            "not a JPEG or PNG",
        ),
        "truncated JPEG": (
            "serving_bytes",
            np.array([jpeg[: len(jpeg) // 2]], object),
            r"image_bytes\[0\]: corrupt or truncated JPEG",
        ),
        "JPEG header only": ("serving_bytes", np.array([jpeg[:200]], object), "JPEG"),
        "truncated PNG": (
            "serving_bytes",
            np.array([png, png[: len(png) // 2]], object),
            r"image_bytes\[1\]: corrupt or truncated PNG",
        ),
        "PNG signature only": ("serving_bytes", np.array([png[:20]], object), "truncated PNG"),
        **{
            f"{n} bytes from the PNG signature": (
                "serving_bytes",
                np.array([png[:n]], object),
                r"image_bytes\[0\]: truncated PNG",
            )
            for n in (8, 9, 10, 11, 12, 16)
        },
        "JPEG declaring 30000x30000": (
            "serving_bytes",
            np.array([eh.jpeg_with_size(jpeg, 30000, 30000)], object),
            r"image_bytes\[0\]: image of 30000 x 30000 pixels larger than the 1000000 pixels",
        ),
        "PNG declaring 30000x30000": (
            "serving_bytes",
            np.array([eh.png_with_size(png, 30000, 30000)], object),
            "larger than the 1000000 pixels",
        ),
        "PNG declaring 2^31-1 x 2^31-1": (
            "serving_bytes",
            np.array([eh.png_with_size(png, 2**31 - 1, 2**31 - 1)], object),
            "larger than",
        ),
        "one bad image among good ones": (
            "serving_bytes",
            np.array([png, b"\xff\xd8\xff garbage", png], object),
            r"image_bytes\[1\]: JPEG without a frame header",
        ),
        "too many images": (
            "serving_bytes",
            np.array([tiny_png] * 257, object),
            "batch larger than the 256",
        ),
        # serving_default
        "empty image batch": ("serving_default", zeros(0, 8, 8, 3), "empty batch"),
        "one image without batch": ("serving_default", zeros(8, 8, 3), "must be a batch"),
        "rank 5": ("serving_default", zeros(1, 1, 8, 8, 3), "must be a batch"),
        "scalar": ("serving_default", np.uint8(7), "must be a batch"),
        "4 channels": ("serving_default", zeros(1, 8, 8, 4), "3 channels"),
        "1 channel": ("serving_default", zeros(1, 8, 8, 1), "3 channels"),
        "zero width": ("serving_default", zeros(1, 8, 0, 3), "width must be at least 1"),
        "too many tiny images": ("serving_default", zeros(257, 1, 1, 3), "batch larger than"),
        # serving_float
        "NaN": ("serving_float", np.full((1, 8, 8, 3), np.nan, np.float32), "finite"),
        "inf": ("serving_float", np.full((1, 8, 8, 3), np.inf, np.float32), "finite"),
        "float wrong rank": ("serving_float", np.zeros((8, 8, 3), np.float32), "must be a batch"),
    }


HOSTILE = _hostile_cases()


def test_hand_made_headers_declare_huge_images():
    """The patched files are otherwise real: libjpeg reads 30000 x 30000 from the JPEG's frame
    header, and the PNG's IHDR chunk carries a valid CRC."""
    huge_jpeg = HOSTILE["JPEG declaring 30000x30000"][1][0]
    assert list(tf.io.extract_jpeg_shape(huge_jpeg).numpy()) == [30000, 30000, 3]
    huge_png = HOSTILE["PNG declaring 30000x30000"][1][0]
    assert struct.unpack(">II", huge_png[16:24]) == (30000, 30000)
    assert struct.unpack(">I", huge_png[29:33])[0] == zlib.crc32(huge_png[12:29])


def _peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_input_is_refused_by_the_signature(case, loaded, session_model):
    signature, value, message = HOSTILE[case]
    input_name = export.SIGNATURE_INPUTS[signature]
    peak = _peak_rss_mb()
    with pytest.raises(tf.errors.InvalidArgumentError, match=message) as err:
        loaded.signatures[signature](**{input_name: tf.constant(value)})
    assert all(c.isprintable() or c in "\n\t" for c in err.value.message), err.value.message
    # TF Serving feeds the request to the SignatureDef's tensors in a TF1 session.
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        session_model.predict(signature, {input_name: value})
    # A header declaring 30000 x 30000 would take 2.7 GB to decode: it is refused unread.
    assert _peak_rss_mb() - peak < 300


def test_good_requests_still_work_after_hostile_ones(loaded, session_model, enc):
    photos = list(eh.sample_photos().values())
    want = eh.reference_from_bytes(enc, photos)
    _assert_close(loaded.signatures["serving_bytes"](image_bytes=tf.constant(photos)), want)
    _assert_close(
        session_model.predict("serving_bytes", {"image_bytes": np.array(photos, object)}), want
    )


def test_limits_are_configurable(enc):
    functions = export.ServingFunctions(enc, max_pixels=100, max_batch=2)
    serve = tf.function(
        functions.serving_default, input_signature=[export.INPUT_SPECS["serving_default"]]
    )
    serve_bytes = tf.function(
        functions.serving_bytes, input_signature=[export.INPUT_SPECS["serving_bytes"]]
    )
    assert serve(tf.zeros((2, 10, 10, 3), tf.uint8))[export.EMBEDDING].shape == (2, 32)
    with pytest.raises(tf.errors.InvalidArgumentError, match="larger than the 100 pixels"):
        serve(tf.zeros((1, 10, 11, 3), tf.uint8))
    with pytest.raises(tf.errors.InvalidArgumentError, match="batch larger than the 2 images"):
        serve(tf.zeros((3, 4, 4, 3), tf.uint8))
    png = eh.encode(np.zeros((11, 10, 3), np.uint8), "PNG")
    with pytest.raises(tf.errors.InvalidArgumentError, match="larger than the 100 pixels"):
        serve_bytes(tf.constant([png]))
    for bad in (dict(max_pixels=0), dict(max_batch=0), dict(max_request_pixels=0)):
        with pytest.raises(export.ExportError, match="must be a positive"):
            export.ServingFunctions(enc, **bad)
    with pytest.raises(export.ExportError, match="below max_pixels"):
        export.ServingFunctions(enc, max_pixels=100, max_request_pixels=99)
    tight = export.ServingFunctions(enc, max_pixels=100, max_batch=8, max_request_pixels=250)
    serve = tf.function(
        tight.serving_default, input_signature=[export.INPUT_SPECS["serving_default"]]
    )
    assert serve(tf.zeros((2, 10, 10, 3), tf.uint8))[export.EMBEDDING].shape == (2, 32)
    with pytest.raises(
        tf.errors.InvalidArgumentError, match=r"images\[2\]: the images up to this one hold 300"
    ):
        serve(tf.zeros((3, 10, 10, 3), tf.uint8))


def test_default_limits_follow_the_input_size():
    assert [export.default_max_pixels(s) for s in (16, 32, 64, 224)] == [
        1_000_000,
        1_000_000,
        1_048_576,
        12_845_056,
    ]
    assert 4032 * 3024 <= export.default_max_pixels(224)  # a 12 MP phone photo
    assert [export.default_max_batch(s) for s in (16, 32, 64, 96, 224, 512)] == [
        256,
        256,
        64,
        16,
        4,
        1,
    ]


# ------------------------------------------------------------------------------------------------
# Small hostile requests, each answered in a fresh process with its peak memory measured, by
# exports at 32 px (the whole image resized) and at 224 px (centre crop 0.875): refused with
# InvalidArgument, or served within a memory bound that follows what is served.


@pytest.fixture(scope="module")
def sized(run, tmp_path_factory):
    """{32: version dir, 224: version dir}: the tiny run exported with image_size 32 and
    eval_crop_fraction 1.0, and with 224 and 0.875, at the default limits."""
    out = {}
    for size, crop in ((32, 1.0), (224, 0.875)):
        workdir = tmp_path_factory.mktemp(f"run{size}")
        shutil.copytree(run, workdir, dirs_exist_ok=True)
        with open(workdir / "config.json") as f:
            config = json.load(f)
        config["data"].update(image_size=size, eval_crop_fraction=crop)
        with open(workdir / "config.json", "w") as f:
            json.dump(config, f)
        out[size] = export.export(str(workdir), str(tmp_path_factory.mktemp("m") / "simsiam"))
    return out


def _encoder_of(version_dir):
    with open(os.path.join(version_dir, "assets.extra", export.METADATA_FILE)) as f:
        return export.load_encoder(json.load(f)["workdir"])


def _bytes(*encoded):
    return np.array(list(encoded), object)


def _refused(result, pattern):
    assert result["error_type"] == "InvalidArgumentError", result
    assert re.search(pattern, result["error"]), result["error"]
    assert all(c.isprintable() or c in "\n\t" for c in result["error"])
    assert result["extra_mb"] < 30, result  # refused before anything in proportion is made


def _served(result, max_mb):
    assert result["error"] is None, result["error"]
    assert result["extra_mb"] < max_mb and result["seconds"] < 20, result


@pytest.mark.parametrize("size", [32, 224])
def test_thin_and_tall_images_are_refused_beyond_the_aspect_bound(sized, size, tmp_path):
    aspect = r"more elongated than the 16:1 aspect ratio"
    results = eh.measure(
        sized[size],
        [
            ("serving_bytes", _bytes(eh.flat_png(1, 1_000_000))),  # 1 KB; was +410 MB at 32 px
            ("serving_bytes", _bytes(eh.flat_png(1, 2000))),  # 81 bytes; was +1.57 GB at 224 px
            ("serving_bytes", _bytes(eh.flat_png(2000, 1))),
            ("serving_bytes", _bytes(eh.jpeg_with_size(eh.flat_jpeg(), 1, 65_500))),
            ("serving_default", np.zeros((1, 1, 1_000_000, 3), np.uint8)),  # was 15.4 GB
            ("serving_float", np.zeros((2, 17, 1, 3), np.float32)),
        ],
        tmp_path,
    )
    for result in results[:4]:
        _refused(result, r"image_bytes\[0\]: image of \d+ x \d+ pixels " + aspect)
    for result in results[4:]:
        _refused(result, r"images\[0\]: image of \d+ x \d+ pixels " + aspect)


@pytest.mark.parametrize(
    "size",
    [32, pytest.param(224, marks=pytest.mark.slow)],  # 224: make test-slow
)
def test_elongated_images_within_the_bound_cost_what_is_served(sized, size, tmp_path):
    """16:1 at the largest accepted size: the resize allocates output height x input width, so
    the bound keeps it at image_size x sqrt(16 max_pixels) floats."""
    max_pixels = export.default_max_pixels(size)
    height = int(np.sqrt(max_pixels / 16))
    [wide] = eh.measure(
        sized[size], [("serving_bytes", _bytes(eh.flat_png(height, 16 * height)))], tmp_path
    )
    [tall] = eh.measure(
        sized[size],
        [("serving_default", np.zeros((1, 16 * height, height, 3), np.uint8))],
        tmp_path,
    )
    _served(wide, {32: 40, 224: 160}[size])
    _served(tall, {32: 40, 224: 160}[size])


@pytest.mark.parametrize(
    "size",
    [32, pytest.param(224, marks=pytest.mark.slow)],  # 224: make test-slow
)
def test_declared_sizes_below_the_limit_cost_a_bounded_amount(sized, size, tmp_path):
    """Small files whose headers declare the largest accepted image (libjpeg decodes the
    missing rows as flat grey): served within a bound; one pixel more, refused; a request
    holding more than max_request_pixels, refused naming the image that crosses it."""
    max_pixels = export.default_max_pixels(size)
    side = int(np.sqrt(max_pixels))
    flat, progressive = eh.flat_jpeg(), eh.flat_jpeg(progressive=True)
    jpeg = eh.jpeg_with_size(flat, side, side)
    budget = export.REQUEST_PIXELS_PER_IMAGE
    over_budget = budget + 1  # images of the largest size, one more than a request may hold
    refused = eh.measure(
        sized[size],
        [
            ("serving_bytes", _bytes(eh.jpeg_with_size(flat, 6324, 6324))),  # was +593 MB
            ("serving_bytes", _bytes(eh.jpeg_with_size(flat, side + 1, side))),
            ("serving_bytes", _bytes(*[jpeg] * over_budget)),
            ("serving_default", np.zeros((1, side, side, 3), np.uint8)[:, : side // 2]),
        ],
        tmp_path,
    )
    _refused(
        refused[0], rf"image_bytes\[0\]: image of 6324 x 6324 pixels larger than the {max_pixels}"
    )
    _refused(refused[1], rf"larger than the {max_pixels} pixels")
    if over_budget <= export.default_max_batch(size):
        _refused(
            refused[2],
            rf"image_bytes\[{budget}\]: the images up to this one hold {over_budget * side**2} "
            rf"pixels, more than the {budget * max_pixels} this export accepts in one request",
        )
    else:  # at 224 px the batch limit (4 images) binds first
        _refused(refused[2], r"image_bytes: batch larger than the 4 images")
    _served(refused[3], {32: 30, 224: 100}[size])
    # Served, each in a process of its own: the largest image as a progressive JPEG (libjpeg
    # keeps its coefficients at full size whatever the DCT scale) and as a transparent PNG (the
    # costliest per pixel), and a request of as many baseline JPEGs of that size as it may hold.
    requests = {
        "progressive JPEG": (_bytes(eh.jpeg_with_size(progressive, side, side)), 60),
        "RGBA PNG": (_bytes(eh.flat_png(side, side, "RGBA")), {32: 40, 224: 200}[size]),
        "full request": (_bytes(*[jpeg] * min(budget, export.default_max_batch(size))), 30),
    }
    for name, (value, bound) in requests.items():
        [result] = eh.measure(sized[size], [("serving_bytes", value)], tmp_path)
        _served(dict(result, case=name), bound)


@pytest.mark.parametrize("size", [32, 224])
def test_every_refusal_is_invalid_argument_naming_the_image(sized, size, tmp_path):
    """8 to 11 bytes starting with the PNG signature were a UnicodeDecodeError (a slice past the
    end, whose message quoted the bytes); a decoder failure named no image."""
    png = eh.encode(np.zeros((30, 40, 3), np.uint8), "PNG")
    photo = eh.sample_photos()["china.jpg"]
    results = eh.measure(
        sized[size],
        [("serving_bytes", _bytes(png[:n])) for n in range(8, 16)]
        + [
            ("serving_bytes", _bytes(png, photo[:-2000])),  # libjpeg fails on the second
            ("serving_bytes", _bytes(png, png[:-20])),  # zlib fails on the second
            ("serving_bytes", _bytes(png, b"\xff\xd8\xff\xe0\x00\x02" + b"\xfe" * 6)),
            ("serving_float", np.stack([np.zeros((4, 4, 3)), np.full((4, 4, 3), np.nan)])),
        ],
        tmp_path,
    )
    for result in results[:8]:
        _refused(result, r"image_bytes\[0\]: truncated PNG \(no IHDR header; \d+ bytes\)")
    _refused(results[8], r"image_bytes\[1\]: corrupt or truncated JPEG data")
    _refused(results[9], r"image_bytes\[1\]: corrupt or truncated PNG data")
    _refused(results[10], r"image_bytes\[1\]: JPEG without a frame header")
    _refused(results[11], r"images\[1\]: not finite")


def test_a_jpeg_of_thousands_of_scans_is_refused(loaded):
    """Each scan is another pass over the coefficients: 1000 in 30 KB cost 0.7 s to decode at
    12.8 MP, and a few such files per request would pass 20 s."""
    progressive = eh.jpeg_with_size(eh.flat_jpeg(progressive=True), 200, 200)
    start = progressive.index(b"\xff\xda")
    scans = progressive[start:-2].split(b"\xff\xda")[1:]
    assert 5 <= len(scans) <= export.MAX_JPEG_SCANS

    def with_scans(n):
        body = b"".join(b"\xff\xda" + scans[i % len(scans)] for i in range(n))
        return progressive[:start] + body + b"\xff\xd9"

    serve = loaded.signatures["serving_bytes"]
    assert serve(image_bytes=[progressive])["embedding"].shape == (1, 32)
    with pytest.raises(
        tf.errors.InvalidArgumentError, match=r"image_bytes\[1\]: JPEG of 1000 scans, more than"
    ):
        serve(image_bytes=[progressive, with_scans(1000)])


def test_a_phone_photo_is_decoded_at_a_dct_scale(sized, tmp_path):
    """A 12-megapixel photo served at 224 px is decoded at 1/4 scale (0.76 MP), bit for bit as
    evaluation decodes it, and embeds close to its full-size decode."""
    y, x = np.mgrid[0:3024, 0:4032]
    photo = np.stack([x % 256, y % 256, (x // 16 + y // 16) % 256], -1).astype(np.uint8)
    jpeg = eh.encode(photo, "JPEG", quality=90)
    assert int(data.eval_jpeg_ratio(tf.constant(3024), tf.constant(4032), 224, 0.875)) == 4
    [result] = eh.measure(sized[224], [("serving_bytes", _bytes(jpeg))], tmp_path)
    _served(result, 25)  # its full-size decode alone is 36.6 MB
    enc224 = _encoder_of(sized[224])
    got = tf.saved_model.load(sized[224]).signatures["serving_bytes"](image_bytes=[jpeg])
    _assert_close({k: v.numpy() for k, v in got.items()}, eh.reference_from_bytes(enc224, [jpeg]))
    scaled = data.decode_rgb(jpeg, ratio=4)
    assert scaled.shape == (756, 1008, 3)
    np.testing.assert_array_equal(
        data.decode_eval(jpeg, 224, 0.875), data.eval_preprocess(scaled, 224, 0.875)
    )
    full = data.eval_preprocess(data.decode_rgb(jpeg), 224, 0.875)
    assert float(tf.reduce_mean(tf.abs(data.decode_eval(jpeg, 224, 0.875) - full))) < 0.02


# ------------------------------------------------------------------------------------------------
# What users see is what is embedded: EXIF orientation and transparency, in training (which
# decodes with data.decode_rgb), evaluation (data.decode_eval) and serving alike.

_SHOWN = {  # EXIF orientation -> the stored pixels as a viewer shows them
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),  # a phone held upright: stored sideways, turned clockwise
    7: lambda a: np.rot90(a, 2).transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}


def _phone_jpeg(height=48, width=80):
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack([x * 3, y * 5, (x + 2 * y) % 256], -1).astype(np.uint8)
    return eh.encode(image, "JPEG", quality=95)


@pytest.mark.parametrize("big_endian", [False, True])
def test_exif_orientation_is_applied_when_decoding(big_endian):
    from PIL import Image, ImageOps

    plain = _phone_jpeg()
    stored = data.decode_rgb(plain).numpy()
    for orientation, shown in _SHOWN.items():
        jpeg = eh.with_exif_orientation(plain, orientation, big_endian)
        assert int(data.jpeg_orientation(jpeg)) == orientation
        np.testing.assert_array_equal(data.decode_rgb(jpeg), shown(stored))
        # PIL agrees on the geometry (its IDCT differs by a few levels).
        pil = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(jpeg))), np.int16)
        assert pil.shape == shown(stored).shape
        assert np.abs(pil - shown(stored)).mean() < 3
        for crop in (1.0, 0.875, 0.5):  # only the kept region is turned: the same pixels
            np.testing.assert_array_equal(
                data.decode_eval(jpeg, 24, crop), data.eval_preprocess(shown(stored), 24, crop)
            )
    # No Exif, a cut-off one, or nonsense in it: as stored.
    for jpeg in (
        plain,
        eh.with_exif_orientation(plain, 6)[:60],
        eh.with_exif_orientation(plain, 9),
    ):
        assert int(data.jpeg_orientation(jpeg)) == 1


def test_decode_rgb_in_a_data_pipeline_takes_each_kind_of_file_its_own_way():
    """A JPEG upright as stored (no Exif, or orientation 1) takes libjpeg alone, a turned one
    libjpeg and `orient`, a PNG the general decoder: in a tf.data map as training runs it,
    each file comes out as a viewer shows it, at ratio 1 and 2."""
    plain = _phone_jpeg()
    stored = tf.io.decode_jpeg(plain, channels=3).numpy()
    rgba = np.dstack([stored, np.full(stored.shape[:2], 128, np.uint8)])
    files = [plain, eh.with_exif_orientation(plain, 6), eh.with_exif_orientation(plain, 1)]
    files += [eh.encode(rgba, "PNG"), eh.with_exif_orientation(plain, 3)]
    for ratio in (1, 2):
        ds = tf.data.Dataset.from_tensor_slices(files).map(lambda b, r=ratio: data.decode_rgb(b, r))
        got = [x.numpy() for x in ds]
        want = tf.io.decode_jpeg(plain, channels=3, ratio=ratio).numpy()
        np.testing.assert_array_equal(got[0], want)
        np.testing.assert_array_equal(got[1], np.rot90(want, -1))
        np.testing.assert_array_equal(got[2], want)
        over_white = np.round(stored * (128 / 255) + 255 * (127 / 255)).astype(np.uint8)
        np.testing.assert_array_equal(got[3], over_white)  # PNGs are never scaled
        np.testing.assert_array_equal(got[4], want[::-1, ::-1])


def test_exif_orientation_in_the_eval_pipeline_and_serving(loaded, enc, tmp_path):
    """A portrait photo stored sideways (orientation 6) embeds as the upright image, through
    evaluation's image-folder pipeline and through serving_bytes."""
    plain = _phone_jpeg()
    sideways = eh.with_exif_orientation(plain, 6)
    upright = np.rot90(data.decode_rgb(plain).numpy(), -1)
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(sideways)
    source = data.load_source(f"folder:{folder}", "train")
    [(pixels, _)] = list(data.eval_dataset(source, 16, 1))
    np.testing.assert_array_equal(pixels[0], data.eval_preprocess(upright, 16, 1.0))
    got = loaded.signatures["serving_bytes"](image_bytes=[sideways])
    _assert_close({k: v.numpy() for k, v in got.items()}, enc(upright[None]))


def test_transparency_is_composited_onto_white():
    from PIL import Image

    rng = np.random.default_rng(7)
    rgba = rng.integers(0, 256, (9, 13, 4), dtype=np.uint8)
    rgba[0, :, 3], rgba[1, :, 3] = 0, 255
    alpha = rgba[..., 3:].astype(np.float64) / 255
    want = np.round(rgba[..., :3] * alpha + data.ALPHA_BACKGROUND * (1 - alpha)).astype(np.uint8)
    got = data.decode_rgb(eh.encode(rgba, "PNG")).numpy()
    np.testing.assert_array_equal(got, want)
    assert (got[0] == 255).all() and (got[1] == rgba[1, :, :3]).all()
    grey_alpha = Image.fromarray(rgba).convert("LA")
    buf = io.BytesIO()
    grey_alpha.save(buf, "PNG")
    la = np.asarray(grey_alpha, np.float64)
    want_la = np.round(la[..., 0] * la[..., 1] / 255 + 255 * (1 - la[..., 1] / 255))
    np.testing.assert_array_equal(data.decode_rgb(buf.getvalue())[..., 0], want_la)
    for crop in (1.0, 0.875):  # evaluation composites only the region it keeps: same pixels
        np.testing.assert_array_equal(
            data.decode_eval(eh.encode(rgba, "PNG"), 8, crop), data.eval_preprocess(got, 8, crop)
        )


def test_transparent_png_serves_as_its_composite(loaded, enc):
    rgba = np.random.default_rng(8).integers(0, 256, (20, 30, 4), dtype=np.uint8)
    png = eh.encode(rgba, "PNG")
    got = loaded.signatures["serving_bytes"](image_bytes=[png])
    composite = data.decode_rgb(png).numpy()
    _assert_close({k: v.numpy() for k, v in got.items()}, enc(composite[None]))
    # ... and not as the colour under the alpha, which PNG decoders return by default.
    opaque = loaded.signatures["serving_default"](images=rgba[None, ..., :3])
    assert np.abs(got["embedding"].numpy() - opaque["embedding"].numpy()).max() > 1e-3


def test_eval_crops_before_resizing_and_serving_matches_it(run, tmp_path):
    """The eval pipeline of an image folder and the export of the same run give the same
    numbers for images of any shape, including big JPEGs decoded at a DCT scale."""
    from PIL import Image

    rng = np.random.default_rng(9)
    folder = tmp_path / "images"
    folder.mkdir()
    files = []
    for i, (h, w) in enumerate(((37, 23), (300, 520), (1100, 700), (5, 80))):
        base = rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)
        image = np.asarray(Image.fromarray(base).resize((w, h), Image.BILINEAR))
        fmt = "JPEG" if i % 2 else "PNG"
        path = folder / f"{i}.{fmt.lower()}"
        path.write_bytes(eh.encode(image, fmt))
        files.append(path)
    crop_run = _centre_crop_run(run, tmp_path)
    # The 1100 x 700 PNG holds about 220 KB of data, above the default max_png_bytes.
    path = export.export(str(crop_run), str(tmp_path / "m"), max_png_bytes=1 << 20)
    enc = export.load_encoder(str(crop_run))
    source = data.load_source(f"folder:{folder}", "train")
    [(pixels, _)] = list(data.eval_dataset(source, 16, 8, crop_fraction=0.875))
    encoded = [open(source.files[i], "rb").read() for i in range(4)]
    for i, e in enumerate(encoded):
        np.testing.assert_array_equal(pixels[i], data.decode_eval(e, 16, 0.875))
    got = tf.saved_model.load(path).signatures["serving_bytes"](image_bytes=encoded)
    want = export._outputs(enc.backbone, enc.projector, pixels)  # the eval pipeline's pixels
    _assert_close({k: v.numpy() for k, v in got.items()}, {k: v.numpy() for k, v in want.items()})


# ------------------------------------------------------------------------------------------------
# Bounded header reads, legal JPEGs, PNG data bounded by the declared rows.


def _segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload


def test_legal_jpegs_embed_as_the_same_image_without_their_segments(loaded):
    """61 comments, an ICC profile in 70 chunks and FF DA inside payloads were refused (the
    old walk gave up after 64 segments, and counted FF DA anywhere as a scan)."""
    photo = _photo_jpeg()
    profile = np.random.default_rng(3).integers(0, 256, 65519 * 69 + 7, np.uint8).tobytes()
    from PIL import Image

    icc = io.BytesIO()
    Image.open(io.BytesIO(photo)).save(icc, "JPEG", quality=95, icc_profile=profile)
    plain = io.BytesIO()
    Image.open(io.BytesIO(photo)).save(plain, "JPEG", quality=95)
    with_icc, without_icc = icc.getvalue(), plain.getvalue()
    assert with_icc.count(b"\xff\xe2") >= 70
    comments = photo[:2] + b"".join(_segment(0xFE, b"%d \xff\xda" % i) for i in range(61))
    variants = [
        comments + photo[2:],
        photo[:2] + _segment(0xFE, b"\xff\xda" * 150) + photo[2:],
    ]
    serve = loaded.signatures["serving_bytes"]
    got = serve(image_bytes=tf.constant([photo, *variants, without_icc, with_icc]))["embedding"]
    got = got.numpy()
    np.testing.assert_array_equal(got[1], got[0])
    np.testing.assert_array_equal(got[2], got[0])
    np.testing.assert_array_equal(got[4], got[3])


def _png_bomb(height, width, zeros):
    raw = b"".join(b"\x00" + b"\x00" * (3 * width) for _ in range(height))
    c = zlib.compressobj(9)
    stream = c.compress(raw + b"\x00" * zeros) + c.flush()
    chunk = lambda kind, body: (
        struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    )
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", stream) + chunk(b"IEND", b"")
    )


def test_a_png_whose_data_outgrows_its_rows_is_refused_before_decoding(loaded):
    """A 1x1 PNG inflating to 0.5 GB was accepted (libpng inflates to the end of the stream)
    and cost 1.3-1.8 s of CPU; within the bound it is served, past it refused by name."""
    bomb = _png_bomb(1, 1, 64 << 20)  # 64 MB of zeros past the one row: 65 KB of data
    fine = _png_bomb(1, 1, 0)
    serve = loaded.signatures["serving_bytes"]
    assert tf.io.decode_png(bomb).shape == (1, 1, 3)  # libpng accepts it
    with pytest.raises(
        tf.errors.InvalidArgumentError,
        match=r"image_bytes\[1\]: PNG of \d+ bytes of compressed image data \(IDAT\), more than "
        r"the 1041 that its declared 1 x 1 pixels can need",
    ):
        serve(image_bytes=tf.constant([fine, bomb]))
    assert serve(image_bytes=tf.constant([fine]))["embedding"].shape == (1, 32)


def _idat_bytes(png: bytes) -> int:
    pos, total = 8, 0
    while pos < len(png):
        size = struct.unpack(">I", png[pos : pos + 4])[0]
        total += size if png[pos + 4 : pos + 8] == b"IDAT" else 0
        pos += 12 + size
    return total


def test_png_data_is_limited_per_image_and_per_request(enc):
    """Within its rows' bound a PNG's compressed data can still inflate 1000-fold past them (a
    stream of zeros), so decoding work is bounded by max_png_bytes and max_request_png_bytes."""
    rng = np.random.default_rng(3)
    noise = [eh.encode(rng.integers(0, 256, (20, 20 + i, 3), np.uint8), "PNG") for i in range(3)]
    sizes = [_idat_bytes(png) for png in noise]
    assert sizes[0] < sizes[1] < sizes[2] and sizes[0] > 1200  # incompressible: rows + stored
    functions = export.ServingFunctions(
        enc, max_png_bytes=sizes[1], max_request_png_bytes=sizes[0] + sizes[1]
    )
    serve = tf.function(
        functions.serving_bytes, input_signature=[export.INPUT_SPECS["serving_bytes"]]
    )
    photo = eh.encode(rng.integers(0, 256, (30, 30, 3), np.uint8), "JPEG")
    # At each limit exactly: served (a JPEG counts against no PNG limit).
    assert serve(tf.constant([noise[0], photo, noise[1]]))[export.EMBEDDING].shape == (3, 32)
    with pytest.raises(
        tf.errors.InvalidArgumentError,
        match=rf"image_bytes\[1\]: PNG of {sizes[2]} bytes of compressed image data \(IDAT\), "
        rf"more than the {sizes[1]} this export accepts per PNG \(max_png_bytes",
    ):
        serve(tf.constant([noise[0], noise[2]]))
    with pytest.raises(
        tf.errors.InvalidArgumentError,
        match=rf"image_bytes\[2\]: the PNGs up to this one hold {sizes[0] + sizes[1] + sizes[0]} "
        rf"bytes of compressed image data \(IDAT\), more than the {sizes[0] + sizes[1]} this "
        "export accepts in one request",
    ):
        serve(tf.constant([noise[0], noise[1], noise[0]]))
    assert functions.limits()["max_request_png_bytes"] == sizes[0] + sizes[1]


@pytest.mark.parametrize("size", [32, 224])
def test_huge_requests_cost_a_few_mb_before_their_refusal(sized, size, tmp_path):
    """16 MB after the JPEG magic cost +496-512 MB before its refusal (split on FF DA), and 16 MB
    of "Exif\\0\\0" after a photo +48 MB (split in the Exif probe)."""
    photo = _photo_jpeg()
    results = eh.measure(
        sized[size],
        [
            ("serving_bytes", _bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(16 << 20))),
            ("serving_bytes", _bytes(photo + b"Exif\x00\x00" * ((16 << 20) // 6))),
            ("serving_bytes", _bytes(_png_bomb(1, 1, 0)[:33] + bytes(16 << 20))),
        ],
        tmp_path,
    )
    _refused(results[0], r"image_bytes\[0\]: JPEG without a frame header")
    assert results[0]["extra_mb"] < 4, results[0]
    _served(results[1], 16)
    _refused(results[2], r"image_bytes\[0\]: PNG whose headers could not be followed")
    assert results[2]["extra_mb"] < 4, results[2]
