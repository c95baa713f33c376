"""simsiam_tf.torch_weights: the official PyTorch layout, both directions, without torch."""

import types

import keras
import numpy as np
import pytest

from simsiam_tf import model, torch_weights
from simsiam_tf.config import default_config


def _simsiam(backbone, proj_layers, dim=64, hidden=64, pred_hidden=16, size=32, seed=0):
    keras.utils.set_random_seed(seed)
    c = default_config().model
    c.backbone = backbone
    c.proj_layers = proj_layers
    c.proj_dim, c.proj_hidden, c.pred_hidden = dim, hidden, pred_hidden
    net = model.build_simsiam(c)
    net(np.zeros((1, size, size, 3), np.float32))
    return net


def _randomise(net, seed=1):
    """Every variable random (BN statistics included; variances positive), so a swapped or
    transposed tensor cannot pass unnoticed."""
    rng = np.random.default_rng(seed)
    for v in net.weights:
        value = rng.normal(0, 1, v.shape)
        if "variance" in v.path:
            value = rng.uniform(0.5, 2.0, v.shape)
        v.assign(value.astype(np.float32))


@pytest.fixture(scope="module")
def resnet18_cifar():
    return _simsiam("resnet18_cifar", proj_layers=2)


@pytest.fixture(scope="module")
def resnet50():
    return _simsiam("resnet50", proj_layers=3, dim=128, hidden=2048)


def test_official_names_and_layouts(resnet50):
    sd = torch_weights.to_torch_state_dict(resnet50)
    names = list(sd)
    assert names[:6] == [
        "encoder.conv1.weight",
        "encoder.bn1.weight",
        "encoder.bn1.bias",
        "encoder.bn1.running_mean",
        "encoder.bn1.running_var",
        "encoder.bn1.num_batches_tracked",
    ]
    assert sd["encoder.conv1.weight"].shape == (64, 3, 7, 7)  # OIHW
    assert sd["encoder.layer1.0.conv1.weight"].shape == (64, 64, 1, 1)
    assert sd["encoder.layer1.0.conv3.weight"].shape == (256, 64, 1, 1)
    assert sd["encoder.layer2.0.conv2.weight"].shape == (128, 128, 3, 3)
    assert sd["encoder.layer1.0.downsample.0.weight"].shape == (256, 64, 1, 1)
    assert sd["encoder.layer2.0.downsample.1.running_var"].shape == (512,)
    assert "encoder.layer2.1.downsample.0.weight" not in sd
    assert sd["encoder.layer4.2.bn3.weight"].shape == (2048,)
    # builder.py: fc.0 Linear, fc.1 BN, fc.3 Linear, fc.4 BN, fc.6 Linear + frozen bias, fc.7 BN
    # without affine; predictor.0 Linear, predictor.1 BN, predictor.3 Linear with bias.
    projector = [n for n in names if n.startswith("encoder.fc.")]
    assert projector == [
        "encoder.fc.0.weight",
        *[f"encoder.fc.1.{s}" for s in ("weight", "bias", "running_mean", "running_var")],
        "encoder.fc.1.num_batches_tracked",
        "encoder.fc.3.weight",
        *[f"encoder.fc.4.{s}" for s in ("weight", "bias", "running_mean", "running_var")],
        "encoder.fc.4.num_batches_tracked",
        "encoder.fc.6.weight",
        "encoder.fc.6.bias",
        "encoder.fc.7.running_mean",
        "encoder.fc.7.running_var",
        "encoder.fc.7.num_batches_tracked",
    ]
    assert sd["encoder.fc.0.weight"].shape == (2048, 2048)
    assert sd["encoder.fc.6.weight"].shape == (128, 2048)  # [out, in]
    assert not sd["encoder.fc.6.bias"].any()
    assert sd["encoder.fc.7.num_batches_tracked"].dtype == np.int64
    assert [n for n in names if n.startswith("predictor.")] == [
        "predictor.0.weight",
        *[f"predictor.1.{s}" for s in ("weight", "bias", "running_mean", "running_var")],
        "predictor.1.num_batches_tracked",
        "predictor.3.weight",
        "predictor.3.bias",
    ]
    assert sd["predictor.0.weight"].shape == (16, 128)
    # 53 convs + 53 BNs of 5 tensors in torchvision's resnet50 without fc.
    assert len([n for n in names if not n.startswith(("encoder.fc.", "predictor."))]) == 53 * 6


