"""The Python API (simsiam_tf/api.py, SimSiam.from_backbone, .keras saving): the README's
"Use from Python" code, run; the lr schedule from the arguments; datasets; export."""

import os
import re

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import simsiam_tf
from simsiam_tf import data, export
from tests.conftest import REPO


def readme_blocks() -> list:
    """The python code blocks of README.md's "Use from Python" section."""
    with open(os.path.join(REPO, "README.md")) as f:
        text = f.read()
    section = text.split("## Use from Python", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def _small_model(seed=0, **kwargs):
    keras.utils.set_random_seed(seed)
    encoder = keras.Sequential(
        [
            keras.Input((16, 16, 3)),
            keras.layers.Conv2D(8, 3, strides=2),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.GlobalAveragePooling2D(),
        ]
    )
    return simsiam_tf.SimSiam.from_backbone(
        encoder, proj_layers=2, proj_dim=16, pred_hidden=4, **kwargs
    )


def _images(n=16, size=20, seed=0):
    return np.random.default_rng(seed).uniform(size=(n, size, size, 3)).astype(np.float32)


def test_readme_sequential_example_runs_saves_and_trains_on(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(readme_blocks()[1], namespace)
    model, reloaded = namespace["model"], namespace["reloaded"]
    assert sorted(os.listdir(tmp_path)) == ["simsiam-1.keras", "simsiam-2.keras"]
    assert int(model.optimizer.iterations) == 4
    assert int(reloaded.optimizer.iterations) == 6  # the optimizer state came with the file
    # The checkpoint of the last epoch is the model as fit left it: equal embeddings.
    again = keras.saving.load_model("simsiam-2.keras")
    x = _images(4, 32)
    np.testing.assert_array_equal(again(x).numpy(), model(x).numpy())
    assert not np.array_equal(reloaded(x).numpy(), model(x).numpy())  # it trained on


@pytest.mark.slow
def test_readme_keras_applications_example(tmp_path, monkeypatch):
    """The first example as printed, at 32 px, batch 4 and 2 x 2 steps (a ResNet50V2's train step
    takes about a minute to trace on 2 cores)."""
    code = readme_blocks()[0]
    for big, small in (
        ("64", "32"),
        ("batch_size=32", "batch_size=4"),
        ("epochs=10", "epochs=2"),
        ("steps_per_epoch=100", "steps_per_epoch=2"),
    ):
        assert big in code
        code = code.replace(big, small)
    monkeypatch.chdir(tmp_path)
    os.makedirs("photos")
    for i, image in enumerate(_images(8, 40)):
        Image.fromarray((image * 255).astype(np.uint8)).save(f"photos/{i}.png")
    namespace = {}
    exec(code, namespace)
    model = namespace["model"]
    assert model.backbone.get_layer("preprocess") is not None  # ResNet50V2 gets [-1, 1]
    served = tf.saved_model.load("exports/simsiam/1").signatures[export.SERVING_BYTES]
    png = tf.io.read_file("photos/0.png")
    got = served(image_bytes=tf.reshape(png, (1,)))["embedding"].numpy()
    want = model(data.eval_preprocess(tf.io.decode_png(png)[None], 32, 1.0)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    loaded = keras.saving.load_model("simsiam.keras")
    x = _images(2, 32)
    np.testing.assert_array_equal(loaded(x).numpy(), model(x).numpy())


def test_sgd_schedule_spans_the_given_run():
    model = _small_model()
    opt = simsiam_tf.sgd(model, batch_size=64, epochs=10, steps_per_epoch=100)
    peak = 0.05 * 64 / 256
    lr = opt._learning_rate  # the schedule (`learning_rate` is its value now)
    assert float(lr(0)) == pytest.approx(peak)
    assert float(lr(500)) == pytest.approx(peak / 2, rel=1e-6)  # cosine midpoint at 500 steps
    assert float(lr(1000)) == pytest.approx(0.0, abs=1e-9)
    assert opt.l2_weight_decay == pytest.approx(1e-4) and opt.momentum == pytest.approx(0.9)
    with pytest.raises(TypeError):
        simsiam_tf.sgd(model, batch_size=64, steps_per_epoch=100)  # no silent 800 epochs
    fixed = simsiam_tf.sgd(model, batch_size=64, epochs=2, steps_per_epoch=5, fix_pred_lr=True)
    fixed.build(model.trainable_variables)
    predictor = {id(v) for v in model.predictor.trainable_variables}
    flags = [fixed.uses_fixed_lr(v) for v in model.trainable_variables]
    assert flags == [id(v) in predictor for v in model.trainable_variables] and any(flags)


def test_pretrain_dataset_from_a_spec_and_from_a_dataset():
    batch = next(iter(simsiam_tf.pretrain_dataset("builtin:digits", image_size=16, batch_size=8)))
    assert batch["view1"].shape == (8, 16, 16, 3) and batch["view1"].dtype == tf.uint8
    assert not np.array_equal(batch["view1"].numpy(), batch["view2"].numpy())
    # Images of several sizes, floats in [0, 1], with labels.
    images = [_images(1, s, seed=s)[0] for s in (20, 24, 28)]
    ds = tf.data.Dataset.from_generator(
        lambda: ((im, 0) for im in images),
        output_signature=(tf.TensorSpec((None, None, 3), tf.float32), tf.TensorSpec((), tf.int32)),
    )
    got = list(simsiam_tf.pretrain_dataset(ds, image_size=12, batch_size=2).take(3))
    assert [b["view2"].shape for b in got] == [(2, 12, 12, 3)] * 3  # repeats; full batches
    with pytest.raises(TypeError, match="did you mean blur_prob"):
        simsiam_tf.pretrain_dataset("builtin:digits", image_size=16, batch_size=8, blur_prb=0.5)
    with pytest.raises(ValueError, match="batch_size=4096 is larger than builtin:digits"):
        simsiam_tf.pretrain_dataset("builtin:digits", image_size=16, batch_size=4096)


def test_save_load_of_a_built_in_backbone_run(tmp_path):
    """SimSiam built by the command line's builder (custom Normalize and BatchNorm layers)."""
    from tests.helpers import tiny_config

    net = simsiam_tf.model.build_simsiam(tiny_config().model)
    x = _images(2, 16)
    path = str(tmp_path / "cnn.keras")
    net.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, simsiam_tf.SimSiam)
    np.testing.assert_array_equal(loaded(x).numpy(), net(x).numpy())
    z = loaded.projector(loaded(x), training=False).numpy()
    np.testing.assert_array_equal(z, net.projector(net(x), training=False).numpy())


def test_export_saved_model_serves_what_the_model_computes(tmp_path):
    model = _small_model()
    path = simsiam_tf.export_saved_model(model, str(tmp_path / "exports" / "m"), image_size=16)
    assert path == str(tmp_path / "exports" / "m" / "1")
    photo = (np.random.default_rng(1).uniform(size=(24, 30, 3)) * 255).astype(np.uint8)
    png = tf.io.encode_png(photo)
    served = tf.saved_model.load(path).signatures[export.SERVING_BYTES]
    got = served(image_bytes=tf.reshape(png, (1,)))["embedding"].numpy()
    want = model(data.eval_preprocess(photo[None], 16, 1.0)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert simsiam_tf.export_saved_model(model, str(tmp_path / "exports" / "m"), 16).endswith("2")
