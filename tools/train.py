"""Pretrains SimSiam.

  python tools/train.py --config=configs/cifar10_resnet18.py --workdir=runs/cifar10 \
      [--config.optim.epochs=100 --config.data.source=folder:/data/images ...]

Rerunning the same command resumes from the last checkpoint in --workdir.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from simsiam_tf import callbacks, train
from simsiam_tf.errors import ConfigError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (created; resumed if it exists).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    try:
        summary = train.train(_CONFIG.value, _WORKDIR.value)
    except ConfigError as err:
        sys.exit(f"error: {err}")
    except callbacks.NonFiniteLossError as err:
        sys.exit(f"error: {err}")
    except train.Preempted as err:
        logging.warning("%s", err)
        sys.exit(143)
    logging.info("summary: %s", summary)
    print(" ".join(f"{k}={v}" for k, v in summary.items()))


if __name__ == "__main__":
    app.run(main)
