"""Builds a benchmark folder of real photos of ImageNet-like size (200-500 px) as JPEG files.

    python tools/make_bench_folder.py --out=data/bench_photos [--n=1024] [--seed=0]

No data set can be downloaded here, so the photos come from Python packages that ship them:
scikit-learn's `load_sample_images()` (china.jpg, flower.jpg, 427x640), matplotlib's
grace_hopper.jpg (600x512) and, when scikit-image is importable, the colour photos of
`skimage.data` (astronaut, chelsea, coffee, rocket, hubble_deep_field, retina,
immunohistochemistry, motorcycle_left). scikit-image is not a project requirement; install it
into a throwaway environment to get the full set:

    python3 -m venv .venv-skimg && .venv-skimg/bin/pip install scikit-image scikit-learn matplotlib
    .venv-skimg/bin/python tools/make_bench_folder.py --out=data/bench_photos

Each file is a random crop of one photo: width and height each uniform in [200, 500] px, taken
after rescaling the photo by a log-uniform factor between the smallest scale at which that crop
fits and 1 (never upscaled unless the photo is smaller than the crop), resampled with Lanczos,
saved as baseline JPEG quality 90 with 4:2:0 chroma subsampling (PIL's defaults; most ImageNet
files are like that). Seeded: the same command writes the same files.
"""

from __future__ import annotations

import math
import os

import numpy as np
from absl import app, flags
from PIL import Image

_OUT = flags.DEFINE_string("out", None, "Folder to write (created; never inside the repo).")
_N = flags.DEFINE_integer("n", 1024, "Number of JPEG files.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the crops.")
_MIN = flags.DEFINE_integer("min_side", 200, "Smallest side of a file, px.")
_MAX = flags.DEFINE_integer("max_side", 500, "Largest side of a file, px.")
_QUALITY = flags.DEFINE_integer("quality", 90, "JPEG quality.")
flags.mark_flag_as_required("out")

SKIMAGE_PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "retina",
    "immunohistochemistry",
)


def source_photos() -> dict:
    """Name -> uint8 HxWx3 array of every real colour photo the installed packages ship."""
    from sklearn.datasets import load_sample_images

    photos = {}
    sample = load_sample_images()
    for path, image in zip(sample.filenames, sample.images):
        photos[os.path.basename(path)] = image
    try:
        import matplotlib.cbook

        with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
            photos["grace_hopper.jpg"] = np.asarray(Image.open(f).convert("RGB"))
    except (ImportError, OSError, ValueError):
        pass
    try:
        import skimage.data
    except ImportError:
        return photos
    for name in SKIMAGE_PHOTOS:
        photos[name] = np.asarray(getattr(skimage.data, name)())[..., :3]
    left = os.path.join(os.path.dirname(skimage.data.__file__), "motorcycle_left.png")
    if os.path.exists(left):
        photos["motorcycle_left"] = np.asarray(Image.open(left).convert("RGB"))
    return photos


def make_folder(out: str, n: int, seed: int, sides=(200, 500), quality: int = 90) -> list:
    """Writes n JPEG crops into `out`; returns their paths."""
    photos = source_photos()
    names = sorted(photos)
    rng = np.random.default_rng(seed)
    os.makedirs(out, exist_ok=True)
    paths = []
    for i in range(n):
        name = names[i % len(names)]
        photo = Image.fromarray(photos[name])
        big_w, big_h = photo.size
        w, h = (int(rng.integers(sides[0], sides[1] + 1)) for _ in range(2))
        low = max(w / big_w, h / big_h)
        high = max(low, 1.0)
        scale = math.exp(rng.uniform(math.log(low), math.log(high)))
        new_w = max(w, int(math.ceil(big_w * scale)))
        new_h = max(h, int(math.ceil(big_h * scale)))
        resized = photo.resize((new_w, new_h), Image.LANCZOS)
        x = int(rng.integers(0, new_w - w + 1))
        y = int(rng.integers(0, new_h - h + 1))
        path = os.path.join(out, f"{i:05d}_{os.path.splitext(name)[0]}.jpg")
        resized.crop((x, y, x + w, y + h)).save(path, quality=quality)
        paths.append(path)
    return paths


def main(argv):
    del argv
    paths = make_folder(_OUT.value, _N.value, _SEED.value, (_MIN.value, _MAX.value), _QUALITY.value)
    sizes = [os.path.getsize(p) for p in paths]
    print(
        f"files={len(paths)} sources={len(source_photos())} "
        f"mean_kb={np.mean(sizes) / 1024:.1f} out={_OUT.value}"
    )


if __name__ == "__main__":
    app.run(main)
