"""Decoding: what a viewer shows, in training, evaluation and serving alike.

Every byte-level rule of the project's image input is here: reading a JPEG's or PNG's size
from its header by bounded, bounds-safe byte reads, the EXIF orientation of a JPEG,
transparency composited onto white, JPEG decoding at a DCT scale, and the evaluation-time
preprocessing (`eval_preprocess`, `decode_eval`) that evaluation and the serving signatures
share. `data` builds the training and evaluation pipelines on these functions; `export` builds
the serving graph on them.
"""

from __future__ import annotations

import functools

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
_JPEG_SEGMENTS = 64  # marker segments read before the first scan, for Exif and the frame
_EXIF_ENTRIES = 64  # IFD0 entries searched for the orientation tag


def _bytes_at(encoded: tf.Tensor, pos: tf.Tensor, n: int) -> tf.Tensor:
    """n bytes of `encoded` from `pos` as int64 [n], zeros past its end (never out of range)."""
    length = tf.cast(tf.strings.length(encoded), tf.int64)
    pos = tf.clip_by_value(tf.cast(pos, tf.int64), 0, length)
    raw = tf.io.decode_raw(tf.strings.substr(encoded, pos, n), tf.uint8, fixed_length=n)
    return tf.cast(raw, tf.int64)


def png_size(encoded: tf.Tensor, missing: int = 0) -> tf.Tensor:
    """(height, width) int64 from a PNG's IHDR chunk (big-endian at bytes 16-23); (missing,
    missing) when there is no IHDR chunk there (never an error, whatever the bytes)."""
    head = _bytes_at(encoded, 12, 12)
    ihdr = tf.reduce_all(tf.equal(head[:4], tf.constant(list(b"IHDR"), tf.int64)))
    big_endian = lambda b: ((b[0] * 256 + b[1]) * 256 + b[2]) * 256 + b[3]
    size = tf.stack([big_endian(head[8:12]), big_endian(head[4:8])])
    return tf.where(ihdr, size, tf.fill([2], tf.constant(missing, tf.int64)))


# Start-of-frame markers (the frame header holds the image size): C0-CF but DHT, JPG and DAC.
_SOF_MARKERS = (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF)


def _jpeg_segments(encoded: tf.Tensor, leading_only: bool = False):
    """(position of the TIFF header of the first APP1 Exif segment, position of the first frame
    header), -1 where absent: the marker segments from the SOI are followed by their lengths,
    as libjpeg reads them, up to the first scan (SOS), the end, or bytes that are no segment.

    `leading_only`: stop at the first segment that is not an application segment (APPn) or a
    comment, where the Exif and JFIF specifications place the Exif segment; the walk then takes
    2 or 3 steps instead of one per table, which matters when it runs for every training image.
    """

    def walk(i, pos, exif, sof):
        seg = _bytes_at(encoded, pos, 10)  # FF, marker, length (2), "Exif\0\0"
        marker = seg[1]
        is_segment = tf.logical_and(tf.equal(seg[0], 0xFF), seg[2] * 256 + seg[3] >= 2)
        is_exif = tf.logical_and(
            tf.equal(marker, 0xE1),
            tf.reduce_all(tf.equal(seg[4:10], tf.constant(list(b"Exif\0\0"), tf.int64))),
        )
        is_sof = tf.reduce_any(tf.equal(marker, _SOF_MARKERS))
        exif = tf.where(tf.logical_and(is_segment, is_exif) & (exif < 0), pos + 10, exif)
        sof = tf.where(tf.logical_and(is_segment, is_sof) & (sof < 0), pos, sof)
        go_on = tf.logical_and(is_segment, tf.logical_and(marker != 0xDA, marker != 0xD9))
        if leading_only:
            leading = tf.logical_or(tf.logical_and(marker >= 0xE0, marker <= 0xEF), marker == 0xFE)
            go_on = tf.logical_and(go_on, leading)
        pos = tf.where(go_on, pos + 2 + seg[2] * 256 + seg[3], tf.constant(-1, tf.int64))
        return i + 1, pos, exif, sof

    minus_one = tf.constant(-1, tf.int64)
    _, _, exif, sof = tf.while_loop(
        lambda i, pos, exif, sof: tf.logical_and(i < _JPEG_SEGMENTS, pos >= 0),
        walk,
        (tf.constant(0), tf.constant(2, tf.int64), minus_one, minus_one),
    )
    return exif, sof


