"""Test set-up: TensorFlow quiet, the CPU split into 2 logical devices (so MirroredStrategy runs
with 2 replicas anywhere), and fixtures for real image data."""

import atexit
import os
import shutil
import sys
import tarfile
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["KERAS_BACKEND"] = "tensorflow"
# Everything a test session writes goes under one directory of its own, removed at exit:
# pytest's tmp_path, the temporary files of libraries (TFDS leaves an empty tmp*tfds directory
# per dataset builder) and of subprocesses (they inherit TMPDIR). Unpacked archives and
# image-check verdicts go to a cache in it, never to the user's ~/.cache.
_SESSION_TMP = tempfile.mkdtemp(prefix="simsiam-tf-test-")
atexit.register(shutil.rmtree, _SESSION_TMP, ignore_errors=True)
os.environ["TMPDIR"] = _SESSION_TMP
tempfile.tempdir = None  # gettempdir() reads TMPDIR again
os.environ["SIMSIAM_TF_CACHE"] = os.path.join(_SESSION_TMP, "cache")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(1, os.path.join(REPO, "tools"))  # tools import their shared `cli` module

_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    _cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
)

CIFAR_TAR = os.environ.get(
    "SIMSIAM_CIFAR10_TAR", os.path.join(REPO, "..", "shared", "data", "cifar10-jpeg.tar.gz")
)


@pytest.fixture(scope="session")
def cifar10_folder(tmp_path_factory):
    """A class-per-subfolder CIFAR-10 JPEG folder with train/ (40 per class) and test/ (10 per
    class), unpacked from ../shared/data; skips where the archive is absent."""
    if not os.path.exists(CIFAR_TAR):
        pytest.skip(f"real CIFAR-10 JPEGs not found at {CIFAR_TAR}")
    root = tmp_path_factory.mktemp("cifar10")
    want = {"train": 40, "test": 10}
    counts = {}
    with tarfile.open(CIFAR_TAR, "r:gz") as tar:
        for member in tar:
            if not member.isfile() or not member.name.lower().endswith(".jpg"):
                continue
            parts = member.name.split("/")
            split = next((p for p in parts if p in want), None)
            if split is None:
                continue
            cls = parts[parts.index(split) + 1]
            key = (split, cls)
            if counts.get(key, 0) >= want[split]:
                continue
            counts[key] = counts.get(key, 0) + 1
            dest = root / split / cls / os.path.basename(member.name)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(tar.extractfile(member).read())
            if len(counts) == 20 and all(counts[k] >= want[k[0]] for k in counts):
                break
    return str(root)


def write_images(folder, n, size=(24, 20), mode="RGB", ext=".png", seed=0):
    """n small real-format image files (PIL) of smooth random colour blobs."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(n):
        base = rng.integers(0, 255, (4, 4, 3)).astype(np.uint8)
        img = Image.fromarray(base).resize(size, Image.BILINEAR).convert(mode)
        path = os.path.join(folder, f"img{i:03d}{ext}")
        img.save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="session")
def two_replicas():
    """One MirroredStrategy over the 2 logical CPUs for the whole session: strategies created
    side by side in one process can collide on collective-op instance keys."""
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


# A tiny trained run, its SavedModel and the in-memory encoder, built once per session
# (tests/export_helpers.py caches them) for the export, serving-client and embed tests.
@pytest.fixture(scope="session")
def run(tmp_path_factory):
    from tests import export_helpers

    return export_helpers.tiny_run(tmp_path_factory)


@pytest.fixture(scope="session")
def saved_model(tmp_path_factory):
    from tests import export_helpers

    return export_helpers.exported(tmp_path_factory)


@pytest.fixture(scope="session")
def enc(tmp_path_factory):
    from tests import export_helpers

    return export_helpers.encoder(tmp_path_factory)
