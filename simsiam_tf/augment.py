"""The two-view augmentation recipe (paper appendix A: the MoCo v2 recipe).

    RandomResizedCrop(scale 0.2-1, ratio 3/4-4/3)
    RandomApply(ColorJitter(0.4, 0.4, 0.4, 0.1), p=0.8)      torchvision semantics
    RandomGrayscale(p=0.2)
    RandomApply(GaussianBlur(sigma in [0.1, 2]), p=0.5)     ImageNet only
    RandomHorizontalFlip()

Each op is a keras-cv image-augmentation layer (`RecipeLayer`, a subclass of keras-cv's
VectorizedBaseImageAugmentationLayer) and the pipeline runs them through keras-cv's own call,
`layer({"images": ..., "seed": ...})`; this is the only module that imports keras_cv. keras-cv
draws the per-image parameters of a batch (cheap scalars), then calls the layer's
`augment_images` once on the batch, which runs one of two kernels that compute the same thing
(tested against each other):

  * batched: vectorised ops over a whole batch with per-image factors; what the train step runs
    on the accelerator (device mode) and what the in-memory sources use;
  * per image: one view at a time, colour in planar layout, banded-matmul resize and blur; what
    tf.data runs on the CPU for image files, one example at a time (docs/PERFORMANCE.md). The
    crop's resize and the colour jitter run as the C++ ops of `simsiam_tf.native` where they
    are built (`kernels`, config `aug.kernels`): the same arithmetic in one or two passes over
    a view instead of some 25.

Every random number is drawn per image, per view, from stateless ops keyed by an explicit seed
(seed, epoch, batch or example, view, layer), so

  * the photometric half can run in tf.data on the CPU or inside the train step on the device
    (`data.photometric = "device"`) with the very same distributions;
  * a run is reproducible and resumable mid-epoch: same seed, same views.

Users append stock keras-cv (or Keras) layers with `aug.extra`, or replace the recipe with
`aug.recipe` (`parse_layers`); in device mode they run in the train step after the recipe's
colour layers. Stock layers draw from their own random state (keras-cv's tf.random.Generator,
Keras' SeedGenerator), which is neither keyed by the example nor saved in checkpoints, and which
tf.data's parallel map advances in no fixed order: their draws are not reproducible, and a
resumed run draws them afresh. The recipe's own layers stay exact.

The semantics follow torchvision (which the official code uses) operation by operation:
colour-jitter factors drawn uniformly in [1 - s, 1 + s] (hue in [-h, h]), the four jitter ops in
a random order per image, each result clipped to [0, 1]; contrast blends with the mean of the
grayscale image; saturation with the grayscale image; hue shifts H in HSV; grayscale uses the
ITU-R 601 luma weights. Known departures, each small:

  * images are float in [0, 1] between ops (PIL rounds to uint8 after each op);
  * the blur is an exact separable Gaussian truncated at 3 sigma (PIL approximates a Gaussian by
    three box blurs); edges are reflected.

Images are float32 in [0, 1] between layers; `RandomResizedCrop` takes the decoded uint8 image.
"""

from __future__ import annotations

import ast
import math
import threading

import keras
import keras_cv
import tensorflow as tf

from simsiam_tf import native
from simsiam_tf.errors import ConfigError

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