def jpeg_size(encoded: tf.Tensor, missing: int = 0) -> tf.Tensor:
    """(height, width) int64 from a JPEG's frame header; (missing, missing) when none is found
    (never an error, whatever the bytes)."""
    _, sof = _jpeg_segments(encoded)
    head = _bytes_at(encoded, sof, 9)  # FF, marker, length (2), precision, height (2), width (2)
    size = tf.stack([head[5] * 256 + head[6], head[7] * 256 + head[8]])
    return tf.where(sof >= 0, size, tf.fill([2], tf.constant(missing, tf.int64)))


def jpeg_orientation(encoded: tf.Tensor) -> tf.Tensor:
    """The EXIF orientation (1-8, int32) of a JPEG; 1 when it has none or it cannot be read.

    Reads tag 0x0112 of the first IFD of the APP1 "Exif" segment, in either TIFF byte order.
    Every read is bounds-safe, so any bytes give an answer.
    """
    tiff, _ = _jpeg_segments(encoded, leading_only=True)
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
    """HxWxC as stored -> as shown, for an EXIF orientation 1-8 (2-8 mirror or rotate it)."""
    image = tf.cond(orientation >= 5, lambda: tf.transpose(image, (1, 0, 2)), lambda: image)
    mirror = tf.reduce_any(tf.equal(orientation, (2, 3, 6, 7)))
    image = tf.cond(mirror, lambda: tf.reverse(image, [1]), lambda: image)
    upside_down = tf.reduce_any(tf.equal(orientation, (3, 4, 7, 8)))
    return tf.cond(upside_down, lambda: tf.reverse(image, [0]), lambda: image)


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

    def blend(block):
        rgb = tf.cast(block[..., :3], tf.uint16)
        alpha = tf.cast(block[..., 3:], tf.uint16)
        out = (rgb - ALPHA_BACKGROUND) * alpha + (ALPHA_BACKGROUND * 255 + 127)
        return tf.cast(out // 255, tf.uint8)

    def blend_all():
        def step(i, parts):
            start = top + i * rows
            stop = top + tf.minimum((i + 1) * rows, height)
            return i + 1, parts.write(i, blend(rgba[start:stop, left : left + width]))

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


_EXIF_ID = b"Exif\0\0"


@functools.lru_cache(maxsize=None)
def _decode_any(ratio: int):
    """`_decode` of one image at a fixed ratio as a function that the graph calls, not inlines
    (`_noinline`): a `tf.cond` branch of inlined ops costs every one of its ops on each call,
    taken or not (the executor passes them dead tensors), and this one is ~200 ops."""

    def decode(encoded):
        return _decode(encoded, None if ratio == 1 else (lambda h, w: ratio), None)

    return tf.function(
        decode,
        input_signature=[tf.TensorSpec([], tf.string)],
        experimental_attributes={"_noinline": True},
    )


def decode_rgb(encoded: tf.Tensor, ratio: int = 1) -> tf.Tensor:
    """Encoded JPEG/PNG/GIF/BMP bytes -> uint8 HxWx3 as a viewer shows the image: a JPEG turned
    by its EXIF orientation, transparency composited onto ALPHA_BACKGROUND, grayscale, palette
    and 16-bit images made 8-bit RGB. A JPEG is decoded at 1/ratio scale (1, 2, 4 or 8).

    A JPEG whose bytes hold no Exif identifier anywhere has no orientation to apply: it takes
    libjpeg's decoder alone (the same pixels, ~0.2 ms less per training image); every other
    image takes the general decoder."""
    if ratio not in _DCT_RATIOS:
        raise ValueError(f"ratio={ratio}: libjpeg scales by one of {_DCT_RATIOS}")
    encoded = tf.convert_to_tensor(encoded, tf.string)
    plain_jpeg = tf.logical_and(
        tf.equal(tf.strings.substr(encoded, 0, len(JPEG_MAGIC)), JPEG_MAGIC),
        tf.equal(tf.size(tf.strings.split(encoded, sep=_EXIF_ID)), 1),
    )
    image = tf.cond(
        plain_jpeg,
        lambda: _decode_jpeg(encoded, ratio),
        lambda: _decode_any(ratio)(encoded),
    )
    image.set_shape((None, None, 3))
    return image


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
