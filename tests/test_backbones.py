"""Backbones by name (simsiam_tf/backbones.py): the input range each family's first convolution
sees, unknown names, heads sized from any backbone."""

import keras
import numpy as np
import pytest

from simsiam_tf import backbones, model
from simsiam_tf.config import default_config, validate
from simsiam_tf.errors import ConfigError
from tests.helpers import run_python

MEAN, STD = np.array(backbones.IMAGENET_MEAN), np.array(backbones.IMAGENET_STD)
TORCH = (float(np.min(-MEAN / STD)), float(np.max((1 - MEAN) / STD)))  # -2.118, 2.640
UNIT_TF = (-1.0, 1.0)  # x / 127.5 - 1 of 0-255 pixels
CAFFE = (-123.68, 255 - 103.939)  # BGR minus the ImageNet mean, 0-255

# (backbone name, the range its first convolution sees for images at 0 and at 1)
FAMILIES = [
    ("resnet18", TORCH),  # our Normalize
    ("keras.applications.ResNet50V2", UNIT_TF),  # preprocess_input "tf"
    ("keras.applications.ResNet50", CAFFE),  # preprocess_input "caffe"
    ("keras.applications.DenseNet121", TORCH),  # preprocess_input "torch"
    ("keras.applications.MobileNetV3Small", UNIT_TF),  # built in: Rescaling(1/127.5, -1)
    ("keras.applications.EfficientNetV2B0", TORCH),  # built in: Rescaling + Normalization
    ("keras.applications.EfficientNetV2S", (-1.0, 255 / 128 - 1)),  # built in: x / 128 - 1
    ("keras.applications.ConvNeXtTiny", TORCH),  # built in: Normalization of 0-255
    ("keras.applications.EfficientNetB0", TORCH),  # built in, its statistics set here
    ("keras_cv.models.ResNet18V2Backbone", (0.0, 1.0)),  # keras-cv: include_rescaling=False
]


def _first_conv(net: keras.Model):
    """The first convolution in the order of the graph (a functional model's `layers`)."""
    convs = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.SeparableConv2D)
    for layer in net.layers:
        found = _first_conv(layer) if isinstance(layer, keras.Model) else None
        if found or isinstance(layer, convs):
            return found or layer
    return None


@pytest.mark.parametrize("name,expected", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_first_convolution_sees_the_range_its_family_was_designed_for(name, expected):
    net = model.build_backbone(name)
    conv = _first_conv(net)
    seen = []
    original = conv.call
    conv.call = lambda x, *a, **k: (seen.append(np.asarray(x)), original(x, *a, **k))[1]
    images = np.stack([np.zeros((32, 32, 3)), np.ones((32, 32, 3))]).astype(np.float32)
    features = net(images, training=False)
    assert features.shape == (2, model.feature_dim(net))
    (x,) = seen
    # Padding adds zeros, which lie inside every range; the extremes come from the images.
    assert float(x.min()) == pytest.approx(expected[0], abs=1e-3)
    assert float(x.max()) == pytest.approx(expected[1], abs=1e-3)


def test_preprocess_affine_is_the_modules_own_function():
    matrix, offset = backbones.preprocess_affine(keras.applications.ResNet50)
    pixels = np.random.default_rng(0).uniform(0, 1, (5, 3))
    want = keras.applications.resnet.preprocess_input(pixels.reshape(1, 5, 1, 3) * 255.0)
    np.testing.assert_allclose(pixels @ matrix.T + offset, want.reshape(5, 3), atol=1e-3)
    assert matrix[0, 2] == pytest.approx(255.0) and matrix[0, 0] == 0  # caffe: B first, 0-255


@pytest.mark.parametrize(
    "name,hint",
    [
        ("resnet50v2", "keras.applications.ResNet50V2"),
        ("renset18", "resnet18"),
        ("keras.applications.EfficentNetV2B0", "keras.applications.EfficientNetV2B0"),
        ("keras_cv.models.ResNet50V2", "keras_cv.models.ResNet50V2Backbone"),
    ],
)
def test_unknown_backbone_names_the_closest(name, hint):
    c = default_config()
    c.model.backbone = name
    with pytest.raises(ConfigError, match=f"did you mean {hint}\\?"):
        validate(c)


def test_unknown_backbone_on_the_command_line_is_one_line(tmp_path):
    proc = run_python(
        "tools/train.py",
        "--config=configs/quickstart.py",
        f"--workdir={tmp_path / 'run'}",
        "--config.model.backbone=keras.applications.ResNet50v2",
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: model.backbone=keras.applications.ResNet50v2: keras.applications.ResNet50v2 does "
        "not exist; did you mean keras.applications.ResNet50V2?"
    )
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_heads_are_sized_from_any_backbone():
    sequential = keras.Sequential(
        [keras.layers.Conv2D(12, 3), keras.layers.GlobalAveragePooling2D()], name="mine"
    )
    net = model.SimSiam.from_backbone(sequential, proj_dim=16, pred_hidden=4, image_size=16)
    assert net.projector.input.shape[-1] == 12  # from compute_output_shape, not .output
    assert net.projector.layers[1].kernel.shape == (12, 12)  # hidden = feature width (builder.py)
    assert net.predictor.output.shape[-1] == 16
    # A feature map (no pooling) is pooled to a vector.
    fmap = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.Conv2D(5, 3)], name="fmap")
    pooled = model.SimSiam.from_backbone(fmap, proj_dim=8, pred_hidden=4)
    assert pooled(np.zeros((2, 16, 16, 3), np.float32)).shape == (2, 5)


