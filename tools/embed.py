"""Embeds an image folder with an exported SavedModel; answers nearest-neighbour queries. The command lives in simsiam_tf/cli/embed.py (installed as `simsiam-embed`)."""

import cli  # noqa: F401  (first: a quiet TensorFlow start-up)

from simsiam_tf.cli.embed import *  # noqa: F401,F403
from simsiam_tf.cli.embed import run_command

if __name__ == "__main__":
    run_command()
