"""Keeping native libraries' known noise off the console, and nothing else.

TensorFlow's C++ libraries and libjpeg write to file descriptor 2 directly, so Python's
sys.stderr and logging levels cannot reach them. `native_stderr_filtered` captures the
descriptor for a block and replays every line that is not known noise. No TensorFlow import
here: the tools use it around `import tensorflow`.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile

# Lines the native libraries print at load time, before TF_CPP_MIN_LOG_LEVEL applies.
STARTUP_NOISE = re.compile(
    r"All log messages before absl::InitializeLog\(\) is called"
    r"|oneDNN custom operations are on"
    r"|cpu_feature_guard\.cc"
    r"|This TensorFlow binary is optimized to use available CPU instructions"
    r"|^To enable the following instructions: .*rebuild TensorFlow"
    r"|Unable to register cu(DNN|FFT|BLAS) factory"
)
# libjpeg's (and TensorFlow's jpeg_mem.cc) messages on broken or damaged files; the image check
# names such files itself.
LIBJPEG_NOISE = re.compile(
    r"^(Input file read error|Premature end of JPEG file|Corrupt JPEG data|Not a JPEG file"
    r"|Invalid JPEG file structure|Unsupported marker type|Bogus marker length"
    r"|Huffman table 0x[0-9a-f]+ was not defined|Warning: unknown JFIF revision"
    r"|Improper call to JPEG library in state \d+)"
    r"|jpeg_mem\.cc:\d+\] "  # TensorFlow's own lines about the same files
)


class native_stderr_filtered:
    """Runs a block with file descriptor 2 captured; replays the lines `noise` does not match."""

    def __init__(self, noise: re.Pattern):
        self.noise = noise

    def __enter__(self):
        sys.stderr.flush()
        self._saved = os.dup(2)
        self._capture = tempfile.TemporaryFile(mode="w+b")
        os.dup2(self._capture.fileno(), 2)
        return self

    def __exit__(self, *exc):
        sys.stderr.flush()
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._capture.seek(0)
        for line in self._capture.read().decode("utf-8", "replace").splitlines(True):
            if not self.noise.search(line):
                sys.stderr.write(line)
        self._capture.close()
        sys.stderr.flush()
        return False


def progress_verbosity() -> int:
    """Keras verbosity for a progress bar: 1 (a redrawn bar) on a terminal, 2 (one line at the
    end) when stdout is a file or a pipe (nohup, SLURM, CI). Keras's own test for a terminal
    is true on every POSIX system, so a log would fill with backspaces."""
    return 1 if sys.stdout.isatty() else 2
