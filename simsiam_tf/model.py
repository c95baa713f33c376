"""SimSiam: backbone + projection MLP (the encoder f) and the prediction MLP h.

Architecture as the paper (section 3 and appendix A/D) and the official code
(facebookresearch/simsiam, simsiam/builder.py):

  projector:  [Dense(no bias) -> BN -> ReLU] x (layers - 1) -> Dense(no bias) -> BN(no affine)
  predictor:  Dense(2048 -> 512, no bias) -> BN -> ReLU -> Dense(512 -> 2048)   (bottleneck)

Images enter every backbone as float RGB in [0, 1]; the mean/std normalisation is the
backbone's first layer, so training, evaluation and the exported SavedModel share it. Besides
the built-in backbones, `build_backbone` takes any `keras.applications.NAME` and
`keras_cv.models.NAMEBackbone` (simsiam_tf/backbones.py, which says what range each sees).
"""

from __future__ import annotations

import math
from typing import Sequence

import keras
import tensorflow as tf

from simsiam_tf import backbones, losses, native

# The built-in backbones; `model.backbone` also takes keras.applications.NAME and
# keras_cv.models.NAME (`backbone_error` says whether a name can be built).
BACKBONES = ("resnet18_cifar", "resnet18", "resnet50", "cnn_small")
PREDICTORS = ("mlp", "identity", "fixed_random")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# PyTorch's defaults, so that the recipe's hyper-parameters mean the same thing here:
# BN momentum 0.1 (Keras counts the other way: 0.9), eps 1e-5, and the unbiased batch variance
# in the running variance (`BatchNorm`); conv weights
# kaiming_normal(fan_out) as torchvision's ResNet; Dense weights and biases U(+-1/sqrt(fan_in)).
# A fresh initializer per layer: a Keras 3 initializer instance draws its seed once, so one
# instance shared by several layers would give every layer of a shape the same weights, and one
# made at import time would ignore keras.utils.set_random_seed.
_BN = dict(momentum=0.9, epsilon=1e-5)


def _conv_init():
    return keras.initializers.VarianceScaling(2.0, "fan_out", "untruncated_normal")


def _dense_init():
    return keras.initializers.VarianceScaling(1.0 / 3.0, "fan_in", "uniform")