@pytest.mark.slow
def test_every_tool_works_on_a_keras_applications_run(tmp_path):
    """Train, resume, kNN, linear probe, plot, export and embed a keras.applications.VGG16 run
    (about 3 minutes on 2 cores)."""
    from tests.conftest import write_images

    run = tmp_path / "run"
    flags = [
        "--config=configs/quickstart.py",
        f"--workdir={run}",
        "--config.model.backbone=keras.applications.VGG16",
        "--config.data.image_size=32",
        "--config.optim.batch_size=32",
        "--config.train.steps_per_epoch=2",
        "--config.optim.warmup_epochs=0",
        "--config.model.proj_dim=32",
        "--config.model.proj_hidden=32",
        "--config.model.pred_hidden=8",
        "--config.train.verbose=2",
        "--config.eval.max_bank=200",
        "--config.eval.max_queries=100",
        "--config.eval.knn_k=20",
    ]

    def ok(*args):
        proc = run_python(*args)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    assert "epochs=1 " in ok("tools/train.py", *flags, "--config.optim.epochs=1")
    assert "epochs=2 " in ok("tools/train.py", *flags, "--config.optim.epochs=2")  # resumes
    assert ok("tools/eval_knn.py", f"--workdir={run}").startswith("epoch 2: knn_top1=")
    linear = ok("tools/eval_linear.py", f"--workdir={run}", "--epochs=1", "--max_train=200")
    assert "backbone_unchanged=True" in linear
    ok("tools/plot.py", f"--workdir={run}", "--queries=2", "--k=3", "--max_bank=100")
    assert (run / "retrieval.png").exists()
    export = ok("tools/export.py", f"--workdir={run}", f"--export_dir={tmp_path / 'exp'}")
    assert export.strip() == str(tmp_path / "exp" / "1")
    write_images(str(tmp_path / "imgs"), 3)
    out = ok(
        "tools/embed.py",
        f"--saved_model={tmp_path / 'exp'}",
        f"--image_dir={tmp_path / 'imgs'}",
        f"--index={tmp_path / 'idx' / 'i'}",
    )
    assert out.strip().splitlines()[-1].startswith("3 of 3 images embedded")  # after the bar


def test_an_image_size_the_backbone_cannot_take_fails_validation():
    c = default_config()
    c.model.backbone = "keras.applications.InceptionV3"  # its stem needs 75 px
    c.data.image_size = 32
    with pytest.raises(ConfigError, match="cannot take data.image_size=32 px images.*raise"):
        validate(c)
    c.data.image_size = 96
    validate(c)


def test_fix_pred_lr_survives_keras_saving(tmp_path):
    import simsiam_tf

    encoder = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3)])
    net = model.SimSiam.from_backbone(encoder, proj_layers=2, proj_dim=8, pred_hidden=4)
    net.compile(
        optimizer=simsiam_tf.sgd(net, batch_size=4, epochs=2, steps_per_epoch=2, fix_pred_lr=True)
    )
    net.optimizer.build(net.trainable_variables)
    net.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    predictor = {id(v) for v in loaded.predictor.trainable_variables}
    flags = [loaded.optimizer.uses_fixed_lr(v) for v in loaded.trainable_variables]
    assert flags == [id(v) in predictor for v in loaded.trainable_variables] and any(flags)
    assert loaded.optimizer.fixed_lr == pytest.approx(0.05 * 4 / 256)
