"""Batching parameters that agree with the export's limits: the shipped file and an export's
own, parsed with TF Serving's BatchingParameters message, and the arithmetic behind them."""

import json
import os

import pytest
from google.protobuf import (
    descriptor_pb2,
    descriptor_pool,
    message_factory,
    text_format,
    wrappers_pb2,
)

from simsiam_tf import export
from tests import export_helpers as eh
from tests.conftest import REPO
from tests.helpers import run_python

# TF Serving's message BatchingParameters, field for field, from
# tensorflow_serving/servables/tensorflow/session_bundle_config.proto (tensorflow/serving at
# 9d981c5c2708d23c5407c7c1e30309e6f9798874); the wheel of tensorflow-serving-api does not ship
# that file. (name, number, wrapper type or scalar type, repeated)
_BATCHING_FIELDS = [
    ("max_batch_size", 1, "Int64Value"),
    ("batch_timeout_micros", 2, "Int64Value"),
    ("max_enqueued_batches", 3, "Int64Value"),
    ("num_batch_threads", 4, "Int64Value"),
    ("thread_pool_name", 5, "StringValue"),
    ("allowed_batch_sizes", 6, "repeated int64"),
    ("pad_variable_length_inputs", 7, "bool"),
    ("enable_large_batch_splitting", 8, "BoolValue"),
    ("max_execution_batch_size", 9, "Int64Value"),
]


def _batching_parameters_class():
    F = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(
        name="tensorflow_serving/servables/tensorflow/session_bundle_config.proto",
        package="tensorflow.serving",
        dependency=["google/protobuf/wrappers.proto"],
        syntax="proto3",
    )
    message = proto.message_type.add(name="BatchingParameters")
    for name, number, kind in _BATCHING_FIELDS:
        field = message.field.add(name=name, number=number, label=F.LABEL_OPTIONAL)
        if kind == "repeated int64":
            field.label, field.type = F.LABEL_REPEATED, F.TYPE_INT64
        elif kind == "bool":
            field.type = F.TYPE_BOOL
        else:
            field.type, field.type_name = F.TYPE_MESSAGE, f".google.protobuf.{kind}"
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(wrappers_pb2.DESCRIPTOR.serialized_pb)
    pool.Add(proto)
    return message_factory.GetMessageClass(
        pool.FindMessageTypeByName("tensorflow.serving.BatchingParameters")
    )


BatchingParameters = _batching_parameters_class()


def _parse(text: str):
    return text_format.Parse(text, BatchingParameters())


def _check_agrees(params, limits: dict):
    """TF Serving's own rules (batching_session.cc, bundle_factory_util.h) and the limits'."""
    assert params.enable_large_batch_splitting.value
    assert not params.pad_variable_length_inputs
    assert not params.allowed_batch_sizes
    requests, merged = params.max_batch_size.value, params.max_execution_batch_size.value
    assert 1 <= merged <= requests <= limits["max_batch"]
    # Any merged batch: at most `merged` images of at most max_pixels each.
    assert merged * limits["max_pixels"] <= limits["max_request_pixels"]
    # ... and at most `merged` PNGs of at most max_png_bytes of compressed data each.
    assert merged * limits["max_png_bytes"] <= limits["max_request_png_bytes"]
    assert params.num_batch_threads.value >= 1 and params.batch_timeout_micros.value > 0


def test_the_message_is_tf_servings():
    with pytest.raises(text_format.ParseError):
        _parse("max_batch_size: 4")  # a wrapper, not a plain number
    with pytest.raises(text_format.ParseError):
        _parse("max_batch_sizes { value: 4 }")
    assert _parse("max_execution_batch_size { value: 3 }").max_execution_batch_size.value == 3


@pytest.mark.parametrize("size", [16, 32, 64, 96, 224, 512])
@pytest.mark.parametrize("request_images", [1, 4, 10])
@pytest.mark.parametrize("request_pngs", [2, 4, 10])
def test_generated_parameters_agree_with_any_limits(size, request_images, request_pngs):
    max_pixels = export.default_max_pixels(size)
    limits = export.resolve_limits(
        size,
        max_request_pixels=request_images * max_pixels,
        max_png_bytes=1000,
        max_request_png_bytes=request_pngs * 1000 + 999,
    )
    params = _parse(export.export_batching_text(limits))
    _check_agrees(params, limits)
    assert params.max_batch_size.value == limits["max_batch"]
    expected = min(limits["max_batch"], request_images, request_pngs)
    assert params.max_execution_batch_size.value == expected


def test_limits_that_refuse_their_own_largest_image_are_refused():
    with pytest.raises(
        export.ExportError, match="max_request_png_bytes=99 is below max_png_bytes=100"
    ):
        export.resolve_limits(32, max_png_bytes=100, max_request_png_bytes=99)
    with pytest.raises(
        export.ExportError, match="max_png_bytes=0 must be a positive number of bytes"
    ):
        export.resolve_limits(32, max_png_bytes=0)
    defaults = export.resolve_limits(224)
    assert defaults["max_png_bytes"] == export.DEFAULT_MAX_PNG_BYTES
    assert defaults["max_request_png_bytes"] == 4 * export.DEFAULT_MAX_PNG_BYTES


