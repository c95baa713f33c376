import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from simsiam_tf import data
from simsiam_tf.config import default_config
from simsiam_tf.errors import ConfigError
from tests.conftest import write_images


def _cfgs(size=16, photometric="cpu"):
    c = default_config()
    c.data.image_size = size
    c.data.photometric = photometric
    return c.data, c.aug


def test_builtin_digits_splits():
    train = data.load_source("builtin:digits", "train")
    test = data.load_source("builtin:digits", "test")
    assert train.num_examples == 1347 and test.num_examples == 450
    assert train.images.shape == (1347, 8, 8, 3) and train.images.dtype == np.uint8
    assert train.num_classes == 10 and set(np.unique(train.labels)) == set(range(10))
    assert train.images.max() == 255 and train.images.min() == 0
    assert data.load_source("builtin:digits", "validation") is None


def test_unknown_source_is_a_clear_error():
    with pytest.raises(ValueError, match="data.source='s3:bucket'"):
        data.load_source("s3:bucket")
    with pytest.raises(ValueError, match="unknown built-in"):
        data.load_source("builtin:mnist")


def test_missing_and_empty_folders_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="no such directory"):
        data.load_source(f"folder:{tmp_path}/nope")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="no images found"):
        data.load_source(f"folder:{tmp_path}/empty")


def test_folder_class_layout_and_flat_layout(tmp_path):
    write_images(tmp_path / "classes" / "b_cats", 3, ext=".jpg")
    write_images(tmp_path / "classes" / "a_dogs" / "nested", 2, ext=".png", mode="L")
    src = data.load_source(f"folder:{tmp_path}/classes")
    assert src.class_names == ("a_dogs", "b_cats") and src.num_classes == 2
    assert list(src.labels) == [0, 0, 1, 1, 1]
    write_images(tmp_path / "flat", 4, ext=".png", mode="RGBA")
    flat = data.load_source(f"folder:{tmp_path}/flat")
    assert flat.num_classes == 0 and (flat.labels == -1).all() and flat.num_examples == 4
    # No test split in a folder without test/.
    assert data.load_source(f"folder:{tmp_path}/flat", "test") is None


def test_folder_pipeline_decodes_every_format_to_rgb_views(tmp_path):
    write_images(tmp_path / "a", 3, ext=".jpg")
    write_images(tmp_path / "b", 3, ext=".png", mode="L")  # grayscale
    write_images(tmp_path / "c", 3, ext=".png", mode="RGBA")
    write_images(tmp_path / "d", 3, ext=".png", mode="P")  # palette
    src = data.load_source(f"folder:{tmp_path}")
    dcfg, acfg = _cfgs(size=16)
    ds = data.pretrain_dataset(src, dcfg, acfg, global_batch=4, seed=0, num_epochs=2)
    batches = list(ds)
    assert len(batches) == 2 * (12 // 4)
    for b in batches:
        assert set(b) == {"view1", "view2"}
        assert b["view1"].shape == (4, 16, 16, 3) and b["view1"].dtype == tf.uint8


def test_identical_images_are_augmented_differently_and_views_differ():
    src = data.load_source("builtin:digits", "train")
    photo = np.random.default_rng(0).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
    src.images = np.repeat(photo, src.num_examples, axis=0)  # one image, many times
    dcfg, acfg = _cfgs(size=16)
    batch = next(iter(data.pretrain_dataset(src, dcfg, acfg, global_batch=32, seed=0)))
    v1, v2 = batch["view1"].numpy(), batch["view2"].numpy()
    flat = v1.reshape(32, -1)
    assert len({row.tobytes() for row in flat}) == 32  # every copy got its own augmentation
    assert all(not np.array_equal(a, b) for a, b in zip(v1, v2))  # and the two views differ


def test_pipeline_is_reproducible_and_epochs_differ():
    src = data.load_source("builtin:digits", "train")
    dcfg, acfg = _cfgs(size=16)
    steps = src.num_examples // 64
    a = list(data.pretrain_dataset(src, dcfg, acfg, 64, seed=1, num_epochs=2))
    b = list(data.pretrain_dataset(src, dcfg, acfg, 64, seed=1, num_epochs=2))
    assert len(a) == 2 * steps
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["view1"].numpy(), y["view1"].numpy())
    assert not np.array_equal(a[0]["view1"].numpy(), a[steps]["view1"].numpy())
    # Starting at epoch 1 gives exactly epoch 1 of the full run (what a resume needs).
    c = list(data.pretrain_dataset(src, dcfg, acfg, 64, seed=1, start_epoch=1, num_epochs=1))
    np.testing.assert_array_equal(c[0]["view2"].numpy(), a[steps]["view2"].numpy())


