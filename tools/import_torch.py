"""Imports a checkpoint of the official PyTorch SimSiam (facebookresearch/simsiam) as a run.

  python tools/import_torch.py --checkpoint=checkpoint_0099.pth.tar \
      --config=configs/imagenet_resnet50.py --workdir=runs/official_r50 [--steps_per_epoch=N]

Reads main_simsiam.py's pretraining checkpoints (`module.encoder.*`, projector included, and
`module.predictor.*`) and main_lincls.py's linear-evaluation checkpoints (a torchvision ResNet
with the classifier `fc`), and writes a run directory that tools/eval_knn.py,
tools/eval_linear.py, tools/export.py and tools/train.py accept (see simsiam_tf/torch_import.py).
A checkpoint whose tensors do not fit the config's model is refused before anything is written,
naming the first tensor that differs.

--steps_per_epoch: the steps of one epoch of the run that would continue pretraining from the
checkpoint; the run's step is then epoch x steps_per_epoch, so train.py resumes after the
checkpoint's epochs, at the same point of the cosine schedule. Default: counted from the
config's data source (ImageNet train at batch 512: 1281167 // 512 = 2502); when that data is
not at hand, 0. 0: step 0, all that evaluation and export need (train.py would pretrain from
epoch 0 starting at these weights). A checkpoint whose `optimizer` is empty or missing imports
the weights alone, the momentum buffers at zero. Official weights into TF Serving:

  python tools/import_torch.py --checkpoint=C.pth.tar --config=configs/imagenet_resnet50.py \
      --workdir=runs/official_r50
  python tools/export.py --workdir=runs/official_r50 --export_dir=exports/official_r50

Needs torch (requirements-parity.txt); training, evaluation and serving never import it.
"""

import json
import os
import pickle
import sys

try:  # before anything imports TensorFlow: torch's libraries must load first
    import torch
except ImportError:
    torch = None

from absl import app, flags, logging
from ml_collections import config_flags

from simsiam_tf import torch_import
from simsiam_tf.errors import ConfigError

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "An official .pth.tar checkpoint.")
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Recipe file whose model the checkpoint holds.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory to create (must not hold a run).")
_STEPS = flags.DEFINE_integer(
    "steps_per_epoch", -1, "Steps of one epoch to continue with (-1: count the data; 0: step 0)."
)
flags.mark_flags_as_required(["checkpoint", "config", "workdir"])


def load_checkpoint(path: str) -> dict:
    """A .pth.tar as nested dicts and lists with NumPy arrays for tensors (no code is run:
    weights_only)."""
    if torch is None:
        raise ImportError(
            "tools/import_torch.py needs torch: pip install -r requirements-parity.txt"
        )
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--checkpoint={path}: no such file")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError) as err:
        raise ValueError(
            f"--checkpoint={path} cannot be read by torch.load(weights_only=True) "
            f"({type(err).__name__}): not a torch checkpoint, or one that holds objects other "
            "than tensors, numbers, strings and containers"
        ) from err

    def to_numpy(x):
        if isinstance(x, torch.Tensor):
            return x.detach().cpu().numpy()
        if isinstance(x, dict):
            return {k: to_numpy(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(to_numpy(v) for v in x)
        return x

    return to_numpy(raw)


def main(argv):
    del argv
    config, steps = _CONFIG.value, _STEPS.value
    try:
        ckpt = torch_import.parse(load_checkpoint(_CHECKPOINT.value))
        logging.info(
            "%s: %s layout, arch %s, epoch %s, %d momentum buffers",
            _CHECKPOINT.value,
            ckpt.layout,
            ckpt.arch,
            ckpt.epoch,
            len(ckpt.momentum),
        )
        if steps < 0:
            steps = 0
            if ckpt.layout == torch_import.PRETRAINING and ckpt.epoch:
                try:
                    steps = torch_import.count_steps_per_epoch(config)
                except Exception as err:  # noqa: BLE001 - any failure to read the data
                    logging.warning(
                        "config.data.source=%r cannot be read (%s): imported at step 0, for "
                        "evaluation and export; to continue pretraining, import again with "
                        "--steps_per_epoch=N, the steps of one epoch of the run that will "
                        "continue (ImageNet at batch 512: 2502)",
                        config.data.source,
                        err,
                    )
        info = torch_import.write_run(ckpt, config, _WORKDIR.value, steps, origin=_CHECKPOINT.value)
    except (ConfigError, ValueError, FileNotFoundError, ImportError) as err:
        sys.exit(f"error: {err}")
    print(json.dumps(info))


if __name__ == "__main__":
    app.run(main)
