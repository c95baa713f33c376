"""Backbones by name beyond the built-in ones: any `keras.applications` constructor and any
keras-cv `*Backbone` class, built without downloaded weights and pooled to NxC.

The input contract of every SimSiam backbone: float RGB images in [0, 1], NxHxWx3. Each
family is fed the range it was designed for, and its own preprocessing is never applied twice:

  built-in (resnet18, ...)  our `Normalize` layer: (x - ImageNet mean) / std, as torchvision.
  keras.applications.X      x * 255 passed through the module's own `preprocess_input`, as
                            an exact per-pixel affine map (`ColorAffine`, taken from the
                            function itself): ResNet50V2, MobileNetV2, Xception, ... see
                            [-1, 1]; ResNet50 and VGG see caffe's BGR minus the mean; DenseNet
                            the torch normalisation. Models whose preprocessing is built in
                            (MobileNetV3, EfficientNet, EfficientNetV2, ConvNeXt) have an
                            identity `preprocess_input`, so they get the [0, 255] pixels that
                            their own first layers expect. EfficientNet (V1)'s built-in
                            `Normalization` holds no statistics without downloaded weights (it
                            would pass [0, 1] through): it is set to the ImageNet ones it has
                            with weights.
  keras_cv.models.X         built with `include_rescaling=False`: keras-cv's rescaling is
                            x / 255, so these models are designed for [0, 1], which they get.

tests/test_backbones.py measures the range the first convolution sees for each family.
"""

from __future__ import annotations

import difflib
import importlib
import sys
from typing import Callable

import keras
import numpy as np
import tensorflow as tf

APPLICATIONS = "keras.applications."
KERAS_CV = "keras_cv.models."
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Unbuildable(ValueError):
    """A backbone name that resolves but cannot be built as asked; the message says why."""


@keras.saving.register_keras_serializable("simsiam_tf")
class ColorAffine(keras.layers.Layer):
    """y = x @ matrix^T + offset per pixel: [0, 1] RGB -> what a backbone family expects
    (a scale, a shift and, for caffe's BGR, a channel permutation)."""

    def __init__(self, matrix, offset, **kwargs):
        super().__init__(**kwargs)
        self.matrix = [[float(v) for v in row] for row in matrix]
        self.offset = [float(v) for v in offset]

    def call(self, inputs):
        x = tf.cast(inputs, self.compute_dtype)
        matrix = tf.constant(self.matrix, x.dtype)  # out x in
        return tf.tensordot(x, tf.transpose(matrix), 1) + tf.constant(self.offset, x.dtype)

    def get_config(self):
        return {**super().get_config(), "matrix": self.matrix, "offset": self.offset}


def is_external(name: str) -> bool:
    return name.startswith((APPLICATIONS, KERAS_CV))


# keras-cv 0.9's named aliases (ResNet50V2Backbone, ...) fetch their architecture from a Kaggle
# preset at construction; these are built here from the architecture itself, offline. Other
# aliases still fetch it (a config, not weights).
_RESNET_DEPTHS = {
    "18": ("basic_block", [2, 2, 2, 2]),
    "34": ("basic_block", [3, 4, 6, 3]),
    "50": ("block", [3, 4, 6, 3]),
    "101": ("block", [3, 4, 23, 3]),
    "152": ("block", [3, 8, 36, 3]),
}
KERAS_CV_ARCHITECTURES = {
    f"ResNet{depth}{v}Backbone": (
        "ResNetV2Backbone" if v else "ResNetBackbone",
        dict(
            stackwise_filters=[64, 128, 256, 512],
            stackwise_blocks=blocks,
            stackwise_strides=[1, 2, 2, 2],
            block_type=block,
        ),
    )
    for depth, (block, blocks) in _RESNET_DEPTHS.items()
    for v in ("", "V2")
}


def application_names() -> list:
    return [APPLICATIONS + n for n in dir(keras.applications) if n[:1].isupper()]


def keras_cv_names() -> list:
    import keras_cv

    return [
        KERAS_CV + n for n in dir(keras_cv.models) if n.endswith("Backbone") and n != "Backbone"
    ]


def closest(name: str, known: list) -> str | None:
    """The known name nearest to `name`: by its last part, case-insensitively, then difflib."""
    tail = name.rsplit(".", 1)[-1].lower().replace("_", "")
    by_tail = {k.rsplit(".", 1)[-1].lower(): k for k in known}
    if tail in by_tail:
        return by_tail[tail]
    hint = difflib.get_close_matches(tail, list(by_tail), n=1, cutoff=0.6)
    if hint:
        return by_tail[hint[0]]
    hint = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    return hint[0] if hint else None


