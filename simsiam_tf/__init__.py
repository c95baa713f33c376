"""simsiam-tf: SimSiam (Chen & He, CVPR 2021) in TensorFlow / Keras 3."""

import os

# Keras 3 must use TensorFlow: the train step, tf.data and tf.distribute are TensorFlow code.
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

__version__ = "0.1.0"