def test_layouts_are_transposes(resnet18_cifar):
    sd = torch_weights.to_torch_state_dict(resnet18_cifar)
    kernel = resnet18_cifar.backbone.get_layer("stage2_block1_conv1").kernel.numpy()  # HWIO
    np.testing.assert_array_equal(
        sd["encoder.layer2.0.conv1.weight"][5, 7, 2, 1], kernel[2, 1, 7, 5]
    )
    dense = resnet18_cifar.projector.get_layer("fc1").kernel.numpy()  # [in, out]
    np.testing.assert_array_equal(sd["encoder.fc.0.weight"], dense.T)
    # The 2-layer projector of the CIFAR recipe: fc.0, fc.1, fc.3 (+ frozen bias), fc.4.
    assert [n for n in sd if n.startswith("encoder.fc.") and n.endswith("weight")] == [
        "encoder.fc.0.weight",
        "encoder.fc.1.weight",
        "encoder.fc.3.weight",
    ]
    assert "encoder.fc.4.running_mean" in sd and "encoder.fc.4.weight" not in sd


@pytest.mark.parametrize("name", ["resnet18_cifar", "resnet50"])
def test_round_trip_is_exact(name, request):
    net = request.getfixturevalue(name)
    _randomise(net, seed=3)
    before = [v.numpy().copy() for v in net.weights]
    sd = torch_weights.to_torch_state_dict(net)
    _randomise(net, seed=4)
    torch_weights.assign_from_torch(net, sd)
    for v, value in zip(net.weights, before):
        np.testing.assert_array_equal(v.numpy(), value, err_msg=v.path)
    sd2 = torch_weights.to_torch_state_dict(net)
    assert list(sd2) == list(sd)
    for k in sd:
        np.testing.assert_array_equal(sd2[k], sd[k], err_msg=k)


def test_frozen_bias_is_folded_into_the_running_mean(resnet18_cifar):
    """Inference output of the projector is unchanged when the checkpoint's last Linear has a
    bias b and its BN running mean includes b: Keras moving_mean = running_mean - b."""
    net = resnet18_cifar
    _randomise(net, seed=5)
    features = np.random.default_rng(0).normal(0, 1, (4, 512)).astype(np.float32)
    z_before = net.projector(features, training=False).numpy()
    sd = torch_weights.to_torch_state_dict(net)
    bias = np.random.default_rng(1).normal(0, 1, sd["encoder.fc.3.bias"].shape).astype(np.float32)
    sd["encoder.fc.3.bias"] = bias
    sd["encoder.fc.4.running_mean"] = sd["encoder.fc.4.running_mean"] + bias
    _randomise(net, seed=6)
    torch_weights.assign_from_torch(net, sd)
    z_after = net.projector(features, training=False).numpy()
    np.testing.assert_allclose(z_after, z_before, rtol=1e-5, atol=1e-5)
    # A numpy version of the official projector in inference mode, with the bias, agrees.
    w0, g1, b1 = sd["encoder.fc.0.weight"], sd["encoder.fc.1.weight"], sd["encoder.fc.1.bias"]
    m1, v1 = sd["encoder.fc.1.running_mean"], sd["encoder.fc.1.running_var"]
    h = np.maximum((features @ w0.T - m1) / np.sqrt(v1 + 1e-5) * g1 + b1, 0)
    y = h @ sd["encoder.fc.3.weight"].T + bias
    z_torch = (y - sd["encoder.fc.4.running_mean"]) / np.sqrt(sd["encoder.fc.4.running_var"] + 1e-5)
    np.testing.assert_allclose(z_after, z_torch, rtol=1e-4, atol=1e-4)