def batch_crop_resize(images, windows, flips, size: int, gain: float = 1.0):
    """The batched form for images of one size (CIFAR, built-in data): NxHxWx3 -> Nx size x size.

    Each image's window is cut and resized with bilinear interpolation at half-pixel centres,
    clamped at the window's edges: exactly torchvision's crop-then-resize for enlarged crops
    (no antialiasing, which only matters when a crop is shrunk). Two gathers per axis, so the
    whole batch costs about as much as one resize. Images mirrored where `flips`; float32 out,
    times `gain`.
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
    return views * gain if gain != 1.0 else views


def batch_crop_resize_flip(images, windows, flips, size: int):
    """`batch_crop_resize` rounded to uint8."""
    views = batch_crop_resize(images, windows, flips, size)
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


def blur_image(image, sigma, radius: int):
    """Separable Gaussian blur of one HxWxC image, sigma a scalar in pixels: rows, then columns,
    each a banded matmul (two transposes in all)."""
    h, w, c = (tf.shape(image)[i] for i in range(3))
    x = tf.reshape(image, (h, w * c))
    index, weights = _blur_taps(sigma, h, radius)
    x = tf.reshape(_resample_rows(x, index, weights, h), (h, w, c))
    x = tf.reshape(tf.transpose(x, (1, 0, 2)), (w, h * c))  # columns first
    index, weights = _blur_taps(sigma, w, radius)
    x = tf.reshape(_resample_rows(x, index, weights, w), (w, h, c))
    return tf.transpose(x, (1, 0, 2))


# ------------------------------------------------------------------------------------------------
# Photometry: colour jitter, grayscale, blur, as per-image parameters and a batched apply.


def sample_jitter(seed, n, prob, brightness, contrast, saturation, hue) -> dict:
    """Per-image ColorJitter parameters for n images (torchvision ColorJitter.get_params: the
    order is randperm(4), then each factor), and whether RandomApply(p=prob) applies it."""
    s = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 6)
    order = tf.argsort(_uniform(s[0], (n, _JITTER_OPS), 0.0, 1.0), axis=1, stable=True)
    return {
        "jitter": _uniform(s[1], (n,), 0.0, 1.0) < prob,
        "order": tf.cast(order, tf.int32),
        "brightness": _uniform(s[2], (n,), max(0.0, 1 - brightness), 1 + brightness),
        "contrast": _uniform(s[3], (n,), max(0.0, 1 - contrast), 1 + contrast),
        "saturation": _uniform(s[4], (n,), max(0.0, 1 - saturation), 1 + saturation),
        "hue": _uniform(s[5], (n,), -hue, hue),
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


def blur_radius(sigma_max: float) -> int:
    """Kernel radius of a Gaussian blur with sigma up to sigma_max: truncated at 3 sigma."""
    return max(1, int(math.ceil(3.0 * sigma_max)))


# ------------------------------------------------------------------------------------------------
# The per-image kernels (tf.data on the CPU): one view at a time.
#
# The same operations as the batched kernels, arranged for a CPU core: one 224 px view (600 kB)
# stays in the L2 cache through every op, each image runs only the ops its own parameters select
# (tf.cond / tf.switch_case on scalars, so no work is done and thrown away), colour jitter works
# on contiguous planes CxHxW (mixing channels needs no strided access) and the blur is a banded
# matmul. Tests check them against the batched kernels and against torchvision's formulas.


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


def _jitter_planar(image, params, hue: bool):
    """torchvision ColorJitter on one planar image, its four ops in this image's order."""
    ops = (
        lambda x: _clip01(x * params["brightness"]),
        lambda x: _clip01(
            x * params["contrast"] + tf.reduce_mean(_gray_planar(x)) * (1.0 - params["contrast"])
        ),
        lambda x: _clip01(
            x * params["saturation"] + _gray_planar(x) * (1.0 - params["saturation"])
        ),
        (lambda x: _hue_planar(x, params["hue"])) if hue else (lambda x: x),
    )
    x = image
    for pos in range(_JITTER_OPS):
        x = tf.switch_case(params["order"][pos], [lambda op=op, x=x: op(x) for op in ops])
    return x


def _gray_image(image):
    """ITU-R 601 luma of one HxWx3 image, in all 3 channels: one (HW x 3) @ (3 x 3) matmul."""
    luma = tf.tile(tf.constant(_LUMA, image.dtype)[:, None], (1, 3))
    return tf.reshape(tf.matmul(tf.reshape(image, (-1, 3)), luma), tf.shape(image))


# ------------------------------------------------------------------------------------------------
# The recipe as keras-cv layers.
#
# Each op is a keras-cv VectorizedBaseImageAugmentationLayer and runs through keras-cv's own
# call path: `layer(images)` or `layer({"images": ..., "seed": ...})`. keras-cv draws a batch of
# per-image parameters (`get_random_transformation_batch`), then calls `augment_images` once on
# the whole batch, which runs the batched kernel, or the per-image kernel for a single image
# (what tf.data calls per example). The draws are stateless: a call whose inputs carry "seed"
# (int64 [2]) draws from it, so the pipeline keys every draw by (seed, epoch, batch or example,
# view, layer) and a run resumes mid-epoch with the very same views. Inputs that carry "params"
# (per-image parameters drawn in tf.data) apply those: that is how device mode runs the colour
# half in the train step. A call with neither draws from the layer's own generator, as stock
# keras-cv layers do.

