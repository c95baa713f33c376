"""Pretrains SimSiam. The command lives in simsiam_tf/cli/train.py (installed as `simsiam-train`)."""

import cli  # noqa: F401  (first: a quiet TensorFlow start-up)

from simsiam_tf.cli.train import *  # noqa: F401,F403
from simsiam_tf.cli.train import run_command

if __name__ == "__main__":
    run_command()
