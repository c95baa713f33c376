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