SEED_KEY = "seed"
PARAMS_KEY = "params"


class RecipeLayer(keras_cv.layers.VectorizedBaseImageAugmentationLayer):
    """Base of the recipe's layers: keras-cv's call path with stateless, per-image draws.

    Subclasses implement `sample(seed, n, images)` (a dict of per-image parameters with leading
    dim n), `augment_batch(images, params)` and `augment_one(image, params)` (one HxWxC image,
    its parameters as scalars). `geometric` layers stay in tf.data in device mode.

    kernels: what the per-image kernel of a layer that has a native one (the crop, the colour
    jitter) runs: "auto" (the C++ kernels of `simsiam_tf.native` where built, else stock
    TensorFlow ops), "native" (ConfigError here when they are not built), "tf" (stock ops).
    The same results to float rounding; the batched kernels are stock ops whatever is set.
    """

    geometric = False

    def __init__(self, seed=None, kernels="auto", **kwargs):
        # float32 whatever the global (mixed) precision policy: the kernels and the parameters
        # are float32, and colour ops in float16 would be coarser than the uint8 views.
        kwargs.setdefault("dtype", "float32")
        super().__init__(seed=seed, **kwargs)
        self._call_inputs = threading.local()
        if kernels not in native.KERNELS:
            raise ValueError(f"kernels={kernels!r}: choose one of {native.KERNELS}")
        self.kernels = kernels
        if kernels == "native":
            native.ops(kernels)  # not built: a ConfigError now, not at the first example

    def _native(self):
        """The native op library for the per-image kernel, or None for stock ops."""
        return native.ops(self.kernels)

    def get_config(self):
        config = super().get_config()
        config.update(kernels=self.kernels)
        return config

    def sample(self, seed, n, images=None) -> dict:
        raise NotImplementedError

    def augment_batch(self, images, params):
        raise NotImplementedError

    def augment_one(self, image, params):
        raise NotImplementedError

    def _batch_augment(self, inputs):
        # keras-cv hands get_random_transformation_batch the images only; this call's seed or
        # parameters travel in the inputs dict, so they are kept at hand for it.
        self._call_inputs.value = inputs
        try:
            return super()._batch_augment(inputs)
        finally:
            self._call_inputs.value = None

    def get_random_transformation_batch(self, batch_size, images=None, **kwargs):
        inputs = getattr(self._call_inputs, "value", None) or {}
        if PARAMS_KEY in inputs:
            return inputs[PARAMS_KEY]
        if SEED_KEY in inputs:
            seed = tf.reshape(inputs[SEED_KEY], (2,))  # a single image's seed arrives as [1, 2]
        else:
            seed = self._random_generator.uniform_full_int((2,), dtype=tf.int64)
        return self.sample(seed, batch_size, images)

    def augment_images(self, images, transformations, **kwargs):
        if images.shape[0] == 1:  # one image (tf.data, per example): the per-image kernel
            one = self.augment_one(images[0], {k: v[0] for k, v in transformations.items()})
            return one[None]
        return self.augment_batch(images, transformations)

    def augment_labels(self, labels, transformations, **kwargs):
        return labels


