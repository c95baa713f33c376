"""The native per-image kernels (kernels/augment_ops.cc): build, find and load them.

tf.data runs the recipe one example at a time on the host CPU. There the crop's resize and the
colour jitter, written with stock TensorFlow ops, make some 25 memory-bound passes over each
view's pixels; the C++ kernels make one or two. They compute what `augment`'s per-image kernels
compute, to float rounding (tests/test_native.py), and only those: the batched kernels that run
on an accelerator (device mode) stay stock TensorFlow.

The library is compiled against the installed TensorFlow wheel with its own compile flags (about
25 s of g++): `make install` does it, or `python -m simsiam_tf.native`. It lands beside the
source, or in ~/.cache/simsiam_tf where the package's folder is read-only, named by the
TensorFlow version, so an upgrade of TensorFlow asks for a new build rather than loading a
stale one. `aug.kernels` picks what runs: "auto" (native where built, else stock ops, with one
warning), "native" (an error before training when not built), "tf" (stock ops).
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Optional

from absl import logging

from simsiam_tf.errors import ConfigError

_KERNELS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels")
SOURCE = os.path.join(_KERNELS_DIR, "augment_ops.cc")
# One library: the pipeline's kernels and BatchNorm's training step (model.BatchNorm).
SOURCES = (SOURCE, os.path.join(_KERNELS_DIR, "batchnorm_ops.cc"))
KERNELS = ("auto", "native", "tf")
BUILD_COMMAND = "python -m simsiam_tf.native"


class NativeBuildError(RuntimeError):
    """The native kernels could not be compiled."""


def _library_name() -> str:
    import tensorflow as tf

    return f"_augment_ops-tf{tf.__version__}.so"


def _places() -> list:
    """Where the library is built and looked for: beside the source, then the user's cache."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return [os.path.dirname(SOURCE), os.path.join(cache, "simsiam_tf")]


def library_path() -> Optional[str]:
    """The built library for this TensorFlow, if one at least as new as its source exists."""
    newest = max(os.path.getmtime(source) for source in SOURCES)
    for place in _places():
        path = os.path.join(place, _library_name())
        if os.path.exists(path) and os.path.getmtime(path) >= newest:
            return path
    return None


def compiler() -> Optional[str]:
    """The C++ compiler ($CXX, else g++), or None where there is none."""
    return shutil.which(os.environ.get("CXX", "g++"))


def build_command(cxx: str, output: str) -> list:
    import tensorflow as tf

    return [
        cxx,
        "-std=c++17",
        "-shared",
        "-fPIC",
        "-O3",
        # a * b + c rounded as TensorFlow's separate multiply and add round it
        "-ffp-contract=off",
        # FP exceptions are never trapped, so both sides of a select may be computed: the
        # loops with selects vectorise (results unchanged: no reassociation)
        "-fno-trapping-math",
        "-Wno-deprecated-declarations",
        *tf.sysconfig.get_compile_flags(),
        *SOURCES,
        "-o",
        output,
        *tf.sysconfig.get_link_flags(),
    ]


def build(force: bool = False) -> str:
    """Compiles the kernels for the installed TensorFlow, unless an up-to-date build exists.

    Returns the library's path. Raises NativeBuildError when there is no compiler or g++ fails
    (its message carries the compiler's output).
    """
    if not force and library_path() is not None:
        return library_path()
    cxx = compiler()
    if cxx is None:
        raise NativeBuildError(
            f"no C++ compiler: {os.environ.get('CXX', 'g++')} is not on PATH (install g++ or set "
            "CXX); the pipeline runs on stock TensorFlow ops without it (aug.kernels='tf')"
        )
    errors = []
    for place in _places():
        try:
            os.makedirs(place, exist_ok=True)
            # Compiled to a temporary name, then renamed: a concurrent loader never sees half.
            fd, partial = tempfile.mkstemp(suffix=".so", dir=place)
            os.close(fd)
        except OSError as e:
            errors.append(f"{place}: {e}")
            continue
        start = time.monotonic()
        proc = subprocess.run(build_command(cxx, partial), capture_output=True, text=True)
        if proc.returncode != 0:
            os.unlink(partial)
            raise NativeBuildError(f"building {' '.join(SOURCES)} failed:\n{proc.stderr[-4000:]}")
        output = os.path.join(place, _library_name())
        os.replace(partial, output)
        logging.info("Built %s in %.1f s", output, time.monotonic() - start)
        return output
    raise NativeBuildError("no writable place for the native kernels: " + "; ".join(errors))


@functools.lru_cache(maxsize=None)
def _load(path: str):
    import tensorflow as tf

    return tf.load_op_library(path)


@functools.lru_cache(maxsize=None)
def _warn_not_built(setting: str):
    what = {
        "aug.kernels": "the pipeline runs the crop and colour jitter on stock TensorFlow ops "
        "(about 1.5x the CPU time a pair",
        "model.bn_kernels": "BatchNorm's training step runs on stock TensorFlow ops (about "
        "4.5x its time",
    }[setting]
    logging.warning(
        "The native kernels are not built for this TensorFlow, so %s; docs/PERFORMANCE.md). "
        "Build them with `%s` (make install does).",
        what,
        BUILD_COMMAND,
    )


def ops(kernels: str = "auto", setting: str = "aug.kernels"):
    """The loaded op library for `kernels` ("auto", "native", "tf"), or None for stock ops.

    "native" raises ConfigError when the library is not built; "auto" then warns once.
    `setting` is the config key the choice came from, for the messages.
    """
    if kernels not in KERNELS:
        raise ConfigError(f"{setting}={kernels!r}: choose one of {KERNELS}")
    if kernels == "tf":
        return None
    path = library_path()
    if path is None:
        if kernels == "native":
            raise ConfigError(
                f"{setting}='native' but the native kernels are not built for this "
                f"TensorFlow: run `{BUILD_COMMAND}`, or set {setting}='auto' or 'tf'"
            )
        _warn_not_built(setting)
        return None
    return _load(path)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    force = "--force" in argv
    try:
        path = build(force=force)
    except NativeBuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    _load(path)  # the ops register: the build links and loads
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
