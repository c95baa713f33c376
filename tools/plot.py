"""Pictures of a pretraining run: training curves and a nearest-neighbour retrieval grid. The command lives in simsiam_tf/cli/plot.py (installed as `simsiam-plot`)."""

import cli  # noqa: F401  (first: a quiet TensorFlow start-up)

from simsiam_tf.cli.plot import *  # noqa: F401,F403
from simsiam_tf.cli.plot import run_command

if __name__ == "__main__":
    run_command()
