"""Measures the remaining departures from the official SimSiam code (docs/FIDELITY.md).

    python tools/measure_departures.py --photos=DIR [--size=0] [--num=500] [--seed=0]

Three departures, each against what the official code computes:

  schedule  our cosine is evaluated per step; main_simsiam.py / main_lincls.py set
            lr = peak x 0.5 x (1 + cos(pi x epoch / epochs)) once per epoch. For every recipe in
            configs/ and both linear protocols: the largest gap between the two curves (as a
            fraction of the peak lr) and the difference of their sums (the total step size).
  blur      our separable Gaussian (truncated at 3 sigma_max, reflected edges) against PIL's
            ImageFilter.GaussianBlur(radius=sigma), which simsiam/loader.py calls, on real
            photos, for sigma across the recipe's range [0.1, 2].
  resize    our RandomResizedCrop resampling (the per-image antialiased path that image files
            take; the batched bilinear path of in-memory sources when the photos are all one
            size) against PIL's img.crop(box).resize((size, size), BILINEAR), which torchvision
            runs, on windows drawn by the recipe (scale 0.2-1) and resized to --view px.
  colour    our colour jitter + grayscale (float in [0, 1] between ops, one rounding at the end)
            against torchvision's ColorJitter + RandomGrayscale on PIL images, which round to
            uint8 after every op (ImageEnhance for brightness, contrast, saturation; uint8 HSV
            for hue; convert("L") for grayscale), with the same per-image factors and op order.
            Each op alone, then the recipe's full draw (jitter p=0.8, grayscale p=0.2).

Differences are in uint8 grey levels (0-255) of the finished images. DIR is an image folder
(class subfolders or flat), e.g. the CIFAR-10 JPEGs' test/ folder, or photos of ImageNet size
from tools/make_bench_folder.py with --size=224. Prints Markdown tables.
"""

from __future__ import annotations

import glob
import importlib.util
import math
import os

import cli  # noqa: F401  (first: a quiet TensorFlow start-up)

import ml_collections
import numpy as np
import tensorflow as tf
from absl import app, flags
from PIL import Image, ImageEnhance, ImageFilter

from simsiam_tf import augment, data, linear, optim
from simsiam_tf.config import default_config

_PHOTOS = flags.DEFINE_string("photos", None, "Image folder of real photos.")
_SIZE = flags.DEFINE_integer(
    "size", 0, "Resize every photo to SIZE x SIZE (PIL bilinear); 0: keep."
)
_NUM = flags.DEFINE_integer("num", 500, "Number of photos (a seeded subset of the folder).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the subset and of the augmentation draws.")
_VIEW = flags.DEFINE_integer("view", 0, "resize: output size of a view (0: the photos' size).")
_PARTS = flags.DEFINE_list("parts", ["schedule", "resize", "blur", "colour"], "What to measure.")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Training-set sizes of the recipes' sources (a `data.max_examples` subset overrides them).
TRAIN_EXAMPLES = {"tfds:cifar10": 50_000, "tfds:imagenet2012": 1_281_167, "builtin:digits": 1_347}
CIFAR_TRAIN, IMAGENET_TRAIN = 50_000, 1_281_167


# ------------------------------------------------------------------------------------------------
# Schedule.


def schedule_gap(peak: float, epochs: int, steps: int, warmup_epochs: float = 0.0) -> dict:
    """Ours (optim.WarmupCosine, per step) against the official per-epoch cosine."""
    total = epochs * steps
    ours = optim.WarmupCosine(peak, total, int(warmup_epochs * steps))(tf.range(total)).numpy()
    epoch = np.arange(total) // steps
    official = peak * 0.5 * (1.0 + np.cos(math.pi * epoch / epochs))
    gap = np.abs(ours.astype(np.float64) - official)
    return {
        "epochs": epochs,
        "warmup_epochs": warmup_epochs,
        "steps_per_epoch": steps,
        "max_gap_of_peak": float(gap.max() / peak),
        "sum_ratio_minus_1": float(ours.sum(dtype=np.float64) / official.sum() - 1.0),
        "last_epoch_official_of_peak": float(official[-1] / peak),
    }


