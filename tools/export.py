"""Exports a trained run's encoder as a new version of a TF Serving model. The command lives in simsiam_tf/cli/export.py (installed as `simsiam-export`)."""

import cli  # noqa: F401  (first: a quiet TensorFlow start-up)

from simsiam_tf.cli.export import *  # noqa: F401,F403
from simsiam_tf.cli.export import run_command

if __name__ == "__main__":
    run_command()
