"""tools/import_torch.py: official PyTorch checkpoints in, TF Serving out.

Checkpoints are made here independently with torchvision, as facebookresearch/simsiam's
builder.py and main_simsiam.py / main_lincls.py lay them out, with random weights and BatchNorm
statistics; each is imported, exported, and the served embedding of real photos compared with
the torch backbone's output for the same preprocessed pixels. Skipped where torch is absent
(`make parity` installs it; requirements-parity.txt).
"""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import REPO
from tests.export_helpers import sample_photos

if not all(importlib.util.find_spec(m) for m in ("torch", "torchvision")):
    pytest.skip("torch and torchvision not installed (make parity)", allow_module_level=True)

SIZE = 64  # small inputs: every stride-2 layer of the ImageNet ResNets still sees even sizes


class Official:
    """A checkpoint made by tests/official_torch.py (its own process: torchvision imported
    after TensorFlow crashes the interpreter), and the torch model's outputs."""

    def __init__(self, path, **model):
        self.path = str(path)
        self.flags = [f"--{k}={v}" for k, v in model.items() if not isinstance(v, bool)]
        self.flags += [f"--{k}" for k, v in model.items() if v is True]
        _tool("tests/official_torch.py", "make", f"--out={self.path}", *self.flags)
        self.ref = np.load(f"{self.path}.ref.npz")

    def outputs(self, pixels) -> dict:
        """The torch backbone's (`embedding`) and projector's (`z`) outputs in eval mode."""
        np.save(f"{self.path}.pixels.npy", pixels)
        result = f"{self.path}.result.npz"
        _tool(
            "tests/official_torch.py",
            "embed",
            f"--out={self.path}",
            *self.flags,
            f"--pixels={self.path}.pixels.npy",
            f"--result={result}",
        )
        return dict(np.load(result))


def _tool(*args, ok=True):
    cmd = [sys.executable, *args]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=900)
    if ok:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _import(checkpoint, workdir, config, *overrides, ok=True):
    return _tool(
        "tools/import_torch.py",
        f"--checkpoint={checkpoint}",
        f"--config={config}",
        f"--workdir={workdir}",
        *overrides,
        ok=ok,
    )


R18 = [  # the ImageNet config with torchvision's resnet18 (builder.py: hidden = 512 = prev_dim)
    "--config.model.backbone=resnet18",
    "--config.model.proj_hidden=512",
    "--config.model.proj_dim=128",
    "--config.model.pred_hidden=32",
    f"--config.data.image_size={SIZE}",
]


def _served(export_dir, size, crop_fraction):
    """Served embeddings of the sample photos (serving_bytes, the TF Serving client path) and the
    pixels the export's preprocessing makes of them (`decode.decode_eval`: a JPEG decoded at
    the DCT scale that keeps the region at least twice the output size)."""
    from simsiam_tf import decode

    loaded = tf.saved_model.load(export_dir)
    photos = sample_photos()
    out = loaded.signatures["serving_bytes"](image_bytes=tf.constant(list(photos.values())))
    pixels = np.stack([decode.decode_eval(b, size, crop_fraction).numpy() for b in photos.values()])
    # serving_default on the image that serving_bytes decodes (at its DCT scale).
    china = photos["china.jpg"]
    height, width = tf.unstack(tf.shape(tf.io.decode_jpeg(china))[:2])
    ratio = int(decode.eval_jpeg_ratio(height, width, size, crop_fraction))
    served = loaded.signatures["serving_default"](images=decode.decode_rgb(china, ratio)[None])
    assert _relative_l2(served["embedding"].numpy(), out["embedding"].numpy()[:1]) <= 1e-5
    return out["embedding"].numpy(), pixels


def _relative_l2(a, b):
    return float(np.max(np.linalg.norm(a - b, axis=-1) / np.linalg.norm(b, axis=-1)))


def _export(workdir, tmp_path, *flags):
    _tool("tools/export.py", f"--workdir={workdir}", f"--export_dir={tmp_path / 'export'}", *flags)
    return str(tmp_path / "export" / "1")


