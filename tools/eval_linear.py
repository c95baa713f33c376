"""Linear evaluation of a pretraining run: a linear classifier on the frozen backbone. The command lives in simsiam_tf/cli/eval_linear.py (installed as `simsiam-eval-linear`)."""

import cli  # noqa: F401  (first: a quiet TensorFlow start-up)

from simsiam_tf.cli.eval_linear import *  # noqa: F401,F403
from simsiam_tf.cli.eval_linear import run_command

if __name__ == "__main__":
    run_command()