def test_the_shipped_file_is_generated_and_agrees_with_every_recipe():
    """40 one-photo requests to a 32 px export merged into one batch of up to 64 were refused
    together (more than max_request_pixels); the 224 px export accepts 4 images at most."""
    with open(os.path.join(REPO, "serving", "batching_parameters.txt")) as f:
        shipped = f.read()
    proc = run_python("tools/batching_parameters.py")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == shipped
    params = _parse(shipped)
    sizes = {32, 224}
    assert "(32 px)" in shipped and "(224 px)" in shipped
    for size in sizes:
        _check_agrees(params, export.resolve_limits(size))
    assert (params.max_batch_size.value, params.max_execution_batch_size.value) == (4, 4)
    assert run_python("tools/batching_parameters.py", "--check").returncode == 0


def test_an_export_writes_its_limits_and_batching_parameters(tmp_path_factory):
    version = eh.exported(tmp_path_factory)
    extra = os.path.join(version, "assets.extra")
    with open(os.path.join(extra, export.LIMITS_FILE)) as f:
        limits = json.load(f)
    with open(os.path.join(extra, export.METADATA_FILE)) as f:
        metadata = json.load(f)
    for key in export.REQUEST_LIMITS + ("max_aspect_ratio",):
        assert limits[key] == metadata[key]
    assert limits["max_batch"] == export.default_max_batch(16) == 256
    assert limits["images_per_execution"] == 4
    with open(os.path.join(extra, export.BATCHING_FILE)) as f:
        params = _parse(f.read())
    _check_agrees(params, limits)
    assert params.max_batch_size.value == 256 and params.max_execution_batch_size.value == 4


def test_the_cost_tools_hostile_png_fills_its_budget_and_is_a_valid_stream():
    """tools/serving_costs.py measures the PNG-data worst case with zeros_stream: it must use
    the whole budget (whole 64 MB blocks alone left a third of it unused) and be a complete
    stream, inflating far past the declared rows. In a process of its own: the tool defines
    absl flags that another tool of the suite defines too."""
    code = (
        "import sys, zlib; sys.path.insert(0, 'tools')\n"
        "from serving_costs import zeros_stream\n"
        "for raw, budget in ((4, 1041), (3003000, 196608)):\n"
        "    stream = zeros_stream(raw, budget)\n"
        "    inflater, out, rest = zlib.decompressobj(), 0, stream\n"
        "    while rest:\n"
        "        out += len(inflater.decompress(rest, 1 << 26))\n"
        "        rest = inflater.unconsumed_tail\n"
        "    print(raw, budget, len(stream), out, inflater.eof)\n"
    )
    proc = run_python("-c", code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for line in proc.stdout.split("\n")[-3:-1]:
        raw, budget, length, out, eof = line.split()
        assert int(budget) - 100 <= int(length) <= int(budget) and eof == "True"
        assert int(out) > 500 * int(length) and int(out) > int(raw)
    assert export.DEFAULT_MAX_PNG_BYTES == 196608


def test_serving_costs_legitimate_cases_declare_the_largest_accepted_image():
    """The Memory table's legitimate rows are the worst case only if their images declare
    max_pixels: each JPEG and PNG is read back by PIL (header only) and the dense batches'
    shapes checked, for limits small enough to build quickly."""
    code = (
        "import io, json, sys; sys.path.insert(0, 'tools')\n"
        "from PIL import Image\n"
        "from serving_costs import cases\n"
        "built = cases(dict(max_pixels=4096, max_request_pixels=16384, max_batch=8,\n"
        "                   max_png_bytes=196608, max_request_png_bytes=786432))\n"
        "out = {}\n"
        "for name in ('jpeg_baseline_max_pixels', 'jpeg_progressive_max_pixels',\n"
        "             'png_rgba_max_pixels', 'png_rgba_max_pixels_request',\n"
        "             'png_max_pixels_legit_request'):\n"
        "    images = [Image.open(io.BytesIO(b)) for b in built[name]()]\n"
        "    out[name] = [[im.format, im.mode, *im.size] for im in images]\n"
        "for name in ('dense_uint8_max_pixels', 'dense_float32_max_pixels'):\n"
        "    a = built[name]()\n"
        "    out[name] = [str(a.dtype), *a.shape]\n"
        "print(json.dumps(out))\n"
    )
    proc = run_python("-c", code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["jpeg_baseline_max_pixels"] == [["JPEG", "RGB", 64, 64]]
    assert out["jpeg_progressive_max_pixels"] == [["JPEG", "RGB", 64, 64]]
    assert out["png_rgba_max_pixels"] == [["PNG", "RGBA", 64, 64]]
    # The request's pixel budget: 16384 / 4096 = 4 images (max_batch 8 allows more).
    assert out["png_rgba_max_pixels_request"] == [["PNG", "RGBA", 64, 64]] * 4
    assert out["png_max_pixels_legit_request"] == [["PNG", "RGB", 64, 64]] * 4
    assert out["dense_uint8_max_pixels"] == ["uint8", 1, 64, 64, 3]
    assert out["dense_float32_max_pixels"] == ["float32", 1, 64, 64, 3]