def test_device_mode_carries_parameters_and_matches_cpu_mode():
    src = data.load_source("builtin:digits", "train")
    dcfg, acfg = _cfgs(size=16, photometric="device")
    from simsiam_tf import augment

    dev = next(iter(data.pretrain_dataset(src, dcfg, acfg, 32, seed=2)))
    assert {"params1", "params2"} <= set(dev)
    assert dev["params1"]["layer1"]["brightness"].shape == (32,)
    stage = augment.TwoViewRecipe(acfg, 16, "device").device_stage()
    on_device = stage(tf.cast(dev["view1"], tf.float32) / 255.0, params=dev["params1"])
    dcfg_cpu, _ = _cfgs(size=16, photometric="cpu")
    cpu = next(iter(data.pretrain_dataset(src, dcfg_cpu, acfg, 32, seed=2)))
    # Same seed, same distributions, same draws: equal up to the uint8 rounding of CPU mode.
    diff = np.abs(np.round(on_device.numpy() * 255) - cpu["view1"].numpy().astype(np.float32))
    assert diff.max() <= 1.0


def test_eval_dataset_shapes_and_ranges():
    src = data.load_source("builtin:digits", "test")
    images, labels = next(iter(data.eval_dataset(src, size=32, batch=100)))
    assert images.shape == (100, 32, 32, 3) and images.dtype == tf.float32
    assert 0.0 <= float(tf.reduce_min(images)) and float(tf.reduce_max(images)) <= 1.0
    np.testing.assert_array_equal(labels.numpy(), src.labels[:100])


def test_eval_centre_crop():
    image = tf.cast(tf.random.uniform((300, 400, 3), maxval=256, seed=1), tf.uint8)
    out = data.eval_preprocess(image, 224, 0.875)
    assert out.shape == (224, 224, 3)


def test_cifar10_jpeg_folder(cifar10_folder):
    train = data.load_source(f"folder:{cifar10_folder}", "train")
    test = data.load_source(f"folder:{cifar10_folder}", "test")
    assert train.num_classes == 10 and train.num_examples == 400
    assert test.num_examples == 100
    assert train.class_names[0] == "airplane"
    dcfg, acfg = _cfgs(size=32)
    batch = next(iter(data.pretrain_dataset(train, dcfg, acfg, 64, seed=0)))
    assert batch["view1"].shape == (64, 32, 32, 3)
    v = batch["view1"].numpy().astype(np.float32)
    assert 30 < v.mean() < 220 and v.std() > 20  # real photos, not blank frames
    images, labels = next(iter(data.eval_dataset(test, 32, 50)))
    assert images.shape == (50, 32, 32, 3) and set(labels.numpy()) <= set(range(10))