def test_counter_is_optional_on_import(resnet18_cifar):
    sd = torch_weights.to_torch_state_dict(resnet18_cifar)
    sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    torch_weights.assign_from_torch(resnet18_cifar, sd)


def test_mismatch_names_the_tensor_and_assigns_nothing(resnet18_cifar):
    resnet18 = _simsiam("resnet18", proj_layers=2)
    sd = torch_weights.to_torch_state_dict(resnet18)
    before = [v.numpy().copy() for v in resnet18_cifar.weights]
    with pytest.raises(ValueError) as err:
        torch_weights.assign_from_torch(resnet18_cifar, sd)
    assert str(err.value) == (
        "checkpoint tensor encoder.conv1.weight has shape (64, 3, 7, 7); the model expects "
        "(64, 3, 3, 3) (model.backbone=resnet18_cifar, projector output 64, predictor hidden 16)"
    )
    for v, value in zip(resnet18_cifar.weights, before):
        np.testing.assert_array_equal(v.numpy(), value)


def test_resnet18_into_resnet50_is_refused(resnet50):
    resnet18 = _simsiam("resnet18", proj_layers=3, dim=128, hidden=2048)
    sd = torch_weights.to_torch_state_dict(resnet18)
    with pytest.raises(
        ValueError, match=r"encoder.layer1.0.conv1.weight has shape \(64, 64, 3, 3\)"
    ):
        torch_weights.assign_from_torch(resnet50, sd)


def test_missing_and_unexpected_tensors(resnet18_cifar):
    sd = torch_weights.to_torch_state_dict(resnet18_cifar)
    missing = {k: v for k, v in sd.items() if k != "predictor.3.bias"}
    with pytest.raises(ValueError, match="checkpoint has no tensor predictor.3.bias"):
        torch_weights.assign_from_torch(resnet18_cifar, missing)
    extra = dict(sd, **{"encoder.fc.9.weight": np.zeros((3, 3), np.float32)})
    with pytest.raises(ValueError, match="checkpoint tensor encoder.fc.9.weight is unexpected"):
        torch_weights.assign_from_torch(resnet18_cifar, extra)
    prefixed = {f"module.{k}": v for k, v in sd.items()}
    with pytest.raises(ValueError, match="no tensor encoder.conv1.weight"):
        torch_weights.assign_from_torch(resnet18_cifar, prefixed)


def test_layers_are_found_by_name_not_position(resnet18_cifar):
    """Layers without weights (padding, pooling) do not shift the mapping."""
    backbone = resnet18_cifar.backbone
    order = torch_weights.backbone_to_torch_state_dict(backbone)
    shuffled = types.SimpleNamespace(layers=backbone.layers[::-1])  # same names, other order
    assert [layer.name for layer in shuffled.layers][-1] == "images"
    assert list(torch_weights.backbone_to_torch_state_dict(shuffled)) == list(order)


def test_linear_eval_layout(resnet18_cifar):
    backbone_sd = torch_weights.backbone_to_torch_state_dict(resnet18_cifar.backbone)
    rng = np.random.default_rng(0)
    fc_w, fc_b = rng.normal(0, 1, (10, 512)), rng.normal(0, 1, (10,))
    sd = dict(backbone_sd, **{"fc.weight": fc_w, "fc.bias": fc_b})
    backbone, kernel, bias = torch_weights.split_linear_eval(sd)
    assert list(backbone) == list(backbone_sd)
    np.testing.assert_array_equal(kernel, fc_w.T)
    np.testing.assert_array_equal(bias, fc_b)
    torch_weights.assign_backbone_from_torch(resnet18_cifar.backbone, backbone)
    with pytest.raises(ValueError, match="no tensor fc.weight"):
        torch_weights.split_linear_eval(backbone_sd)


def test_cnn_small_has_no_official_layout():
    c = default_config().model
    c.backbone, c.width, c.proj_dim, c.proj_hidden, c.pred_hidden = "cnn_small", 4, 8, 8, 4
    net = model.build_simsiam(c)
    with pytest.raises(ValueError, match="'conv1' has no torchvision ResNet counterpart"):
        torch_weights.to_torch_state_dict(net)
