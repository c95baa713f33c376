"""simsiam_tf.torch_import: official checkpoints (as NumPy) -> run directories, without torch.

The checkpoints here are made with torch_weights.to_torch_state_dict; tests/test_import_torch.py
makes them with torchvision instead, where torch is installed.
"""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from simsiam_tf import torch_import, torch_weights, train
from simsiam_tf.config import default_config

_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def _config(**model):
    c = default_config()
    c.model.backbone = "resnet18_cifar"
    c.model.proj_dim, c.model.proj_hidden, c.model.pred_hidden = 32, 64, 8
    c.model.update(model)
    c.data.image_size = 16
    c.optim.batch_size = 16
    c.optim.fix_pred_lr = True
    return c


def _official(config, epoch=4, seed=1):
    """An official pretraining checkpoint: `module.` names, random weights and statistics, the
    projector's frozen bias (with the running mean that includes it), SGD state of the
    --fix-pred-lr param groups (a buffer for every parameter but the frozen bias)."""
    keras.utils.set_random_seed(seed)
    net, _ = train.build_model_and_optimizer(config, 1)
    rng = np.random.default_rng(seed)
    for v in net.weights:
        value = (
            rng.uniform(0.5, 2.0, v.shape) if "variance" in v.path else rng.normal(0, 1, v.shape)
        )
        v.assign(value.astype(np.float32))
    sd = torch_weights.to_torch_state_dict(net)
    last = f"encoder.fc.{3 * (config.model.proj_layers - 1)}"
    bias = rng.normal(0, 1, sd[f"{last}.bias"].shape).astype(np.float32)
    sd[f"{last}.bias"] = bias
    sd[f"{last[:-1]}{int(last[-1]) + 1}.running_mean"] += bias
    params = [n for n in sd if n.rsplit(".", 1)[-1] not in _BUFFERS]
    encoder = [i for i, n in enumerate(params) if n.startswith("encoder.")]
    predictor = [i for i, n in enumerate(params) if n.startswith("predictor.")]
    state = {
        i: {"momentum_buffer": rng.normal(0, 1, sd[n].shape).astype(np.float32)}
        for i, n in enumerate(params)
        if n != f"{last}.bias"
    }
    raw = {
        "epoch": epoch,
        "arch": "resnet18",
        "state_dict": {f"module.{k}": v for k, v in sd.items()},
        "optimizer": {
            "state": state,
            "param_groups": [
                {"params": encoder, "fix_lr": False, "lr": 0.06},
                {"params": predictor, "fix_lr": True, "lr": 0.06},
            ],
        },
    }
    return raw, net, params


def test_pretraining_checkpoint_becomes_a_run(tmp_path):
    config = _config()
    raw, source, params = _official(config)
    ckpt = torch_import.parse(raw)
    assert ckpt.layout == torch_import.PRETRAINING and ckpt.epoch == 4 and ckpt.arch == "resnet18"
    assert len(ckpt.momentum) == len(params) - 1  # all but the frozen bias
    workdir = str(tmp_path / "run")
    info = torch_import.write_run(ckpt, config, workdir, 5, origin="c.pth.tar")
    assert info["step"] == 20 and info["epochs_done"] == 4
    assert info["momentum_buffers"] == len(params) - 1
    for name in ("config.json", "backbone.weights.h5", "import.json", "history.jsonl"):
        assert os.path.exists(os.path.join(workdir, name)), name

    restored = train.load_config(workdir)
    assert restored.model.to_dict() == config.model.to_dict()
    assert not restored.eval.random_init_knn
    net, opt = train.build_model_and_optimizer(restored, 5)
    latest = tf.train.latest_checkpoint(os.path.join(workdir, "checkpoints"))
    tf.train.Checkpoint(model=net, optimizer=opt).restore(latest).assert_consumed()
    assert int(opt.iterations.numpy()) == 20  # train.py resumes at epoch 20 // 5 = 4
    # The weights are the source's exactly, the frozen bias folded into the output BN.
    for got, want in zip(net.weights, source.weights):
        np.testing.assert_allclose(
            got.numpy(), want.numpy(), rtol=1e-6, atol=1e-6, err_msg=got.path
        )
    # Momentum buffers, in the Keras layouts.
    tensors = {t.name: t for t in torch_weights.simsiam_tensors(net)}
    state = raw["optimizer"]["state"]
    for i, name in enumerate(params):
        if i not in state:
            continue
        t = tensors[name]
        got = opt.momentums[opt._get_variable_index(t.variable)].numpy()
        want = torch_weights.from_torch_layout(state[i]["momentum_buffer"], t.kind)
        np.testing.assert_array_equal(got, want, err_msg=name)
    with open(os.path.join(workdir, "history.jsonl")) as f:
        assert json.loads(f.readline()) == {"epoch": 4, "imported_from": "c.pth.tar"}

    with pytest.raises(ValueError, match="already holds a run"):
        torch_import.write_run(ckpt, config, workdir, 5, origin="c.pth.tar")


