"""The two-view augmentation recipe (paper appendix A: the MoCo v2 recipe).

    RandomResizedCrop(scale 0.2-1, ratio 3/4-4/3)
    RandomApply(ColorJitter(0.4, 0.4, 0.4, 0.1), p=0.8)      torchvision semantics
    RandomGrayscale(p=0.2)
    RandomApply(GaussianBlur(sigma in [0.1, 2]), p=0.5)     ImageNet only
    RandomHorizontalFlip()

Every random number is drawn per image from stateless ops keyed by an explicit seed, in two
steps: `sample_*` draws the per-image parameters (cheap scalars), `apply_*` applies them to a
whole batch at once with vectorised ops. So

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