def test_resnet18_pretraining_checkpoint_served_equals_torch(tmp_path):
    official = Official(
        tmp_path / "checkpoint_0002.pth.tar", arch="resnet18", epoch=3, dim=128, pred_dim=32
    )
    workdir = tmp_path / "run"
    proc = _import(
        official.path, workdir, "configs/imagenet_resnet50.py", *R18, "--steps_per_epoch=10"
    )
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["layout"] == "pretraining" and info["step"] == 30 and info["epochs_done"] == 3
    # Every trainable parameter (all but the frozen bias) has a buffer after one SGD step.
    assert info["momentum_buffers"] == official.ref["buffers"] == official.ref["trainable"]

    embedding, pixels = _served(_export(workdir, tmp_path, "--projection"), SIZE, 0.875)
    torch_out = official.outputs(pixels)
    assert _relative_l2(embedding, torch_out["embedding"]) <= 1e-4

    # The projector too (its frozen bias folded into the BN running mean), and the run's state.
    from simsiam_tf import train

    config = train.load_config(str(workdir))
    assert config.model.backbone == "resnet18" and not config.eval.random_init_knn
    net, opt = train.build_model_and_optimizer(config, 10)
    restored = tf.train.Checkpoint(model=net, optimizer=opt)
    restored.restore(tf.train.latest_checkpoint(str(workdir / "checkpoints"))).assert_consumed()
    assert int(opt.iterations.numpy()) == 30
    z = net.projector(net.backbone(tf.constant(pixels), training=False), training=False)
    assert _relative_l2(z.numpy(), torch_out["z"]) <= 1e-4
    conv = net.backbone.get_layer("stage2_block1_conv1").kernel
    np.testing.assert_array_equal(
        opt.momentums[opt._get_variable_index(conv)].numpy(),
        official.ref["layer2_conv1"].transpose(2, 3, 1, 0),
    )
    bias = net.predictor.get_layer("fc2").bias
    np.testing.assert_array_equal(
        opt.momentums[opt._get_variable_index(bias)].numpy(), official.ref["predictor_bias"]
    )

    # The evaluation tools take the run as it is.
    out = _tool(
        "tools/eval_knn.py",
        f"--workdir={workdir}",
        "--data=builtin:digits",
        "--bank_split=train",
        "--query_split=test",  # the ImageNet recipe's query split is val
        "--max_bank=100",
        "--max_queries=50",
        "--random_init_baseline=false",
    ).stdout
    assert "knn_top1=" in out


@pytest.mark.parametrize("optimizer", ["empty", "missing"])
def test_weights_without_optimizer_or_data_import_for_serving(tmp_path, optimizer):
    """A checkpoint whose `optimizer` is `{}` or absent, and a config whose data is not at hand:
    the import needs neither. The weights come in at step 0 with zero momentum, each said in one
    line, and the served embedding of real photos is torch's."""
    official = Official(
        tmp_path / "checkpoint_0099.pth.tar",
        arch="resnet18",
        epoch=100,
        dim=128,
        pred_dim=32,
        optimizer=optimizer,
    )
    workdir = tmp_path / "run"
    # The recipe's TFDS imagenet2012, which is not prepared here (and not downloadable).
    no_data = [
        f"--config.data.tfds_data_dir={tmp_path / 'tfds'}",
        "--config.data.tfds_download=false",
    ]
    proc = _import(official.path, workdir, "configs/imagenet_resnet50.py", *R18, *no_data)
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (info["step"], info["steps_per_epoch"], info["momentum_buffers"]) == (0, 0, 0)
    assert "the momentum buffers start at zero" in proc.stderr
    assert "cannot be read" in proc.stderr and "--steps_per_epoch=N" in proc.stderr
    embedding, pixels = _served(_export(workdir, tmp_path, "--projection"), SIZE, 0.875)
    assert _relative_l2(embedding, official.outputs(pixels)["embedding"]) <= 1e-4


