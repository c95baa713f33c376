"""Folder -> sharded TFRecords -> the tfrecord: source, losslessly and sharded by file."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from simsiam_tf import data, tfrecords
from simsiam_tf.config import default_config
from tests.conftest import REPO


@pytest.fixture(scope="module")
def records(cifar10_folder, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("records"))
    cmd = [
        sys.executable,
        "tools/make_tfrecords.py",
        f"--folder={cifar10_folder}",
        f"--output_dir={out}",
        "--shards_per_split=train=4,test=2",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "train=400 test=100" in proc.stdout
    return out


def test_manifest_lists_every_shard(records):
    with open(os.path.join(records, "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["class_names"][:2] == ["airplane", "automobile"]
    train = manifest["splits"]["train"]
    assert len(train["shards"]) == 4 and sum(s["num_examples"] for s in train["shards"]) == 400
    assert not [n for n in os.listdir(records) if n.endswith(".tmp")]


def test_round_trip_gives_identical_images_and_labels(records, cifar10_folder):
    for split in ("train", "test"):
        folder = data.load_source(f"folder:{cifar10_folder}", split)
        by_name = {
            os.path.relpath(p, os.path.join(cifar10_folder, split)): (p, int(label))
            for p, label in zip(folder.files, folder.labels)
        }
        found = tfrecords.find_records(records, split)
        ds = tf.data.TFRecordDataset(found.files).map(tfrecords.parse_with_filename)
        seen = set()
        for encoded, label, name in ds:
            path, want_label = by_name[name.numpy().decode()]
            assert int(label) == want_label
            with open(path, "rb") as f:
                assert encoded.numpy() == f.read()  # the very bytes: decoding is identical
            seen.add(path)
        assert len(seen) == folder.num_examples


def test_per_worker_sharding_by_file(records):
    everything = tfrecords.find_records(records, "train")
    w0 = tfrecords.find_records(records, "train", 0, 2)
    w1 = tfrecords.find_records(records, "train", 1, 2)
    assert set(w0.files).isdisjoint(w1.files)
    assert sorted(w0.files + w1.files) == sorted(everything.files)
    assert w0.num_examples + w1.num_examples == 400


def test_tfrecord_source_feeds_the_pipeline_and_evaluation(records):
    src = data.load_source(f"tfrecord:{records}", "train")
    assert src.num_examples == 400 and src.num_classes == 10
    c = default_config()
    batch = next(iter(data.pretrain_dataset(src, c.data, c.aug, 64, seed=0)))
    assert batch["view1"].shape == (64, 32, 32, 3) and batch["view1"].dtype == tf.uint8
    test = data.load_source(f"tfrecord:{records}", "test")
    images, labels = next(iter(data.eval_dataset(test, 32, 100)))
    assert images.shape == (100, 32, 32, 3)
    assert np.bincount(labels.numpy(), minlength=10).tolist() == [10] * 10


def test_bad_tfrecord_sources_are_clear_errors(tmp_path):
    from simsiam_tf.errors import ConfigError

    with pytest.raises(ConfigError, match="no manifest.json"):
        data.load_source(f"tfrecord:{tmp_path}")
    with pytest.raises(ConfigError, match="no files match"):
        data.load_source(f"tfrecord:{tmp_path}/*.tfrecord")


# ------------------------------------------------------------------------------------------------
# Writing: every image checked, every evaluation split written.


def _linked_folder(root, cifar10_folder, splits, classes=None):
    """A folder of symbolic links to the CIFAR JPEGs: {split written: split of CIFAR}, "" for
    class folders at the top (no split subfolders)."""
    for dst, src in splits.items():
        for cls in classes or sorted(os.listdir(os.path.join(cifar10_folder, src))):
            os.makedirs(os.path.join(root, dst, cls))
            for name in sorted(os.listdir(os.path.join(cifar10_folder, src, cls))):
                os.symlink(
                    os.path.join(cifar10_folder, src, cls, name), os.path.join(root, dst, cls, name)
                )
    return str(root)


def _names_and_labels(out, split):
    found = tfrecords.find_records(out, split)
    ds = tf.data.TFRecordDataset(found.files).map(tfrecords.parse_with_filename)
    return {name.decode(): int(label) for _, label, name in ds.as_numpy_iterator()}


def test_broken_files_are_skipped_and_named_and_strict_keeps_nothing(cifar10_folder, tmp_path):
    from tests.conftest import write_images

    root = _linked_folder(tmp_path / "in", cifar10_folder, {"train": "train"}, ["cat", "dog"])
    (tmp_path / "in/train/cat/empty.jpg").write_bytes(b"")
    (tmp_path / "in/train/cat/notfound.jpg").write_bytes(b"<html>404 Not Found</html>")
    dog = os.path.join(cifar10_folder, "train", "dog")
    with open(os.path.join(dog, sorted(os.listdir(dog))[0]), "rb") as f:
        jpg = f.read()
    (tmp_path / "in/train/dog/truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    write_images(str(tmp_path / "in/train/dog"), 1, mode="L")  # grayscale PNG: decodes, kept
    broken = ["cat/empty.jpg", "cat/notfound.jpg", "dog/truncated.jpg"]

    plan = tfrecords.plan_folder(root, holdout_fraction=0)
    out = str(tmp_path / "out")
    manifest = tfrecords.write_folder(plan, out, shards={"train": 3})
    train = manifest["splits"]["train"]
    assert train["skipped"] == broken
    assert train["num_examples"] == 81 == sum(s["num_examples"] for s in train["shards"])
    written = _names_and_labels(out, "train")
    assert len(written) == 81 and "dog/img000.png" in written and not set(broken) & set(written)
    for shard in train["shards"]:  # the manifest counts what each file holds
        path = os.path.join(out, shard["file"])
        assert sum(1 for _ in tf.data.TFRecordDataset(path)) == shard["num_examples"]
    assert manifest["eval_split"] is None and "aliases" not in manifest

    strict_out = tmp_path / "strict"
    with pytest.raises(Exception, match=r"3 files .*cannot be decoded.*cat/empty\.jpg") as err:
        tfrecords.write_folder(plan, str(strict_out), strict=True)
    assert type(err.value).__name__ == "ConfigError"
    assert os.listdir(strict_out) == []  # no shard, no manifest


def test_a_labelled_folder_without_an_eval_split_is_written_with_the_folders_held_out_split(
    cifar10_folder, tmp_path
):
    from simsiam_tf import holdout

    root = os.path.join(cifar10_folder, "train")  # 10 class folders of 40, no split folders
    out = str(tmp_path / "out")
    manifest = tfrecords.write_folder(tfrecords.plan_folder(root), out)
    assert manifest["eval_split"] == "test" and "aliases" not in manifest
    test, train = _names_and_labels(out, "test"), _names_and_labels(out, "train")
    assert len(test) == 80 and len(train) == 320 and not set(test) & set(train)
    assert np.bincount(list(test.values()), minlength=10).tolist() == [8] * 10
    # The very images that `folder:` training on this folder holds out (eval.holdout_* defaults).
    folder = data.load_source(f"folder:{root}")
    _, held = holdout.holdout_split(folder, 0.2, 0)
    assert sorted(test) == sorted(os.path.relpath(f, root) for f in held.files)
    assert manifest["heldout"] == {
        "from": "train",
        "fraction": 0.2,
        "seed": 0,
        "num_examples": 400,
        "num_heldout": 80,
        "sha1": holdout.digest(test),
    }
    other = tfrecords.plan_folder(root, holdout_fraction=0.1, holdout_seed=3)
    assert len(other.splits["test"][0]) == 40 and other.heldout["sha1"] != holdout.digest(test)
    none = tfrecords.plan_folder(root, holdout_fraction=0)
    assert list(none.splits) == ["train"] and none.eval_split is None


def test_bad_writing_arguments_are_named_before_any_file_is_read(cifar10_folder, tmp_path):
    from simsiam_tf.errors import ConfigError

    with pytest.raises(ConfigError, match=r"holdout_fraction=1\.0 must be in \[0, 1\)"):
        tfrecords.plan_folder(cifar10_folder, holdout_fraction=1.0)
    plan = tfrecords.plan_folder(cifar10_folder)
    with pytest.raises(ConfigError, match=r"shards given for \['val'\].*\['test', 'train'\]"):
        tfrecords.write_folder(plan, str(tmp_path / "out"), shards={"val": 2})
    with pytest.raises(ConfigError, match="examples_per_shard=0 must be >= 1"):
        tfrecords.write_folder(plan, str(tmp_path / "out"), examples_per_shard=0)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------
# Reading: a corrupt or truncated record is skipped and counted, not fatal.


def _record_offsets(raw: bytes) -> list:
    """Start of every record in a TFRecord file: 8-byte length, 4-byte CRC, data, 4-byte CRC."""
    offsets, pos = [], 0
    while pos < len(raw):
        offsets.append(pos)
        pos += int.from_bytes(raw[pos : pos + 8], "little") + 16
    return offsets


@pytest.fixture
def damaged_records(cifar10_folder, tmp_path):
    """100 CIFAR images in 2 shards of 50: in the first, a flipped byte in record 10's image
    (its CRC fails); the second cut short in the middle of record 30 (a truncated copy)."""
    out = str(tmp_path / "records")
    plan = tfrecords.plan_folder(os.path.join(cifar10_folder, "test"), holdout_fraction=0)
    manifest = tfrecords.write_folder(plan, out, shards={"train": 2})
    first, second = (os.path.join(out, s["file"]) for s in manifest["splits"]["train"]["shards"])
    with open(first, "rb") as f:
        raw = bytearray(f.read())
    raw[_record_offsets(bytes(raw))[10] + 12 + 100] ^= 0xFF
    with open(first, "wb") as f:
        f.write(raw)
    with open(second, "rb") as f:
        raw = f.read()
    with open(second, "wb") as f:
        f.write(raw[: _record_offsets(raw)[30] + 500])
    return out, first, second


def test_a_corrupt_or_truncated_record_ends_its_shard_counted_and_named(damaged_records, caplog):
    out, first, second = damaged_records
    found = tfrecords.find_records(out, "train")
    assert found.num_examples == 100 and found.sizes == [50, 50]
    assert sum(1 for _ in found.dataset(seed=0)) == 10 + 30  # the records before the damage
    assert found.skipped.count == 40 + 20
    assert sorted(found.skipped.shards) == [first, second]
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith(first) and "after 10 of its 50 records" in m for m in messages)
    assert any(m.startswith(second) and "the other 20 are skipped" in m for m in messages)
    sum(1 for _ in found.dataset(seed=1))  # every pass over the data counts what it skips
    assert found.skipped.count == 120


def test_training_and_evaluation_read_past_a_damaged_shard(damaged_records):
    out, first, _ = damaged_records
    src = data.load_source(f"tfrecord:{out}", "train")
    c = default_config()
    c.data.image_size = 16
    batches = list(data.pretrain_dataset(src, c.data, c.aug, 8, seed=0, num_epochs=1))
    # No DataLossError, and the epoch keeps the length of the manifest's 100 records (12 batches,
    # so steps and resume positions stay those of the intact set): the lost records' places are
    # taken by a second read of the epoch's own stream.
    assert len(batches) == 100 // 8
    images, labels = next(iter(data.eval_dataset(src, 16, 100)))
    assert images.shape == (40, 16, 16, 3) and labels.shape == (40,)


def test_a_glob_of_records_without_manifest_counts_what_is_readable(damaged_records, caplog):
    out, first, second = damaged_records
    found = tfrecords.find_records(os.path.join(out, "train-*.tfrecord"), "train")
    assert found.sizes == [10, 30] and found.num_examples == 40
    assert any(r.getMessage().startswith(first) for r in caplog.records)


# ------------------------------------------------------------------------------------------------
# End to end: ImageNet's layout (train/ + val/) -> records -> training with the kNN monitor ->
# the evaluation tools.


@pytest.mark.slow  # four tool processes, about 2 minutes: make test-slow
def test_records_of_a_train_and_val_folder_train_with_knn_then_evaluate(cifar10_folder, tmp_path):
    from tests.helpers import run_python

    root = _linked_folder(tmp_path / "in", cifar10_folder, {"train": "train", "val": "test"})
    (tmp_path / "in/train/cat/download.jpg").write_bytes(b"<html>rate limited</html>")
    out, workdir = str(tmp_path / "records"), str(tmp_path / "run")
    tool = ["tools/make_tfrecords.py", f"--folder={root}", f"--output_dir={out}"]

    bad = run_python(*tool, "--shards_per_split=train=four")
    assert bad.returncode == 2 and not os.path.exists(out)
    assert "error: --shards_per_split: 'train=four' is not SPLIT=COUNT" in bad.stderr

    made = run_python(*tool, "--shards_per_split=train=4")
    assert made.returncode == 0, made.stderr[-3000:]
    assert "train: skipped 1 of 401 files that cannot be decoded as images: cat/download.jpg" in (
        made.stdout
    )
    assert "train=400 val=100 (test=val) skipped=1" in made.stdout
    with open(os.path.join(out, "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["aliases"] == {"test": "val"} and "heldout" not in manifest

    trained = run_python(
        "tools/train.py",
        "--config=configs/cifar10_small_cpu.py",
        f"--workdir={workdir}",
        f"--config.data.source=tfrecord:{out}",
        "--config.data.max_examples=0",
        "--config.train.steps_per_epoch=2",
        "--config.optim.epochs=1",
        "--config.optim.warmup_epochs=0",
        "--config.optim.batch_size=32",
        "--config.eval.max_bank=0",
        "--config.eval.random_init_knn=False",
        "--config.train.verbose=2",
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "No kNN evaluation" not in trained.stderr
    with open(os.path.join(workdir, "history.jsonl")) as f:
        history = [json.loads(line) for line in f if line.strip()]
    with open(os.path.join(workdir, "summary.json")) as f:
        summary = json.load(f)
    assert 0.0 <= history[-1]["knn_top1"] <= 1.0 and summary["knn_top1"] == history[-1]["knn_top1"]

    knn = run_python("tools/eval_knn.py", f"--workdir={workdir}", "--norandom_init_baseline")
    assert knn.returncode == 0, knn.stderr[-3000:]
    with open(os.path.join(workdir, "knn_eval.json")) as f:
        scored = json.load(f)
    assert (scored["num_bank"], scored["num_queries"]) == (400, 100)  # val/, nothing held out
    # The tool scores the checkpoint the monitor scored, on the same bank and queries.
    assert scored["knn_top1"] == pytest.approx(summary["knn_top1"], abs=0.011)

    linear = run_python("tools/eval_linear.py", f"--workdir={workdir}", "--epochs=1")
    assert linear.returncode == 0, linear.stderr[-3000:]
    with open(os.path.join(workdir, "linear_cifar.json")) as f:
        probe = json.load(f)
    assert 0.0 <= probe["top1"] <= 1.0 and "backbone_unchanged=True" in linear.stdout
