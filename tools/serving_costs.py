"""What hostile and worst-case legitimate requests cost an export: peak memory and CPU time of
each request answered by `serving_bytes` (a dense batch by `serving_default` or `serving_float`)
in a fresh process (docs/SERVING.md, "Memory").

  python tools/serving_costs.py --saved_model=exports/simsiam [--cases=png_bomb,...]

Each case runs in a process of its own that loads the export, answers a warm-up request (as
TF Serving's warm-up leaves it), resets its peak resident memory (Linux clear_refs) and answers
the request: extra_mb = peak resident memory during the request less the resident memory
before it; cpu_s = user + system CPU time of the request. One JSON line per case, then a table.
The requests are built here for the export's limits (its assets.extra/limits.json).
"""

from __future__ import annotations

import io
import json
import os
import resource
import struct
import subprocess
import sys
import tempfile
import time
import zlib

import cli  # noqa: F401  (first: a quiet TensorFlow start-up)

import numpy as np
from absl import flags

_SAVED_MODEL = flags.DEFINE_string("saved_model", None, "An export: a version or a base path.")
_CASES = flags.DEFINE_list("cases", None, "Cases to run (default: all); see CASES.")

_MB = 1 << 20


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png(width: int, height: int, colour: int, stream: bytes) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", stream)
        + _png_chunk(b"IEND", b"")
    )


def zeros_stream(raw: int, compressed: int) -> bytes:
    """A zlib stream of zeros, at most `compressed` bytes and within a few bytes of it, holding
    as many zeros as fit (about 1030 per byte): `raw` of them for the rows a header declares, the
    rest past them. The same byte-aligned deflate block of 64 MB of zeros is repeated, as a
    compressor of zeros writes, and a shorter one fills what is left."""
    c = zlib.compressobj(9)
    head = c.compress(b"\x00" * raw) + c.flush(zlib.Z_FULL_FLUSH)
    block = c.compress(b"\x00" * (64 * _MB)) + c.flush(zlib.Z_FULL_FLUSH)
    final = b"\x03\x00"  # an empty final block of fixed Huffman codes
    room = compressed - len(head) - len(final) - 4
    count = max(0, room // len(block))
    rest = max(0, (room - count * len(block) - 64) * (64 * _MB) // len(block))
    fill = c.compress(b"\x00" * rest) + c.flush(zlib.Z_FULL_FLUSH) if rest else b""
    adler = zlib.adler32(b"\x00" * raw)
    chunk = b"\x00" * (64 * _MB)
    for _ in range(count):
        adler = zlib.adler32(chunk, adler)
    adler = zlib.adler32(b"\x00" * rest, adler)
    return head + block * count + fill + final + struct.pack(">I", adler)


def _encode(array: np.ndarray, fmt: str, **kwargs) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt, **kwargs)
    return buf.getvalue()


def _photo() -> bytes:
    rng = np.random.default_rng(0)
    return _encode(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8), "JPEG", quality=90)


def _side(limits: dict) -> int:
    return int(np.sqrt(limits["max_pixels"]))