def test_tfds_source_on_a_real_prepared_dataset(cifar10_folder, tmp_path):
    """tfds:NAME over a real TFDS dataset, prepared offline by TFDS's own ImageFolder builder
    from the CIFAR-10 JPEGs, then read back through tfds.builder with download off."""
    tfds = pytest.importorskip("tensorflow_datasets")
    builder = tfds.dataset_builders.TfDataBuilder(
        name="cifar10_jpeg_sample",
        version="1.0.0",
        split_datasets={
            split: tfds.ImageFolder(cifar10_folder)
            .as_dataset(split=split, shuffle_files=False)
            .map(lambda ex: {"image": ex["image"], "label": ex["label"]})
            for split in ("train", "test")
        },
        features=tfds.features.FeaturesDict(
            {
                "image": tfds.features.Image(shape=(32, 32, 3)),
                "label": tfds.features.ClassLabel(num_classes=10),
            }
        ),
        data_dir=str(tmp_path),
    )
    builder.download_and_prepare()
    src = data.load_source(
        "tfds:cifar10_jpeg_sample", "train", tfds_data_dir=str(tmp_path), tfds_download=False
    )
    assert src.num_examples == 400 and src.num_classes == 10 and src.in_memory
    assert src.images.shape == (400, 32, 32, 3)
    folder = data.load_source(f"folder:{cifar10_folder}", "train")
    assert sorted(np.bincount(src.labels)) == sorted(np.bincount(folder.labels))
    assert (
        data.load_source(
            "tfds:cifar10_jpeg_sample",
            "validation",
            tfds_data_dir=str(tmp_path),
            tfds_download=False,
        )
        is None
    )


def test_tfds_not_prepared_and_download_off_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="not prepared"):
        data.load_source("tfds:cifar10", tfds_data_dir=str(tmp_path), tfds_download=False)


def test_archive_source_unpacks_once_into_the_cache_and_reads_as_the_folder(tmp_path, monkeypatch):
    import tarfile

    from tests.conftest import write_images

    for split, n in (("train", 6), ("test", 3)):
        for cls in ("cat", "dog"):
            write_images(str(tmp_path / "photos" / split / cls), n, seed=n)
    archive = tmp_path / "photos.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "photos", arcname="photos")
    monkeypatch.setenv("SIMSIAM_TF_CACHE", str(tmp_path / "cache"))

    spec = f"archive:{archive}"
    train = data.load_source(spec, "train")
    folder = data.load_source(f"folder:{tmp_path / 'photos'}", "train")
    assert (train.num_examples, train.class_names) == (12, ("cat", "dog"))
    np.testing.assert_array_equal(train.labels, folder.labels)
    assert [os.path.relpath(f, train.name.split(":", 1)[1]) for f in train.files] == [
        os.path.relpath(f, folder.name.split(":", 1)[1]) for f in folder.files
    ]
    assert data.load_source(spec, "test").num_examples == 6
    unpacked = os.listdir(tmp_path / "cache" / "archives")
    assert len(unpacked) == 1 and ".partial" not in unpacked[0]
    stamp = os.stat(tmp_path / "cache" / "archives" / unpacked[0]).st_mtime_ns
    data.load_source(spec, "train")  # reused, not unpacked again
    assert os.stat(tmp_path / "cache" / "archives" / unpacked[0]).st_mtime_ns == stamp


def test_archive_source_refuses_members_outside_its_folder(tmp_path, monkeypatch):
    import io
    import tarfile

    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo("../outside.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    monkeypatch.setenv("SIMSIAM_TF_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match="cannot unpack"):
        data.load_source(f"archive:{archive}", "train")
    assert not (tmp_path / "cache" / "outside.txt").exists()
    archives = tmp_path / "cache" / "archives"
    assert not archives.exists() or not os.listdir(archives)  # no half-unpacked folder


def _index_images(n):
    """n 8x8 images whose red channel holds their index: identity augmentation gives it back."""
    images = np.zeros((n, 8, 8, 3), np.uint8)
    images[..., 0] = np.arange(n)[:, None, None]
    return images


def _identity_aug(acfg):
    acfg.crop_scale, acfg.crop_ratio = (1.0, 1.0), (1.0, 1.0)
    acfg.flip_prob = acfg.jitter_prob = acfg.grayscale_prob = acfg.blur_prob = 0.0
    return acfg


