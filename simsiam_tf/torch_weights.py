"""Weights in the official PyTorch layout (facebookresearch/simsiam), both directions, in NumPy.

The official model (simsiam/builder.py) is a torchvision ResNet whose `fc` is replaced by the
projector, plus the predictor. Its `state_dict` (less the `module.` prefix that
DistributedDataParallel adds) names, for a 3-layer projector:

    encoder.conv1.weight, encoder.bn1.{weight,bias,running_mean,running_var,num_batches_tracked}
    encoder.layer{1-4}.{i}.conv{1,2[,3]}.weight, .bn{1,2[,3]}.*, .downsample.{0.weight,1.*}
    encoder.fc.0.weight                 Linear(feat, hidden, bias=False)   [out, in]
    encoder.fc.1.*                      BatchNorm1d(hidden)
    encoder.fc.3.weight                 Linear(hidden, hidden, bias=False)
    encoder.fc.4.*                      BatchNorm1d(hidden)
    encoder.fc.6.{weight,bias}          the ResNet's own fc, Linear(hidden, dim); bias frozen
    encoder.fc.7.{running_mean,running_var,num_batches_tracked}   BatchNorm1d(dim, affine=False)
    predictor.0.weight                  Linear(dim, pred_hidden, bias=False)
    predictor.1.*                       BatchNorm1d(pred_hidden)
    predictor.3.{weight,bias}           Linear(pred_hidden, dim)

(the ReLUs, at fc.2, fc.5 and predictor.2, hold no tensors). A projector of L layers follows
the same pattern, [Linear, BN, ReLU] x (L - 1), Linear with bias, BN without affine: the CIFAR
recipe's 2 layers are fc.0, fc.1, fc.3 (with bias) and fc.4. The CIFAR ResNet-18 has the same
names as torchvision's resnet18 (its conv1 is 3x3, and its max-pool, absent, holds nothing).

Layouts: a convolution kernel is OIHW in torch and HWIO in Keras; a Linear weight [out, in]
in torch and a Dense kernel [in, out] in Keras.

The frozen bias of the projector's last Linear (`requires_grad = False` in the builder): this
project's last Dense has no bias. In training mode the following BatchNorm subtracts the batch
mean, so a constant bias cancels exactly; in inference mode that BatchNorm subtracts its running
mean, which, in torch, includes the bias. Importing therefore folds it in:
Keras moving_mean = torch running_mean - bias. Exporting writes a zero bias and the running mean
unchanged, which computes the same function.

`num_batches_tracked` has no Keras counterpart (torch uses it only when BN momentum is None,
which the official code never sets): exported as 0, accepted and ignored on import.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Mapping, Optional

import keras
import numpy as np

COUNTER = "num_batches_tracked"
# The official main_lincls.py: a torchvision ResNet whose `fc` is the linear classifier.
CLASSIFIER = "fc"


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """One tensor of the torch layout and where it lives in Keras.

    kind: "conv" (OIHW <-> HWIO), "linear" ([out, in] <-> [in, out]), "same", "counter"
    (num_batches_tracked, no Keras variable) or "frozen_bias" (the projector's last bias).
    """

    name: str
    variable: Optional[keras.Variable]
    kind: str
    shape: tuple  # the torch shape


def _torch_shape(variable, kind: str) -> tuple:
    shape = tuple(int(s) for s in variable.shape)
    if kind == "conv":
        h, w, i, o = shape
        return (o, i, h, w)
    if kind == "linear":
        return shape[::-1]
    return shape


def _entry(name: str, variable, kind: str = "same") -> _Tensor:
    return _Tensor(name, variable, kind, _torch_shape(variable, kind))


def _bn_tensors(prefix: str, layer: keras.layers.BatchNormalization) -> list:
    out = []
    if layer.scale:
        out.append(_entry(f"{prefix}.weight", layer.gamma))
    if layer.center:
        out.append(_entry(f"{prefix}.bias", layer.beta))
    out.append(_entry(f"{prefix}.running_mean", layer.moving_mean))
    out.append(_entry(f"{prefix}.running_var", layer.moving_variance))
    out.append(_Tensor(f"{prefix}.{COUNTER}", None, "counter", ()))
    return out


# Keras layer name (simsiam_tf.model) -> torchvision ResNet module path, and the order of a
# block's modules in torchvision's state_dict.
_BLOCK = re.compile(r"stage(\d+)_block(\d+)_(conv\d|bn\d|down|down_bn)$")
_BLOCK_PART = {
    "conv1": ("conv1", 0),
    "bn1": ("bn1", 1),
    "conv2": ("conv2", 2),
    "bn2": ("bn2", 3),
    "conv3": ("conv3", 4),
    "bn3": ("bn3", 5),
    "down": ("downsample.0", 6),
    "down_bn": ("downsample.1", 7),
}
_STEM = {"stem_conv": ("conv1", 0), "stem_bn": ("bn1", 1)}


def _layer_tensors(path: str, layer) -> list:
    if isinstance(layer, keras.layers.Conv2D):
        if layer.use_bias:
            raise ValueError(f"layer {layer.name} has a bias; torchvision's ResNet convs have none")
        return [_entry(f"{path}.weight", layer.kernel, "conv")]
    return _bn_tensors(path, layer)


def backbone_tensors(backbone: keras.Model, prefix: str = "") -> list:
    """The backbone's tensors in torchvision ResNet order, named `prefix` + torchvision name.

    Layers are found by name (stem_conv, stageS_blockB_conv1, ...), not by position, so layers
    without weights (padding, pooling, activations) may come and go.
    """
    keyed = []
    for layer in backbone.layers:
        if not layer.weights or layer.name == "normalize":
            continue  # the input normalisation is a constant of the recipe, not a torch tensor
        if layer.name in _STEM:
            path, order = _STEM[layer.name]
            keyed.append(((0, 0, order), _layer_tensors(prefix + path, layer)))
            continue
        match = _BLOCK.match(layer.name)
        if match is None:
            raise ValueError(
                f"backbone layer {layer.name!r} has no torchvision ResNet counterpart: only the "
                "ResNet backbones (resnet18_cifar, resnet18, resnet50) convert to the official "
                "layout"
            )
        stage, block, part = int(match[1]), int(match[2]), match[3]
        sub, order = _BLOCK_PART[part]
        path = f"{prefix}layer{stage}.{block - 1}.{sub}"
        keyed.append(((stage, block, order), _layer_tensors(path, layer)))
    keyed.sort(key=lambda item: item[0])
    return [t for _, tensors in keyed for t in tensors]


def _mlp_layers(net: keras.Model) -> list:
    """The Dense and BatchNormalization layers of an MLP, in order, each with the index of its
    module in the equivalent nn.Sequential (every ReLU takes an index too)."""
    out, index = [], 0
    for layer in net.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        if isinstance(layer, (keras.layers.Dense, keras.layers.BatchNormalization)):
            out.append((index, layer))
        elif not isinstance(layer, keras.layers.ReLU):
            raise ValueError(
                f"{net.name} layer {layer.name!r} ({type(layer).__name__}) has no counterpart "
                "in the official nn.Sequential"
            )
        index += 1
    return out


def projector_tensors(projector: keras.Model, prefix: str = "encoder.fc.") -> list:
    """The projector as the official `encoder.fc` Sequential: the last Linear has a (frozen)
    bias, which the Keras model does not (see the module docstring)."""
    layers = _mlp_layers(projector)
    dense = [(i, layer) for i, layer in layers if isinstance(layer, keras.layers.Dense)]
    out = []
    for index, layer in layers:
        path = f"{prefix}{index}"
        if isinstance(layer, keras.layers.Dense):
            if layer.use_bias:
                raise ValueError(f"projector layer {layer.name} has a bias; the recipe's has none")
            out.append(_entry(f"{path}.weight", layer.kernel, "linear"))
            if (index, layer) == dense[-1]:
                out.append(_Tensor(f"{path}.bias", None, "frozen_bias", (int(layer.units),)))
        else:
            out.extend(_bn_tensors(path, layer))
    return out


def predictor_tensors(predictor: keras.Model, prefix: str = "predictor.") -> list:
    out = []
    for index, layer in _mlp_layers(predictor):
        path = f"{prefix}{index}"
        if isinstance(layer, keras.layers.Dense):
            out.append(_entry(f"{path}.weight", layer.kernel, "linear"))
            if layer.use_bias:
                out.append(_entry(f"{path}.bias", layer.bias))
        else:
            out.extend(_bn_tensors(path, layer))
    return out


def simsiam_tensors(model) -> list:
    """Every tensor of the official SimSiam state_dict (without `module.`), in its order."""
    return (
        backbone_tensors(model.backbone, "encoder.")
        + projector_tensors(model.projector)
        + predictor_tensors(model.predictor)
    )


def describe(backbone: keras.Model) -> str:
    """The config's name of a ResNet backbone, read from its layers (for error messages)."""
    names = {layer.name for layer in backbone.layers}
    if "stage1_block1_conv3" in names:
        return "resnet50"
    if "stem_conv" in names:
        kernel = backbone.get_layer("stem_conv").kernel_size[0]
        return "resnet18_cifar" if kernel == 3 else "resnet18"
    return "not a ResNet"


# ------------------------------------------------------------------------------------------------
# Keras -> torch


def to_torch_layout(value: np.ndarray, kind: str) -> np.ndarray:
    """A Keras value in the torch layout of its kind (see `_Tensor`)."""
    if kind == "conv":
        return np.ascontiguousarray(value.transpose(3, 2, 0, 1))
    if kind == "linear":
        return np.ascontiguousarray(value.T)
    return value


def tensors_to_state_dict(tensors: list) -> dict:
    """NumPy arrays of the given tensors, in the torch layout."""
    out = {}
    for t in tensors:
        if t.kind == "counter":
            out[t.name] = np.zeros((), np.int64)
        elif t.kind == "frozen_bias":
            out[t.name] = np.zeros(t.shape, np.float32)
        else:
            out[t.name] = to_torch_layout(np.asarray(t.variable.numpy()), t.kind)
    return out


def to_torch_state_dict(model) -> dict:
    """The official SimSiam `state_dict` of a `simsiam_tf.model.SimSiam` (without `module.`).

    The projector's frozen bias comes out as zeros, with the running mean unchanged (the same
    function); `num_batches_tracked` as 0.
    """
    return tensors_to_state_dict(simsiam_tensors(model))


def backbone_to_torch_state_dict(backbone: keras.Model, prefix: str = "") -> dict:
    """A torchvision ResNet `state_dict` (without `fc`) of a ResNet backbone."""
    return tensors_to_state_dict(backbone_tensors(backbone, prefix))


# ------------------------------------------------------------------------------------------------
# torch -> Keras


def check_state_dict(tensors: list, state_dict: Mapping, what: str, optional=(COUNTER,)) -> None:
    """Raises ValueError naming the first tensor that is missing, unexpected or of another
    shape. Tensors whose name ends with one of `optional` may be absent."""
    for t in tensors:
        if t.name not in state_dict:
            if t.name.rsplit(".", 1)[-1] in optional:
                continue
            raise ValueError(f"checkpoint has no tensor {t.name}, which {what} needs")
        shape = tuple(np.shape(state_dict[t.name]))
        if shape != t.shape:
            raise ValueError(
                f"checkpoint tensor {t.name} has shape {shape}; the model expects {t.shape} "
                f"({what})"
            )
    known = {t.name for t in tensors}
    for name in state_dict:
        if name not in known:
            hint = ""
            if name.startswith("module."):
                hint = " (strip the DistributedDataParallel prefix `module.` first)"
            raise ValueError(f"checkpoint tensor {name} is unexpected for {what}{hint}")


def from_torch_layout(value: np.ndarray, kind: str) -> np.ndarray:
    """A torch value in the Keras layout of its kind (see `_Tensor`)."""
    if kind == "conv":
        return value.transpose(2, 3, 1, 0)
    if kind == "linear":
        return value.T
    return value


def assign_tensors(tensors: list, state_dict: Mapping, what: str) -> None:
    """Checks every name and shape (`check_state_dict`), then assigns; a frozen bias is folded
    into the running mean of the BatchNorm that follows it."""
    check_state_dict(tensors, state_dict, what)
    values = {}
    for i, t in enumerate(tensors):
        if t.kind == "counter":
            continue
        if t.kind == "frozen_bias":
            # The BN after it: its running_mean is the next tensor with a variable.
            bn_mean = next(u for u in tensors[i + 1 :] if u.name.endswith(".running_mean"))
            values[bn_mean.name] = values.get(bn_mean.name, 0.0) - np.asarray(
                state_dict[t.name], np.float64
            )
            continue
        value = from_torch_layout(np.asarray(state_dict[t.name]), t.kind)
        values[t.name] = values.get(t.name, 0.0) + value.astype(np.float64)
    for t in tensors:
        if t.variable is not None:
            t.variable.assign(values[t.name].astype(t.variable.dtype))


def assign_from_torch(model, state_dict: Mapping) -> None:
    """Loads an official SimSiam `state_dict` (NumPy arrays, without `module.`) into a
    `simsiam_tf.model.SimSiam`. Every name and shape is checked before anything is assigned;
    a ValueError names the first tensor that differs."""
    tensors = simsiam_tensors(model)
    what = (
        f"model.backbone={describe(model.backbone)}, projector output {model.proj_dim}, "
        f"predictor hidden {_hidden(model.predictor)}"
    )
    assign_tensors(tensors, dict(state_dict), what)


def _hidden(predictor) -> str:
    dense = [layer for layer in predictor.layers if isinstance(layer, keras.layers.Dense)]
    return str(dense[0].units) if dense else "none (identity)"


def assign_backbone_from_torch(backbone: keras.Model, state_dict: Mapping, prefix="") -> None:
    """Loads a torchvision ResNet `state_dict` (names `prefix` + torchvision's, no `fc`) into a
    ResNet backbone; checks everything before assigning anything."""
    what = f"model.backbone={describe(backbone)}"
    assign_tensors(backbone_tensors(backbone, prefix), dict(state_dict), what)


def split_linear_eval(state_dict: Mapping) -> tuple:
    """(backbone state_dict, classifier kernel [in, out], classifier bias) of the official
    linear-evaluation layout (`main_lincls.py`: torchvision ResNet names, `fc` the classifier),
    without `module.`."""
    for name in (f"{CLASSIFIER}.weight", f"{CLASSIFIER}.bias"):
        if name not in state_dict:
            raise ValueError(
                f"checkpoint has no tensor {name}: not the official linear-evaluation layout"
            )
    weight = np.asarray(state_dict[f"{CLASSIFIER}.weight"])
    bias = np.asarray(state_dict[f"{CLASSIFIER}.bias"])
    if weight.ndim != 2 or bias.shape != weight.shape[:1]:
        raise ValueError(
            f"checkpoint tensors fc.weight {weight.shape} and fc.bias {bias.shape} are not a "
            "linear classifier [classes, features] and [classes]"
        )
    backbone = {k: v for k, v in state_dict.items() if not k.startswith(f"{CLASSIFIER}.")}
    return backbone, weight.T, bias