def cases(limits: dict) -> dict:
    """{name: builder of the request: a list of encoded images for serving_bytes, or an array
    [batch, height, width, 3] of uint8 for serving_default, of float32 for serving_float}."""
    from simsiam_tf import decode

    side = _side(limits)
    raw = side * (1 + 3 * side)  # RGB rows of the largest square image
    rgba = b"\x00" * (side * (1 + 4 * side))  # transparent black RGBA rows: composited
    # The most compressed data a PNG declaring max_pixels may carry: its rows' bound, and the
    # export's max_png_bytes (exports made before that limit have only the first).
    bound = min(int(decode.png_data_bound(raw).numpy()), limits.get("max_png_bytes", 1 << 62))
    noise = lambda channels: np.random.default_rng(1).integers(
        0, 256, (side, side, channels), dtype=np.uint8
    )
    budget = min(limits["max_batch"], limits["max_request_pixels"] // limits["max_pixels"])
    # As many PNGs at that bound as a request may hold.
    pngs = max(1, min(budget, limits.get("max_request_png_bytes", 1 << 62) // bound))

    def declaring(progressive: bool):  # a 16x16 JPEG whose frame header declares max_pixels
        jpeg = _encode(np.full((16, 16, 3), 128, np.uint8), "JPEG", progressive=progressive)
        sof = jpeg.index(b"\xff\xc2" if progressive else b"\xff\xc0")
        return [jpeg[: sof + 5] + struct.pack(">HH", side, side) + jpeg[sof + 9 :]]

    def phone_photo():  # 4032 x 3024, smooth with grain, as a camera writes it
        rng = np.random.default_rng(2)
        y, x = np.mgrid[0:3024, 0:4032]
        base = np.stack([(x // 16) % 256, (y // 12) % 256, ((x + y) // 28) % 256], -1)
        grain = rng.integers(0, 8, base.shape)
        return [_encode((base + grain).clip(0, 255).astype(np.uint8), "JPEG", quality=85)]

    def progressive_100_scans():
        jpeg = _encode(np.full((16, 16, 3), 128, np.uint8), "JPEG", progressive=True)
        sof = jpeg.index(b"\xff\xc2")
        jpeg = jpeg[: sof + 5] + struct.pack(">HH", side, side) + jpeg[sof + 9 :]
        start = jpeg.index(b"\xff\xda")
        scans = jpeg[start:-2].split(b"\xff\xda")[1:]
        body = b"".join(b"\xff\xda" + scans[i % len(scans)] for i in range(100))
        return [jpeg[:start] + body + b"\xff\xd9"]

    def many_segments():
        photo = _photo()
        comment = b"\xff\xfe\x00\x02"
        return [photo[:2] + comment * (decode.MAX_HEADER_STEPS - 50) + photo[2:]]

    def long_scans():  # scan data of zeros (no marker) in every image, 256 MB in all
        photo = _photo()
        sos = photo.index(b"\xff\xda")
        header = photo[: sos + 2 + struct.unpack(">H", photo[sos + 2 : sos + 4])[0]]
        return [header + b"\x00" * (256 * _MB // limits["max_batch"])] * limits["max_batch"]

    return {
        "jpeg_long_scans_256mb": long_scans,
        "jpeg_magic_16mb": lambda: [b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + b"\x00" * (16 * _MB)],
        "photo_exif_16mb": lambda: [_photo() + b"Exif\x00\x00" * (16 * _MB // 6)],
        "png_magic_16mb": lambda: [_png(1, 1, 2, b"")[:33] + b"\x00" * (16 * _MB)],
        "png_1x1_bomb_0.5gb": lambda: [_png(1, 1, 2, zeros_stream(4, 512 * 1024))],
        "png_1x1_bombs_max_batch": lambda: (
            [_png(1, 1, 2, zeros_stream(4, 512 * 1024))] * limits["max_batch"]
        ),
        "png_1x1_max_batch": lambda: (
            [_png(1, 1, 2, zlib.compress(b"\x00" * 4))] * limits["max_batch"]
        ),
        "png_max_pixels_at_bound": lambda: [_png(side, side, 2, zeros_stream(raw, bound))],
        "png_max_pixels_at_bound_request": lambda: (
            [_png(side, side, 2, zeros_stream(raw, bound))] * pngs
        ),
        "png_max_pixels_legit_request": lambda: (
            [  # flat black: the same decode, no excess
                _png(side, side, 2, zlib.compress(b"\x00" * raw, 9))
            ]
            * pngs
        ),
        "jpeg_baseline_max_pixels": lambda: declaring(False),
        "jpeg_progressive_max_pixels": lambda: declaring(True),
        "png_rgba_max_pixels": lambda: [_png(side, side, 6, zlib.compress(rgba, 9))],
        "png_rgba_max_pixels_request": lambda: [_png(side, side, 6, zlib.compress(rgba, 9))]
        * budget,
        "jpeg_phone_4032x3024": phone_photo,
        # Dense batches (serving_default, serving_float) of the largest image a request may hold.
        "dense_uint8_max_pixels": lambda: np.zeros((1, side, side, 3), np.uint8),
        "dense_float32_max_pixels": lambda: np.zeros((1, side, side, 3), np.float32),
        "png_max_pixels_noise": lambda: [_encode(noise(3), "PNG", compress_level=0)],
        "png_rgba_noise_request": lambda: [_encode(noise(4), "PNG", compress_level=1)] * budget,
        "jpeg_progressive_100_scans": progressive_100_scans,
        "jpeg_comments_to_the_step_bound": many_segments,
    }


# ------------------------------------------------------------------------------------------------
# The fresh process.


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def _child(saved_model: str, request_file: str) -> None:
    import tensorflow as tf

    loaded = tf.saved_model.load(saved_model)
    value = np.load(request_file, allow_pickle=True)
    warmup = np.zeros((1, 8, 8, 3), np.uint8)
    if value.dtype != object:  # a dense batch of images: uint8 or float32 pixels
        signature = "serving_default" if value.dtype == np.uint8 else "serving_float"
        serve, name = loaded.signatures[signature], "images"
        warmup = warmup.astype(value.dtype)
    else:
        serve, name = loaded.signatures["serving_bytes"], "image_bytes"
        warmup = np.array([tf.io.encode_png(warmup[0]).numpy()], object)
    serve(**{name: tf.constant(warmup)})
    value = tf.constant(value)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_mb("VmRSS")
    usage, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    error = None
    try:
        serve(**{name: value})
    except tf.errors.InvalidArgumentError as err:
        error = next((line for line in err.message.splitlines() if "assertion" in line), "")
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime
    print(
        json.dumps(
            dict(
                extra_mb=round(_status_mb("VmHWM") - before, 1),
                cpu_s=round(cpu, 2),
                wall_s=round(time.perf_counter() - start, 2),
                error=error,
            )
        )
    )


def measure(saved_model: str, encoded: list, timeout: float = 900) -> dict:
    """One request of `encoded` answered in a fresh process: {extra_mb, cpu_s, wall_s, error}."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "request.npy")
        request = encoded if isinstance(encoded, np.ndarray) else np.array(encoded, object)
        np.save(path, request, allow_pickle=True)
        proc = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--child", saved_model, path],
            capture_output=True,
            text=True,
            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
            timeout=timeout,
        )
    if proc.returncode != 0:
        return {"crashed": proc.returncode, "stderr": proc.stderr[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv):
    del argv
    from simsiam_tf import export

    path = _SAVED_MODEL.value
    if not os.path.exists(os.path.join(path, "saved_model.pb")):
        found = export.versions(path)
        if not found:
            sys.exit(f"error: --saved_model={path}: neither a SavedModel nor a base path")
        path = os.path.join(path, str(found[-1]))
    with open(os.path.join(path, "assets.extra", export.LIMITS_FILE)) as f:
        limits = json.load(f)
    builders = cases(limits)
    names = _CASES.value or list(builders)
    unknown = sorted(set(names) - set(builders))
    if unknown:
        sys.exit(f"error: --cases: unknown {unknown}; choose from {sorted(builders)}")
    rows = []
    for name in names:
        encoded = builders[name]()
        result = dict(
            case=name,
            images=len(encoded),
            request_mb=round(
                (encoded.nbytes if isinstance(encoded, np.ndarray) else sum(map(len, encoded)))
                / _MB,
                2,
            ),
        )
        result.update(measure(path, encoded))
        print(json.dumps(result), flush=True)
        rows.append(result)
    print(f"\n{path}: {json.dumps({k: limits[k] for k in export.REQUEST_LIMITS if k in limits})}")
    print(
        "| case | images | request | extra | CPU | answer |\n| --- | --- | --- | --- | --- | --- |"
    )
    for r in rows:
        answer = (
            "served" if not r.get("error") else "refused: " + r["error"].split(": ", 1)[-1][:90]
        )
        print(
            f"| {r['case']} | {r['images']} | {r['request_mb']} MB | {r.get('extra_mb')} MB "
            f"| {r.get('cpu_s')} s | {answer} |"
        )


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        _child(sys.argv[2], sys.argv[3])
    else:
        cli.run(main)