def _streamed_sources(tmp_path, n):
    """The same n index images as a streamed TFDS source (prepared offline from arrays, PNG,
    no fixed shape, so it is not held in memory) and as 6 TFRecord shards."""
    tfds = pytest.importorskip("tensorflow_datasets")
    from PIL import Image

    from simsiam_tf import tfrecords

    images = _index_images(n)
    tfds.dataset_builders.TfDataBuilder(
        name="index_images",
        version="1.0.0",
        split_datasets={
            "train": tf.data.Dataset.from_tensor_slices(
                {"image": images, "label": np.arange(n) % 10}
            )
        },
        features=tfds.features.FeaturesDict(
            {
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
                "label": tfds.features.ClassLabel(num_classes=10),
            }
        ),
        data_dir=str(tmp_path / "tfds"),
    ).download_and_prepare()
    streamed = data.load_source(
        "tfds:index_images", tfds_data_dir=str(tmp_path / "tfds"), tfds_download=False
    )
    paths = []
    for i, image in enumerate(images):
        paths.append(str(tmp_path / f"{i:03d}.png"))
        Image.fromarray(image).save(paths[-1])
    out = tmp_path / "records"
    out.mkdir()
    entry = tfrecords.write_split(paths, np.full(n, -1), str(tmp_path), str(out), "train", 6)
    tfrecords.write_manifest(str(out), {"train": entry}, ())
    return {"tfds": streamed, "tfrecord": data.load_source(f"tfrecord:{out}")}


@pytest.mark.parametrize("kind", ["tfds", "tfrecord"])
def test_streamed_source_epochs_differ_and_resume_mid_epoch_is_exact(tmp_path, kind):
    """Streamed sources: every epoch a new order (each image once), the same order on every
    build, and a run resumed at (epoch, batch) gets exactly the batches of the full run."""
    n, batch = 96, 16
    src = _streamed_sources(tmp_path, n)[kind]
    assert not src.in_memory and src.stream is not None
    dcfg, acfg = _cfgs(size=8)
    dcfg.shuffle_buffer = 32  # narrower than the data, as for ImageNet
    ident = _identity_aug(_cfgs(size=8)[1])

    def order(**kw):
        ds = data.pretrain_dataset(src, dcfg, ident, batch, seed=1, **kw)
        return np.stack([b["view1"].numpy()[:, 0, 0, 0] for b in ds]).astype(int)

    full = order(num_epochs=3)  # 3 epochs x 6 batches of image indices
    assert full.shape == (18, batch)
    epochs = full.reshape(3, n)
    for e in range(3):
        assert sorted(epochs[e]) == list(range(n))  # each image exactly once per epoch
    # Epochs differ in order and in how images are grouped into batches.
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
    groups = [{frozenset(b) for b in full[6 * e : 6 * e + 6]} for e in range(3)]
    assert not groups[0] & groups[1] and not groups[1] & groups[2]
    np.testing.assert_array_equal(order(num_epochs=3), full)
    np.testing.assert_array_equal(order(start_epoch=1, num_epochs=2, start_batch=4), full[10:])
    # Whatever global seed the caller set (train.py sets config.seed, often 0).
    for global_seed in (0, 5):
        keras.utils.set_random_seed(global_seed)
        np.testing.assert_array_equal(order(num_epochs=3), full)

    # With the real augmentation too: a mid-epoch resume reproduces the views bit for bit.
    def views(**kw):
        ds = data.pretrain_dataset(src, dcfg, acfg, batch, seed=1, **kw)
        return [b["view2"].numpy() for b in ds]

    whole = views(num_epochs=2)
    resumed = views(start_epoch=0, num_epochs=2, start_batch=3)
    assert len(resumed) == len(whole) - 3
    for a, b in zip(whole[3:], resumed):
        np.testing.assert_array_equal(a, b)
