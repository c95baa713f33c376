"""What every tool shares (a quiet start, one-line errors): simsiam_tf/cli/__init__.py.

Import this module before TensorFlow (first among a tool's imports): `import cli`.
"""

from simsiam_tf.cli import *  # noqa: F401,F403
from simsiam_tf.cli import EXIT_USAGE, USER_ERRORS, fail, run, stop  # noqa: F401
