"""Decoding: what a viewer shows, in training, evaluation and serving alike.

Every byte-level rule of the project's image input is here: reading a JPEG's or PNG's size
from its header by bounded, bounds-safe byte reads, the EXIF orientation of a JPEG,
transparency composited onto white, JPEG decoding at a DCT scale, and the evaluation-time
preprocessing (`eval_preprocess`, `decode_eval`) that evaluation and the serving signatures
share. `data` builds the training and evaluation pipelines on these functions; `export` builds
the serving graph on them.
"""

from __future__ import annotations

from typing import Optional

import tensorflow as tf

JPEG_MAGIC = b"\xff\xd8\xff"  # the first bytes of a JPEG file
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Transparent pixels (RGBA, grey+alpha and palette PNGs with transparency) are composited onto
# white, as a page or an image viewer on a light background shows them.
ALPHA_BACKGROUND = 255
# Evaluation decodes a JPEG at the smallest DCT scale (libjpeg's 1/2, 1/4, 1/8) that keeps the
# centre region it embeds at least this many times the output size on its shorter side, so a
# 12-megapixel photo served at 224 px is decoded at 1/4 scale (0.75 megapixels).
DCT_SCALE_MARGIN = 2
_DCT_RATIOS = (1, 2, 4, 8)
_EXIF_ENTRIES = 64  # IFD0 entries searched for the orientation tag
# Steps of a walk over a JPEG's markers or a PNG's chunks: one marker segment, one chunk of a
# scan's data or one PNG chunk a step, for every image of a batch at once, so what a header
# read costs is bounded whatever the size of the request (docs/SERVING.md, "Headers first").
MAX_HEADER_STEPS = 4096
# Bytes of a scan's entropy-coded data searched for the next marker in one step, over all the
# images of a batch (each gets this / batch, at least JPEG_MIN_SEARCH): memory of a step.
JPEG_SEARCH_BYTES = 1 << 20
JPEG_MIN_SEARCH = 4096


def _bytes_at(encoded: tf.Tensor, pos: tf.Tensor, n: int) -> tf.Tensor:
    """n bytes of `encoded` from `pos` as int64 [..., n], zeros past its end (never out of
    range); encoded and pos of one shape (a scalar, or a batch and its positions)."""
    length = tf.cast(tf.strings.length(encoded), tf.int64)
    # substr wants pos and len of the shape of encoded
    pos = tf.clip_by_value(tf.cast(pos, tf.int64) + tf.zeros_like(length), 0, length)
    count = tf.fill(tf.shape(pos), tf.constant(n, tf.int64))
    raw = tf.io.decode_raw(tf.strings.substr(encoded, pos, count), tf.uint8, fixed_length=n)
    return tf.cast(raw, tf.int64)


_big_endian = lambda b: ((b[..., 0] * 256 + b[..., 1]) * 256 + b[..., 2]) * 256 + b[..., 3]


def png_size(encoded: tf.Tensor, missing: int = 0) -> tf.Tensor:
    """(height, width) int64 from a PNG's IHDR chunk (big-endian at bytes 16-23); (missing,
    missing) when there is no IHDR chunk there (never an error, whatever the bytes)."""
    head = _bytes_at(encoded, 12, 12)
    ihdr = tf.reduce_all(tf.equal(head[:4], tf.constant(list(b"IHDR"), tf.int64)))
    size = tf.stack([_big_endian(head[8:12]), _big_endian(head[4:8])])
    return tf.where(ihdr, size, tf.fill([2], tf.constant(missing, tf.int64)))


# Samples per pixel of each PNG colour type (0 grey, 2 RGB, 3 palette, 4 grey+alpha, 6 RGBA).
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
# zlib's conservative deflateBound (any level, window or memory setting): n + n/8 + n/64 + 5
# bytes of deflate data for n bytes, plus the zlib header and checksum (6 bytes). It covers
# stored blocks smaller than deflate's largest (zlib at level 0 writes blocks of about 42 KB:
# 5 bytes per block more than a 65535-byte split allows, which refused a 12.8 MP noise PNG);
# PNG_DATA_SLACK more for encoders that flush or end with empty blocks.
_ZLIB_FRAME = 6
PNG_DATA_SLACK = 1024