class RandomResizedCrop(RecipeLayer):
    """torchvision RandomResizedCrop(size, scale, ratio): a window of area fraction ~ U(scale)
    and log aspect ratio ~ U(log ratio), resized to size x size. A single image is resized with
    antialiased bilinear (as PIL); a batch of images of one size with bilinear at half-pixel
    centres, exact for enlarged crops (CIFAR). The output is multiplied by `rescale`, as by
    keras.layers.Rescaling but at no cost (it is folded into the resize weights): the recipe
    uses 1/255, from uint8 values to [0, 1]."""

    geometric = True

    def __init__(self, size, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), rescale=1.0, **kwargs):
        super().__init__(**kwargs)
        self.size = int(size)
        self.scale = tuple(scale)
        self.ratio = tuple(ratio)
        self.rescale = float(rescale)
        if self.size < 1 or not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"size={size} and scale={scale}: need size >= 1, 0 < min <= max <= 1")

    def _ensure_inputs_are_compute_dtype(self, inputs):
        # keras-cv casts the whole input image to float first; the crop reads only its window
        # and casts that (in _resample_rows), which saves a pass over the decoded image.
        return inputs

    def sample(self, seed, n, images=None):
        shape = tf.shape(images)
        y, x, h, w = sample_crop_windows(seed, shape[1], shape[2], n, self.scale, self.ratio)
        return {"y": y, "x": x, "h": h, "w": w}

    @staticmethod
    def _window(p):
        return p["y"], p["x"], p["h"], p["w"]

    def augment_batch(self, images, params):
        no_flip = tf.zeros_like(params["y"], tf.bool)
        return batch_crop_resize(images, self._window(params), no_flip, self.size, self.rescale)

    def augment_one(self, image, params):
        ops = self._native()
        if ops is not None and image.dtype == tf.uint8 and image.shape[-1] == 3:
            window = tf.cast(tf.stack(self._window(params)), tf.int32)
            return ops.simsiam_resize_crop(image, window, size=self.size, gain=self.rescale)
        view = resize_crop(image, self._window(params), False, self.size, self.rescale)
        return tf.transpose(view, (1, 0, 2))

    def get_config(self):
        config = super().get_config()
        config.update(size=self.size, scale=self.scale, ratio=self.ratio, rescale=self.rescale)
        return config


class HorizontalFlip(RecipeLayer):
    """torchvision RandomHorizontalFlip(p)."""

    geometric = True

    def __init__(self, prob=0.5, **kwargs):
        super().__init__(**kwargs)
        self.prob = float(prob)

    def sample(self, seed, n, images=None):
        return {"flip": sample_flips(seed, n, self.prob)}

    def augment_batch(self, images, params):
        return _where_rows(params["flip"], tf.reverse(images, axis=[2]), images)

    def augment_one(self, image, params):
        return tf.cond(params["flip"], lambda: tf.reverse(image, axis=[1]), lambda: image)

    def _ensure_inputs_are_compute_dtype(self, inputs):
        # A mirror is exact in any type: uint8 views stay uint8 (keras-cv would cast them to
        # float32 first, 4x the bytes to move).
        return inputs

    def get_config(self):
        config = super().get_config()
        config.update(prob=self.prob)
        return config


class ColorJitter(RecipeLayer):
    """RandomApply(ColorJitter(brightness, contrast, saturation, hue), p=prob) with torchvision
    semantics: factors ~ U[1 - s, 1 + s] (hue ~ U[-h, h]), the four ops in a random order per
    image, each result clipped to [0, 1]. Images float in [0, 1]."""

    def __init__(self, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, prob=0.8, **kwargs):
        super().__init__(**kwargs)
        self.brightness = float(brightness)
        self.contrast = float(contrast)
        self.saturation = float(saturation)
        self.hue = float(hue)
        self.prob = float(prob)

    def sample(self, seed, n, images=None):
        return sample_jitter(
            seed, n, self.prob, self.brightness, self.contrast, self.saturation, self.hue
        )

    def augment_batch(self, images, params):
        return color_jitter(images, params)

    def augment_one(self, image, params):
        ops = self._native()

        def jitter():
            if ops is not None and image.dtype == tf.float32 and image.shape[-1] == 3:
                factors = tf.stack(
                    [params[k] for k in ("brightness", "contrast", "saturation", "hue")]
                )
                return ops.simsiam_color_jitter(image, params["order"], factors, hue=self.hue > 0)
            planar = tf.transpose(image, (2, 0, 1))
            return tf.transpose(_jitter_planar(planar, params, self.hue > 0), (1, 2, 0))

        return tf.cond(params["jitter"], jitter, lambda: image)

    def get_config(self):
        config = super().get_config()
        config.update(
            brightness=self.brightness,
            contrast=self.contrast,
            saturation=self.saturation,
            hue=self.hue,
            prob=self.prob,
        )
        return config


class RandomGrayscale(RecipeLayer):
    """torchvision RandomGrayscale(p): ITU-R 601 luma in all three channels."""

    def __init__(self, prob=0.2, **kwargs):
        super().__init__(**kwargs)
        self.prob = float(prob)

    def sample(self, seed, n, images=None):
        return {"grayscale": _uniform(seed, (n,), 0.0, 1.0) < self.prob}

    def augment_batch(self, images, params):
        return _where_rows(params["grayscale"], tf.tile(grayscale(images), (1, 1, 1, 3)), images)

    def augment_one(self, image, params):
        return tf.cond(params["grayscale"], lambda: _gray_image(image), lambda: image)

    def get_config(self):
        config = super().get_config()
        config.update(prob=self.prob)
        return config