def _load_config(path: str) -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def measure_schedule() -> list:
    rows = []
    for path in sorted(glob.glob(os.path.join(REPO, "configs", "*.py"))):
        c = _load_config(path)
        n = c.data.max_examples or TRAIN_EXAMPLES.get(c.data.source, CIFAR_TRAIN)
        steps = n // c.optim.batch_size
        peak = optim.scaled_lr(c.optim.base_lr, c.optim.batch_size)
        row = schedule_gap(peak, c.optim.epochs, steps, c.optim.warmup_epochs)
        rows.append({"schedule": f"pretrain {os.path.basename(path)}", **row})
    for name, n in (("cifar", CIFAR_TRAIN), ("imagenet", IMAGENET_TRAIN)):
        p = linear.get_protocol(name)
        row = schedule_gap(p.lr, p.epochs, max(n // p.batch_size, 1))
        rows.append({"schedule": f"linear protocol {name}", **row})
    return rows


# ------------------------------------------------------------------------------------------------
# Photos.


def load_photos(folder: str, num: int, size: int, seed: int) -> list:
    """uint8 HxWx3 arrays of a seeded subset of the folder's images, optionally resized."""
    paths, _, _ = data.list_image_folder(folder)
    rng = np.random.default_rng(seed)
    keep = np.sort(rng.permutation(len(paths))[: min(num, len(paths))])
    photos = []
    for i in keep:
        with Image.open(paths[i]) as im:
            im = im.convert("RGB")
            if size:
                im = im.resize((size, size), Image.BILINEAR)
            photos.append(np.asarray(im, np.uint8))
    return photos


def _stats(ours: list, reference: list) -> dict:
    d = np.concatenate(
        [(a.astype(np.int16) - b.astype(np.int16)).ravel() for a, b in zip(ours, reference)]
    )
    a = np.abs(d)
    return {
        "max": int(a.max()),
        "mean": float(a.mean()),
        "mean_signed": float(d.mean()),
        "frac_gt1": float((a > 1).mean()),
    }


# ------------------------------------------------------------------------------------------------
# Crop and resize.


def measure_resize(photos: list, view: int, seed: int) -> list:
    cfg = default_config().aug
    same_size = len({p.shape for p in photos}) == 1
    pil, planar, batched = [], [], []
    for i, photo in enumerate(photos):
        h, w = photo.shape[:2]
        win = augment.sample_crop_windows(
            tf.constant([seed, i], tf.int64), h, w, 1, cfg.crop_scale, cfg.crop_ratio
        )
        y, x, ch, cw = (int(t[0]) for t in win)
        box = (x, y, x + cw, y + ch)
        pil.append(
            np.asarray(Image.fromarray(photo).crop(box).resize((view, view), Image.BILINEAR))
        )
        no_flip = tf.constant(False)
        window = (y, x, ch, cw)
        out = augment.resize_crop(tf.constant(photo), window, no_flip, view)
        planar.append(_to_uint8(tf.transpose(out, (1, 0, 2)) / 255.0))
        if same_size:
            windows = tuple(tf.constant([v]) for v in window)
            batched.append(
                augment.batch_crop_resize_flip(
                    photo[None], windows, tf.constant([False]), view
                ).numpy()[0]
            )
    rows = [{"path": "per image (antialiased, files)", **_stats(planar, pil)}]
    if same_size:
        rows.append({"path": "batched (bilinear, in memory)", **_stats(batched, pil)})
    return rows


# ------------------------------------------------------------------------------------------------
# Blur.


def _to_uint8(x) -> np.ndarray:
    return np.clip(np.round(np.asarray(x) * 255.0), 0, 255).astype(np.uint8)


def _interior(images: list, border: int) -> list:
    """The images without their `border`-pixel frame (where edge handling matters)."""
    return [x[border:-border, border:-border] for x in images]


def measure_blur(photos: list, sigmas=(0.1, 0.5, 1.0, 1.5, 2.0)) -> list:
    radius = augment.blur_radius(default_config().aug.blur_sigma[1])  # 3 x 2 = 6 px
    rows = []
    for sigma in sigmas:
        pil, batched, planar = [], [], []
        for photo in photos:
            pil.append(np.asarray(Image.fromarray(photo).filter(ImageFilter.GaussianBlur(sigma))))
            x = tf.constant(photo, tf.float32) / 255.0
            batched.append(
                _to_uint8(augment.gaussian_blur(x[None], tf.constant([sigma]), radius)[0])
            )
            planar.append(_to_uint8(augment.blur_image(x, tf.constant(sigma), radius)))
        rows.append(
            {
                "sigma": sigma,
                **{f"all_{k}": v for k, v in _stats(batched, pil).items()},
                **{
                    f"interior_{k}": v
                    for k, v in _stats(_interior(batched, radius), _interior(pil, radius)).items()
                },
                "batched_vs_planar_max": _stats(batched, planar)["max"],
            }
        )
    return rows


# ------------------------------------------------------------------------------------------------
# Colour: torchvision's PIL path, op by op.


def _pil_hue(img: Image.Image, hue: float) -> Image.Image:
    """torchvision transforms/_functional_pil.py adjust_hue: H shifted in uint8 HSV."""
    h, s, v = img.convert("HSV").split()
    np_h = np.array(h, dtype=np.uint8)
    with np.errstate(over="ignore"):
        np_h += np.int32(hue * 255).astype(np.uint8)
    return Image.merge("HSV", (Image.fromarray(np_h, "L"), s, v)).convert("RGB")


def torchvision_pil(photo: np.ndarray, params: dict, active=range(4)) -> np.ndarray:
    """ColorJitter (ops in params["order"]) then RandomGrayscale(3 channels), as torchvision on a
    PIL image: each op returns a uint8 image. `active`: the jitter ops applied (torchvision
    applies all four: its hue op, even at a factor near 0, goes through uint8 HSV)."""
    img = Image.fromarray(photo)
    if params["jitter"]:
        ops = (
            lambda im: ImageEnhance.Brightness(im).enhance(params["brightness"]),
            lambda im: ImageEnhance.Contrast(im).enhance(params["contrast"]),
            lambda im: ImageEnhance.Color(im).enhance(params["saturation"]),
            lambda im: _pil_hue(im, params["hue"]),
        )
        for op in params["order"]:
            if op in active:
                img = ops[op](img)
    if params["grayscale"]:
        img = Image.fromarray(np.dstack([np.asarray(img.convert("L"))] * 3), "RGB")
    return np.asarray(img)


def _recipe_colour_layers(cfg):
    """The recipe's ColorJitter and RandomGrayscale layers, as the training pipeline makes them."""
    jitter = augment.ColorJitter(
        cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue, prob=cfg.jitter_prob
    )
    return jitter, augment.RandomGrayscale(prob=cfg.grayscale_prob)


def _ours(photo: np.ndarray, params: dict, cfg) -> np.ndarray:
    batch = {k: tf.constant(np.asarray(v)[None]) for k, v in params.items()}
    jitter, gray = _recipe_colour_layers(cfg)
    x = tf.constant(photo[None], tf.float32) / 255.0
    x = jitter.augment_batch(x, {k: v for k, v in batch.items() if k != "grayscale"})
    x = gray.augment_batch(x, {"grayscale": batch["grayscale"]})
    return _to_uint8(x[0])


def measure_colour(photos: list, seed: int) -> list:
    cfg = default_config().aug  # the recipe: ColorJitter(0.4, 0.4, 0.4, 0.1) p=0.8, gray p=0.2
    jitter, gray = _recipe_colour_layers(cfg)
    seeds = tf.random.experimental.stateless_split(tf.constant([seed, 7], tf.int64), 2)
    drawn = {**jitter.sample(seeds[0], len(photos)), **gray.sample(seeds[1], len(photos))}
    drawn = {k: v.numpy() for k, v in drawn.items()}
    per_image = [{k: v[i] for k, v in drawn.items()} for i in range(len(photos))]
    neutral = {"brightness": 1.0, "contrast": 1.0, "saturation": 1.0, "hue": 0.0}
    ops = list(neutral)
    cases = [(op, op) for op in ops] + [("grayscale", "grayscale"), ("full recipe draw", None)]
    rows = []
    for case, keep in cases:
        ours, ref = [], []
        for photo, p in zip(photos, per_image):
            p, active = dict(p), range(4)
            if keep is not None:  # one op alone, always applied, at its drawn factor
                p.update({k: np.float32(v) for k, v in neutral.items() if k != keep})
                p["jitter"] = np.bool_(keep != "grayscale")
                p["grayscale"] = np.bool_(keep == "grayscale")
                active = [ops.index(keep)] if keep in ops else []
            ours.append(_ours(photo, p, cfg))
            ref.append(torchvision_pil(photo, p, active))
        rows.append({"case": case, **_stats(ours, ref)})
    return rows


def _table(rows: list) -> str:
    keys = list(rows[0])
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    lines += ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main(argv):
    del argv
    parts = set(_PARTS.value)
    unknown = parts - {"schedule", "resize", "blur", "colour"}
    if unknown:
        raise app.UsageError(f"--parts: unknown {sorted(unknown)}; choose from {_PARTS.default}")
    if "schedule" in parts:
        print("## Per-step cosine against the official per-epoch cosine\n")
        print(_table(measure_schedule()) + "\n")
    if parts & {"resize", "blur", "colour"}:
        if not _PHOTOS.value or not os.path.isdir(_PHOTOS.value):
            raise app.UsageError(f"--photos={_PHOTOS.value!r}: give a folder of real photos")
        photos = load_photos(_PHOTOS.value, _NUM.value, _SIZE.value, _SEED.value)
        shapes = sorted({p.shape for p in photos})
        sides = [side for p in photos for side in p.shape[:2]]
        print(f"{len(photos)} photos, {len(shapes)} sizes, sides {min(sides)}-{max(sides)} px\n")
        if "resize" in parts:
            view = _VIEW.value or photos[0].shape[0]
            print(f"## Crop and resize to {view} px: ours against PIL crop + BILINEAR resize\n")
            print(_table(measure_resize(photos, view, _SEED.value)) + "\n")
        if "blur" in parts:
            if len(shapes) > 1:
                raise app.UsageError("blur: photos of several sizes; pass --size")
            print("## Gaussian blur: ours against PIL ImageFilter.GaussianBlur (uint8 levels)\n")
            print(_table(measure_blur(photos)) + "\n")
        if "colour" in parts:
            print("## Colour ops: ours (float) against torchvision on PIL (uint8 per op)\n")
            print(_table(measure_colour(photos, _SEED.value)) + "\n")


if __name__ == "__main__":
    cli.run(main)