def resolve(name: str) -> Callable:
    """The constructor of an external backbone name; ValueError naming the closest known one."""
    if name.startswith(APPLICATIONS):
        attr = name[len(APPLICATIONS) :]
        constructor = getattr(keras.applications, attr, None) if attr[:1].isupper() else None
        known = application_names()
    elif name.startswith(KERAS_CV):
        import keras_cv

        attr = name[len(KERAS_CV) :]
        constructor = getattr(keras_cv.models, attr, None) if attr.endswith("Backbone") else None
        known = keras_cv_names()
    else:
        raise ValueError(f"{name!r} is neither keras.applications.NAME nor keras_cv.models.NAME")
    if constructor is None:
        hint = closest(name, known)
        raise ValueError(f"{name} does not exist" + (f"; did you mean {hint}?" if hint else ""))
    return constructor


def _squash(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def application_for_model_name(model_name: str) -> Callable | None:
    """The keras.applications constructor that names its models `model_name` ("resnet50v2",
    "efficientnetv2-b0", "MobileNetV3Small", ...), or None."""
    wanted = _squash(model_name)
    for name in application_names():
        attr = name[len(APPLICATIONS) :]
        if _squash(attr) == wanted:
            return getattr(keras.applications, attr)
    return None


def preprocess_affine(constructor: Callable) -> tuple[np.ndarray, np.ndarray]:
    """(matrix, offset) with preprocess_input(255 x) = x @ matrix^T + offset for x in [0, 1], read
    off the application module's own `preprocess_input`; ValueError if it is not affine."""
    module = sys.modules.get(constructor.__module__) or importlib.import_module(
        constructor.__module__
    )
    fn = getattr(module, "preprocess_input", None)
    if fn is None:
        raise ValueError(f"{constructor.__module__} has no preprocess_input")

    def apply(x):  # x in [0, 1], one pixel per row; a fresh copy (preprocess_input works in place)
        return np.asarray(fn(np.array(x, np.float32).reshape(1, -1, 1, 3) * 255.0), np.float64)[
            0, :, 0
        ]

    offset = apply(np.zeros((1, 3)))[0]
    matrix = (apply(np.eye(3)) - offset).T  # column i: the response to channel i
    probe = np.random.default_rng(0).uniform(0, 1, (8, 3))
    if not np.allclose(apply(probe), probe @ matrix.T + offset, atol=1e-4):
        raise ValueError(
            f"{constructor.__module__}.preprocess_input is not a per-pixel affine map; build "
            "the backbone yourself and pass it to SimSiam.from_backbone"
        )
    return matrix, offset


def set_unset_normalization(net: keras.Model) -> None:
    """EfficientNet (V1) normalises with a `Normalization` whose statistics come with the
    ImageNet weights; without them it is the identity. Sets the ImageNet statistics (its input
    is x / 255 there)."""
    for layer in net._flatten_layers(include_self=False):
        if isinstance(layer, keras.layers.Normalization) and layer.input_mean is None:
            layer.adapt_mean.assign(np.asarray(IMAGENET_MEAN, np.float32))
            layer.adapt_variance.assign(np.square(np.asarray(IMAGENET_STD, np.float32)))
            layer.finalize_state()


def pool(x):
    """Pooled features NxC of a feature map NxHxWxC, tokens NxLxC, or features NxC."""
    if len(x.shape) == 4:
        return keras.layers.GlobalAveragePooling2D(name="pool")(x)
    if len(x.shape) == 3:
        return keras.layers.GlobalAveragePooling1D(name="pool")(x)
    return x


def _keras_cv_backbone(name: str, constructor: Callable) -> keras.Model:
    import keras_cv

    attr = name[len(KERAS_CV) :]
    if attr in KERAS_CV_ARCHITECTURES:
        base, arguments = KERAS_CV_ARCHITECTURES[attr]
        return getattr(keras_cv.models, base)(
            include_rescaling=False, input_shape=(None, None, 3), **arguments
        )
    try:
        return constructor(include_rescaling=False, input_shape=(None, None, 3))
    except OSError as err:  # requests' ConnectionError is one
        raise Unbuildable(
            f"model.backbone={name}: keras-cv fetches this architecture from a Kaggle preset, "
            f"which failed ({type(err).__name__}); offline, keras_cv.models."
            "ResNet{18,34,50,101,152}[V2]Backbone and every keras.applications.NAME build"
        ) from None


def build_external(name: str, sync_bn: bool = False) -> keras.Model:
    """An external backbone by name: [0, 1] images NxHxWx3 -> pooled features NxC."""
    constructor = resolve(name)
    inputs = keras.Input((None, None, 3), name="images")
    try:
        if name.startswith(APPLICATIONS):
            matrix, offset = preprocess_affine(constructor)
            x = ColorAffine(matrix, offset, name="preprocess")(inputs)
            net = constructor(include_top=False, weights=None, input_shape=(None, None, 3))
            set_unset_normalization(net)
        else:
            x = inputs
            net = _keras_cv_backbone(name, constructor)
    except Unbuildable:
        raise
    except (TypeError, ValueError) as err:
        raise Unbuildable(
            f"model.backbone={name} cannot be built with its default arguments ({str(err).splitlines()[0]}); "
            "build it yourself and pass it to SimSiam.from_backbone"
        ) from None
    if sync_bn:
        for layer in net._flatten_layers(include_self=False):
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.synchronized = True
    return keras.Model(inputs, pool(net(x)), name="backbone")
