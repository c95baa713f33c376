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

`--camera` writes the files as cameras and phones do instead (the bench folder's re-encoded
crops flatter a decoder that skips what camera files carry):

- an APP1 Exif segment in every file (make, model, date, and a maker note of 4-24 KB of
  opaque bytes, as cameras write), and an orientation tag: 1 in most files, 6 or 8 (the
  pixels stored turned, as a phone held upright stores them) in 1 of 4;
- chroma subsampling 4:2:0 (60%), 4:2:2 (25%) or 4:4:4 (15%), quality 80-97, and 1 file in 6
  progressive;
- sides of 192-500 px by default (`--min_side=192`).

    python tools/make_bench_folder.py --out=data/camera_photos --camera --min_side=192
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
_QUALITY = flags.DEFINE_integer("quality", 90, "JPEG quality (not with --camera).")
_CAMERA = flags.DEFINE_bool("camera", False, "Write the files as cameras do (see above).")
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


# Exif orientation -> the PIL transpose that stores a shown image as a camera writes it turned.
_STORED = {1: None, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}


def _camera_save(image: Image.Image, path: str, rng: np.random.Generator) -> None:
    """`image` (as shown) saved as a camera would: Exif with a maker note and an orientation
    (the pixels stored accordingly), varied subsampling and quality, some progressive."""
    from PIL import ImageFile

    ImageFile.MAXBLOCK = max(ImageFile.MAXBLOCK, 1 << 24)  # progressive + Exif in one block
    orientation = int(rng.choice([1, 6, 8], p=[0.75, 0.125, 0.125]))
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[0x010F], exif[0x0110] = "BenchCam", "Model 1"
    sub = exif.get_ifd(0x8769)
    sub[0x9003] = "2026:01:01 12:00:00"
    sub[0x927C] = rng.integers(0, 256, int(rng.integers(4096, 24577)), dtype=np.uint8).tobytes()
    if _STORED[orientation] is not None:
        image = image.transpose(_STORED[orientation])
    image.save(
        path,
        quality=int(rng.integers(80, 98)),
        subsampling=int(rng.choice([2, 1, 0], p=[0.6, 0.25, 0.15])),  # 4:2:0, 4:2:2, 4:4:4
        progressive=bool(rng.random() < 1 / 6),
        exif=exif.tobytes(),
    )


def make_folder(
    out: str, n: int, seed: int, sides=(200, 500), quality: int = 90, camera: bool = False
) -> list:
    """Writes n JPEG crops into `out` (as cameras write them with `camera`); returns their
    paths."""
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
        crop = resized.crop((x, y, x + w, y + h))
        if camera:
            _camera_save(crop, path, rng)
        else:
            crop.save(path, quality=quality)
        paths.append(path)
    return paths


def main(argv):
    del argv
    paths = make_folder(
        _OUT.value,
        _N.value,
        _SEED.value,
        (_MIN.value, _MAX.value),
        _QUALITY.value,
        camera=_CAMERA.value,
    )
    sizes = [os.path.getsize(p) for p in paths]
    print(
        f"files={len(paths)} sources={len(source_photos())} "
        f"mean_kb={np.mean(sizes) / 1024:.1f} out={_OUT.value}"
    )


if __name__ == "__main__":
    app.run(main)
