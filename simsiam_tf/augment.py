"""The two-view augmentation recipe (paper appendix A: the MoCo v2 recipe).

    RandomResizedCrop(scale 0.2-1, ratio 3/4-4/3)
    RandomApply(ColorJitter(0.4, 0.4, 0.4, 0.1), p=0.8)      torchvision semantics
    RandomGrayscale(p=0.2)
    RandomApply(GaussianBlur(sigma in [0.1, 2]), p=0.5)     ImageNet only
    RandomHorizontalFlip()

Every random number is drawn per image from stateless ops keyed by an explicit seed, in two
steps: `sample_*` draws the per-image parameters (cheap scalars), then they are applied, by one
of two paths that compute the same thing (tested against each other):

  * batched, `apply_photometric`: vectorised ops over a whole batch with per-image factors; what
    the train step runs on the accelerator (device mode) and the in-memory sources use;
  * per image, `augment_view`: one view at a time in planar layout with banded-matmul resize and
    blur; what tf.data runs on the CPU for image files (about 2x the torchvision/PIL loader per
    core at 224 px, docs/PERFORMANCE.md).

So

  * the photometric half can run in tf.data on the CPU or inside the train step on the device
    (`data.photometric = "device"`) with the very same distributions;
  * a run is reproducible and resumable mid-epoch: same seed, same views.

The semantics follow torchvision (which the official code uses) operation by operation:
colour-jitter factors drawn uniformly in [1 - s, 1 + s] (hue in [-h, h]), the four jitter ops in
a random order per image, each result clipped to [0, 1]; contrast blends with the mean of the
grayscale image; saturation with the grayscale image; hue shifts H in HSV; grayscale uses the
ITU-R 601 luma weights. Known departures, each small:

  * images are float in [0, 1] between ops (PIL rounds to uint8 after each op);
  * the blur is an exact separable Gaussian truncated at 3 sigma (PIL approximates a Gaussian by
    three box blurs); edges are reflected.

Images here are float32 in [0, 1]; `PhotometricAugment` wraps the batched half as a keras-cv
vectorised augmentation layer.
"""

from __future__ import annotations

import math

import keras_cv
import tensorflow as tf

_LUMA = (0.299, 0.587, 0.114)
_JITTER_OPS = 4  # brightness, contrast, saturation, hue
_ATTEMPTS = 10  # torchvision RandomResizedCrop tries 10 windows before falling back


def _uniform(seed, shape, low, high):
    return tf.random.stateless_uniform(shape, seed, minval=low, maxval=high)


def fold_seed(seed: tf.Tensor, *keys) -> tf.Tensor:
    """A new stateless seed [2] from `seed` and integer keys (epoch, batch, example, ...)."""
    seed = tf.cast(seed, tf.int64)
    for key in keys:
        seed = tf.random.experimental.stateless_fold_in(seed, tf.cast(key, tf.int64))
    return seed


# ------------------------------------------------------------------------------------------------
# Geometry: RandomResizedCrop and the flip.


