"""The byte-level rules of simsiam_tf/decode.py: the bounded walks over a JPEG's markers and a
PNG's chunks, against files built here byte by byte and against PIL's reading of them."""

import io
import struct
import zlib

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from simsiam_tf import decode

RNG = np.random.default_rng(19)
PIXELS = RNG.integers(0, 256, (40, 60, 3), dtype=np.uint8)


def _jpeg(**kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(PIXELS).save(buf, "JPEG", quality=90, **kwargs)
    return buf.getvalue()


def _segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload


def _after_soi(jpeg: bytes, *segments: bytes) -> bytes:
    return jpeg[:2] + b"".join(segments) + jpeg[2:]


def _walk(encoded, until="end", search=4096, max_steps=decode.MAX_HEADER_STEPS) -> dict:
    out = decode.jpeg_walk(tf.constant(encoded), until, search=search, max_steps=max_steps)
    return {k: v.numpy().tolist() for k, v in out.items()}


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png(width, height, depth, colour, raw: bytes, interlace=0, idat_pieces=1, level=9) -> bytes:
    """A PNG of the given IHDR whose IDAT data is zlib(raw), split into idat_pieces chunks."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, interlace)
    data = zlib.compress(raw, level)
    step = -(-len(data) // idat_pieces)
    idats = [_png_chunk(b"IDAT", data[i : i + step]) for i in range(0, len(data), step)]
    plte = _png_chunk(b"PLTE", bytes(range(256)) * 3) if colour == 3 else b""
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + plte
        + b"".join(idats)
        + _png_chunk(b"IEND", b"")
    )


def _header(png: bytes, max_steps=decode.MAX_HEADER_STEPS) -> dict:
    out = decode.png_header(tf.constant([png]), max_steps=max_steps)
    return {k: v.numpy().tolist()[0] for k, v in out.items()}


# ------------------------------------------------------------------------------------------------
# JPEG.


def test_the_walk_counts_the_scans_libjpeg_reads():
    baseline, progressive = _jpeg(), _jpeg(progressive=True)
    restarts = _jpeg(restart_marker_blocks=1)  # an RSTn marker after every MCU of the scan
    assert sum(restarts.count(bytes([0xFF, 0xD0 + n])) for n in range(8)) == 11  # 12 MCUs
    walks = _walk([baseline, progressive, restarts])
    assert walks["scans"] == [1, progressive.count(b"\xff\xda"), 1]
    assert walks["scans"][1] >= 5  # libjpeg's progressive script
    assert walks["height"] == [40] * 3 and walks["width"] == [60] * 3
    assert walks["walked"] == [True] * 3


def test_segments_and_fd_da_inside_them_do_not_count_as_scans():
    """A comment holding 150 FF DA pairs was "JPEG of 151 scans"; 61 comments were "JPEG
    without a frame header" (the walk gave up after 64 segments)."""
    base = _jpeg()
    comment = _segment(0xFE, b"\xff\xda" * 150)
    many = _after_soi(base, *[_segment(0xFE, b"note %d \xff\xda" % i) for i in range(300)])
    walks = _walk([_after_soi(base, comment), many])
    assert walks["scans"] == [1, 1]
    assert walks["height"] == [40, 40] and walks["width"] == [60, 60]
    sof = base.index(b"\xff\xc0")
    assert walks["sof"] == [sof + len(comment), many.index(b"\xff\xc0")]
    # 300 segments and a scan of 4 KB steps: cut the walk short and it says so.
    assert _walk([many], max_steps=100)["walked"] == [False]
    assert _walk([many], max_steps=400)["walked"] == [True]


def test_an_icc_profile_in_70_chunks_is_walked_to_its_frame():
    profile = RNG.integers(0, 256, 65519 * 69 + 100, dtype=np.uint8).tobytes()
    icc = _jpeg(icc_profile=profile)
    assert icc.count(b"\xff\xe2") >= 70
    walk = _walk([icc], search=1 << 16)
    assert walk["sof"] == [icc.index(b"\xff\xc0\x00\x11")]
    assert walk["scans"] == [1] and walk["walked"] == [True]
    assert decode.jpeg_size(tf.constant(icc)).numpy().tolist() == [40, 60]


def test_scan_data_is_searched_in_bounded_steps():
    """The data of a scan is searched `search` bytes a step: a scan of N bytes takes about
    N / search steps, whatever the bytes (stuffing FF 00 and fill FF FF are not markers)."""
    base = _jpeg()
    sos = base.index(b"\xff\xda")
    body = base[sos : sos + 2 + struct.unpack(">H", base[sos + 2 : sos + 4])[0]]
    data = (b"\x12\xff\x00" * 4000) + b"\xff\xff"  # 12 KB of stuffed entropy-coded data
    jpeg = base[:sos] + body + data + b"\xff\xd9"
    assert _walk([jpeg], search=4096)["walked"] == [True]
    assert _walk([jpeg], search=4096)["scans"] == [1]
    steps = len(base[:sos].split(b"\xff")) + 3  # segments, then 12 KB in 4 KB steps
    assert _walk([jpeg], search=4096, max_steps=steps - 4)["walked"] == [False]


def test_a_huge_request_after_the_jpeg_magic_is_walked_in_bounded_memory():
    """16 MB of junk after FF D8 FF: the walk stops at the first byte that is no marker, having
    read a few bytes (splitting the file on FF DA made a string per piece: +496 MB)."""
    junk = b"\xff\xd8\xff\xe0\x00\x10" + b"JFIF\x00" + b"\x00" * (16 << 20)
    walk = _walk([junk])
    assert walk == {
        "exif": [-1],
        "sof": [-1],
        "height": [-1],
        "width": [-1],
        "scans": [0],
        "walked": [True],
    }


def test_the_exif_probe_reads_the_leading_segments_only():
    """16 MB of "Exif\\0\\0" after a photo (not an Exif segment): no orientation, the photo's
    pixels, and no split of the file."""
    photo = _jpeg()
    padded = photo + b"Exif\x00\x00" * ((16 << 20) // 6)
    np.testing.assert_array_equal(
        decode.decode_rgb(tf.constant(padded)).numpy(), decode.decode_rgb(photo).numpy()
    )
    assert int(decode.jpeg_orientation(tf.constant(padded))) == 1


def test_legal_segments_decode_as_the_same_image():
    base = _jpeg()
    profile = RNG.integers(0, 256, 65519 * 69 + 100, dtype=np.uint8).tobytes()
    variants = [
        _after_soi(base, *[_segment(0xFE, b"c\xff\xda%d" % i) for i in range(61)]),
        _after_soi(base, _segment(0xEB, b"\xff\xda" * 3000)),  # an APP11 of FF DA pairs
        _jpeg(icc_profile=profile),
    ]
    want = decode.decode_rgb(base).numpy()
    for jpeg in variants:
        np.testing.assert_array_equal(decode.decode_rgb(tf.constant(jpeg)).numpy(), want)
        got = decode.decode_eval(tf.constant(jpeg), 32, 1.0).numpy()
        np.testing.assert_array_equal(got, decode.decode_eval(base, 32, 1.0).numpy())


# ------------------------------------------------------------------------------------------------
# PNG.


# The seven Adam7 passes: first row, row step, first column, column step.
ADAM7 = [
    (0, 8, 0, 8),
    (0, 8, 4, 8),
    (4, 8, 0, 4),
    (0, 4, 2, 4),
    (2, 4, 0, 2),
    (0, 2, 1, 2),
    (1, 2, 0, 1),
]


def _adam7_bytes(height, width, bits_per_pixel):
    total = 0
    for y0, dy, x0, dx in ADAM7:
        rows, cols = len(range(y0, height, dy)), len(range(x0, width, dx))
        if rows and cols:
            total += rows * (1 + (cols * bits_per_pixel + 7) // 8)
    return total


@pytest.mark.parametrize(
    "depth,colour,samples",
    [(1, 0, 1), (2, 0, 1), (4, 3, 1), (8, 3, 1), (16, 0, 1), (8, 2, 3), (16, 4, 2), (16, 6, 4)],
)
def test_raw_bytes_of_every_png_kind_plain_and_interlaced(depth, colour, samples):
    for height, width in [(1, 1), (3, 5), (7, 9), (40, 61)]:
        bits = samples * depth
        plain = height * (1 + (width * bits + 7) // 8)
        got = decode.png_raw_bytes(height, width, depth, colour, 0).numpy()
        assert got == plain
        got = decode.png_raw_bytes(height, width, depth, colour, 1).numpy()
        assert got == _adam7_bytes(height, width, bits)
    assert decode.png_raw_bytes(4, 4, 3, 0, 0).numpy() == -1  # grey of 3 bits: not PNG
    assert decode.png_raw_bytes(4, 4, 16, 3, 0).numpy() == -1  # 16-bit palette: not PNG
    assert decode.png_raw_bytes(4, 4, 8, 2, 2).numpy() == -1  # interlace method 2: none


def test_an_interlaced_png_of_random_rows_decodes_within_its_bound():
    """Adam7 rows of random bytes, stored uncompressed (deflate's worst case): the IDAT
    bytes are within the bound, and libpng and PIL read the same pixels."""
    height, width = 13, 11
    raw = _adam7_bytes(height, width, 24)
    rows = RNG.integers(0, 256, raw, dtype=np.uint8)
    stream = bytearray(rows.tobytes())
    pos = 0  # set every row's filter byte to 0 (None)
    for y0, dy, x0, dx in ADAM7:
        rows_, cols = len(range(y0, height, dy)), len(range(x0, width, dx))
        for _ in range(rows_ if cols else 0):
            stream[pos] = 0
            pos += 1 + 3 * cols
    assert pos == raw
    png = _png(width, height, 8, 2, bytes(stream), interlace=1, idat_pieces=5, level=0)
    header = _header(png)
    assert header["raw_bytes"] == raw
    assert header["idat_bytes"] == len(zlib.compress(bytes(stream), 0))
    assert header["idat_bytes"] <= decode.png_data_bound(raw).numpy()
    np.testing.assert_array_equal(
        tf.io.decode_png(png, channels=3).numpy(), np.asarray(Image.open(io.BytesIO(png)))
    )


def test_idat_lengths_are_summed_over_the_chunk_list():
    raw = b"".join(b"\x00" + bytes(RNG.integers(0, 256, 3 * 64, dtype=np.uint8)) for _ in range(64))
    png = _png(64, 64, 8, 2, raw, idat_pieces=300, level=9)
    header = _header(png)
    assert header["idat_bytes"] == len(zlib.compress(raw, 9))
    assert (header["height"], header["width"], header["walked"]) == (64, 64, True)
    assert _header(png, max_steps=200)["walked"] is False  # 302 chunks in 200 steps


def test_a_png_bomb_exceeds_the_bound_of_its_declared_rows():
    """A 1x1 PNG whose zlib stream goes on past its one row (libpng inflates it all and
    accepts the image: +0.5 GB of zeros cost 1.3-1.8 s of CPU) carries more IDAT bytes than
    one row can need; a legitimate 1x1 PNG, the worst case of 64x64 noise, do not."""
    bomb = _png(1, 1, 8, 2, b"\x00" * (64 << 20))
    header = _header(bomb)
    assert header["raw_bytes"] == 4
    assert header["idat_bytes"] > decode.png_data_bound(4).numpy()
    assert decode.png_data_bound(4).numpy() == 4 + 1 + 1 + 5 + 6 + decode.PNG_DATA_SLACK == 1041
    noise = RNG.integers(0, 256, (64, 64, 4), dtype=np.uint8)
    stored = _png(64, 64, 8, 6, bytes(64 * (1 + 4 * 64)), level=0)
    for png in (_png(1, 1, 8, 2, b"\x00\x01\x02\x03"), _encoded_noise(noise), stored):
        header = _header(png)
        assert header["idat_bytes"] <= decode.png_data_bound(header["raw_bytes"]).numpy()


def _encoded_noise(pixels) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG", compress_level=0)
    return buf.getvalue()


def test_the_bound_covers_zlibs_own_stored_blocks():
    """zlib at level 0 stores blocks of about 42 KB, not 65535 bytes: a bound of 5 bytes per
    65535 refused a 12.8 MP noise PNG (4520 bytes of headers against 2945 allowed)."""
    noise = RNG.integers(0, 256, (600, 600, 3), dtype=np.uint8)
    header = _header(_encoded_noise(noise))
    raw = 600 * (1 + 3 * 600)
    assert header["raw_bytes"] == raw
    overhead = header["idat_bytes"] - raw - 6
    assert overhead > 5 * -(-raw // 65535)  # more block headers than 65535-byte blocks need
    assert header["idat_bytes"] <= decode.png_data_bound(raw).numpy()


def test_the_exif_probe_finds_what_the_leading_walk_finds():
    """decode_rgb's probe (its first steps written out, then a loop) against jpeg_walk's
    "leading" walk: Exif first, second, after 3 and 70 other leading segments, after fill
    bytes, behind a non-leading segment (not leading: none), cut off, and not a JPEG; and the
    step bound."""
    exif = _segment(0xE1, b"Exif\x00\x00II*\x00\x08\x00\x00\x00")
    app0, com = _segment(0xE0, b"JFIF\x00" + bytes(9)), _segment(0xFE, b"hello")
    dqt = _segment(0xDB, bytes(65))
    plain = _jpeg()
    files = {
        "none": plain,
        "first": _after_soi(plain, exif),
        "second": _after_soi(plain, app0, exif),
        "fourth": _after_soi(plain, app0, com, com, exif),
        "after 70": _after_soi(plain, *([com] * 70), exif),
        "after fill": plain[:2] + b"\xff\xff" + exif + plain[2:],
        "behind a DQT": _after_soi(plain, dqt, exif),
        "cut off": _after_soi(plain, app0, exif)[:25],
        "a PNG": _png(2, 2, 8, 2, bytes(14)),
    }
    got = {k: int(decode._exif_position(tf.constant(v))) for k, v in files.items()}
    want = {k: _walk([v], "leading")["exif"][0] for k, v in files.items()}
    assert got == want
    assert got["first"] == 2 + 10 and got["second"] == 2 + len(app0) + 10
    assert got["after 70"] == 2 + 70 * len(com) + 10
    assert got["none"] == got["behind a DQT"] == got["a PNG"] == -1
    # The bound: 71 steps reach the Exif segment after 70 comments, 70 do not.
    encoded = tf.constant(files["after 70"])
    assert int(decode._exif_position(encoded, max_steps=71)) == got["after 70"]
    assert int(decode._exif_position(encoded, max_steps=70)) == -1


def test_decode_rgb_gives_the_general_decoders_pixels_for_every_kind_of_file():
    """decode_rgb (training's decoder, few ops) and _decode (serving's) agree on every kind of
    file: JPEGs in each orientation, grey, RGB, palette, grey+alpha and RGBA PNGs (composited),
    16-bit PNG, GIF, BMP."""
    from tests import export_helpers as eh

    alpha = RNG.integers(0, 256, PIXELS.shape[:2], dtype=np.uint8)
    images = {f"jpeg orientation {o}": eh.with_exif_orientation(_jpeg(), o) for o in range(1, 9)}

    def encode(array, fmt, **kwargs):
        buf = io.BytesIO()
        Image.fromarray(array, **kwargs).save(buf, fmt)
        return buf.getvalue()

    images["png grey"] = encode(PIXELS[..., 0], "PNG")
    images["png rgb"] = encode(PIXELS, "PNG")
    images["png palette"] = Image.fromarray(PIXELS).quantize(16)
    buf = io.BytesIO()
    images["png palette"].save(buf, "PNG")
    images["png palette"] = buf.getvalue()
    images["png grey+alpha"] = encode(np.dstack([PIXELS[..., 0], alpha]), "PNG")
    images["png rgba"] = encode(np.dstack([PIXELS, alpha]), "PNG")
    images["png 16-bit"] = encode(PIXELS[..., 0].astype(np.uint16) * 257, "PNG")
    images["gif"] = encode(PIXELS, "GIF")
    images["bmp"] = encode(PIXELS, "BMP")
    for name, encoded in images.items():
        want = decode._decode(tf.constant(encoded), None, None).numpy()
        got = decode.decode_rgb(encoded).numpy()
        assert got.shape == want.shape and np.array_equal(got, want), name
    # Turned JPEGs really are turned (6: stored sideways), transparency really composited.
    assert decode.decode_rgb(images["jpeg orientation 6"]).shape == (60, 40, 3)
    rgba = decode.decode_rgb(images["png rgba"]).numpy().astype(int)
    expected = np.round(PIXELS * (alpha[..., None] / 255) + 255 * (1 - alpha[..., None] / 255))
    assert np.abs(rgba - expected).max() <= 1


def test_decode_rgb_keeps_three_channels_in_its_static_shape():
    """Traced with an unknown file, decode_rgb's output is known to have 3 channels (the
    pipeline builds fixed-shape zeros from its views' shapes)."""
    spec = tf.TensorSpec([], tf.string)
    assert tf.function(decode.decode_rgb).get_concrete_function(spec).output_shapes[-1] == 3
    assert decode.orient(tf.zeros([5, 7, 3], tf.uint8), tf.constant(6)).shape.as_list() == [7, 5, 3]