class GaussianBlur(RecipeLayer):
    """RandomApply(GaussianBlur(sigma ~ U(sigma)), p=prob), the MoCo v2 blur, as an exact
    separable Gaussian truncated at 3 sigma with reflected edges (PIL approximates it by three
    box blurs)."""

    def __init__(self, prob=0.5, sigma=(0.1, 2.0), **kwargs):
        super().__init__(**kwargs)
        self.prob = float(prob)
        self.sigma = tuple(sigma)
        self.radius = blur_radius(self.sigma[1])

    def sample(self, seed, n, images=None):
        s = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 2)
        return {
            "blur": _uniform(s[0], (n,), 0.0, 1.0) < self.prob,
            "sigma": _uniform(s[1], (n,), self.sigma[0], self.sigma[1]),
        }

    def augment_batch(self, images, params):
        blur = lambda x, s: gaussian_blur(x, s, self.radius)
        return _on_subset(blur, images, params["blur"], params["sigma"])

    def augment_one(self, image, params):
        blur = lambda: blur_image(image, params["sigma"], self.radius)
        return tf.cond(params["blur"], blur, lambda: image)

    def get_config(self):
        config = super().get_config()
        config.update(prob=self.prob, sigma=self.sigma)
        return config


RECIPE_LAYERS = {
    cls.__name__: cls
    for cls in (RandomResizedCrop, ColorJitter, RandomGrayscale, GaussianBlur, HorizontalFlip)
}


# ------------------------------------------------------------------------------------------------
# The recipe of a config: its layers, extra layers named in the config, and where each runs.


def _layer_class(name: str):
    """The layer class called `name`: the recipe's own, then keras_cv.layers, then keras.layers
    (Keras 3's preprocessing layers); "keras_cv.X" or "keras.X" picks the module."""
    module, _, short = name.rpartition(".")
    places = {
        "": [RECIPE_LAYERS, vars(keras_cv.layers), vars(keras.layers)],
        "keras_cv": [vars(keras_cv.layers)],
        "keras": [vars(keras.layers)],
    }
    for place in places.get(module, []):
        cls = place.get(short)
        if isinstance(cls, type) and issubclass(cls, keras.layers.Layer):
            return cls
    return None


def _is_dotted_name(node) -> bool:
    """Name or module.Name."""
    if isinstance(node, ast.Attribute):
        return isinstance(node.value, ast.Name)
    return isinstance(node, ast.Name)


_ARITHMETIC = {ast.Add: float.__add__, ast.Sub: float.__sub__, ast.Mult: float.__mul__}
_ARITHMETIC[ast.Div] = float.__truediv__


def _literal(node):
    """A Python literal (ast.literal_eval), in which numbers may also be written as arithmetic
    of numbers, such as 1/255; nothing is evaluated as code."""
    if isinstance(node, ast.BinOp) and type(node.op) in _ARITHMETIC:
        left, right = _literal(node.left), _literal(node.right)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (left, right)):
            raise ValueError(f"arithmetic of non-numbers: {ast.unparse(node)}")
        return _ARITHMETIC[type(node.op)](float(left), float(right))
    if isinstance(node, (ast.Tuple, ast.List)):
        values = [_literal(e) for e in node.elts]
        return tuple(values) if isinstance(node, ast.Tuple) else values
    return ast.literal_eval(node)


