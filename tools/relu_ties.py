"""Where a float32 step parts from float64: the ReLUs whose input rounds to the other side of 0.

    python tools/relu_ties.py [--backbone=resnet18_cifar] [--size=32] [--batch=16] [--seed=0]
                              [--bn_kernels=tf|auto|native]

(--batch, --seed and --bn_kernels are tools/parity.py's flags: 0 is batch 16, no --bn_kernels
the stock step.)

Builds the backbone twice from the same weights, in float32 and in float64, with random BN
gammas and betas (every residual branch live, as after the first SGD step), feeds both one
batch of tools/parity.py's smooth images, and prints, per ReLU, how many of its inputs have a
different sign in float32 (an exact 0 counts as not positive, as the ReLU's gradient takes it),
then every gradient of sum(features x r), r fixed and random, as its relative L2 error against
float64, backbone output first.

A ReLU input that float64 puts within float32 rounding of 0 may land on the other side: one
element then takes or drops its whole upstream gradient, and every gradient below that ReLU
moves by about |that element's gradient| / ||the tensor's gradient||. In ResNet-18 at batch 16
that is ~1e-3 for one element of 131,072 (docs/FIDELITY.md, "Where the float32 steps part"):
this is how `make parity`'s ten float32 steps become a draw over the seed, whatever the BN step.
"""

from __future__ import annotations

import cli  # noqa: F401  (first: a quiet TensorFlow start-up)

import numpy as np
import parity  # its images, and its --seed, --batch and --bn_kernels
from absl import flags

_BACKBONE = flags.DEFINE_string("backbone", "resnet18_cifar", "A built-in backbone.")
_SIZE = flags.DEFINE_integer("size", 32, "Image side in pixels.")


def build(dtype: str, seed: int):
    import keras

    from simsiam_tf import model

    keras.config.set_floatx(dtype)
    keras.config.set_dtype_policy(dtype)
    keras.utils.set_random_seed(seed)
    net = model.build_backbone(_BACKBONE.value)
    keras.config.set_floatx("float32")
    keras.config.set_dtype_policy("float32")
    return net


def relu_inputs_and_gradients(net, images, r, dtype):
    """(the input of every ReLU layer, every gradient of sum(features x r)), as float64."""
    import keras
    import tensorflow as tf

    relus = [layer for layer in net.layers if isinstance(layer, keras.layers.ReLU)]
    probe = keras.Model(net.input, [layer.input for layer in relus] + [net.output])
    with tf.GradientTape() as tape:  # one forward pass gives the ReLU inputs and the features
        *inputs, features = probe(tf.constant(images, dtype), training=True)
        loss = tf.reduce_sum(features * tf.constant(r, dtype))
    grads = tape.gradient(loss, net.trainable_variables)
    inputs = [t.numpy().astype(np.float64) for t in inputs]
    return relus, inputs, [g.numpy().astype(np.float64) for g in grads]


def main(argv):
    del argv
    import keras

    from simsiam_tf import model

    seed, batch = parity._SEED.value, parity._BATCH.value or 16
    net32, net64 = build("float32", seed), build("float64", seed)
    rng = np.random.default_rng(seed)
    for layer in net64.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = int(layer.gamma.shape[0])
            layer.gamma.assign(rng.uniform(0.5, 1.5, n))  # tools/parity.py's affine draw
            layer.beta.assign(rng.uniform(-0.2, 0.2, n))
    for v32, v64 in zip(net32.variables, net64.variables):
        v32.assign(v64.numpy().astype(np.float32))
    model.set_bn_kernels(net32, parity._BN_KERNELS.value or "tf")
    images = parity.smooth_images(rng, batch, _SIZE.value)
    r = rng.normal(size=(batch, net64.output.shape[-1]))
    relus, in32, g32 = relu_inputs_and_gradients(net32, images, r, "float32")
    _, in64, g64 = relu_inputs_and_gradients(net64, images, r, "float64")

    print("| ReLU (input of) | elements | sign differs in float32 | closest float64 input to 0 |")
    print("| --- | --- | --- | --- |")
    total = 0
    for layer, a, b in zip(relus, in32, in64):
        flips = int(np.count_nonzero((a > 0) != (b > 0)))
        total += flips
        source = layer.input._keras_history[0].name  # the layer feeding this ReLU
        print(f"| {layer.name} (after {source}) | {b.size} | {flips} | {np.abs(b).min():.1e} |")
    print(f"sign differences: {total}")
    print("\n| gradient | rel. error vs float64 |\n| --- | --- |")
    for v, a, b in reversed(list(zip(net32.trainable_variables, g32, g64))):
        print(f"| {v.path} | {parity.rel_error(a, b):.2e} |")


if __name__ == "__main__":
    cli.run(main)