@keras.saving.register_keras_serializable("simsiam_tf")
class Normalize(keras.layers.Layer):
    """torchvision's `Normalize(mean, std)`: (x - mean) / std per channel, in the same order of
    operations. The constants are cast from Python floats to the compute type, so a float64
    model normalises in float64 (Keras' `Normalization` rounds given constants to float32 and
    divides by sqrt(std**2))."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], **kwargs):
        super().__init__(**kwargs)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    def call(self, inputs):
        x = tf.cast(inputs, self.compute_dtype)
        return (x - tf.constant(self.mean, x.dtype)) / tf.constant(self.std, x.dtype)

    def get_config(self):
        return {**super().get_config(), "mean": list(self.mean), "std": list(self.std)}


@keras.saving.register_keras_serializable("simsiam_tf")
class BatchNorm(keras.layers.BatchNormalization):
    """Keras BatchNormalization with the statistics and the accuracy of `torch.nn.BatchNorm` /
    `SyncBatchNorm`.

    In training mode the batch is normalised with its biased variance, as Keras does, but the
    moving variance accumulates the unbiased one, var * n / (n - 1) with n the values per
    channel (over all replicas when `synchronized`), as torch does. Keras accumulates the
    biased variance: 3% lower for a projector BN at batch 32, 33% at batch 4.

    A training step computes what torch's kernels compute, in the input's own float type
    (`_normalize`): the variance from a second pass over x - mean, not E[x^2] - E[x]^2; the
    output as (x - mean) * gamma / std + beta; and a gradient of its own, dgamma =
    sum(dy * x_hat), dbeta = sum(dy), dx = gamma / std * (dy - mean(dy) - x_hat *
    mean(dy * x_hat)). Every sum over the batch runs one axis at a time, so float32 rounding
    grows with the longest axis (the width, the height or the batch), not with N x H x W.

    Keras' own step, x * inv + (beta - mean * inv) differentiated by autodiff, subtracts two
    large terms whenever the mean is large against the spread: the gradient of a
    zero-initialised residual gamma came out 20x further from float64 than torch's float32
    does, and ten SGD steps ended ~8x further from exact arithmetic than the official code's
    float32 run (issue 20, docs/FIDELITY.md).

    `sum_dtype` is the type of those sums: "float64" (torch's CPU kernels accumulate in double),
    "float32" (as cuDNN does; the BN step is then 1.5-1.8x faster on the CPU than Keras' own,
    and about 1.6x faster than with float64 sums: docs/PERFORMANCE.md), or "auto": float64 for
    a float32 layer, except under a TPUStrategy (no float64), and float32 under mixed
    precision; never narrower than the layer's own type (a float64 model sums in float64
    whatever is set). The products (dy * x_hat, squares) are float32 in every case; only the
    additions are widened. The mean is the corrected two-pass one (the rounding of the first
    pass's mean taken out again), so x - mean keeps the digits of the spread of x however
    large the mean.

    `sum_dtype="fused"` instead runs TensorFlow's fused kernel (FusedBatchNormV3 and its
    gradient: oneDNN on the CPU, cuDNN on a GPU) on float32, channels-last, 2-D or 4-D inputs
    of a layer not synchronised over replicas; any other call takes the "float32" step. It is
    the fastest step (a ResNet-18 CIFAR step 10% faster than with "float32"), at the kernel's
    digits: where the mean is large against the spread, dgamma is about 13x further from
    float64 than with "float32" sums, though closer than Keras' own BN (tests/test_model.py).

    `kernels` picks what computes a float64-sum step of a float32, channels-last layer not
    synchronised over replicas: "tf" (the layer's default) stock TensorFlow ops; "auto" (the
    config's default, `model.bn_kernels`) the native kernels (kernels/batchnorm_ops.cc, built
    by `make install`) where they are built and no GPU is visible, else stock ops; "native"
    requires them. Both pass the float32 parity of resnet18_builder at seeds 0-3, its bounds
    after ten steps taken over four official float32 runs because ReLU inputs rounding to the
    other side of 0 make any single run a draw (tools/relu_ties.py, docs/FIDELITY.md). Under
    XLA (`train.jit_compile`) the stock ops run whatever is set, XLA takes no custom op. The
    native step adds in double from the first value and normalises in double (one pass over x
    for the statistics, one for the output, two for the gradient, against about fifteen
    passes of stock ops), so it is at least as close to float64 as the stock step and about
    as fast as the fused kernel (docs/PERFORMANCE.md); the two agree to float32 rounding
    (tests/test_native.py). Its row blocks are fixed by the channel count, so its bits do not
    depend on the number of threads.
    """

    SUM_DTYPES = ("auto", "float32", "float64", "fused")

    def __init__(self, *args, sum_dtype: str = "auto", kernels: str = "tf", **kwargs):
        super().__init__(*args, **kwargs)
        if sum_dtype not in self.SUM_DTYPES:
            raise ValueError(f"sum_dtype={sum_dtype!r}: choose one of {self.SUM_DTYPES}")
        if kernels not in native.KERNELS:
            raise ValueError(f"kernels={kernels!r}: choose one of {native.KERNELS}")
        self.sum_dtype = sum_dtype
        self.kernels = kernels

    def get_config(self):
        return {**super().get_config(), "sum_dtype": self.sum_dtype, "kernels": self.kernels}

    def accumulation_dtype(self):
        """The dtype the batch sums of a training step add in (see `sum_dtype`)."""
        if self.sum_dtype == "fused":  # where the fused kernel cannot run (see `_fusable`)
            return tf.float32
        if self.sum_dtype != "auto":
            return tf.as_dtype(self.sum_dtype)
        if self.compute_dtype not in ("float32", "float64") or isinstance(
            tf.distribute.get_strategy(), tf.distribute.TPUStrategy
        ):
            return tf.float32
        return tf.float64

    def call(self, inputs, training=None, mask=None):
        if not (training and self.trainable) or mask is not None or self.renorm:
            return super().call(inputs, training=training, mask=mask)
        x = tf.cast(inputs, keras.backend.result_type(inputs.dtype, "float32"))
        shape = [1] * len(x.shape)
        shape[self.axis] = x.shape[self.axis]
        gamma = tf.reshape(tf.cast(self.gamma, x.dtype), shape) if self.scale else None
        beta = tf.reshape(tf.cast(self.beta, x.dtype), shape) if self.center else None
        ctx = tf.distribute.get_replica_context() if self.synchronized else None
        if ctx is not None and ctx.num_replicas_in_sync == 1:
            ctx = None
        if self.sum_dtype == "fused" and ctx is None and _fusable(x, self.axis):
            outputs, mean, unbiased = _fused_normalize(x, gamma, beta, self.epsilon)
            self._update_moving(mean, unbiased, x.dtype)
            return tf.cast(outputs, self.compute_dtype)
        ops = self._native_ops() if ctx is None else None
        if ops is not None and _native_takes(x, self.axis, self.accumulation_dtype()):
            outputs, mean, unbiased = _native_normalize(ops, x, gamma, beta, self.epsilon)
            self._update_moving(mean, unbiased, x.dtype)
            return tf.cast(outputs, self.compute_dtype)
        outputs, mean, variance, count = _normalize(
            x,
            gamma,
            beta,
            axes=list(self._reduction_axes),
            epsilon=self.epsilon,
            ctx=ctx,
            sum_dtype=self.accumulation_dtype(),
        )
        unbiased = variance * count / tf.maximum(count - 1.0, 1.0)
        self._update_moving(mean, unbiased, x.dtype)
        return tf.cast(outputs, self.compute_dtype)

    def _native_ops(self):
        """The native BN kernels (kernels/batchnorm_ops.cc), or None for stock ops: "native"
        always (an error where not built), "auto" where built and no GPU is visible (the
        kernels are the CPU's; on a GPU the stock ops run there), "tf" never."""
        if self.kernels == "tf" or _in_xla():  # XLA compiles stock ops only
            return None
        if self.kernels == "auto" and tf.config.list_logical_devices("GPU"):
            return None
        return native.ops(self.kernels, setting="model.bn_kernels")

    def _update_moving(self, mean, unbiased, dtype):
        momentum = tf.convert_to_tensor(self.momentum, dtype)  # not via float32
        for moving, batch in ((self.moving_mean, mean), (self.moving_variance, unbiased)):
            batch = tf.reshape(batch, moving.shape)
            moving.assign(
                tf.cast(tf.cast(moving, dtype) * momentum + batch * (1.0 - momentum), moving.dtype)
            )


def set_bn_sum_dtype(model: keras.Model, sum_dtype: str) -> int:
    """Sets `sum_dtype` ("auto", "float32", "float64", "fused") on every `BatchNorm` of `model`
    (nested models too) before it is traced; returns how many. Other BN layers are left alone."""
    return _set_on_batchnorms(model, "sum_dtype", sum_dtype, BatchNorm.SUM_DTYPES)


def set_bn_kernels(model: keras.Model, kernels: str) -> int:
    """Sets `kernels` ("auto", "native", "tf") on every `BatchNorm` of `model` (nested models
    too) before it is traced; returns how many. Other BN layers are left alone."""
    return _set_on_batchnorms(model, "kernels", kernels, native.KERNELS)


def _set_on_batchnorms(model, name, value, choices) -> int:
    if value not in choices:
        raise ValueError(f"{name}={value!r}: choose one of {choices}")
    layers = [x for x in model._flatten_layers(include_self=True) if isinstance(x, BatchNorm)]
    for layer in layers:
        setattr(layer, name, value)
    return len(layers)


def _in_xla() -> bool:
    """Whether the graph being traced is compiled by XLA (`train.jit_compile`), which takes no
    custom ops."""
    from tensorflow.python.ops import control_flow_util  # no public equivalent

    return control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())