def sample_crop_windows(seed, height, width, n: int, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
    """n crop windows (y, x, h, w), int32 [n] each, with torchvision RandomResizedCrop.get_params.

    Up to 10 attempts per window at area fraction ~ U(scale) and log aspect ratio ~ U(log ratio);
    the first that fits is kept, otherwise the central crop with the ratio clamped.
    """
    height = tf.cast(height, tf.float32)
    width = tf.cast(width, tf.float32)
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 4)
    shape = (n, _ATTEMPTS)
    area = height * width * _uniform(seeds[0], shape, scale[0], scale[1])
    aspect = tf.exp(_uniform(seeds[1], shape, math.log(ratio[0]), math.log(ratio[1])))
    w = tf.round(tf.sqrt(area * aspect))
    h = tf.round(tf.sqrt(area / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = tf.argmax(tf.cast(fits, tf.int32), axis=1)  # first fitting attempt (0 if none)
    any_fit = tf.reduce_any(fits, axis=1)
    h = tf.gather(h, first, batch_dims=1)
    w = tf.gather(w, first, batch_dims=1)
    y = tf.floor(_uniform(seeds[2], (n,), 0.0, 1.0) * (height - h + 1))
    x = tf.floor(_uniform(seeds[3], (n,), 0.0, 1.0) * (width - w + 1))
    # Fallback: the whole image, cut to the nearest allowed aspect ratio, centred.
    in_ratio = width / height
    fh = tf.where(in_ratio < ratio[0], tf.round(width / ratio[0]), height)
    fw = tf.where(in_ratio > ratio[1], tf.round(height * ratio[1]), width)
    fh, fw = tf.minimum(fh, height), tf.minimum(fw, width)
    fy, fx = tf.floor((height - fh) / 2), tf.floor((width - fw) / 2)
    pick = lambda a, b: tf.cast(tf.where(any_fit, a, b), tf.int32)
    return pick(y, fy), pick(x, fx), pick(h, fh), pick(w, fw)


def crop_resize_flip(image, window, flip, size: int):
    """One view: crop `window` (y, x, h, w) out of an HxWx3 image, resize to size x size with
    antialiased bilinear (as PIL does), flip if `flip`. Returns uint8 [size, size, 3]."""
    y, x, h, w = window
    crop = tf.slice(image, tf.stack([y, x, 0]), tf.stack([h, w, 3]))
    view = tf.image.resize(crop, (size, size), method="bilinear", antialias=True)
    view = tf.cond(flip, lambda: tf.reverse(view, axis=[1]), lambda: view)
    return tf.cast(tf.clip_by_value(tf.round(view), 0.0, 255.0), tf.uint8)


def _bilinear_taps(start, length, size: int):
    """Source indices and weights of bilinear resampling of [start, start + length) to `size`
    samples with half-pixel centres, clamped at the crop's edges (torchvision's crop-then-resize).

    start, length: float [N]. Returns i0, i1 int32 [N, size] and the weight of i1, float [N, size].
    """
    k = tf.range(size, dtype=tf.float32)[None, :] + 0.5
    c = k * length[:, None] / size - 0.5
    c = tf.clip_by_value(c, 0.0, length[:, None] - 1.0)
    c0 = tf.floor(c)
    c1 = tf.minimum(c0 + 1.0, length[:, None] - 1.0)
    to_index = lambda t: tf.cast(start[:, None] + t, tf.int32)
    return to_index(c0), to_index(c1), c - c0


def batch_crop_resize_flip(images, windows, flips, size: int):
    """The batched form for images of one size (CIFAR, built-in data): NxHxWx3 -> Nx size x size.

    Each image's window is cut and resized with bilinear interpolation at half-pixel centres,
    clamped at the window's edges: exactly torchvision's crop-then-resize for enlarged crops
    (no antialiasing, which only matters when a crop is shrunk). Two gathers per axis, so the
    whole batch costs about as much as one resize.
    """
    y, x, h, w = (tf.cast(t, tf.float32) for t in windows)
    images = tf.cast(images, tf.float32)
    r0, r1, fy = _bilinear_taps(y, h, size)  # Nxsize
    c0, c1, fx = _bilinear_taps(x, w, size)  # Nxsize
    flip = flips[:, None]
    c0, c1, fx = (tf.where(flip, tf.reverse(t, axis=[1]), t) for t in (c0, c1, fx))
    rows0 = tf.gather(images, r0, axis=1, batch_dims=1)  # Nx size x W x 3
    rows1 = tf.gather(images, r1, axis=1, batch_dims=1)
    rows = rows0 + (rows1 - rows0) * fy[:, :, None, None]
    cols0 = tf.gather(rows, c0, axis=2, batch_dims=1)  # Nx size x size x 3
    cols1 = tf.gather(rows, c1, axis=2, batch_dims=1)
    views = cols0 + (cols1 - cols0) * fx[:, None, :, None]
    return tf.cast(tf.clip_by_value(tf.round(views), 0.0, 255.0), tf.uint8)


def sample_flips(seed, n: int, prob: float = 0.5):
    return _uniform(seed, (n,), 0.0, 1.0) < prob


# ------------------------------------------------------------------------------------------------
# Banded resampling: resize and blur of one image as a few small matmuls.
#
# Both the antialiased resize of a crop and the separable blur compute, along one axis, each
# output sample as a weighted sum of a short run of input samples. Output samples are taken in
# blocks of _BLOCK; the inputs that one block reads are contiguous, so an axis is resampled by one
# row gather (nb blocks x span rows) and one batched matmul (nb x _BLOCK x span) @ (nb x span x
# rest). TensorFlow's generic kernels for this (ScaleAndTranslate, depthwise_conv2d) are scalar
# loops on the CPU; the matmul form is 2-3x cheaper and exact to float rounding.

_BLOCK = 16


def _resample_rows(x, index, weights, size: int):
    """out[b * _BLOCK + k] = sum_l weights[b, k, l] * x[index[b, l]]: x (n, ...) -> (size, rest)."""
    rows = tf.gather(x, index)  # nb x span x ...
    if rows.dtype != weights.dtype:
        rows = tf.cast(rows, weights.dtype)
    shape = tf.shape(rows)
    rows = tf.reshape(rows, (shape[0], shape[1], -1))
    out = tf.matmul(weights, rows)  # nb x _BLOCK x rest
    return tf.reshape(out, (-1, tf.shape(out)[2]))[:size]


def _resize_taps(length, size: int, flip, gain: float = 1.0):
    """Antialiased bilinear (triangle) resampling of `length` samples to `size`, optionally
    mirrored: what tf.image.resize(antialias=True) and PIL's BILINEAR resize compute.

    Output k samples the input at (k + 0.5) * length / size with a triangle of half-width
    max(1, length / size) input pixels, normalised over the pixels inside the input.
    Returns (index int32 [nb, span], weights float [nb, _BLOCK, span]), weights times `gain`.
    """
    nb = -(-size // _BLOCK)
    length_f = tf.cast(length, tf.float32)
    scale = length_f / size
    support = tf.maximum(scale, 1.0)
    k = tf.range(nb * _BLOCK, dtype=tf.float32)
    k = tf.where(flip, size - 1.0 - k, k)
    centre = tf.reshape((k + 0.5) * scale, (nb, _BLOCK))
    span = tf.minimum(tf.math.ceil((_BLOCK - 1) * scale + 2.0 * support) + 2.0, length_f)
    low = tf.clip_by_value(tf.floor(tf.reduce_min(centre, 1) - support), 0.0, length_f - span)
    pos = low[:, None] + tf.range(span)[None, :]  # nb x span
    w = tf.nn.relu(1.0 - tf.abs(pos[:, None, :] + 0.5 - centre[:, :, None]) / support)
    w = tf.math.divide_no_nan(w, tf.reduce_sum(w, axis=2, keepdims=True)) * gain
    return tf.cast(pos, tf.int32), w


def resize_crop(image, window, flip, size: int, gain: float = 1.0):
    """One view of an HxWx3 image: crop `window` (y, x, h, w), resize to size x size with
    antialiased bilinear (as PIL, as `crop_resize_flip`), mirror left-right if `flip`.

    Returns float32 [size(x), size(y), 3] times `gain`: TRANSPOSED (columns first), so that the
    caller picks the layout with one transpose: (1, 0, 2) for HxWxC, (2, 1, 0) for planar CxHxW.
    """
    y, x, h, w = window
    crop = tf.slice(image, tf.stack([y, x, 0]), tf.stack([h, w, 3]))
    index, weights = _resize_taps(h, size, False, gain)
    rows = _resample_rows(crop, index, weights, size)  # size(y) x (w * 3)
    cols = tf.transpose(tf.reshape(rows, (size, w, 3)), (1, 0, 2))  # w x size(y) x 3
    index, weights = _resize_taps(w, size, flip)
    return tf.reshape(_resample_rows(cols, index, weights, size), (size, size, 3))


def _blur_taps(sigma, length, radius: int):
    """Gaussian blur along one axis of `length` samples, mirror-reflected edges (as
    `gaussian_blur`): (index int32 [nb, span], weights float [nb, _BLOCK, span])."""
    nb = -(-length // _BLOCK)
    span = _BLOCK + 2 * radius
    kernel = _gaussian_kernels(sigma[None], radius)[0]  # 2r+1
    d = tf.range(span)[None, :] - tf.range(_BLOCK)[:, None]  # _BLOCK x span: tap offset
    inside = (d >= 0) & (d <= 2 * radius)
    w = tf.where(inside, tf.gather(kernel, tf.clip_by_value(d, 0, 2 * radius)), 0.0)
    pos = tf.range(nb)[:, None] * _BLOCK - radius + tf.range(span)[None, :]  # nb x span
    pos = (length - 1) - tf.abs((length - 1) - tf.abs(pos))  # reflect, edge not repeated
    pos = tf.clip_by_value(pos, 0, length - 1)  # rows past the end (last block's padding)
    return pos, tf.tile(w[None], (nb, 1, 1))


def blur_planar(image, sigma, radius: int):
    """Separable Gaussian blur of one planar image CxHxW, sigma a scalar in pixels."""
    c, h, w = (tf.shape(image)[i] for i in range(3))
    x = tf.reshape(tf.transpose(image, (1, 0, 2)), (h, c * w))  # rows first
    index, weights = _blur_taps(sigma, h, radius)
    x = tf.reshape(_resample_rows(x, index, weights, h), (h, c, w))
    x = tf.reshape(tf.transpose(x, (2, 1, 0)), (w, c * h))  # columns first
    index, weights = _blur_taps(sigma, w, radius)
    x = tf.reshape(_resample_rows(x, index, weights, w), (w, c, h))
    return tf.transpose(x, (1, 2, 0))


# ------------------------------------------------------------------------------------------------
# Photometry: colour jitter, grayscale, blur, as per-image parameters and a batched apply.


def sample_photometric(seed, n: int, cfg) -> dict:
    """Per-image photometric parameters for n images, each a tensor with leading dim n.

    Args:
      seed: stateless seed [2].
      n: number of images.
      cfg: the `aug` section of a config (jitter_prob, brightness, contrast, saturation, hue,
        grayscale_prob, blur_prob, blur_sigma).
    """
    s = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 9)
    b, c, sat, hue = cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue
    # torchvision ColorJitter.get_params: fn_idx = randperm(4), then each factor.
    order = tf.argsort(_uniform(s[0], (n, _JITTER_OPS), 0.0, 1.0), axis=1, stable=True)
    return {
        "jitter": _uniform(s[1], (n,), 0.0, 1.0) < cfg.jitter_prob,
        "order": tf.cast(order, tf.int32),
        "brightness": _uniform(s[2], (n,), max(0.0, 1 - b), 1 + b),
        "contrast": _uniform(s[3], (n,), max(0.0, 1 - c), 1 + c),
        "saturation": _uniform(s[4], (n,), max(0.0, 1 - sat), 1 + sat),
        "hue": _uniform(s[5], (n,), -hue, hue),
        "grayscale": _uniform(s[6], (n,), 0.0, 1.0) < cfg.grayscale_prob,
        "blur": _uniform(s[7], (n,), 0.0, 1.0) < cfg.blur_prob,
        "sigma": _uniform(s[8], (n,), cfg.blur_sigma[0], cfg.blur_sigma[1]),
    }


def grayscale(images):
    """ITU-R 601 luma, NxHxWx3 -> NxHxWx1 (PIL's convert("L"), torchvision's rgb_to_grayscale)."""
    return tf.reduce_sum(images * tf.constant(_LUMA, images.dtype), axis=-1, keepdims=True)


def _where_rows(mask, a, b):
    return tf.where(tf.reshape(mask, (-1, 1, 1, 1)), a, b)


def _shift_hue(images, delta):
    hsv = tf.image.rgb_to_hsv(images)
    h = tf.math.floormod(hsv[..., :1] + tf.reshape(delta, (-1, 1, 1, 1)), 1.0)
    return tf.image.hsv_to_rgb(tf.concat([h, hsv[..., 1:]], axis=-1))


def _on_subset(fn, images, mask, *args):
    """fn applied only to the images where mask holds (gather, fn, scatter back)."""
    idx = tf.where(mask)[:, 0]

    def run():
        sub = fn(tf.gather(images, idx), *(tf.gather(a, idx) for a in args))
        return tf.tensor_scatter_nd_update(images, idx[:, None], sub)

    return tf.cond(tf.size(idx) > 0, run, lambda: images)


def color_jitter(images, params):
    """torchvision ColorJitter with per-image factors and per-image order, batched.

    brightness: x * f; contrast: blend with the image's mean gray; saturation: blend with its
    gray; hue: shift H. Brightness, contrast and saturation are one blend x*f + ref*(1 - f)
    with a per-image reference, so each of the 4 positions in the order costs one blend; the
    hue shift (the costly op) runs only on the images whose order puts it at that position.
    """
    jitter = params["jitter"]
    factors = tf.stack(
        [
            params["brightness"],
            params["contrast"],
            params["saturation"],
            tf.ones_like(jitter, tf.float32),
        ],
        axis=1,
    )  # Nx4, hue's blend factor 1 = no-op
    for pos in range(_JITTER_OPS):
        op = params["order"][:, pos]  # N
        f = tf.gather(factors, op, batch_dims=1)
        f = tf.where(jitter, f, 1.0)
        gray = grayscale(images)  # NxHxWx1
        mean_gray = tf.reduce_mean(gray, axis=[1, 2, 3], keepdims=True)  # Nx1x1x1
        op4 = tf.reshape(op, (-1, 1, 1, 1))
        ref = tf.where(op4 == 1, mean_gray, tf.where(op4 == 2, gray, 0.0))
        f4 = tf.reshape(f, (-1, 1, 1, 1))
        images = tf.clip_by_value(images * f4 + ref * (1.0 - f4), 0.0, 1.0)
        hue_here = jitter & tf.equal(op, 3) & tf.not_equal(params["hue"], 0.0)
        images = _on_subset(_shift_hue, images, hue_here, params["hue"])
    return images


def _gaussian_kernels(sigma, radius: int):
    """Normalised 1-D Gaussian kernels, N x (2 * radius + 1)."""
    t = tf.range(-radius, radius + 1, dtype=tf.float32)
    k = tf.exp(-0.5 * tf.square(t[None, :] / sigma[:, None]))
    return k / tf.reduce_sum(k, axis=1, keepdims=True)


def gaussian_blur(images, sigma, radius: int):
    """Separable Gaussian blur with a per-image sigma: NxHxWxC, sigma [N] in pixels.

    The batch is folded into channels so one depthwise convolution per axis blurs every image
    with its own kernel.
    """
    n, h, w, c = (tf.shape(images)[i] for i in range(4))
    x = tf.reshape(tf.transpose(images, (1, 2, 0, 3)), (1, h, w, n * c))  # 1xHxWx(N*C)
    k = tf.repeat(_gaussian_kernels(sigma, radius), c, axis=0)  # (N*C)xK
    k = tf.transpose(k)  # Kx(N*C)
    x = tf.pad(x, [[0, 0], [radius, radius], [radius, radius], [0, 0]], mode="REFLECT")
    x = tf.nn.depthwise_conv2d(x, k[:, None, :, None], (1, 1, 1, 1), "VALID")
    x = tf.nn.depthwise_conv2d(x, k[None, :, :, None], (1, 1, 1, 1), "VALID")
    return tf.transpose(tf.reshape(x, (h, w, n, c)), (2, 0, 1, 3))


def blur_radius(cfg) -> int:
    return max(1, int(math.ceil(3.0 * cfg.blur_sigma[1])))


# ------------------------------------------------------------------------------------------------
# The per-image path (tf.data on the CPU): one view at a time, planar CxHxW float in [0, 1].
#
# The same operations and parameters as `apply_photometric`, arranged for a CPU core: one 224 px
# planar view (600 kB) stays in the L2 cache through every op, each image runs only the ops its
# own parameters select (tf.cond / tf.switch_case on scalars, so no work is done and thrown
# away), channels are contiguous planes (mixing them needs no strided access) and the blur is a
# banded matmul. Tests check it against the batched path and against torchvision's formulas.


def _gray_planar(image):
    """ITU-R 601 luma of a planar image: 3xHxW -> HxW."""
    r, g, b = tf.unstack(image)
    return r * _LUMA[0] + g * _LUMA[1] + b * _LUMA[2]


def _clip01(x):
    return tf.clip_by_value(x, 0.0, 1.0)


def _hue_planar(image, delta):
    """Shift the HSV hue of a planar image by `delta` (a fraction of the circle), elementwise.

    torchvision's _rgb2hsv / _hsv2rgb, with the HSV -> RGB step in its closed form
    f(n) = V - C * clamp(min(k, 4 - k), 0, 1), k = (n + H / 60 deg) mod 6, (R, G, B) = f(5, 3, 1),
    where C = max - min is the chroma, which a hue shift keeps, as it keeps V = max.
    """
    r, g, b = tf.unstack(image)
    v = tf.maximum(tf.maximum(r, g), b)
    c = v - tf.minimum(tf.minimum(r, g), b)
    # Hue in sixths of the circle; grey pixels (c == 0) come out as v whatever their hue.
    h = tf.where(
        tf.equal(v, r),
        tf.math.divide_no_nan(g - b, c),
        tf.where(
            tf.equal(v, g),
            2.0 + tf.math.divide_no_nan(b - r, c),
            4.0 + tf.math.divide_no_nan(r - g, c),
        ),
    )
    h = h + 6.0 * delta

    def channel(n):
        k = h + n
        k = k - 6.0 * tf.floor(k * (1.0 / 6.0))
        return v - c * _clip01(tf.minimum(k, 4.0 - k))

    return tf.stack([channel(5.0), channel(3.0), channel(1.0)])


def _jitter_planar(image, params, cfg):
    """torchvision ColorJitter on one planar image, its four ops in this image's order."""
    ops = (
        lambda x: _clip01(x * params["brightness"]),
        lambda x: _clip01(
            x * params["contrast"] + tf.reduce_mean(_gray_planar(x)) * (1.0 - params["contrast"])
        ),
        lambda x: _clip01(
            x * params["saturation"] + _gray_planar(x) * (1.0 - params["saturation"])
        ),
        (lambda x: _hue_planar(x, params["hue"])) if cfg.hue > 0 else (lambda x: x),
    )
    x = image
    for pos in range(_JITTER_OPS):
        x = tf.switch_case(params["order"][pos], [lambda op=op, x=x: op(x) for op in ops])
    return x


def photometric_planar(image, params, cfg):
    """Colour jitter, grayscale and blur of ONE planar image 3xHxW in [0, 1].

    params: this image's parameters, scalars (row i of `sample_photometric`).
    """
    x = image
    if cfg.jitter_prob > 0:
        x = tf.cond(params["jitter"], lambda: _jitter_planar(x, params, cfg), lambda: x)
    if cfg.grayscale_prob > 0:
        x = tf.cond(params["grayscale"], lambda: tf.stack([_gray_planar(x)] * 3), lambda: x)
    if cfg.blur_prob > 0:
        x = tf.cond(
            params["blur"], lambda: blur_planar(x, params["sigma"], blur_radius(cfg)), lambda: x
        )
    return x


def augment_view(image, window, flip, size: int, params=None, cfg=None):
    """One view of a decoded uint8 HxWx3 image, as uint8 size x size x 3: crop, antialiased
    resize and flip; then, when `params` (this view's, scalars) are given, the photometric half
    of the recipe `cfg`, applied before the only rounding to uint8."""
    if params is None:
        view = tf.transpose(resize_crop(image, window, flip, size), (1, 0, 2))
        return tf.cast(tf.round(view), tf.uint8)
    planar = tf.transpose(resize_crop(image, window, flip, size, 1.0 / 255.0), (2, 1, 0))
    planar = photometric_planar(planar, params, cfg)
    return tf.cast(tf.round(tf.transpose(planar, (1, 2, 0)) * 255.0), tf.uint8)


def apply_photometric(images, params, cfg):
    """Colour jitter, grayscale and blur for a batch, NxHxWx3 float in [0, 1] (or uint8)."""
    if images.dtype == tf.uint8:
        images = tf.cast(images, tf.float32) / 255.0
    if cfg.jitter_prob > 0:
        images = color_jitter(images, params)
    if cfg.grayscale_prob > 0:
        images = _where_rows(params["grayscale"], tf.tile(grayscale(images), (1, 1, 1, 3)), images)
    if cfg.blur_prob > 0:
        images = _on_subset(
            lambda x, s: gaussian_blur(x, s, blur_radius(cfg)),
            images,
            params["blur"],
            params["sigma"],
        )
    return images


class PhotometricAugment(keras_cv.layers.VectorizedBaseImageAugmentationLayer):
    """The photometric half of the recipe as a keras-cv vectorised augmentation layer.

    Called on a batch it draws its own per-image parameters; `apply(images, params)` applies
    parameters drawn elsewhere (in tf.data), which is how the train step uses it on the device.
    Images are float in [0, 1] or uint8.
    """

    def __init__(self, aug_config, seed=None, **kwargs):
        super().__init__(seed=seed, **kwargs)
        self.aug_config = aug_config

    def get_random_transformation_batch(self, batch_size, **kwargs):
        seed = self._random_generator.uniform_full_int((2,), dtype=tf.int64)
        return sample_photometric(seed, batch_size, self.aug_config)

    def augment_images(self, images, transformations, **kwargs):
        return apply_photometric(images, transformations, self.aug_config)

    def augment_labels(self, labels, transformations, **kwargs):
        return labels

    def apply(self, images, params):
        return apply_photometric(images, params, self.aug_config)

    def get_config(self):
        config = super().get_config()
        config.update(aug_config=self.aug_config.to_dict())
        return config
