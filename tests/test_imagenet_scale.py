"""Input at ImageNet scale, checked exactly on small cases: splits linear in the files and the
same as before, every layout keeping every training image, image checks cached per folder,
paths fed as data, broken files replaced in training, a chunked kNN bank and the monitor's cap.
The large measurements of the same code are `tools/benchmark.py startup` (docs/PERFORMANCE.md).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from simsiam_tf import callbacks, data, holdout, imagecheck, knn
from simsiam_tf.config import default_config
from tests.conftest import REPO, write_images
from tests.helpers import TINY_TRAIN_FLAGS

# ------------------------------------------------------------------------------------------------
# Splits


def _per_class_loop_mask(labels, fraction, seed):
    """The held-out draw as it was first written (one scan of the labels per class)."""
    rng = np.random.default_rng(seed)
    held = np.zeros(len(labels), bool)
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        n = max(1, int(round(fraction * len(idx)))) if len(idx) > 1 else 0
        held[rng.permutation(idx)[:n]] = True
    return held


@pytest.mark.parametrize("seed", [0, 3])
def test_stratified_mask_draws_the_split_runs_always_drew(seed):
    labels = np.random.default_rng(seed).integers(0, 37, 5000)
    labels[:3] = 99  # a class of three, and one of one
    labels[3] = 100
    got = holdout.stratified_mask(labels, 0.2, seed)
    np.testing.assert_array_equal(got, _per_class_loop_mask(labels, 0.2, seed))
    assert got.sum() == sum(
        max(1, round(0.2 * c)) if c > 1 else 0 for c in np.unique(labels, return_counts=True)[1]
    )


def test_stratified_subset_keeps_class_proportions():
    labels = np.repeat(np.arange(4), [500, 300, 150, 50])
    keep = holdout.stratified_subset(labels, 100, seed=1)
    assert len(keep) == 100 and len(set(keep)) == 100 and np.all(np.diff(keep) > 0)
    np.testing.assert_array_equal(np.bincount(labels[keep]), [50, 30, 15, 5])
    assert not np.array_equal(keep, holdout.stratified_subset(labels, 100, seed=2))
    np.testing.assert_array_equal(holdout.stratified_subset(labels, 5000, 0), np.arange(1000))


def test_split_source_by_key_set_and_keys_relative_to_the_folder(tmp_path):
    for c in ("a", "b"):
        write_images(str(tmp_path / "f" / c), 6, seed=len(c))
    src = data.load_source(f"folder:{tmp_path / 'f'}")
    keys = holdout.example_keys(src)
    assert keys == [os.path.relpath(p, str(tmp_path / "f")) for p in src.files]
    train, held = holdout.split_source(src, {"a/img001.png", "b/img005.png", "missing.png"})
    assert [os.path.basename(p) for p in held.files] == ["img001.png", "img005.png"]
    assert train.num_examples == 10 and held.labels.tolist() == [0, 1]


def _folder_config(root, **eval_overrides):
    c = default_config()
    c.data.source = f"folder:{root}"
    for k, v in eval_overrides.items():
        c.eval[k] = v
    return c


@pytest.mark.parametrize("eval_dir", ["val", "validation", "test"])
def test_train_plus_eval_folder_keeps_every_training_image(tmp_path, eval_dir):
    """ImageNet's layout (train/ + val/): nothing is held out of train/, and the evaluation
    split (the default query split "test" too) is val/."""
    for split, n in (("train", 20), (eval_dir, 4)):
        for c in ("a", "b"):
            write_images(str(tmp_path / split / c), n, seed=n + len(c))
    config = _folder_config(tmp_path)
    run = str(tmp_path / "run")
    train, info = holdout.load_split(config, "train", run, record=True)
    test, _ = holdout.load_split(config, "test", run)
    assert info is None and not os.path.exists(os.path.join(run, holdout.RECORD))
    assert train.num_examples == 40 and test.num_examples == 8
    assert all(f"{os.sep}{eval_dir}{os.sep}" in p for p in test.files)
    assert data.load_source(f"folder:{tmp_path}", eval_dir).num_examples == 8


# ------------------------------------------------------------------------------------------------
# The image check


@pytest.mark.parametrize(
    "head,tail,size,verdict",
    [
        (b"\xff\xd8\xff\xe0", b"...\xff\xd9", 100, imagecheck.HEADER_OK),
        (b"\xff\xd8\xff\xe0", b"...cut mid-scan", 100, 0),  # truncated: decode to know
        (b"\x89PNG\r\n\x1a\n", b"\0\0\0\0IEND\xaeB`\x82", 100, imagecheck.HEADER_OK),
        (b"\x89PNG\r\n\x1a\n", b"IDAT...", 100, 0),
        (b"GIF89a", b"\x00;", 100, imagecheck.HEADER_OK),
        (b"BM" + (90).to_bytes(4, "little"), b"", 100, imagecheck.HEADER_OK),
        (b"BM" + (900).to_bytes(4, "little"), b"", 100, 0),  # shorter than declared
        (b"<html>", b"</html>", 100, 0),  # an unknown signature: decode to know
        (b"", b"", 0, imagecheck.BAD),
    ],
)
def test_header_verdicts(head, tail, size, verdict):
    assert imagecheck.header_verdict(head, tail, size)[0] == verdict


def _photo_folder(root, n=6):
    for c in ("cats", "dogs"):
        write_images(str(root / c), n, ext=".jpg", seed=len(c))
    return str(root)


def test_verdicts_are_cached_per_folder_and_only_new_files_are_checked(tmp_path, monkeypatch):
    root = _photo_folder(tmp_path / "photos")
    (tmp_path / "photos" / "cats" / "cut.jpg").write_bytes(
        (tmp_path / "photos" / "cats" / "img000.jpg").read_bytes()[:300]
    )
    (tmp_path / "photos" / "dogs" / "page.jpg").write_bytes(b"<html>404</html>")
    checked = []
    headers = imagecheck._headers
    monkeypatch.setattr(
        imagecheck, "_headers", lambda paths, sizes: checked.extend(paths) or headers(paths, sizes)
    )
    cache = str(tmp_path / "cache")
    src = data.load_source(f"folder:{root}")
    bad = imagecheck.check_files(src.files, src.root, cache_dir=cache, progress=False)
    assert sorted(os.path.basename(src.files[i]) for i in bad) == ["cut.jpg", "page.jpg"]
    assert "end marker" in bad[src.files.index(os.path.join(root, "cats", "cut.jpg"))]
    assert len(checked) == 14 and len(os.listdir(cache)) == 1

    # Another run directory, another process: the same folder is not read again.
    checked.clear()
    assert imagecheck.check_files(src.files, src.root, cache_dir=cache, progress=False) == bad
    assert checked == []
    # The folder grew and one file changed: only those two are checked.
    write_images(str(tmp_path / "photos" / "dogs" / "new"), 1, ext=".jpg", seed=7)
    (tmp_path / "photos" / "dogs" / "page.jpg").write_bytes(
        (tmp_path / "photos" / "cats" / "img000.jpg").read_bytes()
    )
    src = data.load_source(f"folder:{root}")
    bad = imagecheck.check_files(src.files, src.root, cache_dir=cache, progress=False)
    assert sorted(os.path.basename(p) for p in checked) == ["img000.jpg", "page.jpg"]
    assert [os.path.basename(src.files[i]) for i in bad] == ["cut.jpg"]
    # A full decode re-checks what the header check alone passed, once.
    checked.clear()
    decoded = imagecheck.undecodable
    seen = []
    monkeypatch.setattr(
        imagecheck, "undecodable", lambda p, progress=True: seen.extend(p) or decoded(p, False)
    )
    imagecheck.check_files(src.files, src.root, "decode", cache_dir=cache, progress=False)
    assert len(seen) == src.num_examples - 1  # all but cut.jpg, already known to be broken
    seen.clear()
    imagecheck.check_files(src.files, src.root, "decode", cache_dir=cache, progress=False)
    assert seen == [] and checked == []


# ------------------------------------------------------------------------------------------------
# The pipeline


def _flat_map_graph_bytes(ds):
    """Size of the GraphDef of the per-epoch function of a pretraining dataset."""
    while not hasattr(ds, "_map_func"):
        ds = ds._input_dataset
    return len(ds._map_func.function.graph.as_graph_def().SerializeToString())


def test_paths_are_data_not_graph_constants(tmp_path):
    """The epoch function's graph does not grow with the paths: they reach it as a captured
    tensor (as a graph constant, 20,000 paths added 0.6 MB to it, 30 bytes a path)."""
    c = default_config()
    sizes = []
    for n in (100, 20_000):
        files = [str(tmp_path / f"class{i % 10}" / f"image_{i:08d}.jpg") for i in range(n)]
        src = data.Source("folder:x", n, 10, np.arange(n) % 10, files=files, root=str(tmp_path))
        ds = data.pretrain_dataset(src, c.data, c.aug, 32, seed=0)
        sizes.append(_flat_map_graph_bytes(ds))
    assert sizes[1] - sizes[0] < 20_000  # < 1 byte a path: the constants of the sizes only


def _identity_config(size=16):
    c = default_config()
    c.data.image_size = size
    a = c.aug
    a.crop_scale, a.crop_ratio = (1.0, 1.0), (1.0, 1.0)
    a.flip_prob = a.jitter_prob = a.grayscale_prob = a.blur_prob = 0.0
    return c


def test_an_image_that_fails_to_decode_in_training_is_replaced_and_counted(tmp_path):
    """A JPEG with a valid start and end but nothing decodable between passes the header check;
    in training its place takes the image before it, every batch keeps its size and every
    other image its place, and the file is named."""
    root = _photo_folder(tmp_path / "photos", n=8)
    bad = os.path.join(root, "cats", "img003.jpg")
    good = data.load_source(f"folder:{root}")
    c = _identity_config()
    before = list(data.pretrain_dataset(good, c.data, c.aug, 4, seed=0, num_epochs=1))
    with open(bad, "wb") as f:
        f.write(b"\xff\xd8\xff\xe0" + b"\x00" * 200 + b"\xff\xd9")
    src = data.load_source(f"folder:{root}")
    assert imagecheck.check_files(src.files, src.root, cache_dir="", progress=False) == {}
    replaced = len(data.replaced_images())
    after = list(data.pretrain_dataset(src, c.data, c.aug, 4, seed=0, num_epochs=1))
    assert data.replaced_images()[replaced:] == [bad]
    assert len(after) == len(before) == 4
    flat = lambda batches, v: np.concatenate([b[v].numpy() for b in batches])
    changed = [
        i
        for i in range(16)
        if not np.array_equal(flat(after, "view1")[i], flat(before, "view1")[i])
    ]
    assert len(changed) == 1  # the bad file's slot only: every other image keeps its place
    slot = changed[0]
    for v in ("view1", "view2"):
        b, a = flat(before, v), flat(after, v)
        np.testing.assert_array_equal(np.delete(a, slot, 0), np.delete(b, slot, 0))
        np.testing.assert_array_equal(a[slot], b[slot - 1] if slot else b[1])


def test_a_worker_decodes_only_its_rows_with_their_global_draws(tmp_path):
    root = _photo_folder(tmp_path / "photos", n=10)
    src = data.load_source(f"folder:{root}")
    c = default_config()
    c.data.image_size = 8
    whole = list(data.pretrain_dataset(src, c.data, c.aug, 8, 0, 0, 1, 2))
    parts = [
        list(data.pretrain_dataset(src, c.data, c.aug, 8, 0, 0, 1, 2, shard=(w, 2))) for w in (0, 1)
    ]
    for b in range(2):
        for v in ("view1", "view2"):
            joined = np.concatenate([parts[0][b][v], parts[1][b][v]])
            np.testing.assert_array_equal(joined, whole[b][v].numpy())
    with pytest.raises(ValueError, match="divide"):
        data.pretrain_dataset(src, c.data, c.aug, 9, 0, shard=(0, 2))


# ------------------------------------------------------------------------------------------------
# kNN


def _unit(a):
    return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)


def test_a_chunked_bank_votes_as_one_dense_bank():
    rng = np.random.default_rng(0)
    bank, queries = _unit(rng.normal(size=(1000, 16))), _unit(rng.normal(size=(90, 16)))
    bank[500] = bank[10]  # a tie across chunks: the lower index wins in both
    labels = rng.integers(0, 5, 1000)
    dense = knn.knn_predict(bank, labels, queries, 5, k=20, t=0.1)
    chunked = knn.FeatureBank.from_array(bank, labels, chunk_rows=64)
    assert len(chunked.chunks) == 16
    np.testing.assert_array_equal(knn.knn_predict(chunked, None, queries, 5, k=20), dense)
    sims = queries @ bank.T
    want = np.argmax(
        [
            np.bincount(labels[o], np.exp(s[o] / 0.1), 5)
            for s, o in zip(sims, np.argsort(-sims)[:, :20])
        ],
        axis=1,
    )
    np.testing.assert_array_equal(dense, want)
    half = knn.FeatureBank.from_array(bank, labels, dtype="float16", chunk_rows=100)
    assert half.chunks[0].dtype == tf.float16
    assert np.mean(knn.knn_predict(half, None, queries, 5, k=20) == dense) > 0.95


def test_the_bank_is_built_chunk_by_chunk_on_its_device():
    import keras

    backbone = keras.Sequential([keras.Input((4, 4, 3)), keras.layers.Flatten()])
    x = np.random.default_rng(1).normal(size=(70, 4, 4, 3)).astype(np.float32)
    ds = tf.data.Dataset.from_tensor_slices((x, np.arange(70) % 3)).batch(8)
    bank = knn.build_bank(backbone, ds, dtype="float16", chunk_rows=20)
    assert [int(c.shape[0]) for c in bank.chunks] == [24, 24, 22]  # whole batches per chunk
    assert all(c.dtype == tf.float16 and c.device.endswith("CPU:0") for c in bank.chunks)
    np.testing.assert_allclose(bank.numpy(), _unit(x.reshape(70, -1)), atol=1e-3)
    np.testing.assert_array_equal(bank.labels, np.arange(70) % 3)


def test_the_monitor_scores_a_capped_stratified_bank(tmp_path):
    for c in ("a", "b", "c"):
        write_images(str(tmp_path / "f" / "train" / c), 12, seed=len(c))
        write_images(str(tmp_path / "f" / "val" / c), 4, seed=9)
    config = _folder_config(tmp_path / "f", monitor_max_bank=9, monitor_max_queries=6)
    full = callbacks.make_knn_evaluator(config, str(tmp_path / "run"))
    capped = callbacks.make_knn_evaluator(config, str(tmp_path / "run"), monitor=True)
    assert (full.bank.num_examples, full.queries.num_examples) == (36, 12)
    assert (capped.bank.num_examples, capped.queries.num_examples) == (9, 6)
    assert np.bincount(capped.bank.labels).tolist() == [3, 3, 3]
    assert set(capped.bank.files) <= set(full.bank.files)


# ------------------------------------------------------------------------------------------------
# The command line


@pytest.mark.slow  # a training process: make test-slow; holdout tests cover the split
def test_max_examples_trains_on_that_many_images(tmp_path):
    for c in ("a", "b"):
        write_images(str(tmp_path / "f" / c), 20, seed=len(c))
    run = str(tmp_path / "run")
    cmd = [sys.executable, "tools/train.py", *TINY_TRAIN_FLAGS, f"--workdir={run}"]
    cmd += [f"--config.data.source=folder:{tmp_path / 'f'}", "--config.data.max_examples=24"]
    cmd += ["--config.optim.epochs=1", "--config.optim.batch_size=8"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[train]: 24 examples, 3 steps of 8" in proc.stderr
    assert "24 train images, 8 evaluation images held out" in proc.stderr
    with open(os.path.join(run, "history.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [3]


def test_an_unknown_tfds_name_is_one_line_naming_the_closest(tmp_path):
    from simsiam_tf.errors import ConfigError

    config = _folder_config(tmp_path)
    config.data.source = "tfds:cifar_10"
    with pytest.raises(
        ConfigError, match=r"tfds:cifar_10: TFDS has no such data set; did you mean tfds:cifar10"
    ):
        holdout.load_split(config, "train")  # the split lookup comes first: no traceback there


def test_a_one_class_folder_is_named_as_such_by_the_monitor(tmp_path, caplog):
    write_images(str(tmp_path / "photos" / "cats"), 6)
    config = _folder_config(tmp_path / "photos")
    assert callbacks.make_knn_evaluator(config, str(tmp_path / "run")) is None
    (message,) = [r.getMessage() for r in caplog.records if "No kNN evaluation" in r.getMessage()]
    assert message.endswith("split has one class (cats); kNN needs two or more")
