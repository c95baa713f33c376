"""simsiam-tf: SimSiam (Chen & He, CVPR 2021) in TensorFlow / Keras 3.

    import keras, simsiam_tf
    model = simsiam_tf.SimSiam.from_backbone(keras.applications.ResNet50V2(
        include_top=False, pooling="avg", weights=None, input_shape=(64, 64, 3)))
    ds = simsiam_tf.pretrain_dataset("folder:photos", image_size=64, batch_size=32)
    model.compile(optimizer=simsiam_tf.sgd(model, batch_size=32, epochs=10, steps_per_epoch=100))
    model.fit(ds, epochs=10, steps_per_epoch=100)

The public names load on first use, so `import simsiam_tf` itself does not start TensorFlow
(the command line quiets TensorFlow's start-up before importing it).
"""

import importlib
import os

# Keras 3 must use TensorFlow: the train step, tf.data and tf.distribute are TensorFlow code.
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

__version__ = "0.1.0"

# public name -> the module that defines it
_PUBLIC = {
    "SimSiam": "simsiam_tf.model",
    "build_backbone": "simsiam_tf.model",
    "build_projector": "simsiam_tf.model",
    "build_predictor": "simsiam_tf.model",
    "pretrain_dataset": "simsiam_tf.api",
    "sgd": "simsiam_tf.api",
    "export_saved_model": "simsiam_tf.api",
    "simsiam_loss": "simsiam_tf.losses",
}
__all__ = sorted(_PUBLIC) + ["__version__"]


def __getattr__(name):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'simsiam_tf' has no attribute {name!r}")


def __dir__():
    return __all__