def test_cifar_resnet18_continues_pretraining(tmp_path):
    """The CIFAR recipe (resnet18_cifar, 2-layer projector): train.py resumes after the
    checkpoint's epochs, at the step the import set, from the imported weights."""
    official = Official(
        tmp_path / "checkpoint_0000.pth.tar",
        arch="resnet18",
        epoch=1,
        dim=64,
        pred_dim=16,
        proj_layers=2,
        cifar=True,
    )
    workdir = tmp_path / "run"
    flags = [
        "--config.model.proj_hidden=512",
        "--config.model.proj_dim=64",
        "--config.model.pred_hidden=16",
        "--config.data.source=builtin:digits",
        "--config.data.image_size=16",
        "--config.optim.batch_size=16",
        "--config.train.steps_per_epoch=2",
        "--config.optim.epochs=2",
        "--config.eval.max_bank=100",
        "--config.eval.max_queries=50",
        "--config.train.verbose=2",
    ]
    proc = _import(official.path, workdir, "configs/cifar10_resnet18.py", *flags)
    info = json.loads(proc.stdout.splitlines()[-1])
    assert info["steps_per_epoch"] == 2 and info["step"] == 2  # counted from the data
    embedding, pixels = _served(_export(workdir, tmp_path), 16, 1.0)
    assert _relative_l2(embedding, official.outputs(pixels)["embedding"]) <= 1e-4

    proc = _tool(
        "tools/train.py", "--config=configs/cifar10_resnet18.py", f"--workdir={workdir}", *flags
    )
    out = proc.stdout + proc.stderr
    assert "Resumed from" in out and "step 2: epoch 1, batch 0" in out
    assert "Epoch 2/2" in out and "Epoch 1/2" not in out
    with open(workdir / "history.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [r["epoch"] for r in rows] == [1, 2] and "imported_from" in rows[0]
    with open(workdir / "summary.json") as f:
        summary = json.load(f)
    assert summary["epochs"] == 2 and np.isfinite(summary["loss_last"])


def test_linear_eval_checkpoint(tmp_path):
    official = Official(tmp_path / "model_best.pth.tar", layout="linear_eval", arch="resnet18")
    workdir = tmp_path / "run"
    proc = _import(official.path, workdir, "configs/imagenet_resnet50.py", *R18)
    info = json.loads(proc.stdout.splitlines()[-1])
    assert info["layout"] == "linear_eval" and info["step"] == 0
    head = np.load(workdir / "classifier.npz")
    np.testing.assert_array_equal(head["kernel"], official.ref["fc_weight"].T)
    embedding, pixels = _served(_export(workdir, tmp_path, "--projection"), SIZE, 0.875)
    assert _relative_l2(embedding, official.outputs(pixels)["embedding"]) <= 1e-4


def test_architecture_mismatch_is_refused_before_writing(tmp_path):
    official = Official(tmp_path / "checkpoint_0099.pth.tar", arch="resnet18", dim=128, pred_dim=32)
    workdir = tmp_path / "run"
    proc = _import(
        official.path, workdir, "configs/imagenet_resnet50.py", "--steps_per_epoch=0", ok=False
    )
    assert proc.returncode != 0
    assert (
        "error: checkpoint tensor encoder.layer1.0.conv1.weight has shape (64, 64, 3, 3); the "
        "model expects (64, 64, 1, 1) (config model.backbone=resnet50" in proc.stderr
    )
    assert "checkpoint arch=resnet18" in proc.stderr
    assert not workdir.exists()

    garbage = tmp_path / "notes.pth.tar"
    garbage.write_text("not a checkpoint")
    proc = _import(garbage, workdir, "configs/imagenet_resnet50.py", ok=False)
    assert proc.returncode != 0 and "cannot be read by torch.load" in proc.stderr
    assert not workdir.exists()


@pytest.mark.slow
def test_resnet50_at_224_served_equals_torch(tmp_path):
    """The released checkpoints' architecture at their resolution (3-layer 2048-d projector)."""
    official = Official(tmp_path / "checkpoint_0099.pth.tar", arch="resnet50", epoch=100)
    workdir = tmp_path / "run"
    _import(official.path, workdir, "configs/imagenet_resnet50.py", "--steps_per_epoch=2502")
    embedding, pixels = _served(_export(workdir, tmp_path), 224, 0.875)
    assert _relative_l2(embedding, official.outputs(pixels)["embedding"]) <= 1e-4