def png_raw_bytes(height, width, bit_depth, colour_type, interlace) -> tf.Tensor:
    """int64 bytes of a PNG's filtered rows as its IHDR declares them (a filter byte and
    ceil(width x bits per pixel / 8) bytes a row, each of the seven Adam7 passes its own rows);
    -1 for a colour type and bit depth PNG does not define."""
    height, width = tf.cast(height, tf.int64), tf.cast(width, tf.int64)
    bit_depth, colour_type = tf.cast(bit_depth, tf.int64), tf.cast(colour_type, tf.int64)
    channels = tf.constant([_PNG_CHANNELS.get(t, 0) for t in range(7)], tf.int64)
    samples = tf.gather(channels, tf.clip_by_value(colour_type, 0, 6))
    bits = samples * bit_depth

    def rows(h, w):  # bytes of h rows of w pixels, none when either is 0
        return tf.where((h > 0) & (w > 0), h * (1 + (w * bits + 7) // 8), 0)

    plain = rows(height, width)
    # Adam7: pass p takes rows from y0 every dy, columns from x0 every dx.
    passes = ((0, 8, 0, 8), (0, 8, 4, 8), (4, 8, 0, 4), (0, 4, 2, 4), (2, 4, 0, 2), (0, 2, 1, 2))
    interlaced = rows(height // 2, width)  # pass 7: odd rows, every column
    for y0, dy, x0, dx in passes:
        interlaced += rows((height - y0 + dy - 1) // dy, (width - x0 + dx - 1) // dx)
    raw = tf.where(tf.equal(interlace, 1), interlaced, plain)
    legal = tf.reduce_any(
        tf.stack(
            [
                tf.equal(colour_type, 0)
                & tf.reduce_any(tf.equal(bit_depth[..., None], [1, 2, 4, 8, 16]), -1),
                tf.equal(colour_type, 3)
                & tf.reduce_any(tf.equal(bit_depth[..., None], [1, 2, 4, 8]), -1),
                tf.reduce_any(tf.equal(colour_type[..., None], [2, 4, 6]), -1)
                & tf.reduce_any(tf.equal(bit_depth[..., None], [8, 16]), -1),
            ]
        ),
        0,
    )
    return tf.where(legal & (tf.cast(interlace, tf.int64) <= 1), raw, -1)


def png_data_bound(raw_bytes) -> tf.Tensor:
    """The most compressed (IDAT) bytes a PNG of raw_bytes filtered bytes can need: zlib's
    conservative bound of deflated data, plus PNG_DATA_SLACK."""
    raw = tf.cast(raw_bytes, tf.int64)
    return raw + (raw + 7) // 8 + (raw + 63) // 64 + 5 + _ZLIB_FRAME + PNG_DATA_SLACK


def _all_true(active, like):
    return tf.ones_like(like, tf.bool) if active is None else active


def png_header(
    encoded: tf.Tensor, max_steps: int = MAX_HEADER_STEPS, active: Optional[tf.Tensor] = None
) -> dict:
    """What a batch [n] of PNGs declares, by bounds-safe reads (never an error): int64 [n]
    "height", "width" (-1 without an IHDR chunk at byte 12), "raw_bytes" (`png_raw_bytes`;
    -1 for an undefined colour type or bit depth), "idat_bytes" (the sum of the lengths of the
    IDAT chunks, read by following the chunk list from the IHDR by the chunks' lengths), and
    "walked" (bool: the list was followed to IEND or to the end of the data within max_steps
    steps, one chunk a step for every image at once). Only the images where `active` (bool
    [n]) is true are walked."""
    head = _bytes_at(encoded, 8, 21)  # length (4), "IHDR", width, height, depth, type, -, -, lace
    ihdr = tf.reduce_all(tf.equal(head[:, 4:8], tf.constant(list(b"IHDR"), tf.int64)), -1)
    height = tf.where(ihdr, _big_endian(head[:, 12:16]), -1)
    width = tf.where(ihdr, _big_endian(head[:, 8:12]), -1)
    raw = png_raw_bytes(height, width, head[:, 16], head[:, 17], head[:, 20])
    length = tf.cast(tf.strings.length(encoded), tf.int64)
    idat_type, iend_type = (
        _big_endian(tf.constant(list(b"IDAT"), tf.int64)),
        _big_endian(tf.constant(list(b"IEND"), tf.int64)),
    )

    def step(i, pos, idat):
        chunk = _bytes_at(encoded, pos, 8)  # length, type
        size, kind = _big_endian(chunk[:, :4]), _big_endian(chunk[:, 4:8])
        live = pos >= 0
        idat = idat + tf.where(live & tf.equal(kind, idat_type), size, 0)
        end = tf.equal(kind, iend_type) | (pos + 12 + size > length)
        return i + 1, tf.where(live & ~end, pos + 12 + size, -1), idat

    start = tf.where(ihdr & _all_true(active, ihdr), tf.constant(8, tf.int64), -1)
    _, pos, idat = tf.while_loop(
        lambda i, pos, idat: (i < max_steps) & tf.reduce_any(pos >= 0),
        step,
        (tf.constant(0), start, tf.zeros_like(start)),
    )
    return dict(height=height, width=width, raw_bytes=raw, idat_bytes=idat, walked=pos < 0)


# Start-of-frame markers (the frame header holds the image size): C0-CF but DHT, JPG and DAC.
_SOF_MARKERS = (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF)
_EXIF_ID = b"Exif\0\0"


def jpeg_walk(
    encoded: tf.Tensor,
    until: str,
    search: int = 0,
    max_steps: int = MAX_HEADER_STEPS,
    active: Optional[tf.Tensor] = None,
):
    """Follows the markers of a batch [n] of JPEGs as libjpeg reads them, by bounds-safe reads
    (never an error), one step for every image at once, at most max_steps steps.

    From the SOI, a marker segment is followed by its length (any number of them, and any
    bytes in them, FF DA included); fill bytes (FF FF) and standalone markers (RSTn, TEM) take
    2 or 1 bytes. After an SOS the scan's entropy-coded data is searched, `search` bytes a step,
    for the next marker: in that data a 0xFF byte is followed by 00 (stuffing), a restart marker
    (D0-D7) or another 0xFF (fill), so the first FF followed by anything else is the next real
    marker. Until:
      "leading"  stop at the first marker that is neither an application segment (APPn) nor a
                 comment, where the Exif and JFIF specifications place the Exif segment
      "frame"    stop at the frame header (SOF) or the first scan
      "end"      follow every scan to the EOI (needs `search` > 0)
    Returns int64 [n] "exif" (position of the TIFF header of the first APP1 Exif segment before
    the first scan), "sof" (of the first frame header before the first scan; -1 where absent),
    "height" and "width" (the frame header's, -1 without one), "scans" (SOS markers met), and
    bool [n] "walked" (the walk reached where `until` says, the
    EOI, bytes that are no marker, or the end of the data within max_steps). Only the images
    where `active` (bool [n]) is true are walked.
    """
    if until not in ("leading", "frame", "end"):
        raise ValueError(f"until={until!r}: one of 'leading', 'frame', 'end'")
    if until == "end" and search < 1:
        raise ValueError("until='end' searches scan data: give search > 0 bytes a step")
    length = tf.cast(tf.strings.length(encoded), tf.int64)
    exif_id = tf.constant(list(_EXIF_ID), tf.int64)
    minus_one = -tf.ones_like(length)

    def segment_step(pos, in_scan, exif, sof, scans):
        seg = _bytes_at(encoded, pos, 10)  # FF, marker, length (2), "Exif\0\0"
        marker, seglen = seg[:, 1], seg[:, 2] * 256 + seg[:, 3]
        at = (pos >= 0) & ~in_scan & tf.equal(seg[:, 0], 0xFF)
        fill = at & tf.equal(marker, 0xFF)
        alone = at & (((marker >= 0xD0) & (marker <= 0xD8)) | tf.equal(marker, 0x01))
        segment = at & ~fill & ~alone & (marker != 0xD9) & (marker != 0) & (seglen >= 2)
        before_scan = tf.equal(scans, 0)
        is_sof = tf.reduce_any(tf.equal(marker[:, None], _SOF_MARKERS), -1)
        is_exif = tf.equal(marker, 0xE1) & tf.reduce_all(tf.equal(seg[:, 4:10], exif_id), -1)
        sof = tf.where(segment & is_sof & before_scan & (sof < 0), pos, sof)
        exif = tf.where(segment & is_exif & before_scan & (exif < 0), pos + 10, exif)
        sos = segment & tf.equal(marker, 0xDA)
        go_on = fill | alone | segment
        if until == "leading":
            leading = ((marker >= 0xE0) & (marker <= 0xEF)) | tf.equal(marker, 0xFE)
            go_on = fill | (segment & leading)
        elif until == "frame":
            go_on = go_on & ~sos & ~(segment & is_sof)
        one, two = tf.constant(1, tf.int64), tf.constant(2, tf.int64)
        step = tf.where(fill, one, tf.where(alone, two, 2 + seglen))
        new_pos = tf.where(go_on, pos + step, -1)
        pos = tf.where((pos >= 0) & ~in_scan, new_pos, pos)
        return pos, in_scan | sos, exif, sof, scans + tf.cast(sos, tf.int64)

    def scan_step(pos, in_scan):
        # Bytes past the end read as zeros: an FF there looks like stuffing, not a marker.
        start = tf.where(in_scan, tf.clip_by_value(pos, 0, length), length)
        chunk = tf.io.decode_raw(
            tf.strings.substr(
                encoded, start, tf.where(in_scan, tf.constant(search + 1, tf.int64), 0)
            ),
            tf.uint8,
            fixed_length=search + 1,
        )
        after = chunk[:, 1:]
        marker = (
            tf.equal(chunk[:, :-1], 0xFF)
            & (after != 0)
            & (after != 0xFF)
            & ((after < 0xD0) | (after > 0xD7))
        )
        found = tf.reduce_any(marker, -1)
        first = tf.argmax(tf.cast(marker, tf.int32), -1, output_type=tf.int64)
        moved = tf.where(found, pos + first, tf.where(pos + search < length, pos + search, -1))
        return tf.where(in_scan, moved, pos), in_scan & ~found

    def step(i, pos, in_scan, exif, sof, scans):
        pos, in_scan, exif, sof, scans = segment_step(pos, in_scan, exif, sof, scans)
        if until == "end":
            pos, in_scan = tf.cond(
                tf.reduce_any(in_scan & (pos >= 0)),
                lambda: scan_step(pos, in_scan),
                lambda: (pos, in_scan),
            )
        return i + 1, pos, in_scan, exif, sof, scans

    _, pos, _, exif, sof, scans = tf.while_loop(
        lambda i, pos, *_: (i < max_steps) & tf.reduce_any(pos >= 0),
        step,
        (
            tf.constant(0),
            tf.where((length >= 2) & _all_true(active, length), tf.constant(2, tf.int64), -1),
            tf.zeros_like(length, tf.bool),
            minus_one,
            minus_one,
            tf.zeros_like(length),
        ),
    )
    head = _bytes_at(encoded, sof, 9)  # FF, marker, length (2), precision, height (2), width (2)
    height = tf.where(sof >= 0, head[:, 5] * 256 + head[:, 6], -1)
    width = tf.where(sof >= 0, head[:, 7] * 256 + head[:, 8], -1)
    return dict(exif=exif, sof=sof, height=height, width=width, scans=scans, walked=pos < 0)


def jpeg_size(encoded: tf.Tensor, missing: int = 0) -> tf.Tensor:
    """(height, width) int64 from a JPEG's frame header; (missing, missing) when none is found
    (never an error, whatever the bytes)."""
    walk = jpeg_walk(tf.reshape(encoded, [1]), "frame")
    size = tf.stack([walk["height"][0], walk["width"][0]])
    return tf.where(walk["sof"][0] >= 0, size, tf.fill([2], tf.constant(missing, tf.int64)))


_UNROLLED_STEPS = 2  # leading segments read without a loop: SOI, then APP1 Exif or APP0 + APP1


def _exif_position(encoded: tf.Tensor, max_steps: int = MAX_HEADER_STEPS) -> tf.Tensor:
    """Position of the TIFF header of a JPEG's leading Exif segment; -1 when it has none.

    What `jpeg_walk(..., "leading")["exif"]` gives, for one image and in fewer ops: the walk
    stops at the Exif segment, and its first steps are written out, so that a file whose Exif
    segment comes first or second (cameras, phones, most editors) needs no loop iteration."""
    encoded = tf.reshape(encoded, [])
    length = tf.cast(tf.strings.length(encoded), tf.int64)
    exif_id = tf.constant(list(_EXIF_ID), tf.int64)
    one, two, minus_one = (tf.constant(v, tf.int64) for v in (1, 2, -1))

    def step(pos, exif):
        seg = _bytes_at(encoded, pos, 10)  # FF, marker, length (2), "Exif\0\0"
        marker, seglen = seg[1], seg[2] * 256 + seg[3]
        at = (pos >= 0) & tf.equal(seg[0], 0xFF)
        fill = at & tf.equal(marker, 0xFF)
        leading = ((marker >= 0xE0) & (marker <= 0xEF)) | tf.equal(marker, 0xFE)
        segment = at & ~fill & leading & (seglen >= 2)
        found = segment & tf.equal(marker, 0xE1) & tf.reduce_all(tf.equal(seg[4:10], exif_id))
        exif = tf.where(found, pos + 10, exif)
        pos = tf.where((fill | segment) & ~found, pos + tf.where(fill, one, two + seglen), -1)
        return pos, exif

    pos, exif = tf.where(length >= 2, two, minus_one), minus_one
    for _ in range(min(_UNROLLED_STEPS, max_steps)):
        pos, exif = step(pos, exif)
    _, _, exif = tf.while_loop(
        lambda i, pos, exif: (i < max_steps) & (pos >= 0),
        lambda i, pos, exif: (i + 1, *step(pos, exif)),
        (tf.constant(min(_UNROLLED_STEPS, max_steps)), pos, exif),
    )
    return exif


def jpeg_orientation(encoded: tf.Tensor) -> tf.Tensor:
    """The EXIF orientation (1-8, int32) of a JPEG; 1 when it has none or it cannot be read.

    Reads tag 0x0112 of the first IFD of the APP1 "Exif" segment, in either TIFF byte order.
    Every read is bounds-safe, so any bytes give an answer.
    """
    tiff = _exif_position(encoded)
    # Most images carry no Exif segment: then nothing more is read.
    return tf.cond(tiff >= 0, lambda: _exif_orientation(encoded, tiff), lambda: tf.constant(1))


def _exif_orientation(encoded: tf.Tensor, tiff: tf.Tensor) -> tf.Tensor:
    """Tag 0x0112 of IFD0 of the TIFF header at `tiff`; 1 when absent or unreadable."""
    u16 = lambda b, le: tf.where(le, b[0] + 256 * b[1], 256 * b[0] + b[1])
    header = _bytes_at(encoded, tiff, 8)  # "II*\0" or "MM\0*", offset of IFD0 (4 bytes)
    little = tf.logical_and(tf.equal(header[0], 0x49), tf.equal(header[1], 0x49))
    big = tf.logical_and(tf.equal(header[0], 0x4D), tf.equal(header[1], 0x4D))
    offset = tf.where(
        little,
        header[4] + 256 * (header[5] + 256 * (header[6] + 256 * header[7])),
        ((header[4] * 256 + header[5]) * 256 + header[6]) * 256 + header[7],
    )
    ifd = tiff + offset
    count = u16(_bytes_at(encoded, ifd, 2), little)
    entries = tf.reshape(_bytes_at(encoded, ifd + 2, 12 * _EXIF_ENTRIES), (_EXIF_ENTRIES, 12))
    tags = u16(tf.transpose(entries[:, :2]), little)
    values = u16(tf.transpose(entries[:, 8:10]), little)  # a SHORT sits first in its field
    hit = tf.logical_and(tf.equal(tags, 0x0112), tf.range(_EXIF_ENTRIES, dtype=tf.int64) < count)
    value = tf.gather(values, tf.argmax(tf.cast(hit, tf.int32)))  # the first hit
    ok = tf.logical_and(
        tf.logical_and(tiff >= 0, tf.logical_or(little, big)),
        tf.logical_and(tf.reduce_any(hit), tf.logical_and(value >= 1, value <= 8)),
    )
    return tf.cast(tf.where(ok, value, 1), tf.int32)


def orient(image: tf.Tensor, orientation: tf.Tensor) -> tf.Tensor:
    """HxWxC as stored -> as shown, for an EXIF orientation 1-8 (2-8 mirror or rotate it).

    Without branches: a transpose by a permutation and a reverse over axes picked by the
    orientation (the identity permutation and no axes for 1, which pass the image through), so
    that a graph pays no `tf.cond` per image."""
    orientation = tf.cast(orientation, tf.int32)
    channels = image.shape[-1]
    perm = tf.where(orientation >= 5, tf.constant([1, 0, 2]), tf.constant([0, 1, 2]))
    image = tf.transpose(image, perm)
    upside_down = tf.reduce_any(tf.equal(orientation, (3, 4, 7, 8)))
    mirror = tf.reduce_any(tf.equal(orientation, (2, 3, 6, 7)))
    axes = tf.boolean_mask(tf.constant([0, 1]), tf.stack([upside_down, mirror]))
    turned = tf.reverse(image, axes)
    turned.set_shape([None, None, channels])  # the permutation keeps the channels last
    return turned


def _shown_region(image, orientation, window_fn):
    """The region window_fn(shown height, shown width) -> (top, left, height, width) of the image
    as shown, cut from the image as stored (so only the region is ever reoriented or copied)."""
    if window_fn is None:
        return orient(image, orientation)
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    transposed = orientation >= 5
    shown_h, shown_w = tf.where(transposed, w, h), tf.where(transposed, h, w)
    top, left, rh, rw = window_fn(shown_h, shown_w)
    top = tf.where(tf.reduce_any(tf.equal(orientation, (3, 4, 7, 8))), shown_h - top - rh, top)
    left = tf.where(tf.reduce_any(tf.equal(orientation, (2, 3, 6, 7))), shown_w - left - rw, left)
    top, left, rh, rw = (
        tf.where(transposed, left, top),
        tf.where(transposed, top, left),
        tf.where(transposed, rw, rh),
        tf.where(transposed, rh, rw),
    )
    return orient(image[top : top + rh, left : left + rw], orientation)


def _blend(rgba: tf.Tensor) -> tf.Tensor:
    """uint8 ...x4 -> ...x3 over ALPHA_BACKGROUND, exactly (see `composite`)."""
    rgb = tf.cast(rgba[..., :3], tf.uint16)
    alpha = tf.cast(rgba[..., 3:], tf.uint16)
    out = (rgb - ALPHA_BACKGROUND) * alpha + (ALPHA_BACKGROUND * 255 + 127)
    return tf.cast(out // 255, tf.uint8)


def composite(rgba: tf.Tensor, window=None) -> tf.Tensor:
    """uint8 HxWx4 -> HxWx3 over ALPHA_BACKGROUND, round(rgb x a + background x (1 - a))
    exactly; opaque pixels keep their values. With window (top, left, height, width), only that
    region, which is then never copied whole in 4 channels.

    In uint16, 64 rows at a time, so that the 16-bit copies stay small whatever the image:
    (rgb - background) x a wraps modulo 2^16, but rgb x a + background x (255 - a) + 127 is
    below 2^16, so the modular sum is that exact value.
    """
    rows = 64
    if window is None:
        top, left, height, width = 0, 0, tf.shape(rgba)[0], tf.shape(rgba)[1]
    else:
        top, left, height, width = window

    def blend_all():
        def step(i, parts):
            start = top + i * rows
            stop = top + tf.minimum((i + 1) * rows, height)
            return i + 1, parts.write(i, _blend(rgba[start:stop, left : left + width]))

        blocks = (height + rows - 1) // rows
        parts = tf.TensorArray(tf.uint8, size=blocks, infer_shape=False)
        _, parts = tf.while_loop(lambda i, parts: i < blocks, step, (tf.constant(0), parts))
        return tf.reshape(parts.concat(), tf.stack([height, width, 3]))

    opaque = tf.reduce_all(tf.equal(rgba[top : top + height, left : left + width, 3], 255))
    return tf.cond(opaque, lambda: rgba[top : top + height, left : left + width, :3], blend_all)


def _decode_jpeg(encoded, ratio):
    """A JPEG decoded by libjpeg at 1/ratio scale (ratio a Python int or a scalar tensor)."""
    if isinstance(ratio, int):
        return tf.io.decode_jpeg(encoded, channels=3, ratio=ratio)
    branches = [lambda r=r: tf.io.decode_jpeg(encoded, channels=3, ratio=r) for r in _DCT_RATIOS]
    index = tf.cast(tf.math.log(tf.cast(ratio, tf.float32)) / tf.math.log(2.0) + 0.5, tf.int32)
    return tf.switch_case(index, branches)


def _decode(encoded, ratio_fn, window_fn) -> tf.Tensor:
    """The one decoder: JPEG (at 1/ratio_fn(height, width) scale, turned upright), PNG
    (transparency composited), else whatever tf.io.decode_image reads (GIF first frame, BMP);
    uint8 RGB, cut to window_fn's region of the image as shown."""
    is_jpeg = tf.equal(tf.strings.substr(encoded, 0, len(JPEG_MAGIC)), JPEG_MAGIC)
    is_png = tf.equal(tf.strings.substr(encoded, 0, len(PNG_MAGIC)), PNG_MAGIC)

    def jpeg():
        if ratio_fn is None:
            image = _decode_jpeg(encoded, 1)
        else:
            shape = tf.io.extract_jpeg_shape(encoded)
            image = _decode_jpeg(encoded, ratio_fn(shape[0], shape[1]))
        return _shown_region(image, jpeg_orientation(encoded), window_fn)

    def png():
        rgba = tf.io.decode_png(encoded, channels=4)
        if window_fn is None:
            return composite(rgba)
        return composite(rgba, window_fn(tf.shape(rgba)[0], tf.shape(rgba)[1]))

    def other():
        image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
        return _shown_region(image, tf.constant(1), window_fn)

    image = tf.cond(is_jpeg, jpeg, lambda: tf.cond(is_png, png, other))
    image.set_shape((None, None, 3))
    return image


def _decode_not_jpeg(encoded: tf.Tensor) -> tf.Tensor:
    """A PNG (transparency composited) or whatever tf.io.decode_image reads (GIF first frame,
    BMP), uint8 RGB: a few ops, which a graph also runs (on dead tensors) for every JPEG."""
    is_png = tf.equal(tf.strings.substr(encoded, 0, len(PNG_MAGIC)), PNG_MAGIC)
    return tf.cond(
        is_png,
        # `composite` in one pass without branches (an opaque pixel keeps its own value): the
        # uint16 copies of a whole training image, which serving bounds with blocks.
        lambda: _blend(tf.io.decode_png(encoded, channels=4)),
        lambda: tf.io.decode_image(encoded, channels=3, expand_animations=False),
    )


def decode_rgb(encoded: tf.Tensor, ratio: int = 1) -> tf.Tensor:
    """Encoded JPEG/PNG/GIF/BMP bytes -> uint8 HxWx3 as a viewer shows the image: a JPEG turned
    by its EXIF orientation, transparency composited onto ALPHA_BACKGROUND, grayscale, palette
    and 16-bit images made 8-bit RGB. A JPEG is decoded at 1/ratio scale (1, 2, 4 or 8).

    The same pixels as `_decode` (serving's decoder), in few ops per image, for training's
    tf.data maps: there each op of a `tf.cond` branch costs about as much taken or not (a
    branch calling the general decoder as a non-inlined function cost 0.4 ms per JPEG not
    taking it), and every `tf.cond` costs as an op. So a JPEG's orientation is read without
    branches (the leading-segment walk and the tag read; any bytes give 1-8), the JPEG is
    decoded by libjpeg alone and turned by `orient` without branches, and the branch for the
    other formats is a few ops: 2.0-2.2 ms of CPU per camera-like file before, 1.3-1.4 now,
    in a sequential map (docs/PERFORMANCE.md)."""
    if ratio not in _DCT_RATIOS:
        raise ValueError(f"ratio={ratio}: libjpeg scales by one of {_DCT_RATIOS}")
    encoded = tf.convert_to_tensor(encoded, tf.string)
    is_jpeg = tf.equal(tf.strings.substr(encoded, 0, len(JPEG_MAGIC)), JPEG_MAGIC)
    image = tf.cond(
        is_jpeg, lambda: _decode_jpeg(encoded, ratio), lambda: _decode_not_jpeg(encoded)
    )
    image.set_shape((None, None, 3))
    orientation = tf.where(is_jpeg, _exif_orientation(encoded, _exif_position(encoded)), 1)
    return orient(image, orientation)


# ------------------------------------------------------------------------------------------------
# Evaluation-time preprocessing.


def centre_window(height, width, crop_fraction: float):
    """(top, left, height, width) of the region evaluation embeds: the whole image (crop_fraction
    1), or the centre square of side crop_fraction x the shorter side (what resizing the shorter
    side to size / crop_fraction and cropping size x size at the centre keeps)."""
    if crop_fraction >= 1.0:
        return tf.zeros_like(height), tf.zeros_like(width), height, width
    shorter = tf.cast(tf.minimum(height, width), tf.float32)
    side = tf.maximum(tf.cast(tf.round(crop_fraction * shorter), height.dtype), 1)
    return (height - side) // 2, (width - side) // 2, side, side


def eval_jpeg_ratio(height, width, size: int, crop_fraction: float) -> tf.Tensor:
    """The DCT scale (1, 2, 4 or 8) evaluation decodes a height x width JPEG at: the largest
    that keeps the shorter side of the embedded region at least DCT_SCALE_MARGIN x size."""
    side = tf.cast(tf.minimum(height, width), tf.float32) * min(crop_fraction, 1.0)
    ratio = tf.constant(1, tf.int32)
    for r in _DCT_RATIOS[1:]:
        ratio = tf.where(side >= r * DCT_SCALE_MARGIN * size, r, ratio)
    return ratio


def eval_resize(region: tf.Tensor, size: int) -> tf.Tensor:
    """uint8 (or 0-255 float) [N]xHxWx3 -> float [N] x size x size x 3 in [0, 1]: bilinear,
    antialiased, resized in the 0-255 range and scaled after, so uint8 and integer-valued float
    input give the same bits and no float copy of the region is made before the resize."""
    return tf.image.resize(region, (size, size), method="bilinear", antialias=True) / 255.0


def eval_region(image: tf.Tensor, crop_fraction: float) -> tf.Tensor:
    """The `centre_window` region of [N]xHxWx3 images, cut in their own pixels (all of them
    for crop_fraction 1.0)."""
    if crop_fraction >= 1.0:
        return image
    shape = tf.shape(image)
    top, left, h, w = centre_window(shape[-3], shape[-2], crop_fraction)
    return image[..., top : top + h, left : left + w, :]


def eval_preprocess(image: tf.Tensor, size: int, crop_fraction: float) -> tf.Tensor:
    """uint8 (or 0-255 float) [N]xHxWx3 -> float [N] x size x size x 3 in [0, 1], as at
    evaluation time: `eval_resize(eval_region(image, crop_fraction), size)`.

    The centre region of `centre_window` is cut first, in the image's own pixels, and then
    resized to size x size: crop_fraction 1.0 resizes the whole image (small images such as
    CIFAR); 0.875 keeps the centre 87.5% of the shorter side (ImageNet's resize to 256, crop
    224). Memory follows the region and the output, never the product of the input's longer
    side and the output size.
    """
    return eval_resize(eval_region(image, crop_fraction), size)


def decode_eval(encoded: tf.Tensor, size: int, crop_fraction: float) -> tf.Tensor:
    """Encoded image -> float size x size x 3, as evaluation and serving_bytes embed it.

    Exactly `eval_preprocess(decode, size, crop_fraction)` of the image decoded as
    `decode_rgb` does, except that a JPEG is decoded at the DCT scale of `eval_jpeg_ratio`,
    and only the region that is embedded is reoriented and composited.
    """
    window = lambda h, w: centre_window(h, w, crop_fraction)
    ratio = lambda h, w: eval_jpeg_ratio(h, w, size, crop_fraction)
    return eval_resize(_decode(encoded, ratio, window), size)
