"""Weighted kNN evaluation of a pretraining run (the SimSiam authors' CIFAR monitor). The command lives in simsiam_tf/cli/eval_knn.py (installed as `simsiam-eval-knn`)."""

import cli  # noqa: F401  (first: a quiet TensorFlow start-up)

from simsiam_tf.cli.eval_knn import *  # noqa: F401,F403
from simsiam_tf.cli.eval_knn import run_command

if __name__ == "__main__":
    run_command()