def _native_takes(x, axis, sum_dtype) -> bool:
    """Whether the native BN step computes this call: float32 x, channels last, float64 sums."""
    return x.dtype == tf.float32 and axis in (-1, len(x.shape) - 1) and sum_dtype == tf.float64


def _native_normalize(ops, x, gamma, beta, epsilon):
    """`_normalize` for a `_native_takes` x by the native kernels: (outputs, batch mean,
    unbiased batch variance), the last two without gradient. The sums and the normalisation
    run in double, one pass over x for the statistics and one for the output; the gradient is
    torch's, two passes over x and dy."""
    channels = x.shape[-1]
    gamma = tf.ones((channels,), x.dtype) if gamma is None else tf.reshape(gamma, (channels,))
    beta = tf.zeros((channels,), x.dtype) if beta is None else tf.reshape(beta, (channels,))

    @tf.custom_gradient
    def forward(x, gamma, beta):
        outputs, mean, variance, inv = ops.simsiam_batch_norm_train(x, gamma, beta, epsilon=epsilon)

        def grad(d_outputs, *unused):
            return ops.simsiam_batch_norm_grad(d_outputs, x, mean, inv, gamma)

        return (outputs, mean, variance), grad

    outputs, mean, variance = forward(x, gamma, beta)
    count = tf.cast(tf.size(x) // channels, tf.float64)
    unbiased = variance * count / tf.maximum(count - 1.0, 1.0)
    return (
        outputs,
        tf.stop_gradient(tf.cast(mean, x.dtype)),
        tf.stop_gradient(tf.cast(unbiased, x.dtype)),
    )


def _batch_sum(x, axes, dtype=None):
    """The sum over `axes` (kept, as size 1), added in `dtype` (default: x's) one axis at a time
    from the last, so that rounding grows with the longest of them, not with their product;
    returned in x's dtype."""
    out_dtype = x.dtype
    if dtype is not None and tf.as_dtype(dtype).size > out_dtype.size:  # widen, never narrow
        x = tf.cast(x, dtype)
    for axis in sorted(axes, reverse=True):
        x = tf.reduce_sum(x, axis, keepdims=True)
    return tf.cast(x, out_dtype)


def _fusable(x, axis) -> bool:
    """Whether TensorFlow's fused BN kernel takes x: float32, 2-D or 4-D, channels last."""
    rank = len(x.shape)
    return x.dtype == tf.float32 and rank in (2, 4) and axis in (-1, rank - 1)


def _fused_normalize(x, gamma, beta, epsilon):
    """Training-mode batch normalisation of a `_fusable` x by TensorFlow's fused kernel (oneDNN
    on the CPU, cuDNN on a GPU): (outputs, batch mean, unbiased batch variance), the last two
    without gradient. Forward and backward are one kernel each; the sums add in float32 in the
    kernel's own order. 2-D x goes through it as N x 1 x 1 x C."""
    channels = x.shape[-1]
    x4 = x if len(x.shape) == 4 else tf.reshape(x, (-1, 1, 1, channels))
    gamma = tf.ones((channels,), x.dtype) if gamma is None else tf.reshape(gamma, (channels,))
    beta = tf.zeros((channels,), x.dtype) if beta is None else tf.reshape(beta, (channels,))
    outputs, mean, unbiased = tf.compat.v1.nn.fused_batch_norm(
        x4, gamma, beta, epsilon=epsilon, is_training=True
    )
    return tf.reshape(outputs, tf.shape(x)), tf.stop_gradient(mean), tf.stop_gradient(unbiased)


def _normalize(x, gamma, beta, *, axes, epsilon, ctx=None, sum_dtype=None):
    """Training-mode batch normalisation of x over `axes`, and over the replicas when `ctx` (a
    replica context) is given: (outputs, mean, biased variance, values per channel), the last
    three without gradient. gamma and beta are broadcastable to x, or None (no scale, no
    offset); the sums over the batch add in `sum_dtype` (default: x's). The gradient is torch's: dx from the sums of dy and dy * x_hat over the global
    batch; gamma's and beta's gradients are this replica's share of those sums, which the
    optimiser then adds up over the replicas, as DDP does after SyncBatchNorm."""

    def all_sum(t):
        return t if ctx is None else ctx.all_reduce(tf.distribute.ReduceOp.SUM, t)

    param_shape = [1 if i in axes else d for i, d in enumerate(x.shape)]
    gamma = tf.ones(param_shape, x.dtype) if gamma is None else gamma
    beta = tf.zeros(param_shape, x.dtype) if beta is None else beta

    @tf.custom_gradient
    def forward(x, gamma, beta):
        count = tf.cast(tf.reduce_prod(tf.gather(tf.shape(x), axes)), x.dtype)
        sums = all_sum(
            tf.concat([tf.reshape(_batch_sum(x, axes, sum_dtype), [-1]), count[None]], 0)
        )
        count = sums[-1]
        rounded = tf.reshape(sums[:-1] / count, param_shape)
        centred = x - rounded
        # The corrected two-pass algorithm: the rounding of the first mean, mean - rounded, is
        # the mean of x - rounded; taking it out keeps x - mean accurate to the spread of x.
        moments = all_sum(
            tf.stack(
                [
                    _batch_sum(centred, axes, sum_dtype),
                    _batch_sum(tf.square(centred), axes, sum_dtype),
                ]
            )
        )
        residual = moments[0] / count
        mean = rounded + residual
        centred = centred - residual
        variance = moments[1] / count - tf.square(residual)
        inv = tf.math.rsqrt(variance + epsilon)
        x_hat = centred * inv
        outputs = x_hat * gamma + beta

        def grad(d_outputs, *unused):
            d_beta = _batch_sum(d_outputs, axes, sum_dtype)
            d_gamma = _batch_sum(d_outputs * x_hat, axes, sum_dtype)
            mean_d_beta, mean_d_gamma = tf.unstack(all_sum(tf.stack([d_beta, d_gamma])) / count)
            d_x = (gamma * inv) * (d_outputs - mean_d_beta - x_hat * mean_d_gamma)
            return d_x, d_gamma, d_beta

        return (outputs, mean, variance, count), grad

    outputs, mean, variance, count = forward(x, gamma, beta)
    return outputs, tf.stop_gradient(mean), tf.stop_gradient(variance), tf.stop_gradient(count)


def _bn(sync: bool, name: str, zero_gamma: bool = False, affine: bool = True):
    return BatchNorm(
        synchronized=sync,
        gamma_initializer="zeros" if zero_gamma else "ones",
        center=affine,
        scale=affine,
        name=name,
        **_BN,
    )


def _conv(filters: int, kernel: int, stride: int, name: str):
    """Conv2D without bias, padded as torchvision's ResNet: kernel // 2 zeros on every side.

    Keras' "same" pads a strided convolution of an even input on the bottom/right only, which
    samples the pixels one apart from torch; so a strided conv gets explicit symmetric zero
    padding and "valid". At stride 1 an odd kernel's "same" is that symmetric padding already.
    """
    conv = keras.layers.Conv2D(
        filters,
        kernel,
        strides=stride,
        padding="same" if stride == 1 else "valid",
        use_bias=False,
        kernel_initializer=_conv_init(),
        name=name,
    )
    if stride == 1 or kernel // 2 == 0:
        return conv
    pad = keras.layers.ZeroPadding2D(kernel // 2, name=f"{name}_pad")
    return lambda x: conv(pad(x))


def _basic_block(x, filters, stride, sync, zero_init, name):
    shortcut = x
    y = _conv(filters, 3, stride, f"{name}_conv1")(x)
    y = keras.layers.ReLU()(_bn(sync, f"{name}_bn1")(y))
    y = _conv(filters, 3, 1, f"{name}_conv2")(y)
    # Zero-init of the last BN gamma: each block starts as the identity (Goyal et al. 2017),
    # as the official code's `zero_init_residual=True`.
    y = _bn(sync, f"{name}_bn2", zero_gamma=zero_init)(y)
    if stride != 1 or x.shape[-1] != filters:
        shortcut = _bn(sync, f"{name}_down_bn")(_conv(filters, 1, stride, f"{name}_down")(x))
    return keras.layers.ReLU()(keras.layers.Add()([y, shortcut]))


def _bottleneck_block(x, filters, stride, sync, zero_init, name):
    shortcut = x
    y = keras.layers.ReLU()(_bn(sync, f"{name}_bn1")(_conv(filters, 1, 1, f"{name}_conv1")(x)))
    # Stride on the 3x3 conv (ResNet v1.5, torchvision's resnet50).
    y = keras.layers.ReLU()(_bn(sync, f"{name}_bn2")(_conv(filters, 3, stride, f"{name}_conv2")(y)))
    y = _bn(sync, f"{name}_bn3", zero_gamma=zero_init)(_conv(4 * filters, 1, 1, f"{name}_conv3")(y))
    if stride != 1 or x.shape[-1] != 4 * filters:
        shortcut = _bn(sync, f"{name}_down_bn")(_conv(4 * filters, 1, stride, f"{name}_down")(x))
    return keras.layers.ReLU()(keras.layers.Add()([y, shortcut]))


def _resnet(x, block, depths: Sequence[int], cifar_stem: bool, sync, zero_init):
    if cifar_stem:
        # Appendix D: CIFAR variant, 3x3 stride-1 stem and no max-pool.
        x = keras.layers.ReLU()(_bn(sync, "stem_bn")(_conv(64, 3, 1, "stem_conv")(x)))
    else:
        x = keras.layers.ReLU()(_bn(sync, "stem_bn")(_conv(64, 7, 2, "stem_conv")(x)))
        # torch pads the max-pool with -inf; after the ReLU every input is >= 0 and each 3x3
        # window holds at least one real pixel, so zero padding selects the same maximum.
        x = keras.layers.ZeroPadding2D(1, name="stem_pool_pad")(x)
        x = keras.layers.MaxPool2D(3, 2, padding="valid", name="stem_pool")(x)
    for stage, (depth, filters) in enumerate(zip(depths, (64, 128, 256, 512))):
        for i in range(depth):
            stride = 2 if (i == 0 and stage > 0) else 1
            x = block(x, filters, stride, sync, zero_init, f"stage{stage + 1}_block{i + 1}")
    return x


def _cnn_small(x, sync, width: int = 32):
    """A 6-conv plain CNN for CPU tests and the quickstart (not a paper architecture)."""
    for i, (mult, stride) in enumerate(((1, 1), (2, 2), (2, 1), (4, 2), (4, 1), (8, 2))):
        x = _conv(width * mult, 3, stride, f"conv{i + 1}")(x)
        x = keras.layers.ReLU()(_bn(sync, f"bn{i + 1}")(x))
    return x


def build_backbone(
    name: str,
    zero_init_residual: bool = True,
    sync_bn: bool = False,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    width: int = 32,
) -> keras.Model:
    """A backbone mapping float RGB images in [0, 1], NxHxWx3, to pooled features NxC.

    Args:
      name: one of BACKBONES, `keras.applications.NAME` (e.g. keras.applications.ResNet50V2)
        or `keras_cv.models.NAME` (e.g. keras_cv.models.ResNet50V2Backbone); those are built
        with weights=None and fed the input range they were designed for (backbones.py).
      zero_init_residual: zero the last BN gamma of every residual block (official default;
        built-in ResNets only).
      sync_bn: cross-replica BatchNorm (`synchronized=True`).
      mean, std: per-channel normalisation applied as the first layer (built-in backbones).
      width: base width of `cnn_small`.
    """
    message = backbone_error(name)
    if message:
        raise ValueError(message)
    if backbones.is_external(name):
        return backbones.build_external(name, sync_bn)
    inputs = keras.Input((None, None, 3), name="images")
    x = Normalize(mean, std, name="normalize")(inputs)
    if name == "resnet18_cifar":
        x = _resnet(x, _basic_block, (2, 2, 2, 2), True, sync_bn, zero_init_residual)
    elif name == "resnet18":
        x = _resnet(x, _basic_block, (2, 2, 2, 2), False, sync_bn, zero_init_residual)
    elif name == "resnet50":
        x = _resnet(x, _bottleneck_block, (3, 4, 6, 3), False, sync_bn, zero_init_residual)
    else:
        x = _cnn_small(x, sync_bn, width)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, x, name="backbone")


def backbone_error(name: str) -> str | None:
    """Why `name` is no backbone, naming the closest one that is; None for a valid name."""
    if name in BACKBONES:
        return None
    if backbones.is_external(name):
        try:
            backbones.resolve(name)
            return None
        except ValueError as err:
            return f"model.backbone={name}: {err}"
    known = list(BACKBONES) + backbones.application_names() + backbones.keras_cv_names()
    hint = backbones.closest(name, known)
    return (
        f"model.backbone={name!r} is not known"
        + (f"; did you mean {hint}?" if hint else "")
        + f" (built in: {', '.join(BACKBONES)}; or keras.applications.NAME, keras_cv.models.NAME)"
    )


def input_size_error(name: str, image_size: int) -> str | None:
    """Why backbone `name` cannot be built or take image_size x image_size images (a stem that
    shrinks them below 1 px, an architecture keras-cv cannot fetch); None when it can."""
    try:
        build_backbone(name).compute_output_shape((1, image_size, image_size, 3))
    except backbones.Unbuildable as err:
        return str(err)
    except ValueError as err:
        return (
            f"model.backbone={name} cannot take data.image_size={image_size} px images "
            f"({str(err).splitlines()[0][:200]}); raise --config.data.image_size"
        )
    return None


def feature_dim(backbone: keras.Layer, image_size: int | None = None) -> int:
    """The width C of a backbone's pooled output NxC, from `compute_output_shape` (which, unlike
    `backbone.output`, works for a `keras.Sequential` too)."""
    shape = None
    try:
        shape = backbone.input_shape
    except (AttributeError, ValueError):
        pass
    if shape is None or (image_size and None in tuple(shape)[1:3]):
        shape = (None, image_size or 32, image_size or 32, 3)
    out = backbone.compute_output_shape(tuple(shape))
    if len(out) != 2 or out[-1] is None:
        raise ValueError(f"the backbone outputs shape {tuple(out)}; SimSiam needs pooled NxC")
    return int(out[-1])


def _dense(units: int, name: str):
    """Dense without bias: every such layer is followed by BN, whose shift makes a bias moot."""
    return keras.layers.Dense(units, use_bias=False, kernel_initializer=_dense_init(), name=name)


def build_projector(
    in_dim: int, dim: int = 2048, hidden: int = 2048, num_layers: int = 3, sync_bn: bool = False
) -> keras.Model:
    """Projection MLP. Paper: 3 layers for ImageNet, 2 for CIFAR; output BN has no affine."""
    if num_layers < 1:
        raise ValueError(f"model.proj_layers must be >= 1, got {num_layers}")
    inputs = keras.Input((in_dim,), name="features")
    x = inputs
    for i in range(num_layers - 1):
        x = _dense(hidden, f"fc{i + 1}")(x)
        x = keras.layers.ReLU()(_bn(sync_bn, f"bn{i + 1}")(x))
    # No bias before BN: BN's own shift makes it redundant (the official code freezes it).
    x = _dense(dim, f"fc{num_layers}")(x)
    x = _bn(sync_bn, f"bn{num_layers}", affine=False)(x)
    return keras.Model(inputs, x, name="projector")


def build_predictor(
    dim: int = 2048,
    hidden: int = 512,
    kind: str = "mlp",
    hidden_bn: bool = True,
    sync_bn: bool = False,
) -> keras.Model:
    """Prediction MLP h: a bottleneck dim -> hidden -> dim (paper section 4.4, Table 1).

    kind: "mlp" (the paper), "identity" (ablation: collapses) or "fixed_random" (ablation: does
    not train; a random h fixed at initialisation).
    """
    if kind not in PREDICTORS:
        raise ValueError(f"model.predictor={kind!r} is not known; choose one of {PREDICTORS}")
    inputs = keras.Input((dim,), name="z")
    if kind == "identity":
        return keras.Model(inputs, keras.layers.Identity()(inputs), name="predictor")
    x = _dense(hidden, "fc1")(inputs)
    if hidden_bn:
        x = _bn(sync_bn, "bn1")(x)
    x = keras.layers.ReLU()(x)
    # The output layer has a bias and no BN (paper section 4.4; official builder.py).
    x = keras.layers.Dense(
        dim,
        kernel_initializer=_dense_init(),
        bias_initializer=keras.initializers.RandomUniform(
            -1.0 / math.sqrt(hidden), 1.0 / math.sqrt(hidden)
        ),
        name="fc2",
    )(x)
    model = keras.Model(inputs, x, name="predictor")
    if kind == "fixed_random":
        model.trainable = False
    return model


@keras.saving.register_keras_serializable("simsiam_tf")
class SimSiam(keras.Model):
    """The SimSiam network with its own `train_step`.

    `fit` takes batches `{"view1": x1, "view2": x2}` of float images in [0, 1] (or uint8), or,
    when an `augmenter` is given (photometric augmentation on the device), batches that also
    carry `"params1"`/`"params2"`, the per-image augmentation parameters drawn on the CPU.

    Calling the model returns the backbone embedding, the representation that is evaluated
    and exported. `SimSiam.from_backbone(backbone)` sizes the heads from any Keras backbone;
    `model.save("x.keras")` and `keras.saving.load_model` round-trip it.

    Args:
      backbone: [0, 1] images NxHxWx3 -> features NxC.
      projector: NxC -> z, NxD (`build_projector`).
      predictor: z -> p, NxD (`build_predictor`).
      stop_gradient: the stop-gradient on z in the loss (False: the paper's collapsing ablation).
      symmetric: the symmetrised loss (False: one direction only, paper Table 4).
      augmenter: the device stage of the augmentation recipe, or None.
    """

    def __init__(
        self,
        backbone: keras.Model,
        projector: keras.Model,
        predictor: keras.Model,
        stop_gradient: bool = True,
        symmetric: bool = True,
        augmenter: keras.layers.Layer | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.backbone = backbone
        self.projector = projector
        self.predictor = predictor
        self.stop_gradient = stop_gradient
        self.symmetric = symmetric
        self.augmenter = augmenter
        # The projector's output BN has no affine and, in training mode, standardises each
        # channel over the batch: std(l2norm(z)) is then ~1/sqrt(d) whatever the network does,
        # and a collapse is invisible. So the monitor reads z through that BN in inference mode
        # (moving statistics), which shows a collapse as the std falling to 0 (paper Figure 2).
        last = projector.layers[-1]
        self._out_bn = last if isinstance(last, keras.layers.BatchNormalization) else None
        self._proj_body = keras.Model(projector.input, last.input) if self._out_bn else projector
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.z_std_tracker = keras.metrics.Mean(name="z_std")
        self.p_std_tracker = keras.metrics.Mean(name="p_std")
        # Built when its parts are (fit calls train_step, never __call__): so `save` writes every
        # weight, and `load_model` builds the optimizer before restoring its state.
        self.built = all(getattr(part, "built", False) for part in (backbone, projector, predictor))

    @classmethod
    def from_backbone(
        cls,
        backbone: keras.Layer,
        proj_dim: int = 2048,
        proj_hidden: int | None = None,
        proj_layers: int = 3,
        pred_hidden: int = 512,
        predictor: str = "mlp",
        sync_bn: bool = False,
        stop_gradient: bool = True,
        symmetric: bool = True,
        preprocess: str | None = "auto",
        image_size: int | None = None,
        name: str = "simsiam",
    ) -> "SimSiam":
        """SimSiam around any Keras backbone, with the heads sized from its output.

        Defaults are the paper's ImageNet recipe (section 3, appendix A; official builder.py):
        a 3-layer projector whose hidden width is the backbone's feature width, output 2048,
        and a 2048 -> 512 -> 2048 bottleneck predictor. For CIFAR the paper uses proj_layers=2.

        Args:
          backbone: a keras.Model or keras.Sequential taking [0, 1] images NxHxWx3; a feature
            map output (NxHxWxC or NxLxC) is average-pooled to NxC.
          proj_hidden: hidden width of the projector; None: the backbone's feature width.
          preprocess: "auto" feeds a `keras.applications` model (recognised by its name, e.g.
            "resnet50v2") the range its `preprocess_input` gives, as the command line does;
            None feeds the backbone the [0, 1] images as they are.
          image_size: the input size, needed only when the backbone does not declare one and
            its output width depends on it.
        """
        if preprocess not in ("auto", None):
            raise ValueError(f"preprocess={preprocess!r}: choose 'auto' or None")
        backbone = _as_pooled_backbone(backbone, preprocess == "auto", image_size)
        feat_dim = feature_dim(backbone, image_size)
        projector = build_projector(
            feat_dim, proj_dim, proj_hidden or feat_dim, proj_layers, sync_bn=sync_bn
        )
        head = build_predictor(proj_dim, pred_hidden, predictor, sync_bn=sync_bn)
        return cls(
            backbone,
            projector,
            head,
            stop_gradient=stop_gradient,
            symmetric=symmetric,
            name=name,
        )

    def get_config(self):
        serialize = keras.saving.serialize_keras_object
        return {
            "name": self.name,
            "trainable": self.trainable,
            "backbone": serialize(self.backbone),
            "projector": serialize(self.projector),
            "predictor": serialize(self.predictor),
            "stop_gradient": self.stop_gradient,
            "symmetric": self.symmetric,
            "augmenter": None if self.augmenter is None else serialize(self.augmenter),
        }

    def compile_from_config(self, config):
        """As Keras (`load_model`), and a fixed predictor lr (fix_pred_lr), a set of variables
        that a `.keras` file does not record, goes to this model's predictor again."""
        config = keras.saving.deserialize_keras_object(config)
        optimizer = config.get("optimizer")
        inner = getattr(optimizer, "inner_optimizer", optimizer)  # LossScaleOptimizer
        if getattr(inner, "fixed_lr", None) is not None and not inner.built:
            inner.set_fixed_lr_variables(self.predictor.trainable_variables)
        self.compile(**config)
        if self.built:
            self.optimizer.build(self.trainable_variables)  # before its variables are loaded

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        for key in ("backbone", "projector", "predictor", "augmenter"):
            if config.get(key) is not None:
                config[key] = keras.saving.deserialize_keras_object(
                    config[key], custom_objects=custom_objects
                )
        return cls(**config)

    @property
    def metrics(self):
        return [self.loss_tracker, self.z_std_tracker, self.p_std_tracker]

    @property
    def proj_dim(self) -> int:
        return int(self.projector.output.shape[-1])

    def call(self, images, training=False):
        return self.backbone(images, training=training)

    def _project(self, x, training):
        """(z, z as the monitor sees it): the output BN in the given mode, and in inference mode."""
        h = self._proj_body(self.backbone(x, training=training), training=training)
        if self._out_bn is None:
            return h, h
        return self._out_bn(h, training=training), self._out_bn(h, training=False)

    def forward_views(self, x1, x2, training=True):
        """z and p of both views. Each view is its own forward pass, so BN statistics are
        computed per view, as the official code does."""
        return self._forward(x1, x2, training)[:4]

    def _forward(self, x1, x2, training):
        z1, z1_monitor = self._project(x1, training)  # NxC
        z2, _ = self._project(x2, training)  # NxC
        p1 = self.predictor(z1, training=training)  # NxC
        p2 = self.predictor(z2, training=training)  # NxC
        return z1, z2, p1, p2, z1_monitor

    def _views(self, data):
        data, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        x1, x2 = data["view1"], data["view2"]
        if x1.dtype == tf.uint8:  # views travel as uint8 (4x less to copy); the net takes [0, 1]
            x1 = tf.cast(x1, tf.float32) / 255.0
            x2 = tf.cast(x2, tf.float32) / 255.0
        if self.augmenter is not None:
            x1 = self.augmenter(x1, params=data["params1"])
            x2 = self.augmenter(x2, params=data["params2"])
        return x1, x2

    def compute_simsiam_loss(self, data, training=True):
        """(loss, z of view 1 as the collapse monitor reads it, p of view 1)."""
        x1, x2 = self._views(data)
        z1, z2, p1, p2, z1_monitor = self._forward(x1, x2, training)
        loss = losses.simsiam_loss(p1, p2, z1, z2, self.stop_gradient, self.symmetric)
        return loss, z1_monitor, p1

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Keras (3.15) first reduces a sample batch over the replicas, which fails for dict
        # batches under MultiWorkerMirroredStrategy; SimSiam and its optimizer are built before
        # fit, so there is nothing to build and the step is skipped.
        built = all(layer.built for layer in self._flatten_layers())
        if built and self.optimizer is not None and self.optimizer.built:
            return
        return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    def train_step(self, data):
        with tf.GradientTape() as tape:
            loss, z1, p1 = self.compute_simsiam_loss(data, training=True)
            # Gradients are summed over replicas by the optimizer, so each replica contributes
            # its mean loss / N: N replicas then make the update of one replica on the global
            # batch.
            replicas = tf.distribute.get_strategy().num_replicas_in_sync
            scaled = self.optimizer.scale_loss(loss / replicas)
        variables = self.trainable_variables
        grads = tape.gradient(scaled, variables)
        self.optimizer.apply(grads, variables)
        self.loss_tracker.update_state(loss)
        self.z_std_tracker.update_state(losses.channel_std(z1))
        self.p_std_tracker.update_state(losses.channel_std(p1))
        logs = {m.name: m.result() for m in self.metrics}
        logs["lr"] = self.optimizer.learning_rate
        return _for_keras_reduction(logs)

    def test_step(self, data):
        loss, z1, p1 = self.compute_simsiam_loss(data, training=False)
        self.loss_tracker.update_state(loss)
        self.z_std_tracker.update_state(losses.channel_std(z1))
        self.p_std_tracker.update_state(losses.channel_std(p1))
        return _for_keras_reduction({m.name: m.result() for m in self.metrics})


def _as_pooled_backbone(backbone, auto_preprocess: bool, image_size: int | None):
    """`backbone` itself when it maps [0, 1] images to NxC; else wrapped with the input
    preprocessing its keras.applications family expects and/or a global average pool."""
    constructor = backbones.application_for_model_name(backbone.name) if auto_preprocess else None
    try:
        rank = len(backbone.compute_output_shape(tuple(backbone.input_shape)))
    except (AttributeError, ValueError):
        rank = None
    if constructor is None and rank == 2:
        return backbone
    size = image_size
    try:
        shape = tuple(backbone.input_shape)[1:]
    except (AttributeError, ValueError):
        shape = (size, size, 3)
    inputs = keras.Input(shape, name="images")
    x = inputs
    if constructor is not None:
        backbones.set_unset_normalization(backbone)
        matrix, offset = backbones.preprocess_affine(constructor)
        x = backbones.ColorAffine(matrix, offset, name="preprocess")(x)
    return keras.Model(inputs, backbones.pool(backbone(x)), name="backbone")


def _for_keras_reduction(logs: dict) -> dict:
    """Under MultiWorkerMirroredStrategy Keras (3.15) averages returned logs over replicas
    along axis 0, which a scalar lacks: there they get a leading axis of 1."""
    if isinstance(tf.distribute.get_strategy(), tf.distribute.MultiWorkerMirroredStrategy):
        return {k: tf.reshape(v, (1,)) for k, v in logs.items()}
    return logs


def build_simsiam(model_config, augmenter=None) -> SimSiam:
    """Builds SimSiam from the `model` section of a config (see configs/)."""
    c = model_config
    backbone = build_backbone(
        c.backbone,
        zero_init_residual=c.zero_init_residual,
        sync_bn=c.sync_bn,
        width=c.get("width", 32),
    )
    feat_dim = feature_dim(backbone)
    projector = build_projector(
        feat_dim, c.proj_dim, c.proj_hidden, c.proj_layers, sync_bn=c.sync_bn
    )
    predictor = build_predictor(
        c.proj_dim, c.pred_hidden, c.predictor, c.pred_hidden_bn, sync_bn=c.sync_bn
    )
    for part in (backbone, projector, predictor):
        set_bn_sum_dtype(part, c.get("bn_sums", "auto"))
        set_bn_kernels(part, c.get("bn_kernels", "auto"))
    model = SimSiam(
        backbone,
        projector,
        predictor,
        stop_gradient=c.stop_gradient,
        symmetric=c.symmetric,
        augmenter=augmenter,
        name="simsiam",
    )
    return model