def test_step_zero_imports_for_evaluation_only(tmp_path):
    config = _config()
    raw, source, _ = _official(config)
    info = torch_import.write_run(
        torch_import.parse(raw), config, str(tmp_path / "run"), 0, origin="c"
    )
    assert info["step"] == 0 and info["momentum_buffers"] == 0
    assert not os.path.exists(tmp_path / "run" / "history.jsonl")
    backbone = train.build_model_and_optimizer(config, 1)[0].backbone
    backbone.load_weights(str(tmp_path / "run" / "backbone.weights.h5"))
    for got, want in zip(backbone.weights, source.backbone.weights):
        np.testing.assert_array_equal(got.numpy(), want.numpy())


def test_mismatch_is_refused_before_writing(tmp_path):
    raw, _, _ = _official(_config())
    workdir = tmp_path / "run"
    with pytest.raises(ValueError) as err:
        torch_import.write_run(
            torch_import.parse(raw), _config(proj_layers=3), str(workdir), 5, origin="c"
        )
    # fc.3 is the 2-layer projector's output Linear, the 3-layer one's second hidden Linear.
    assert str(err.value) == (
        "checkpoint tensor encoder.fc.3.weight has shape (32, 64); the model expects (64, 64) "
        "(config model.backbone=resnet18_cifar, proj_layers=3, proj_hidden=64, proj_dim=32, "
        "pred_hidden=8; checkpoint arch=resnet18)"
    )
    assert "checkpoint arch=resnet18" in str(err.value)
    assert not workdir.exists()


def test_linear_eval_checkpoint(tmp_path):
    config = _config()
    _, source, _ = _official(config)
    sd = torch_weights.backbone_to_torch_state_dict(source.backbone)
    fc = np.random.default_rng(0).normal(0, 1, (10, 512)).astype(np.float32)
    sd.update({"fc.weight": fc, "fc.bias": np.zeros(10, np.float32)})
    ckpt = torch_import.parse({"epoch": 90, "arch": "resnet18", "state_dict": sd})
    assert ckpt.layout == torch_import.LINEAR_EVAL
    info = torch_import.write_run(ckpt, config, str(tmp_path / "run"), 0, origin="c")
    assert info["projector"].startswith("initialised")
    np.testing.assert_array_equal(np.load(tmp_path / "run" / "classifier.npz")["kernel"], fc.T)


def test_parse_refuses_other_files():
    with pytest.raises(ValueError, match="no `state_dict`"):
        torch_import.parse({"model": 1})
    with pytest.raises(ValueError, match="lacks the `module.` prefix"):
        torch_import.parse({"state_dict": {"module.a": np.zeros(1), "b": np.zeros(1)}})
    with pytest.raises(ValueError, match="neither `encoder.\\*`"):
        torch_import.parse({"state_dict": {"backbone.conv.weight": np.zeros(1)}})
    sd = {"encoder.conv1.weight": np.zeros(1), "predictor.0.weight": np.zeros(1)}
    with pytest.raises(ValueError, match="optimizer has 1 parameters, its state_dict 2"):
        torch_import.parse({"state_dict": sd, "optimizer": {"param_groups": [{"params": [0]}]}})