def parse_layers(spec: str, key: str) -> list:
    """(text, layer) pairs from "Name(arg, key=value); Name(...)". Arguments are Python literals
    (numbers also as arithmetic such as 1/255), parsed and never evaluated as code. Raises
    ConfigError, naming `key`, for an unknown name or a bad argument.

    A recipe (`aug.recipe`) takes the decoded uint8 image and must make image_size views in
    [0, 1]: begin it with RandomResizedCrop(SIZE, rescale=1/255), or with stock layers that crop
    and resize, then keras.Rescaling(1/255)."""
    layers = []
    for text in filter(None, (part.strip() for part in spec.split(";"))):
        try:
            node = ast.parse(text, mode="eval").body
        except SyntaxError:
            node = None
        if isinstance(node, (ast.Name, ast.Attribute)):
            node = ast.Call(func=node, args=[], keywords=[])
        if not isinstance(node, ast.Call) or not _is_dotted_name(node.func):
            raise ConfigError(
                f"config.{key}: {text!r} is not a layer call such as "
                "RandomSharpness(factor=0.5, value_range=(0, 1))"
            )
        name = ast.unparse(node.func)
        cls = _layer_class(name)
        if cls is None:
            raise ConfigError(
                f"config.{key}: no layer {name!r} among the recipe's layers "
                f"({', '.join(RECIPE_LAYERS)}), keras_cv.layers or keras.layers"
            )
        try:
            if any(k.arg is None for k in node.keywords):
                raise ValueError("**kwargs are not supported")
            args = [_literal(a) for a in node.args]
            kwargs = {k.arg: _literal(k.value) for k in node.keywords}
        except ValueError as e:
            raise ConfigError(
                f"config.{key}: {text!r}: arguments must be literals (numbers or arithmetic of "
                f"numbers, strings, tuples, lists, dicts, True, False, None): {e}"
            ) from None
        try:
            layer = cls(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 (any constructor error is a bad argument)
            first = (str(e).strip().splitlines() or [""])[0]
            raise ConfigError(f"config.{key}: {text!r}: {type(e).__name__}: {first}") from None
        layers.append((text, layer))
    return layers


_SHOWN_ARGS = ("size", "scale", "ratio", "brightness", "contrast", "saturation", "hue", "sigma")


def _shown(value):
    return tuple(round(v, 3) for v in value) if isinstance(value, tuple) else value


def recipe_layers(aug_config, image_size: int) -> list:
    """(text, layer) pairs: the recipe of `aug_config` (or the layers of its `recipe` string),
    then its `extra` layers. Ops with probability 0 are left out."""
    a = aug_config
    kernels = a.get("kernels", "auto")
    if a.get("recipe"):
        layers = parse_layers(a.recipe, "aug.recipe")
    else:
        layers = []
        for layer in (
            RandomResizedCrop(
                image_size, a.crop_scale, a.crop_ratio, rescale=1.0 / 255.0, kernels=kernels
            ),
            ColorJitter(
                a.brightness, a.contrast, a.saturation, a.hue, a.jitter_prob, kernels=kernels
            ),
            RandomGrayscale(a.grayscale_prob),
            GaussianBlur(a.blur_prob, a.blur_sigma),
            HorizontalFlip(a.flip_prob),
        ):
            config = layer.get_config()
            if config.get("prob", 1.0) > 0:
                shown = [f"{k}={_shown(config[k])}" for k in _SHOWN_ARGS if k in config]
                shown += [f"p={config['prob']}"] if "prob" in config else []
                layers.append((f"{type(layer).__name__}({', '.join(shown)})", layer))
    if a.get("extra"):
        layers += parse_layers(a.extra, "aug.extra")
    return layers


def to_uint8(views):
    """Views float in [0, 1] -> uint8 (views travel as uint8: 4x less to copy)."""
    return tf.cast(tf.clip_by_value(tf.round(views * 255.0), 0.0, 255.0), tf.uint8)


def _call(layer, images, seed):
    """`layer` on `images` through its own (keras-cv or Keras) call; the recipe's layers are
    given their stateless `seed`."""
    if isinstance(layer, RecipeLayer):
        return layer({"images": images, SEED_KEY: seed})["images"]
    return layer(images)


def _is_geometric(layer) -> bool:
    return getattr(layer, "geometric", False)


def _check_device_split(layers, descriptions):
    """Device mode moves the geometric layers ahead of the others: allowed when the recipe
    starts with RandomResizedCrop and only the recipe's own colour layers (which commute with
    the flip) come before a geometric layer."""
    last = max((i for i, layer in enumerate(layers) if _is_geometric(layer)), default=-1)
    if not layers or not isinstance(layers[0], RandomResizedCrop):
        raise ConfigError(
            "config.data.photometric='device' needs a recipe that starts with "
            "RandomResizedCrop(...) (the crop runs in tf.data); use data.photometric='cpu'"
        )
    for text, layer in zip(descriptions[:last], layers[:last]):
        if not isinstance(layer, RecipeLayer):
            raise ConfigError(
                f"config.data.photometric='device': {text!r} comes before a geometric layer "
                "that would move ahead of it; put stock layers after the flip, or use "
                "data.photometric='cpu'"
            )


class TwoViewRecipe:
    """The augmentation recipe of a config as a list of layers, and where each one runs.

    photometric "cpu": every layer runs in tf.data (`cpu_stage`). "device": the recipe's
    geometric layers (crop, flip) run in tf.data and every other layer in the train step
    (`device_stage`), the recipe's own on per-image parameters drawn in tf.data
    (`device_params`). The flip commutes with the colour ops, so the order is kept in effect.
    Layer i of a view draws from fold_seed(seed, i), `seed` being the view's own key.
    """

    def __init__(self, aug_config, image_size: int, photometric: str = "cpu"):
        described = recipe_layers(aug_config, image_size)
        self.descriptions = [text for text, _ in described]
        self.layers = [layer for _, layer in described]
        on_device = photometric == "device"
        if on_device:
            _check_device_split(self.layers, self.descriptions)
        indexed = list(enumerate(self.layers))
        self.cpu_layers = [(i, x) for i, x in indexed if not on_device or _is_geometric(x)]
        self.device_layers = [(i, x) for i, x in indexed if on_device and not _is_geometric(x)]
        self._round_crop = None  # device mode: rounds the crop's 0-255 views to uint8 at once
        if on_device and all(
            isinstance(x, (RandomResizedCrop, HorizontalFlip)) for _, x in self.cpu_layers
        ):
            # The CPU stage is crop and flip, rounded to uint8 views: its crop resamples straight
            # to 0-255 (a copy of the layer with rescale 1 instead of 1/255), so that the views
            # need no x255 and no clip (the resampling weights are >= 0 and sum to 1), and are
            # rounded before the flip, which then moves a quarter of the bytes (rounding and
            # mirroring commute).
            crop = self.cpu_layers[0][1]
            if crop.rescale * 255.0 == 1.0:
                clone = RandomResizedCrop.from_config({**crop.get_config(), "rescale": 1.0})
                self.cpu_layers[0] = (self.cpu_layers[0][0], clone)
                self._round_crop = lambda views: tf.cast(tf.round(views), tf.uint8)

    @property
    def description(self) -> str:
        return "; ".join(self.descriptions)

    def cpu_stage(self, images, seed):
        """A decoded uint8 image HxWx3 (or a batch NxHxWx3 of one size) -> its view(s), uint8."""
        for i, layer in self.cpu_layers:
            images = _call(layer, images, fold_seed(seed, i))
            if self._round_crop is not None and isinstance(layer, RandomResizedCrop):
                images = self._round_crop(images)
        return images if images.dtype == tf.uint8 else to_uint8(images)

    def device_params(self, seed, n) -> dict:
        """Per-image parameters of the device stage's recipe layers for n views: {"layerI": ...}."""
        return {
            f"layer{i}": layer.sample(fold_seed(seed, i), n)
            for i, layer in self.device_layers
            if isinstance(layer, RecipeLayer)
        }

    def device_stage(self):
        """The layers the train step runs, as one keras Layer; None when there are none."""
        return DeviceAugment(self.device_layers) if self.device_layers else None


class DeviceAugment(keras.layers.Layer):
    """The device stage of a recipe, in the train step: `augment(images, params=...)` runs each
    layer through its own call on the batch, the recipe's layers on the parameters drawn in
    tf.data (`TwoViewRecipe.device_params`), stock layers on their own random state.
    Images float in [0, 1]."""

    def __init__(self, indexed_layers, **kwargs):
        kwargs.setdefault("dtype", "float32")  # as the recipe's layers, whatever the policy
        super().__init__(**kwargs)
        self.keys = [f"layer{i}" for i, _ in indexed_layers]
        self.stages = [layer for _, layer in indexed_layers]
        # Augmentation layers have no weights: built as made, so that Keras does not try to
        # build the model from a sample batch (which it reduces over replicas, and cannot for
        # the boolean parameters).
        for layer in self.stages + [self]:
            layer.built = True

    def call(self, images, params):
        for key, layer in zip(self.keys, self.stages):
            if key in params:
                images = layer({"images": images, PARAMS_KEY: params[key]})["images"]
            else:
                images = layer(images)
        return images
